"""Checkpoints on REAL gloo process groups: bit-exact round trip, async save, 2 -> 1 rank resharding,
incomplete / corrupt checkpoints, retention, and a SIGKILL between writing the data and the commit (the retention
rule alone: tests/unit/test_checkpoint_retention.py)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.checkpoint import COMPLETE, PAUSE_BEFORE_COMMIT_ENV, load_checkpoint, step_dirname

from dist_utils import ToyModel, run_distributed

TESTS_DIR = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ helpers
def _build(dist, seed=0, async_save=False):
    from core.config import EngineConfig, OptimizerConfig
    from core.engines.fsdp2 import FSDP2Engine

    torch.manual_seed(seed)
    engine = FSDP2Engine(EngineConfig(precision="fp32"), dist, async_save=async_save)
    part = engine.prepare("model", ToyModel(), OptimizerConfig(lr=1e-2, weight_decay=0.01), 0.9, "blocks")
    return engine, {"model": part}


def _train_step(parts, dist, step):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    mine = slice(dist.rank * 8 // dist.world_size, (dist.rank + 1) * 8 // dist.world_size)
    part = parts["model"]
    part.backward(F.mse_loss(part.module(x[mine]), y[mine]))
    part.step()


def _snapshot(parts):
    """Full (unsharded) model, EMA and optimizer state as plain CPU tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    part = parts["model"]
    full = StateDictOptions(full_state_dict=True)
    out = {f"model.{k}": v.detach().clone() for k, v in get_model_state_dict(part.module, options=full).items()}
    out.update({f"ema.{k}": v.detach().clone() for k, v in get_model_state_dict(part.ema, options=full).items()})
    osd = get_optimizer_state_dict(part.module, part.optimizer, options=full)
    out.update(
        {f"optim.{k}.{n}": torch.as_tensor(v).detach().clone() for k, st in osd["state"].items() for n, v in st.items()}
    )
    return out


def _assert_bit_exact(got, ref, what):
    assert got.keys() == ref.keys(), (what, sorted(got.keys() ^ ref.keys()))
    bad = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not bad, f"{what}: differs in {bad}"


def _extra(dist, step):
    return {"step": step, "rank": dist.rank, "rng": torch.get_rng_state(), "note": f"rank{dist.rank}-step{step}"}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# ------------------------------------------------------------------------------------------------ workers
def _save_worker(dist, run_dir):
    from core.checkpoint import CheckpointManager
    from core.config import CheckpointConfig

    cfg = CheckpointConfig(every_steps=1, keep_last=2, keep_every=4)
    engine, parts = _build(dist)
    mgr = CheckpointManager(run_dir, cfg, engine, dist)
    assert mgr.load_latest(parts) is None
    snaps, extras = {}, {}
    for step in range(1, 7):
        _train_step(parts, dist, step)
        torch.rand(3)  # advance the global RNG differently per step
        assert mgr.should_save(step, is_last=False)
        extras[step] = _extra(dist, step)
        mgr.save(step, parts, extras[step])
        snaps[step] = _snapshot(parts)
        assert not mgr.should_save(step, is_last=True)  # never twice at the same step
    steps_after_retention = [s for s, _ in mgr.complete_checkpoints()]
    mgr.save(6, parts, extras[6])  # already complete: not rewritten
    mgr.close()
    mgr.close()  # idempotent

    # the live run goes on for 2 steps ...
    for step in (7, 8):
        _train_step(parts, dist, step)
    live = _snapshot(parts)

    # ... and a fresh process state (different init) resumed from the newest checkpoint follows it bit for bit
    engine2, parts2 = _build(dist, seed=123 + dist.rank)
    mgr2 = CheckpointManager(run_dir, cfg, engine2, dist)
    extra = mgr2.load_latest(parts2)
    assert extra["step"] == 6 and extra["rank"] == dist.rank and "world_size_changed" not in extra
    assert torch.equal(extra["rng"], extras[6]["rng"]) and extra["note"] == extras[6]["note"]
    _assert_bit_exact(_snapshot(parts2), snaps[6], "round trip")
    for step in (7, 8):
        _train_step(parts2, dist, step)
    _assert_bit_exact(_snapshot(parts2), live, "continuation after resume")

    # async saves: weights change right after save() returns; the checkpoint holds the state at save()
    mgr3 = CheckpointManager(
        run_dir, CheckpointConfig(every_steps=1, keep_last=2, keep_every=4, async_save=True), engine2, dist
    )
    assert engine2.async_save
    snaps[8] = _snapshot(parts2)
    mgr3.save(8, parts2, _extra(dist, 8))
    _train_step(parts2, dist, 9)
    deadline = time.monotonic() + 60
    while not mgr3.maybe_finalize():
        assert time.monotonic() < deadline, "async save never finished"
        time.sleep(0.05)
    assert (Path(run_dir) / "checkpoints" / step_dirname(8) / COMPLETE).is_file()
    snaps[9] = _snapshot(parts2)
    mgr3.save(9, parts2, _extra(dist, 9))
    _train_step(parts2, dist, 10)  # mutate while the write may be in flight
    mgr3.close()  # commits step 9
    final_steps = [s for s, _ in mgr3.complete_checkpoints()]

    engine4, parts4 = _build(dist, seed=7)
    load_checkpoint(engine4, Path(run_dir) / "checkpoints" / step_dirname(8), parts4)
    _assert_bit_exact(_snapshot(parts4), snaps[8], "async step 8")
    extra = load_checkpoint(engine4, Path(run_dir) / "checkpoints" / step_dirname(9), parts4)
    _assert_bit_exact(_snapshot(parts4), snaps[9], "async step 9 (saved, then closed)")
    assert extra["step"] == 9 and extra["rank"] == dist.rank

    # every_minutes: rank 0's clock decides for everybody
    timed = CheckpointManager(run_dir, CheckpointConfig(every_steps=None, every_minutes=0.001), engine4, dist)
    if dist.rank == 0:
        time.sleep(0.2)
    minutes_due = timed.should_save(11)
    never = CheckpointManager(run_dir, CheckpointConfig(every_steps=None, every_minutes=1e6), engine4, dist)
    minutes_not_due, last_due = never.should_save(11), never.should_save(11, is_last=True)

    return {
        "steps_after_retention": steps_after_retention,
        "final_steps": final_steps,
        "snaps": {s: snaps[s] for s in (4, 8, 9)},
        "extra_rank0": extras[6] if dist.rank == 0 else None,
        "minutes": (minutes_due, minutes_not_due, last_due),
    }


def _reshard_worker(dist, run_dir, snaps):
    from core.checkpoint import CheckpointManager
    from core.config import CheckpointConfig

    records = _Records()
    logging.getLogger("core").addHandler(records)
    root = Path(run_dir) / "checkpoints"
    engine, parts = _build(dist, seed=99)
    mgr = CheckpointManager(run_dir, CheckpointConfig(), engine, dist)

    # 2 ranks -> 1 rank: same full weights / EMA / moments; rank 0's extra, flagged
    extra = mgr.load_latest(parts)
    assert extra["step"] == 9 and extra["rank"] == 0 and extra["world_size_changed"] is True
    _assert_bit_exact(_snapshot(parts), snaps[9], "2 -> 1 ranks")
    assert any("world_size_changed" in m for m in records.messages)

    # an in-progress .tmp- directory and a step directory without COMPLETE are never chosen
    shutil.copytree(root / step_dirname(9), root / (".tmp-" + step_dirname(100)))
    shutil.copytree(root / step_dirname(9), root / step_dirname(50))
    (root / step_dirname(50) / COMPLETE).unlink()
    assert [s for s, _ in mgr.complete_checkpoints()] == [4, 8, 9]
    assert mgr.load_latest(parts)["step"] == 9

    # truncated data file in the newest -> warning naming it, the previous one is loaded
    data_file = sorted((root / step_dirname(9) / "state").glob("*.distcp"))[0]
    with open(data_file, "r+b") as f:
        f.truncate(data_file.stat().st_size // 2)
    records.messages.clear()
    extra = mgr.load_latest(parts)
    assert extra["step"] == 8
    _assert_bit_exact(_snapshot(parts), snaps[8], "fallback to step 8")
    assert any(step_dirname(9) in m and "truncated" in m for m in records.messages), records.messages
    # ... and the damaged one is set aside (not a step_N name: never resumed, not counted by retention)
    assert [p.name.split("-")[0] for p in root.glob(step_dirname(9) + ".*")] == [step_dirname(9) + ".damaged"]
    assert [s for s, _ in mgr.complete_checkpoints()] == [4, 8]

    # corrupt (same size) DCP metadata in step 8 -> DCP's own error -> step 4
    meta = root / step_dirname(8) / "state" / ".metadata"
    meta.write_bytes(b"\0garbage" * (meta.stat().st_size // 8) + b"\0" * (meta.stat().st_size % 8))
    records.messages.clear()
    extra = mgr.load_latest(parts)
    assert extra["step"] == 4
    _assert_bit_exact(_snapshot(parts), snaps[4], "fallback to step 4")
    assert any(step_dirname(8) in m for m in records.messages)
    assert [s for s, _ in mgr.complete_checkpoints()] == [4]

    # nothing loadable -> a clear error that lists every attempt, and nothing is set aside (maybe not the files' fault)
    shutil.rmtree(root / step_dirname(4) / "extra")
    with pytest.raises(RuntimeError) as err:
        mgr.load_latest(parts)
    assert step_dirname(4) in str(err.value)
    assert [s for s, _ in mgr.complete_checkpoints()] == [4]
    return True


def _failed_commit_worker(dist, run_dir):
    """Rank 0's commit fails: every rank raises (none waits in a later collective), rank 0 its own exception."""
    from core.checkpoint import CheckpointManager
    from core.config import CheckpointConfig

    engine, parts = _build(dist)
    mgr = CheckpointManager(run_dir, CheckpointConfig(every_steps=1), engine, dist)

    def fail(step, tmp):
        raise OSError("disk full")

    mgr._commit_on_main = fail
    try:
        mgr.save(1, parts, {"step": 1})
    except Exception as err:  # noqa: BLE001 - returned to the test
        return type(err).__name__, str(err)
    return None


def _killed_child_main(run_dir: str, marker: str) -> None:
    """Run in a subprocess: commit step 1, then block in the commit of step 2 (test hook) until killed."""
    from core.checkpoint import CheckpointManager
    from core.config import CheckpointConfig
    from core.distributed import init_distributed

    dist = init_distributed()
    engine, parts = _build(dist)
    mgr = CheckpointManager(run_dir, CheckpointConfig(every_steps=1, keep_last=3), engine, dist)
    _train_step(parts, dist, 1)
    mgr.save(1, parts, {"step": 1})
    _train_step(parts, dist, 2)
    os.environ[PAUSE_BEFORE_COMMIT_ENV] = marker
    mgr.save(2, parts, {"step": 2})  # never returns
    raise AssertionError("the commit hook did not pause")


def _resume_after_kill_worker(dist, run_dir):
    from core.checkpoint import CheckpointManager
    from core.config import CheckpointConfig

    root = Path(run_dir) / "checkpoints"
    tmp = root / (".tmp-" + step_dirname(2))
    had_tmp_with_data = (tmp / "state" / ".metadata").is_file() and (tmp / "extra" / "rank00000.pt").is_file()
    engine, parts = _build(dist, seed=5)
    mgr = CheckpointManager(run_dir, CheckpointConfig(), engine, dist)
    extra = mgr.load_latest(parts)
    return {
        "had_tmp_with_data": had_tmp_with_data,
        "tmp_removed": not tmp.exists(),
        "complete": [s for s, _ in mgr.complete_checkpoints()],
        "resumed_step": extra["step"],
    }


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ckpt_run")
    results = run_distributed(_save_worker, world_size=2, args=(str(run_dir),))
    return run_dir, results


def test_roundtrip_retention_async_and_minutes_two_ranks(saved_run):
    _, (r0, r1) = saved_run
    for r in (r0, r1):
        # keep_last=2 plus multiples of keep_every=4
        assert r["steps_after_retention"] == [4, 5, 6]
        assert r["final_steps"] == [4, 8, 9]
        assert r["minutes"] == (True, False, True)


def test_reshard_two_to_one_rank_incomplete_and_corrupt_checkpoints(saved_run):
    run_dir, (r0, _) = saved_run
    assert run_distributed(_reshard_worker, world_size=1, args=(str(run_dir), r0["snaps"])) == [True]


def test_failed_commit_fails_every_rank(tmp_path):
    results = run_distributed(_failed_commit_worker, world_size=2, args=(str(tmp_path / "run"),))
    assert results[0] == ("OSError", "disk full")
    assert results[1][0] == "RuntimeError" and "rank 0: committing checkpoint" in results[1][1], results[1]
    assert "OSError: disk full" in results[1][1]


def test_sigkill_before_commit_resumes_previous(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith("SLURM_")
    }
    env["OMP_NUM_THREADS"] = "1"
    code = (
        f"import sys; sys.path[:0] = [{str(TESTS_DIR)!r}, {str(TESTS_DIR.parent)!r}]; import test_checkpoint as t; "
        f"t._killed_child_main({str(run_dir)!r}, {str(marker)!r})"
    )
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(TESTS_DIR.parents[1]))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, f"child exited early with {child.returncode}"
            assert time.monotonic() < deadline, "child never reached the commit"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    (res,) = run_distributed(_resume_after_kill_worker, world_size=1, args=(str(run_dir),))
    assert res == {"had_tmp_with_data": True, "tmp_removed": True, "complete": [1], "resumed_step": 1}
