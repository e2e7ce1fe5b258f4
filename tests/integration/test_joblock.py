"""One job per run directory (core/joblock.py): ranks of a SIGKILLed launcher exit, a second job on a live run
directory is refused naming the owner, and a killed job leaves no stale lock. Real launches of launchers/local.py
(2 gloo ranks) and train.py on the toy latent dataset."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from test_train_resume import CONFIG, REPO, _env, start, wait_for, write_toy_latents

pytestmark = pytest.mark.timeout(300)


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children() if any("train.py" in a for a in p.cmdline())]


def _train_py(run_dir: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", CONFIG, f"data.path={data}", f"run_dir={run_dir}", "wandb.mode=disabled"]
    return subprocess.run([*cmd, *overrides], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=200)


def test_killed_launcher_takes_its_ranks_and_its_lock(tmp_path):
    from core.joblock import lock_owner

    data = write_toy_latents(tmp_path / "mds")
    run_dir = tmp_path / "run"
    job = start(run_dir, data, overrides=("wandb.mode=disabled",), LLAT_DEBUG_STEP_SLEEP=0.5)
    ranks: list[psutil.Process] = []
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(_ranks(job)) == 2, job)
        ranks = _ranks(job)
        owner = lock_owner(run_dir)
        holder = next(p for p in ranks if f"pid {p.pid}," in (owner or ""))  # rank 0 holds the lock
        assert f"host {socket.gethostname()}" in owner and "is in use by a live job" in owner, owner

        # A second launch on the same run directory: refused before it starts a rank, naming the owner.
        second = subprocess.run(
            [sys.executable, "launchers/local.py", "--nproc", "2", CONFIG, f"data.path={data}", f"run_dir={run_dir}"],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert (
            f"error: run directory {run_dir} is in use by a live job (host {socket.gethostname()}, " in (second.stderr)
            and f"pid {holder.pid}," in second.stderr
        ), second.stderr[-3000:]
        assert job.poll() is None and all(p.is_running() for p in ranks)  # the first job goes on

        # SIGKILL the launcher alone (not its process group): the kernel kills its ranks (PR_SET_PDEATHSIG).
        t0 = time.time()
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        gone, alive = psutil.wait_procs(ranks, timeout=5)
        assert not alive, f"ranks still running {time.time() - t0:.1f} s after the launcher died: {alive}"
    finally:
        if job.poll() is None:  # only on failure: the launcher and ranks this test started
            job.kill()
        for p in ranks:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    # ... and left no stale lock: a new job on the run directory is accepted and trains.
    assert lock_owner(run_dir) is None
    res = _train_py(run_dir, data, "train.max_steps=1", "checkpoint.resume=false", "checkpoint.every_steps=100")
    assert res.returncode == 0, res.stderr[-3000:]


def test_rank_zero_refuses_a_run_dir_that_a_live_process_owns(tmp_path):
    """The check in the ranks themselves (torchrun, Slurm): train.py run directly while this test process holds
    the lock; once released, lock_owner sees a free run directory."""
    from core.joblock import RunDirLock

    data = write_toy_latents(tmp_path / "mds")
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):
        res = _train_py(run_dir, data, "train.max_steps=1")
    assert res.returncode == 2, res.stderr[-3000:]
    assert (
        f"error: run directory {run_dir} is in use by a live job (host {socket.gethostname()}, pid {os.getpid()}, "
        in (res.stderr)
    ), res.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists()  # nothing was trained
