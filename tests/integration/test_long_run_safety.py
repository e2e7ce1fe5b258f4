"""Long runs that survive their own failures (core/trainer.py rollback, core/checkpoint.py resume_from, damaged
checkpoints set aside, a full disk during a save), on the tiny DiT in the shared gloo ranks of tests/dist_utils.py.

Failures are injected at the task's loss: a NaN (or a finite spike) whenever the trainer reads a given data position
(``step + data_offset``), i.e. a bad stretch of data, which a rollback skips."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tools.check_host_sync import write_toy_latents

from dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/tiny_dit.yaml")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_toy_latents(tmp_path_factory.mktemp("data") / "mds", n=256)  # 16 steps per epoch


def _train(dist, data, run_dir, overrides, nan_at=(), spike_at=(), crash_at=None, fail_save=False):
    """Train the tiny DiT; the loss is NaN when the data position is in ``nan_at``, x1000 in ``spike_at``; raises
    at data position ``crash_at`` (a crash). Returns (outcome, digest of model+EMA+optimizer, data_offset)."""
    from core.trainer import Trainer
    from launchers.experiment import load_config, validate
    from models.tasks import build_task

    cfg = validate(
        load_config(CONFIG, [f"data.path={data}", f"run_dir={run_dir}", "wandb.mode=disabled", *overrides]),
        world_size=dist.world_size,
    )
    try:
        trainer = Trainer(cfg, dist, build_task(cfg, dist))
    except Exception as e:  # noqa: BLE001 - a resume error, reported as the outcome
        return (0, f"{type(e).__name__}: {e}"), "", 0
    loss = trainer.task.loss

    def patched(phase, batch, parts, ctx):
        value, metrics = loss(phase, batch, parts, ctx)
        position = ctx.step + trainer.data_offset
        if position == crash_at:
            raise KeyboardInterrupt("crash")
        if position in nan_at:
            value = value * float("nan")
        if position in spike_at:
            value, metrics = value * 1000.0, {**metrics, "loss": metrics["loss"] * 1000.0}
        return value, metrics

    trainer.task.loss = patched
    if fail_save:  # no tmpfs (not root): the write boundary fails as a full disk does
        engine_save = trainer.engine.save

        def full_disk(ckpt_dir, parts):
            if trainer.step >= 8:
                (Path(ckpt_dir) / "partial").write_bytes(b"x" * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(ckpt_dir))
            engine_save(ckpt_dir, parts)

        trainer.engine.save = full_disk
    try:
        try:
            result = trainer.train()
            outcome = (result.step, result.exit_code)
        except (Exception, KeyboardInterrupt) as e:
            outcome = (trainer.step, f"{type(e).__name__}: {e}")
        digest = hashlib.sha256()
        for _, part in sorted(trainer.parts.items()):
            for which in ("model", "ema"):
                for key, t in sorted(part.full_state_dict(which, rank0_only=False).items()):
                    digest.update(key.encode() + t.numpy().tobytes())
            for state in part.optimizer.state.values():
                for key, t in sorted(state.items()):
                    digest.update(
                        key.encode() + t.full_tensor().numpy().tobytes() if hasattr(t, "full_tensor") else b""
                    )
    finally:
        trainer.close()
    return outcome, digest.hexdigest(), trainer.data_offset


def _steps(run_dir: Path) -> list[int]:
    from core.checkpoint import complete_checkpoints

    return [s for s, _ in complete_checkpoints(run_dir / "checkpoints")]


def _aside(run_dir: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in (run_dir / "checkpoints").iterdir() if "." in p.name[5:])


def _extra(run_dir: Path, step: int) -> dict:
    import torch

    from core.checkpoint import extra_path, step_dirname

    return torch.load(extra_path(run_dir / "checkpoints" / step_dirname(step), 0), weights_only=False)


ROLLBACK = [
    "train.max_steps=14",
    "train.log_every=2",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=10",
    "train.max_consecutive_nonfinite=3",
    "train.rollback.enabled=true",
    "train.rollback.on_nonfinite_streak=2",
    "train.rollback.lr_scale=0.5",
    "train.rollback.lr_scale_steps=2",
]


def test_nan_rolls_back_skips_the_data_and_a_crash_after_it_resumes_identically(dataset, tmp_path):
    """NaN at data positions 9 and 10: the streak reaches 2 at step 11, read at the log step 12 -> restore step 8,
    skip 4 steps of data (offset 4), finish. A second run that crashes right after the rollback and resumes (from
    step 8, the rollback replayed from rollbacks.jsonl) ends with the same bits."""
    a = tmp_path / "a"
    [(outcome, digest_a, offset)] = run_distributed(_train, world_size=1, args=(dataset, a, ROLLBACK, (9, 10)))
    assert outcome == (14, 0) and offset == 4
    [event] = [json.loads(x) for x in (a / "rollbacks.jsonl").read_text().splitlines()]
    assert (event["failed_at"], event["to_step"], event["data_offset"], event["lr_scale_until"]) == (12, 8, 4, 10)
    assert "2 consecutive steps with a non-finite loss/gradient at step 11" in event["reason"]
    assert _steps(a) == [4, 8, 12, 14]
    assert (_extra(a, 14)["data_offset"], _extra(a, 14)["rollback_events"]) == (4, 1)
    records = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollback/to_step"] for r in records if "rollback/count" in r] == [8]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[10] == pytest.approx(0.5e-3) and lrs[12] == pytest.approx(1e-3)  # x0.5 for steps 8, 9 (logged at 10)

    b = tmp_path / "b"
    [(outcome, _, _)] = run_distributed(_train, world_size=1, args=(dataset, b, ROLLBACK, (9, 10), (), 13))
    assert outcome == (9, "KeyboardInterrupt: crash")  # position 13 = step 9 after the rollback, before step 12's save
    assert _steps(b) == [4, 8]
    [(outcome, digest_b, offset)] = run_distributed(_train, world_size=1, args=(dataset, b, ROLLBACK))
    assert outcome == (14, 0) and offset == 4
    assert digest_b == digest_a


def test_loss_spike_rolls_back_then_gives_up_after_max_rollbacks(dataset, tmp_path):
    """A x1000 loss at data position 9 (logged at step 10) is a spike (> 5 x the mean of the last 4 logged losses):
    restore step 8 (<= the last fine log step 8), data offset 2; NaN at positions 13 and 14 (steps 11 and 12) then
    trips the streak at step 13: the second rollback exceeds max_rollbacks=1."""
    run_dir = tmp_path / "run"
    over = [
        "train.max_steps=16",
        "train.log_every=1",
        "checkpoint.every_steps=4",
        "train.rollback.enabled=true",
        "train.rollback.on_nonfinite_streak=2",
        "train.rollback.loss_spike_factor=5",
        "train.rollback.loss_window=4",
        "train.rollback.max_rollbacks=1",
    ]
    [(outcome, _, offset)] = run_distributed(_train, world_size=1, args=(dataset, run_dir, over, (13, 14), (9,)))
    step, message = outcome
    assert step == 13 and offset == 2
    assert message.startswith(
        "RollbackLimitError: 2 consecutive steps with a non-finite loss/gradient at step 13 "
        "(train.rollback.on_nonfinite_streak=2); gave up after 1 rollback(s) (train.rollback.max_rollbacks=1"
    ), message
    [event] = [json.loads(x) for x in (run_dir / "rollbacks.jsonl").read_text().splitlines()]
    assert event["reason"].startswith("loss spike: loss=") and (event["failed_at"], event["to_step"]) == (10, 8)


def test_resume_from_an_older_checkpoint_continues_exactly(dataset, tmp_path):
    """A 12-step run keeps 4, 8, 12. resume_from its step 4 into a new run directory (a fork) and into the same one
    (8 and 12 set aside, nothing deleted) both end with the bits of the original step 12; a requeue after that
    resumes from the run's own newest checkpoint; a damaged step 12 at resume is set aside and rewritten."""
    over = ["train.max_steps=12", "train.log_every=4", "checkpoint.every_steps=4", "checkpoint.keep_last=10"]
    ref = tmp_path / "ref"
    [(outcome, digest, _)] = run_distributed(_train, world_size=1, args=(dataset, ref, over))
    assert outcome == (12, 0) and _steps(ref) == [4, 8, 12]

    fork = tmp_path / "fork"
    source = ref / "checkpoints" / "step_0000004"
    [(outcome, forked, _)] = run_distributed(
        _train, world_size=1, args=(dataset, fork, [*over, f"checkpoint.resume_from={source}"])
    )
    assert outcome == (12, 0) and forked == digest and _steps(fork) == [8, 12]

    same = [*over, "checkpoint.resume_from=4"]
    [(outcome, again, _)] = run_distributed(_train, world_size=1, args=(dataset, ref, same))
    assert outcome == (12, 0) and again == digest
    assert _steps(ref) == [4, 8, 12] and _aside(ref) == ["step_0000008.superseded", "step_0000012.superseded"]
    assert json.loads((ref / "checkpoints" / "RESUMED_FROM").read_text())["step"] == 4

    # Requeue with the same config: resume_from was applied; step 12 is damaged (truncated) -> step 8, then 12 again.
    victim = max((ref / "checkpoints" / "step_0000012").rglob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])
    [(outcome, requeued, _)] = run_distributed(_train, world_size=1, args=(dataset, ref, same))
    assert outcome == (12, 0) and requeued == digest
    assert _steps(ref) == [4, 8, 12]
    assert "step_0000012.damaged" in _aside(ref)

    [(outcome, _, _)] = run_distributed(
        _train, world_size=1, args=(dataset, tmp_path / "x", [*over, "checkpoint.resume_from=3"])
    )
    assert outcome[1].startswith("ValueError: checkpoint.resume_from=3: no complete checkpoint of step 3 in"), outcome


def _mount_tmpfs(path: Path, size: int) -> bool:
    """A real small tmpfs (root only); False where this process may not mount."""
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def test_full_disk_during_a_save_names_dir_and_size_keeps_previous(dataset, tmp_path):
    """The run directory on a tmpfs that holds the step-4 checkpoint but not a second one: the save of step 8
    fails with "no space left on <dir>, the checkpoint needs about N GB", step 4 is kept, no .tmp- directory is
    left. Without root (no mount) the engine's write raises OSError(ENOSPC) instead (an injected failure)."""
    over = ["train.max_steps=12", "train.log_every=4", "checkpoint.every_steps=4", "checkpoint.keep_last=10"]
    probe = tmp_path / "probe"
    run_distributed(_train, world_size=1, args=(dataset, probe, [*over, "train.max_steps=4"]))
    ckpt = probe / "checkpoints" / "step_0000004"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file() and p.name != "COMPLETE")
    mnt = tmp_path / "mnt"
    mounted = _mount_tmpfs(mnt, int(size * 1.6) + 64 * 1024)
    run_dir = (mnt if mounted else tmp_path) / "run"
    try:
        [(outcome, _, _)] = run_distributed(
            _train, world_size=1, args=(dataset, run_dir, over, (), (), None, not mounted)
        )
        step, message = outcome
        assert step == 8
        expected = f"CheckpointSpaceError: no space left on {run_dir / 'checkpoints'}, the checkpoint needs about "
        assert message.startswith(expected), message
        assert f"{size / 1e9:.3g} GB" in message  # the size of the previous checkpoint
        assert _steps(run_dir) == [4]
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000004"]
    finally:
        if mounted:
            shutil.rmtree(run_dir, ignore_errors=True)
            subprocess.run(["umount", str(mnt)], check=True)
