"""End-to-end training through the real local launcher: 2 gloo ranks, FSDP2, real MDS shards. The uninterrupted
reference run, which the interrupted and resumed runs must equal, trains on the shared ranks of tests/dist_utils.py
(the same trainer without a launch); so do the resumes of the launched runs that were SIGKILLed or signalled (a
resume on 1 rank is launched).

The tiny config runs 4 epochs of 4 steps (64 samples, global batch 16) and switches lognorm -> uniform
timestep sampling at epoch 2 (step 8). A checkpoint is written every 4 steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tools import check_host_sync

from dist_utils import train_on_shared_ranks, train_on_shared_ranks_logged

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny_dit.yaml"
TOTAL_STEPS = 16
REQUEUE = 75

pytestmark = pytest.mark.timeout(600)


def write_toy_latents(out: Path) -> Path:
    """64 class-dependent 3x16x16 'latents' (identity tokenizer) with their flips, as MDS shards at ``out``."""
    return check_host_sync.write_toy_latents(out, 64, size_limit=4096)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_toy_latents(tmp_path_factory.mktemp("data") / "mds")


def _cmd(run_dir: Path, data: Path, nproc: int, overrides) -> list[str]:
    return [
        sys.executable,
        "launchers/local.py",
        "--nproc",
        str(nproc),
        CONFIG,
        f"data.path={data}",
        f"run_dir={run_dir}",
        *overrides,
    ]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(run_dir, data, nproc=2, overrides=("wandb.mode=disabled",), **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(run_dir, data, nproc, overrides), cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=300
    )


def start(run_dir, data, nproc=2, overrides=("wandb.mode=disabled",), **env) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(run_dir, data, nproc, overrides),
        cwd=REPO,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def resume_shared(run_dir: Path, data: Path, *overrides: str) -> tuple[int, str]:
    """The run continued on the shared ranks (a resume is the trainer's work, not the launcher's: the runs that are
    killed or signalled are launched for real); its exit code and log."""
    return train_on_shared_ranks_logged(REPO / CONFIG, [f"data.path={data}", f"run_dir={run_dir}", *overrides])


def complete_steps(run_dir: Path) -> list[int]:
    """Steps of the run's committed checkpoints, oldest first."""
    from core.checkpoint import complete_checkpoints

    return [step for step, _ in complete_checkpoints(run_dir / "checkpoints")]


def wait_for(predicate, proc: subprocess.Popen, timeout=180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at once (torchelastic puts ranks in their own
    sessions, so a process-group kill would miss them) — what a node failure does."""
    import psutil

    procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait()


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def final_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor (model, EMA, optimizer) of a checkpoint, gathered into one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run_dir / f"consolidated_{step}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step_{step:07d}" / "state", out)
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    walk("", torch.load(out, weights_only=False))
    return flat


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    kinds = {k.split(".")[1] for k in a}
    assert {"model", "ema", "optim"} <= kinds, kinds
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted 16-step run (shared ranks)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    assert (
        train_on_shared_ranks(REPO / CONFIG, [f"data.path={dataset}", f"run_dir={run_dir}", "wandb.mode=disabled"]) == 0
    )
    return run_dir


def test_reference_run_switches_phase_and_learns(reference):
    log = losses(reference)
    assert sorted(log) == list(range(1, TOTAL_STEPS + 1))
    phases = {}
    for line in (reference / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        phases[rec["step"]] = rec["timestep_phase"]
    # Steps are numbered from 1 after the update; step index 8 (epoch 2.0) is the first uniform one.
    assert [phases[s] for s in range(1, 9)] == [0] * 8
    assert [phases[s] for s in range(9, 17)] == [1] * 8
    assert complete_steps(reference) == [8, 12, 16]  # keep_last 3
    assert (reference / "config.yaml").exists()


@pytest.fixture(scope="module")
def killed(dataset, tmp_path_factory) -> Path:
    """A run (W&B offline) whose whole process tree was SIGKILLed after its step-4 checkpoint, before step 8's. The
    tests resume copies of it: on 2 ranks (bit-exact) and on 1 rank (another world size)."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    proc = start(run_dir, dataset, overrides=("wandb.mode=offline",), LLAT_DEBUG_STEP_SLEEP=0.4)
    try:
        wait_for(lambda: 4 in complete_steps(run_dir), proc)
    finally:
        kill_tree(proc)
    return run_dir


def test_bit_exact_resume_after_sigkill(dataset, reference, killed, tmp_path):
    """Kill -9 the whole process group after the step-4 checkpoint; the resumed run crosses the
    lognorm -> uniform switch and ends bit-identical to the uninterrupted one."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(killed, run_dir)
    killed_at = max(losses(run_dir))
    assert 4 <= killed_at < 8, killed_at
    run_id = (run_dir / "wandb_run_id").read_text()

    code, text = resume_shared(run_dir, dataset, "wandb.mode=offline")
    assert code == 0, text
    assert "resumed from step 4" in text
    assert losses(run_dir) == losses(reference)
    assert_same_state(final_state(run_dir, TOTAL_STEPS), final_state(reference, TOTAL_STEPS))
    # The resumed job continued the same W&B run (offline run directories carry the id).
    assert (run_dir / "wandb_run_id").read_text() == run_id
    assert any(run_id in p.name for p in (run_dir / "wandb").glob("offline-run-*"))


def test_sigusr1_checkpoints_and_exits_with_requeue_code(dataset, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(
        run_dir, dataset, overrides=("wandb.mode=disabled", "checkpoint.every_steps=100"), LLAT_DEBUG_STEP_SLEEP=0.4
    )
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 2, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE, out
    steps = complete_steps(run_dir)
    assert len(steps) == 1 and 2 <= steps[0] < TOTAL_STEPS, steps
    assert f"stopped on a signal at step {steps[0]}" in out

    code, text = resume_shared(run_dir, dataset, "wandb.mode=disabled", "checkpoint.every_steps=100")
    assert code == 0, text
    assert losses(run_dir) == losses(reference)


def test_resume_on_fewer_ranks(dataset, reference, killed, tmp_path):
    """The killed 2-rank run's step-4 checkpoint resumed on 1 rank."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(killed, run_dir)
    assert complete_steps(run_dir)[-1] == 4
    res = run(run_dir, dataset, nproc=1)
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout + res.stderr
    assert "resumed from step 4" in text and "different world size" in text
    log = losses(run_dir)
    assert sorted(log) == list(range(1, TOTAL_STEPS + 1))
    assert all(np.isfinite(v) for v in log.values())
    # Up to the reshard the run is the reference run.
    assert {s: log[s] for s in range(1, 5)} == {s: losses(reference)[s] for s in range(1, 5)}


def test_corrupt_latest_checkpoint_falls_back_to_previous(dataset, reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    data_files = sorted((run_dir / "checkpoints" / "step_0000016" / "state").glob("*.distcp"))
    assert data_files
    with open(data_files[0], "r+b") as f:
        f.truncate(max(1, os.path.getsize(data_files[0]) // 3))
    code, text = resume_shared(run_dir, dataset, "wandb.mode=disabled", "train.epochs=5")
    assert code == 0, text
    assert "step_0000016" in text and "resumed from step 12" in text
    assert max(losses(run_dir)) == 20


def test_bad_config_key_is_a_clear_error(dataset, tmp_path, capsys):
    """train.py's main() in process: a config error returns 2 before any process group exists."""
    import train

    code = train.main([str(REPO / CONFIG), f"data.path={dataset}", "train.global_batchsize=8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.global_batchsize" in err and "global_batch_size" in err


def test_batch_not_divisible_by_world_size(dataset, tmp_path):
    res = run(tmp_path / "run", dataset, nproc=2, overrides=("wandb.mode=disabled", "train.global_batch_size=15"))
    assert res.returncode != 0
    assert "15" in res.stderr + res.stdout and "world size 2" in res.stderr + res.stdout
