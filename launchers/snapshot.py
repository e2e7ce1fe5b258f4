"""A copy of the code taken at submission, which every run of the job (requeues included) executes.

A run of a million steps is requeued dozens of times over days; without a snapshot each restart would import
whatever the checkout holds at that moment. ``take_snapshot`` copies the repository's files (``git ls-files``:
tracked files with their uncommitted changes, plus untracked files that git does not ignore; the package
directories when the checkout is not a git repository) into ``<run_dir>/slurm/code/<time>-<commit>/`` and writes
``snapshot.json`` there (commit, uncommitted changes, source checkout, time). The sbatch script exports
``PYTHONPATH=<snapshot>`` and ``PYTHONSAFEPATH=1`` (the working directory, the submission directory, is not put on
``sys.path``), so ``python -m submitit.core._submit`` and the pickled ``launchers.jobs.SlurmTask`` come from the
snapshot, while relative paths in the job's arguments still mean what they meant at submission.
(submitit's ``helpers.RsyncSnapshot`` does the same with rsync and a working-directory change; a plain copy needs
no rsync on the login node and keeps the working directory.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["SNAPSHOT_FILE", "git_state", "snapshot_dir_name", "take_snapshot"]

SNAPSHOT_FILE = "snapshot.json"
# Copied when the checkout is not a git repository.
FALLBACK_ENTRIES = ("core", "data", "models", "launchers", "tools", "configs", "train.py", "setup.py")


def _git(repo: Path, *args: str) -> Optional[str]:
    try:
        res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(repo: Path) -> dict[str, Any]:
    """commit (None outside git) and whether tracked files have uncommitted changes."""
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit.strip() if commit else None, "dirty": bool(status and status.strip())}


def snapshot_dir_name(state: dict[str, Any], stamp: Optional[float] = None) -> str:
    t = time.strftime("%Y%m%d-%H%M%S", time.localtime(stamp if stamp is not None else time.time()))
    commit = (state.get("commit") or "nogit")[:10]
    return f"{t}-{commit}{'-dirty' if state.get('dirty') else ''}"


def _files(repo: Path) -> list[str]:
    out = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if out is not None:
        return sorted({f for f in out.split("\0") if f})
    files = []
    for entry in FALLBACK_ENTRIES:
        p = repo / entry
        if p.is_file():
            files.append(entry)
        elif p.is_dir():
            files += [str(f.relative_to(repo)) for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    return sorted(files)


def take_snapshot(repo: Path, parent: Path) -> tuple[Path, dict[str, Any]]:
    """Copy ``repo``'s code into a new directory under ``parent``; (its path, what ``snapshot.json`` records)."""
    repo = Path(repo).resolve()
    state = git_state(repo)
    dest = Path(parent) / snapshot_dir_name(state)
    n = 1
    while dest.exists():  # two submissions within one second
        n += 1
        dest = Path(parent) / f"{snapshot_dir_name(state)}.{n}"
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    count = 0
    for rel in _files(repo):
        if any(f"/{d}/code/" in f"/{rel}" for d in ("slurm", "pipeline")):
            continue  # earlier snapshots of a run directory inside the checkout
        src = repo / rel
        if not src.is_file() or src.is_symlink() and not src.exists():
            continue  # deleted but still tracked, or a dangling link
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        count += 1
    record = {
        **state,
        "source": str(repo),
        "files": count,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "path": str(dest),
    }
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / SNAPSHOT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, dest)
    return dest, record
