"""launchers/snapshot.py: the copy of the code a Slurm job and its requeues run (the requeue itself, after the
checkout changed, is tested on the real cluster in tests/integration/test_slurm_pipeline.py)."""

from __future__ import annotations

import json
import subprocess

from launchers.snapshot import SNAPSHOT_FILE, take_snapshot


def git(repo, *args):
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def test_snapshot_copies_the_checkout_as_it_is_and_records_the_commit(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("X = 1\n")
    (repo / ".gitignore").write_text("runs/\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    commit = git(repo, "rev-parse", "HEAD")
    (repo / "pkg" / "mod.py").write_text("X = 2\n")  # uncommitted change: the snapshot has it
    (repo / "new.py").write_text("Y = 1\n")  # untracked, not ignored: copied
    (repo / "runs" / "r").mkdir(parents=True)
    (repo / "runs" / "r" / "big.bin").write_bytes(b"0" * 10)  # ignored: not copied
    (repo / "out" / "slurm" / "code" / "old").mkdir(parents=True)
    (repo / "out" / "slurm" / "code" / "old" / "a.py").write_text("")  # an earlier snapshot: not copied

    dest, record = take_snapshot(repo, repo / "out" / "slurm" / "code")
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == [".gitignore", "new.py", "pkg/mod.py", SNAPSHOT_FILE]
    assert (dest / "pkg" / "mod.py").read_text() == "X = 2\n"
    assert record["commit"] == commit and record["dirty"] is True and record["path"] == str(dest)
    assert json.loads((dest / SNAPSHOT_FILE).read_text()) == record
    assert dest.name.endswith(f"{commit[:10]}-dirty")
    (repo / "pkg" / "mod.py").write_text("X = 3\n")  # the checkout changes later: the snapshot does not
    assert (dest / "pkg" / "mod.py").read_text() == "X = 2\n"
    dest2, _ = take_snapshot(repo, repo / "out" / "slurm" / "code")  # a second submission: its own copy
    assert dest2 != dest and (dest2 / "pkg" / "mod.py").read_text() == "X = 3\n"
