"""VA-VAE on the DeepSpeed engine: ZeRO-1, 2 and 3 train the full objective (L1 + LPIPS + KL + VF with its adaptive
weight + PatchGAN with its adaptive weight and ``disc_start``, two optimizers) on the shared trainer step and agree
with the FSDP2 engine on 2 gloo ranks; bit-exact resume after SIGKILL, resume on one rank through DeepSpeed's
universal checkpoint and tools/export.py through the real launcher, on ZeRO-3.

configs/tiny_vavae.yaml at 16 px: its DINOv2 ViT and LPIPS VGG16 are RANDOMLY INITIALISED (``random_init: true``).
Every ZeRO-3 run sets ``engine.zero3_persistence_threshold=0``: with DeepSpeed's default (parameters of up to 1e5
elements stay gathered) every parameter of the tiny models would be persistent, and ZeRO-3's gather/release hooks,
which the adaptive weights' extra ``autograd.grad`` passes go through, would never release anything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_utils import run_distributed
from test_train_vavae import CONFIG, REPO, TOTAL, _cmd, _env, kill_after_checkpoint, records, train_shared

pytestmark = pytest.mark.usefixtures("one_thread")

TINY16 = [
    "data.image_size=16",
    "vavae.model.resolution=16",
    "vavae.model.attn_resolutions=[8]",
    "vavae.disc.n_layers=2",
    "vavae.loss.disc_start=1",
]
# Adam's eps raised from 1e-8 for the parity runs only. Several parameters of the autoencoder have a gradient that
# is zero in exact arithmetic (a conv bias followed by GroupNorm, the attention key bias: softmax is shift-
# invariant); in fp32 it is rounding noise (~1e-9) that depends on the order of the gradient reduction (FSDP2's
# reduce-scatter vs DeepSpeed's bucketed reduction), up to ~1e-6 with this loss scale (the nll is a per-image sum),
# and Adam with eps 1e-8 turns it into +-lr updates of arbitrary sign. With eps 1e-2 such noise moves a weight by
# < 1e-7; both engines run the same (changed) update rule, which is what this test compares.
PARITY_EPS = ["optimizer.eps=1e-2", "vavae.disc_optimizer.eps=1e-2"]
STEPS = 3  # step 0 before disc_start (GAN terms off), steps 1-2 with them
ZERO3 = ["engine.zero_stage=3", "engine.zero3_persistence_threshold=0"]  # every parameter partitioned (module doc)


def _train(dist, kind: str, stage: int):
    """STEPS training steps (2 micro-batches of 2 images per rank each) of the real task through the trainer's
    ``train_step`` on ``kind`` (ZeRO ``stage``); returns every step's metrics and both parts' full weights."""
    from core.engines import build_engine
    from core.trainer import train_step
    from launchers.experiment import load_config
    from models.tasks.vavae import VAVAETask

    engine_overrides = ZERO3 if stage == 3 else [f"engine.zero_stage={stage}"]
    cfg = load_config(REPO / CONFIG, TINY16 + PARITY_EPS + [f"engine.kind={kind}", *engine_overrides])
    task = VAVAETask(cfg, dist)
    engine = build_engine(cfg.engine, dist)
    parts = {
        n: engine.prepare(n, s.module, s.optimizer, s.ema_decay, blocks_attr=s.blocks_attr, grad_clip=s.grad_clip)
        for n, s in task.build_models().items()
    }
    g = torch.Generator().manual_seed(100 + dist.rank)
    log = []
    for step in range(STEPS):
        batches = [{"image": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1} for _ in range(2)]
        metrics, finite = train_step(task, engine, parts, batches, SimpleNamespace(step=step))
        assert finite
        log.append({k: float(v) for k, v in metrics.items()})
    return log, {n: p.full_state_dict("model") for n, p in parts.items()}


@pytest.fixture(scope="module")
def fsdp2_run():
    return run_distributed(_train, world_size=2, args=("fsdp2", 2), timeout_s=240)[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_fsdp2_across_disc_start(fsdp2_run, stage):
    """Losses (every logged metric, the adaptive weights included) and weights after 3 steps equal the FSDP2 run's
    within fp32 tolerance: relative 1e-5 for the metrics and 1e-5 (relative to max(1, |w|)) for the weights. The
    engines compute the same sums in another order (gradient reduction, grad-norm partial sums), so they differ by
    fp32 rounding (~1e-7 relative per operation); the tolerances leave two orders of magnitude for its growth over
    3 Adam steps. Measured here: ZeRO-1 equal to FSDP2 bit for bit, ZeRO-2 within 3e-7 (metrics), ZeRO-3 within
    5e-7 (metrics) and 1.2e-7 (weights). ZeRO-3 runs with every parameter partitioned (module doc): each adaptive
    weight's autograd.grad pass gathers again the sub-modules it goes through (DeepSpeedPart.set_partial_grads)."""
    log, weights = run_distributed(_train, world_size=2, args=("deepspeed", stage), timeout_s=240)[0]
    ref_log, ref_weights = fsdp2_run
    assert [m["autoencoder/disc_factor"] for m in log] == [0.0, 1.0, 1.0]
    assert all(m["autoencoder/d_weight"] > 0 and m["discriminator/loss"] > 0 for m in log[1:])
    assert all(m["autoencoder/vf_weight"] > 0 for m in log)
    for step, (got, ref) in enumerate(zip(log, ref_log)):
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (step, key)
    assert weights.keys() == ref_weights.keys()
    for part in ref_weights:
        assert weights[part].keys() == ref_weights[part].keys()
        for key, ref in ref_weights[part].items():
            got = weights[part][key]
            scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
            assert float((got - ref).abs().max()) <= 1e-5 * scale, (part, key)


# ------------------------------------------------------------------------------------ end to end (launcher)
DS = ["engine.kind=deepspeed", *ZERO3]


def _run(run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = _cmd(run_dir, [*DS, *overrides])
    cmd[cmd.index("--nproc") + 1] = str(nproc)
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400, check=False)


def _ds_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Both parts' model states, every rank's ZeRO optimizer partition and ema.pt, by file and key."""
    from test_train_deepspeed import _tensors

    flat = {}
    for part in ("autoencoder", "discriminator"):
        root = run_dir / "checkpoints" / f"step_{step:07d}" / "deepspeed" / part
        for f in sorted((root / "state").glob("*.pt")) + [root / "ema.pt"]:
            for k, v in _tensors(torch.load(f, map_location="cpu", weights_only=False)).items():
                flat[f"{part}/{f.name}:{k}"] = v
    return flat


@pytest.fixture(scope="module")
def ds_reference(tmp_path_factory) -> Path:
    """An uninterrupted 12-step ZeRO-3 run, checkpoints every 4 steps (shared ranks)."""
    run_dir = tmp_path_factory.mktemp("ds_vavae_ref") / "run"
    train_shared(run_dir, *DS, "checkpoint.every_steps=4")
    return run_dir


@pytest.mark.timeout(600)
def test_deepspeed_vavae_bit_exact_resume_after_sigkill(ds_reference, tmp_path):
    """SIGKILL every process after the step-4 checkpoint; the resumed run crosses disc_start (step 6) and the epoch
    boundary (step 8) and ends bit-identical: every logged value, both parts' weights, ZeRO optimizer partitions
    and the discriminator's BatchNorm statistics."""
    log = records(ds_reference)
    assert sorted(log) == list(range(1, TOTAL + 1))
    assert [log[s]["autoencoder/disc_factor"] for s in range(1, TOTAL + 1)] == [0.0] * 6 + [1.0] * 6
    assert all(log[s]["autoencoder/d_weight"] > 0 for s in range(7, TOTAL + 1))
    run_dir = tmp_path / "run"
    assert 4 <= kill_after_checkpoint(run_dir, [*DS, "checkpoint.every_steps=4"], 4, timeout=300) < 8
    assert "resumed from step 4" in train_shared(run_dir, *DS, "checkpoint.every_steps=4")  # the resume: shared ranks
    assert records(run_dir) == records(ds_reference)
    got, ref = _ds_state(run_dir, TOTAL), _ds_state(ds_reference, TOTAL)
    assert got.keys() == ref.keys() and any("optim_states" in k for k in got)
    assert any("running_mean" in k for k in got)
    assert [k for k in ref if not torch.equal(got[k], ref[k])] == []


@pytest.mark.timeout(600)
def test_deepspeed_vavae_universal_resume_on_one_rank_and_export(ds_reference, tmp_path, capsys):
    """The step-8 checkpoint of the 2-rank run resumed on 1 rank (DeepSpeed universal checkpoint, both parts), and
    tools/export.py (--part autoencoder / discriminator) on the DeepSpeed run: files the VA-VAE loaders read."""
    import shutil

    from models.vavae import load_vavae_state

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ds_reference / "checkpoints" / "step_0000008", run_dir / "checkpoints" / "step_0000008")
    shutil.copy(ds_reference / "metrics.jsonl", run_dir / "metrics.jsonl")
    res = _run(run_dir, "checkpoint.every_steps=100", nproc=1)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-4000:]
    assert "resumed from step 8" in text and "universal checkpoint" in text
    for part in ("autoencoder", "discriminator"):
        assert (run_dir / "checkpoints" / "step_0000008" / "deepspeed" / part / "universal" / "zero").is_dir()
    log = records(run_dir)
    assert all(torch.isfinite(torch.tensor(log[s]["autoencoder/loss"])) for s in range(9, TOTAL + 1))

    # tools/export.py --part autoencoder / discriminator: the files the VA-VAE loaders read
    from models.losses import NLayerDiscriminator

    # the script for the autoencoder, its main() in this process for the discriminator (no second interpreter start)
    from tools import export

    out = tmp_path / "autoencoder.pt"
    res = subprocess.run(
        [sys.executable, "tools/export.py", str(ds_reference), str(out), "--part", "autoencoder"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"step_{TOTAL:07d}" in res.stdout
    capsys.readouterr()
    assert export.main([str(ds_reference), str(tmp_path / "discriminator.pt"), "--part", "discriminator"]) == 0
    assert f"step_{TOTAL:07d}" in capsys.readouterr().out
    assert load_vavae_state(tmp_path / "autoencoder.pt").autoencoder
    disc = torch.load(tmp_path / "discriminator.pt", weights_only=False)["model"]
    NLayerDiscriminator(3, 16, 2).load_state_dict(disc, strict=True)
