"""One job per run directory: the run-directory lock, and ranks that exit when their launcher dies.

The lock is a POSIX record lock (``fcntl.lockf``) on ``<run_dir>/job.lock``, held by rank 0 of the training job
from before the trainer starts until ``train.main`` returns. The kernel releases it when that process ends, however
it ends (SIGKILL included), so a killed job never leaves it stale; it is not inherited by forked children (data
loader workers), and it works across the nodes of a cluster on NFS (and Lustre mounted with ``flock``). The holder
writes its host, pid, Slurm job id and start time into the file so that a refused job can name it.

Who holds it: rank 0's process, not the launcher, so that every way of starting ranks (``launchers/local.py``,
``torchrun``, Slurm through submitit) is covered; a Slurm requeue or an elastic rank restart starts a new rank 0
only after the old one is gone (the kernel has released the lock by then). ``launchers/local.py`` also tests the
lock before it starts any rank, for a quick refusal.

A rank started by ``launchers/local.py`` (torch elastic starts each rank in a session of its own, so a killed
launcher would otherwise leave them training) asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``): ``exit_with_launcher`` at the start of ``train.py``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["LAUNCHER_PID_ENV", "LOCK_NAME", "RunDirBusy", "RunDirLock", "exit_with_launcher", "lock_owner"]

LOCK_NAME = "job.lock"
LAUNCHER_PID_ENV = "LLAT_LAUNCHER_PID"  # set by launchers/local.py for its ranks
_PR_SET_PDEATHSIG = 1


class RunDirBusy(RuntimeError):
    """Another live job holds the run directory's lock."""


def _owner_text(run_dir: Path, info: dict[str, Any]) -> str:
    who = f"host {info.get('host', '?')}, pid {info.get('pid', '?')}"
    if info.get("slurm_job_id"):
        who += f", Slurm job {info['slurm_job_id']}"
    if info.get("started"):
        who += f", started {info['started']}"
    return (
        f"run directory {run_dir} is in use by a live job ({who}); one job per run directory: stop that job "
        f"or choose another run_dir"
    )


def _read_info(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


class RunDirLock:
    """The lock of one run directory, held by this process until ``release`` (or its end)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> RunDirLock:
        """Take the lock or raise ``RunDirBusy`` naming the job that holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)  # this process holds no lock on the file: closing drops nothing
            raise RunDirBusy(_owner_text(self.run_dir, _read_info(self.path)))
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the record lock
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_owner(run_dir: str | Path) -> Optional[str]:
    """The refusal message when a live job holds ``run_dir``'s lock, else None (the lock is not kept). Must not be
    called by the process that holds the lock (closing any descriptor of the file drops a POSIX lock)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        if _try_lock(fd):
            return None
        return _owner_text(Path(run_dir), _read_info(path))
    finally:
        os.close(fd)


def exit_with_launcher() -> None:
    """In a rank started by ``launchers/local.py`` (``LLAT_LAUNCHER_PID`` set): have the kernel SIGKILL this
    process when its parent (the launcher, which hosts torch's elastic agent) dies, and exit at once when it is
    already gone. The variable is removed so that processes this rank starts do not inherit it. No-op elsewhere."""
    launcher = os.environ.pop(LAUNCHER_PID_ENV, None)
    if not launcher or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        print(f"warning: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return
    if os.getppid() != int(launcher):  # the launcher died before prctl took effect
        print(f"launcher (pid {launcher}) is gone: exiting", file=sys.stderr)
        os._exit(1)
