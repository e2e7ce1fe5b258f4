"""End-to-end training with the DeepSpeed engine through the real local launcher: 2 gloo ranks, ZeRO-2 on
the CPU accelerator (DS_ACCELERATOR=cpu, set by the engine), real MDS shards, gradient accumulation (micro
batch 4 -> 2 micro-batches per rank per step). The trainer is the same as for FSDP2; only the config differs.

Helpers and the dataset fixture come from tests/integration/test_train_resume.py (the FSDP2 end-to-end tests). The
uninterrupted reference run and the 2-rank resume of the killed run train on the shared ranks of tests/dist_utils.py
(the same trainer without a launch); the killed run and the 1-rank resume are launched.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from dist_utils import train_on_shared_ranks
from test_train_resume import (
    CONFIG,
    REPO,
    TOTAL_STEPS,
    complete_steps,
    dataset,  # noqa: F401 - a fixture
    kill_tree,
    losses,
    resume_shared,
    run,
    start,
    wait_for,
)

pytestmark = pytest.mark.timeout(600)

DS = ("engine.kind=deepspeed", "engine.zero_stage=2", "train.micro_batch_size=4")
QUIET = ("wandb.mode=disabled", *DS)


def _tensors(obj, prefix=""):
    """Every tensor inside a nested checkpoint object, by path."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}.{i}"))
    return out


def ds_state(run_dir, step):
    """Model states, every rank's ZeRO optimizer partition (same world size -> same layout) and the EMA."""
    root = run_dir / "checkpoints" / f"step_{step:07d}" / "deepspeed" / "model"
    flat = {}
    for f in sorted((root / "state").glob("*.pt")) + [root / "ema.pt"]:
        for k, v in _tensors(torch.load(f, map_location="cpu", weights_only=False)).items():
            flat[f"{f.name}:{k}"] = v
    return flat


@pytest.fixture(scope="module")
def ds_reference(dataset, tmp_path_factory):
    """An uninterrupted 16-step ZeRO-2 run (shared ranks)."""
    run_dir = tmp_path_factory.mktemp("ds_ref") / "run"
    assert train_on_shared_ranks(REPO / CONFIG, [f"data.path={dataset}", f"run_dir={run_dir}", *QUIET]) == 0
    return run_dir


def test_deepspeed_run_learns_checkpoints_and_exports(ds_reference):
    from launchers.experiment import load_config
    from models.lightningdit import build_model
    from models.loading import load_into_model

    log = losses(ds_reference)
    assert sorted(log) == list(range(1, TOTAL_STEPS + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in log.values())
    assert complete_steps(ds_reference) == [8, 12, 16]
    last = ds_reference / "checkpoints" / f"step_{TOTAL_STEPS:07d}"
    assert (last / "deepspeed" / "model" / "state").is_dir() and (last / "deepspeed" / "model" / "ema.pt").is_file()
    assert sorted(p.name for p in (last / "extra").iterdir()) == ["rank00000.pt", "rank00001.pt"]
    # tools/export.py (the script) on the run directory: the newest checkpoint, loadable into a freshly built
    # LightningDiT (official key names), EMA and raw weights
    out = ds_reference / "export.pt"
    res = subprocess.run(
        [sys.executable, "tools/export.py", str(ds_reference), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"step_{TOTAL_STEPS:07d}" in res.stdout
    model = build_model(load_config(ds_reference / "config.yaml").model)
    assert load_into_model(model, out, which="ema").ok and load_into_model(model, out, which="model").ok


@pytest.fixture(scope="module")
def ds_killed(dataset, tmp_path_factory):
    """A ZeRO-2 run whose every process was SIGKILLed after its step-4 checkpoint, before step 8's. The tests resume
    copies of it: on 2 ranks (bit-exact) and on 1 rank (universal checkpoint)."""
    run_dir = tmp_path_factory.mktemp("ds_killed") / "run"
    proc = start(run_dir, dataset, overrides=QUIET, LLAT_DEBUG_STEP_SLEEP=0.4)
    try:
        wait_for(lambda: 4 in complete_steps(run_dir), proc)
    finally:
        kill_tree(proc)
    return run_dir


def test_deepspeed_bit_exact_resume_after_sigkill(dataset, ds_reference, ds_killed, tmp_path):
    """SIGKILL every process after the step-4 checkpoint; the resumed run crosses the timestep-phase switch
    and ends bit-identical to the uninterrupted one: losses, weights, ZeRO optimizer partitions, EMA."""
    run_dir = tmp_path / "run"
    shutil.copytree(ds_killed, run_dir)
    killed_at = max(losses(run_dir))
    assert 4 <= killed_at < 8, killed_at

    code, text = resume_shared(run_dir, dataset, *QUIET)
    assert code == 0, text
    assert "resumed from step 4" in text
    assert losses(run_dir) == losses(ds_reference)
    got, ref = ds_state(run_dir, TOTAL_STEPS), ds_state(ds_reference, TOTAL_STEPS)
    assert got.keys() == ref.keys() and any("optim_states" in k for k in got) and any("ema.pt" in k for k in got)
    assert [k for k in ref if not torch.equal(got[k], ref[k])] == []


def test_deepspeed_resume_on_one_rank_via_universal_checkpoint(dataset, ds_reference, ds_killed, tmp_path):
    """The killed 2-rank run's step-4 checkpoint resumed on 1 rank through DeepSpeed's universal checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(ds_killed, run_dir)
    assert complete_steps(run_dir)[-1] == 4
    # keep_last 4: the step-4 checkpoint (with the universal checkpoint made from it) outlives the run's retention
    res = run(run_dir, dataset, nproc=1, overrides=(*QUIET, "checkpoint.keep_last=4"))
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    assert "resumed from step 4" in text and "different world size" in text and "universal checkpoint" in text
    assert (run_dir / "checkpoints" / "step_0000004" / "deepspeed" / "model" / "universal" / "zero").is_dir()
    log = losses(run_dir)
    assert sorted(log) == list(range(1, TOTAL_STEPS + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in log.values())
    assert {s: log[s] for s in range(1, 5)} == {s: losses(ds_reference)[s] for s in range(1, 5)}
