"""VA-VAE training end to end: the shared trainer through the real local launcher (2 gloo ranks, FSDP2; the run that
is SIGKILLed; the reference and the resume run on the shared ranks of tests/dist_utils.py), bit-exact resume after
SIGKILL across the discriminator start and an epoch boundary, the tokenizer and the
next-stage warm start from the run's checkpoint, and a tiny VA-VAE whose reconstruction PSNR rises.

configs/tiny_vavae.yaml at 16 px: its DINOv2 ViT and LPIPS VGG16 are RANDOMLY INITIALISED
(``random_init: true``), no weight files, no downloads.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_utils import train_on_shared_ranks_logged
from test_train_resume import complete_steps, final_state, kill_tree

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny_vavae.yaml"
# 16 px images (latent 4x8x8), global batch 4 over 32 images: 8 steps per epoch; 12 steps cross the epoch boundary;
# the GAN terms start at step index 6 (metrics line 7).
SMALL = [
    "data.image_size=16",
    "vavae.model.resolution=16",
    "vavae.model.attn_resolutions=[8]",
    "vavae.disc.n_layers=2",
    "data.synthetic_num_samples=32",
    "train.global_batch_size=4",
    "train.max_steps=12",
    "vavae.loss.disc_start=6",
    "wandb.mode=disabled",
]
TOTAL = 12
TIMING_KEYS = {"img_per_s", "step_time_s", "data_wait_frac", "mfu"}

pytestmark = [pytest.mark.timeout(400), pytest.mark.usefixtures("one_thread")]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cmd(run_dir: Path, overrides) -> list[str]:
    return [sys.executable, "launchers/local.py", "--nproc", "2", CONFIG, f"run_dir={run_dir}", *SMALL, *overrides]


def train_shared(run_dir: Path, *overrides: str) -> str:
    """The run on the shared ranks of tests/dist_utils.py (no launch: for runs whose launch is not what the test
    checks, e.g. the uninterrupted references and the resumes of killed runs); returns what it logged."""
    code, text = train_on_shared_ranks_logged(REPO / CONFIG, [f"run_dir={run_dir}", *SMALL, *overrides])
    assert code == 0, text
    return text


def records(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items() if k not in TIMING_KEYS}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 12-step run (final checkpoint only; shared ranks)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train_shared(run_dir, "checkpoint.every_steps=100")
    return run_dir


def kill_after_checkpoint(run_dir: Path, overrides: list[str], step: int, timeout: float) -> int:
    """Start the training (0.5 s per step), SIGKILL its whole process tree once the step-``step`` checkpoint is
    complete; returns the last step it logged."""
    proc = subprocess.Popen(
        _cmd(run_dir, overrides),
        cwd=REPO,
        env=_env(LLAT_DEBUG_STEP_SLEEP=0.5),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + timeout
        while step not in complete_steps(run_dir):
            if proc.poll() is not None:
                raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
            assert time.time() < deadline, f"timed out waiting for the step-{step} checkpoint"
            time.sleep(0.05)
    finally:
        kill_tree(proc)
    return max(records(run_dir))


def test_reference_run_crosses_disc_start(reference):
    log = records(reference)
    assert sorted(log) == list(range(1, TOTAL + 1))
    # Steps are logged after the update: line s is step index s-1; disc_start 6 -> lines 7.. have the GAN terms.
    assert [log[s]["autoencoder/disc_factor"] for s in range(1, TOTAL + 1)] == [0.0] * 6 + [1.0] * 6
    assert all(log[s]["discriminator/loss"] == 0.0 and log[s]["discriminator/grad_norm"] == 0.0 for s in range(1, 7))
    assert all(log[s]["discriminator/loss"] > 0 and log[s]["autoencoder/d_weight"] > 0 for s in range(7, 13))
    assert all(log[s]["autoencoder/vf_weight"] > 0 and math.isfinite(log[s]["autoencoder/loss"]) for s in log)
    assert complete_steps(reference) == [TOTAL]


def test_bit_exact_resume_after_sigkill(reference, tmp_path):
    """SIGKILL every process after the step-4 checkpoint; the resumed run crosses disc_start (step 6) and the
    epoch boundary (step 8) and ends bit-identical: every logged value and every checkpoint tensor (both parts'
    weights and Adam moments, the discriminator's BatchNorm statistics). The resumed run uses hybrid sharding
    (HSDP, 2 replicas x 1 shard) on the fully sharded checkpoint: with 2 ranks every gradient reduction is one
    addition either way, so the layouts agree bit for bit — except the logged gradient norms (each rank sums the
    squares of the whole gradient instead of half of it: last-ulp differences; no clipping here, so no effect)."""
    run_dir = tmp_path / "run"
    killed_at = kill_after_checkpoint(run_dir, ["checkpoint.every_steps=4"], 4, timeout=240)
    assert 4 <= killed_at < 8, killed_at  # the next checkpoint would be step 8

    text = train_shared(run_dir, "checkpoint.every_steps=4", "engine.sharding=hybrid", "engine.shard_group_size=1")
    assert "resumed from step 4" in text
    got_log, ref_log = records(run_dir), records(reference)
    norms = [k for k in ref_log[TOTAL] if k.endswith("grad_norm")]
    for step in ref_log:
        for k in norms:
            assert got_log[step].pop(k) == pytest.approx(ref_log[step].pop(k), rel=1e-6), (step, k)
    assert got_log == ref_log
    got, ref = final_state(run_dir, TOTAL), final_state(reference, TOTAL)
    assert got.keys() == ref.keys()
    kinds = {k.split(".")[0] + "." + k.split(".")[1] for k in ref}
    assert {"autoencoder.model", "autoencoder.optim", "discriminator.model", "discriminator.optim"} <= kinds, kinds
    assert any("running_mean" in k for k in ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), f"{k} differs"


def test_tokenizer_and_next_stage_from_run_checkpoint(reference):
    from data.tokenizers import build_tokenizer
    from launchers.experiment import load_config
    from models.loading import load_checkpoint_state
    from models.tasks.vavae import VAVAETask

    ckpt = reference / "checkpoints" / f"step_{TOTAL:07d}"
    weights = load_checkpoint_state(ckpt, which="autoencoder.model")
    # The tokenizer reads the architecture from the run's saved config.
    tok = build_tokenizer("vavae", checkpoint=str(ckpt))
    assert tok.latent_shape(16) == (4, 8, 8)
    assert torch.equal(tok.model.decoder.conv_out.weight, weights["decoder.conv_out.weight"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert tok.decode(tok.encode(x, sample=True, generator=torch.Generator().manual_seed(0))).shape == x.shape

    # Next stage: vavae.init_from=<this checkpoint> warm-starts autoencoder, projection and discriminator.
    cfg = load_config(
        REPO / CONFIG,
        SMALL
        + [
            f"vavae.init_from={ckpt}",
            "vavae.loss.disc_start=1",
            "vavae.vf.cos_margin=0.5",
            "vavae.vf.distmat_margin=0.25",
        ],
    )
    task = VAVAETask(cfg, SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")))
    specs = task.build_models()
    for k, v in weights.items():
        assert torch.equal(specs["autoencoder"].module.state_dict()[k], v), k
    disc = load_checkpoint_state(ckpt, which="discriminator.model")
    for k, v in disc.items():
        assert torch.equal(specs["discriminator"].module.state_dict()[k], v), k


# --------------------------------------------------------------------------------------- it learns
def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    a = torch.clamp(127.5 * x + 128, 0, 255).to(torch.uint8).float()
    b = torch.clamp(127.5 * y + 128, 0, 255).to(torch.uint8).float()
    mse = ((a - b) ** 2).mean(dim=[1, 2, 3]).clamp_min(1e-10)
    return float((20 * torch.log10(255.0 / mse.sqrt())).mean())


@pytest.mark.timeout(120)
def test_tiny_vavae_psnr_rises():
    """The task's losses and two Adam optimizers on plain modules (no launcher): L1 + KL + VF (tiny random DINOv2,
    adaptive weight) + GAN from step 100, on 16 px synthetic images; PSNR on held-out images rises."""
    from core.engines.base import build_optimizer
    from data.synthetic import SyntheticImages
    from launchers.experiment import load_config
    from models.tasks.vavae import VAVAETask

    torch.manual_seed(0)
    cfg = load_config(
        REPO / CONFIG,
        SMALL
        + [
            "vavae.loss.perceptual_weight=0",
            "vavae.loss.disc_start=100",
            "optimizer.lr=2e-3",
            "vavae.disc_optimizer.lr=2e-3",
        ],
    )
    task = VAVAETask(cfg, SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")))
    specs = task.build_models()
    ae, disc = specs["autoencoder"].module, specs["discriminator"].module
    opt_ae = build_optimizer(ae.parameters(), cfg.optimizer, torch.device("cpu"))
    opt_d = build_optimizer(disc.parameters(), cfg.vavae.disc_optimizer, torch.device("cpu"))
    data = SyntheticImages(264, image_size=16, num_classes=10, seed=1)
    train = torch.stack([data[i][0] for i in range(256)])
    held_out = torch.stack([data[i][0] for i in range(256, 264)])

    @torch.no_grad()
    def psnr() -> float:
        return _psnr(held_out, ae.decode(ae.encode(held_out).mode()))

    before = psnr()
    g = torch.Generator().manual_seed(0)
    for step in range(160):
        x = train[torch.randint(0, 256, (4,), generator=g)]
        loss, m, recon = task.autoencoder_loss(x, ae, disc, step)
        opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        opt_ae.step()
        d_loss, _ = task.discriminator_loss(x, recon, disc, step)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        assert math.isfinite(float(m["loss"])) and math.isfinite(float(d_loss.detach()))
    after = psnr()
    assert m["d_weight"] > 0 and m["vf_weight"] > 0
    assert after > before + 4.0, (before, after)  # ~9 dB -> ~15 dB
