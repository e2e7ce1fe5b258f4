"""Checkpoint directory management: atomic commit, completion marker, retention, auto-resume.

Layout (see docs/architecture.md)::

    <run_dir>/checkpoints/step_0000100/          complete: has COMPLETE (JSON: step, time, world_size, files)
    <run_dir>/checkpoints/.tmp-step_0000200/     being written; never resumed; removed at the next start

Commit protocol (``save``): every rank writes its part of the checkpoint into ``.tmp-step_N`` (through
the engine) -> barrier -> rank 0 writes ``COMPLETE`` (fsync), fsyncs the directory, renames it to
``step_N`` and fsyncs ``checkpoints/`` -> retention -> barrier. A process killed at any point before the
rename leaves only a ``.tmp-`` directory; after the rename the checkpoint is whole. ``COMPLETE`` lists
every file with its size, so a truncated file is detected before it is read.

Async saves (``CheckpointConfig.async_save``): ``save`` returns once the state is staged in CPU memory;
the commit happens when every rank's background write has finished — checked by ``maybe_finalize()``
(the trainer calls it every step), and forced at the latest by the next ``save`` or by ``close()``.

Inside a checkpoint directory the engine writes the parts' state (``Engine.save``: FSDP2 ``state/``, DeepSpeed
``deepspeed/<part>/``); next to it every rank's ``extra`` (step, RNG states, data-loader state, ...) goes to
``extra/rank{r:05d}.pt``, written and read here for every engine (``save_checkpoint`` / ``load_checkpoint``).
Restored on the same number of ranks, each rank gets its own ``extra``; on another number, every rank gets rank 0's
with ``extra["world_size_changed"] = True`` (per-rank RNG streams cannot be mapped onto other ranks).

Damage and failures: a checkpoint that fails to load at resume is set aside (renamed ``step_N.damaged-<time>``) once an
older one has loaded, so it neither blocks the save of step N later ("already exists") nor counts against
``keep_last``. A save that fails (on any rank) leaves no ``.tmp-`` directory behind and keeps the previous checkpoint;
out of disk space it raises ``CheckpointSpaceError`` ("no space left on <dir>, the checkpoint needs about N GB").
``checkpoint.resume_from`` (``resume``) restores a chosen checkpoint once (a step of this run or any run's checkpoint
directory) and sets this run's newer checkpoints aside (``step_N.superseded-<time>``), recording the choice in
``checkpoints/RESUMED_FROM`` so that a requeue resumes from the run's own newest checkpoint. A rollback
(``restore_before``) restores the newest checkpoint at or before a step and sets the newer ones aside
(``step_N.rolled-back-<time>``). Nothing is deleted except by retention.

Every public method except ``complete_checkpoints`` is collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as tdist
from torch.distributed.checkpoint.api import CheckpointException

from core.config import CheckpointConfig
from core.distributed import DistInfo, all_gather_object, barrier, broadcast_object, raise_if_any_rank_failed
from core.engines.base import Engine, TrainedPart
from core.fileio import atomic_torch_save, atomic_write_json, fsync_dir

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
# Test hook (tests/integration/test_checkpoint.py): when this environment variable names a file, rank 0 creates that
# file and then sleeps forever right before committing a checkpoint — i.e. after every byte of the
# checkpoint is on disk but before COMPLETE/rename — so a test can SIGKILL a process "mid-save".
PAUSE_BEFORE_COMMIT_ENV = "LLAT_TEST_PAUSE_BEFORE_COMMIT"
EXTRA_DIR = "extra"
RESUMED_FROM = "RESUMED_FROM"  # JSON in checkpoints/: the checkpoint.resume_from already applied to this run


class CheckpointSpaceError(RuntimeError):
    """A save ran out of disk space (the message names the directory and the size the checkpoint needs)."""


_NO_SPACE_TEXTS = ("no space left", "disk quota exceeded", "unexpected pos")  # the last: torch's zip writer


def _out_of_space(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from, or a failure DCP collected) says the disk is full."""
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e).lower() for t in _NO_SPACE_TEXTS):
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: rank -> wrapped exception
        if isinstance(failures, dict):
            for f in failures.values():
                todo.append(f[0] if isinstance(f, tuple) and f else f)
    return False


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def set_aside(path: Path, reason: str) -> Path:
    """Rename the checkpoint directory ``path`` to ``<name>.<reason>-<UTC time>`` (not a ``step_N`` name: never resumed,
    never counted by retention); returns the new path. Not collective (rank 0 calls it)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.{reason}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{reason}-{stamp}-{n}")
        n += 1
    os.rename(path, target)
    fsync_dir(path.parent)
    return target


def retained_steps(steps: list[int], keep_last: int, keep_every: Optional[int]) -> set[int]:
    """Steps to keep: the newest ``keep_last`` plus every multiple of ``keep_every``."""
    ordered = sorted(set(steps))
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        keep.update(s for s in ordered if s % keep_every == 0)
    return keep


def complete_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every committed checkpoint (``step_N`` with ``COMPLETE``) in ``checkpoints_dir``,
    oldest first; ``[]`` when the directory does not exist."""
    root = Path(checkpoints_dir)
    out = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        if not (p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / COMPLETE).is_file()):
            continue
        try:
            out.append((int(p.name[len(STEP_PREFIX) :]), p))
        except ValueError:
            continue
    return sorted(out)


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory that ``path`` names: ``path`` itself when it is one (``state/`` of the FSDP2
    engine or ``deepspeed/``), else the newest complete ``step_*`` under ``path`` (a ``checkpoints/``
    directory) or ``path/checkpoints`` (a run directory)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if (path / "state").is_dir() or (path / "deepspeed").is_dir():
        return path
    for root in (path, path / "checkpoints"):
        found = complete_checkpoints(root)
        if found:
            return found[-1][1]
    raise FileNotFoundError(
        f"{path} is neither a checkpoint directory (with state/ or deepspeed/) nor a run or "
        f"checkpoints directory with a complete step_* checkpoint"
    )


# ---------------------------------------------------------------------------------------------- per-rank extra
def extra_path(ckpt_dir: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank``'s extra state lives in a checkpoint directory."""
    return Path(ckpt_dir) / EXTRA_DIR / f"rank{rank:05d}.pt"


def saved_world_size(ckpt_dir: str | os.PathLike) -> int:
    """The number of ranks that wrote the checkpoint directory (its ``extra/rank*.pt`` files)."""
    return len(list((Path(ckpt_dir) / EXTRA_DIR).glob("rank*.pt")))


def save_extra(ckpt_dir: str | os.PathLike, extra: dict[str, Any], dist: DistInfo) -> None:
    """Write this rank's ``extra`` (atomically) into ``ckpt_dir``. Not collective."""
    atomic_torch_save(extra, extra_path(ckpt_dir, dist.rank))


def load_extra(ckpt_dir: str | os.PathLike, dist: DistInfo) -> dict[str, Any]:
    """This rank's ``extra`` when the checkpoint was written by as many ranks as now; otherwise rank 0's with
    ``world_size_changed=True`` (a WARNING on rank 0). Not collective."""
    ckpt_dir = Path(ckpt_dir)
    saved_world = saved_world_size(ckpt_dir)
    if saved_world == 0:
        raise FileNotFoundError(f"{ckpt_dir}: no {EXTRA_DIR}/rank*.pt files")
    own = extra_path(ckpt_dir, dist.rank)
    if saved_world == dist.world_size and own.is_file():
        return torch.load(own, map_location="cpu", weights_only=False)
    if dist.is_main:
        log.warning(
            "checkpoint %s was written by %d rank(s), now %d: restoring rank 0's extra state on every "
            "rank (world_size_changed=True)",
            ckpt_dir,
            saved_world,
            dist.world_size,
        )
    extra = torch.load(extra_path(ckpt_dir, 0), map_location="cpu", weights_only=False)
    extra["world_size_changed"] = True
    return extra


def save_checkpoint(
    engine: Engine, ckpt_dir: str | os.PathLike, parts: dict[str, TrainedPart], extra: dict[str, Any]
) -> None:
    """Collective: this rank's ``extra`` and the engine's state of every part into ``ckpt_dir`` (no commit: see
    ``CheckpointManager.save``). With an async engine the parts' files may still be in flight on return."""
    save_extra(ckpt_dir, extra, engine.dist)
    engine.save(Path(ckpt_dir), parts)


def load_checkpoint(engine: Engine, ckpt_dir: str | os.PathLike, parts: dict[str, TrainedPart]) -> dict[str, Any]:
    """Collective: restore every part from ``ckpt_dir`` (written by any number of ranks); returns the ``extra``
    of ``load_extra``."""
    engine.load(Path(ckpt_dir), parts)
    return load_extra(ckpt_dir, engine.dist)


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


class CheckpointManager:
    """Atomic, retained, resumable checkpoints of an engine's parts under ``<run_dir>/checkpoints``.

    Construction is collective (rank 0 removes stale ``.tmp-`` directories, then all ranks meet).
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig, engine: Engine, dist: DistInfo):
        self.cfg = cfg
        self.engine = engine
        self.dist = dist
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, int(cfg.keep_last))
        if cfg.async_save:
            if getattr(engine, "supports_async_save", False):
                engine.async_save = True
            else:
                log.warning(
                    "checkpoint.async_save is not supported by the %s engine: saving synchronously",
                    type(engine).__name__,
                )
        self.async_save = bool(getattr(engine, "async_save", False))
        self._pending: Optional[tuple[int, Path]] = None  # (step, tmp dir) of an uncommitted async save
        self._pending_parts: dict[str, TrainedPart] = {}  # the parts of the save being committed (size estimate)
        self._last_save_time = time.monotonic()
        self._last_saved_step: Optional[int] = None
        if dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(TMP_PREFIX + "*"):
                log.warning("removing incomplete checkpoint %s (interrupted save)", stale)
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    # ------------------------------------------------------------------ queries
    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every committed checkpoint (``step_N`` with ``COMPLETE``), oldest first. Local."""
        return complete_checkpoints(self.root)

    def should_save(self, step: int, is_last: bool = False) -> bool:
        """Whether to save at ``step``. Collective when ``every_minutes`` is set (rank 0's clock decides)."""
        if step == self._last_saved_step:
            return False
        decision = bool(is_last)
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            decision = True
        if self.cfg.every_minutes:
            timed = (time.monotonic() - self._last_save_time) >= 60.0 * self.cfg.every_minutes
            flag = torch.tensor([1 if timed else 0], dtype=torch.int32, device=self.dist.device)
            if tdist.is_initialized() and self.dist.world_size > 1:
                tdist.broadcast(flag, src=0)
            decision = decision or bool(flag.item())
        return decision

    # ------------------------------------------------------------------ save / commit
    def save(self, step: int, parts: dict[str, TrainedPart], extra: dict[str, Any]) -> None:
        """Collective. Write a checkpoint of ``step``; committed now (sync) or when its write ends (async)."""
        self._finalize_pending()
        final = self.root / step_dirname(step)
        exists = broadcast_object(final.is_dir() and (final / COMPLETE).is_file() if self.dist.is_main else None)
        if exists:
            log.info("checkpoint %s already exists: not rewritten", final)
            self._mark_saved(step)
            return
        tmp = self.root / (TMP_PREFIX + step_dirname(step))
        error: Optional[BaseException] = None
        if self.dist.is_main:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as e:
                error = e
        self._agree_saved(error, tmp, parts)
        # The extra first, agreed on, so that no rank enters the engine's collectives after a peer failed.
        self._saving(lambda: save_extra(tmp, extra, self.dist), tmp, parts)
        self._saving(lambda: self.engine.save(tmp, parts), tmp, parts)
        self._mark_saved(step)
        if self.async_save:
            self._pending = (step, tmp)
            self._pending_parts = parts
        else:
            self._pending_parts = parts
            self._commit(step, tmp)

    def _saving(self, write, tmp: Path, parts: dict[str, TrainedPart]) -> None:
        """Collective: run ``write`` (a part of a save into ``tmp``) on every rank, then agree on the outcome."""
        error: Optional[BaseException] = None
        try:
            write()
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            error = e
        self._agree_saved(error, tmp, parts)

    def _agree_saved(self, error: Optional[BaseException], tmp: Path, parts: dict[str, TrainedPart]) -> None:
        """Collective: when any rank's write into ``tmp`` failed, remove ``tmp`` and raise on every rank (a
        ``CheckpointSpaceError`` when the disk is full)."""
        reports = all_gather_object(
            None if error is None else (f"{type(error).__name__}: {error}", _out_of_space(error))
        )
        failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
        if not failed:
            return
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        if any(full for _, (_, full) in failed):
            raise self._space_error(parts) from error
        if error is not None:
            raise error
        rank, (message, _) = failed[0]
        raise RuntimeError(f"saving checkpoint {tmp} failed on rank {rank}: {message}")

    def _needed_bytes(self, parts: dict[str, TrainedPart]) -> int:
        """About the size of a checkpoint: the newest complete one's, else 4 bytes x (weights + EMA + two optimizer
        moments) of every part."""
        complete = self.complete_checkpoints()
        if complete:
            try:
                marker = json.loads((complete[-1][1] / COMPLETE).read_text())
                return int(sum(marker.get("files", {}).values()))
            except (OSError, ValueError):
                pass
        total = 0
        for part in parts.values():
            n = sum(int(getattr(p, "ds_numel", p.numel())) for p in part.module.parameters())
            total += 4 * n * (3 + (part.ema is not None))
        return total

    def _space_error(self, parts: dict[str, TrainedPart]) -> CheckpointSpaceError:
        try:
            free = f"; {_gb(shutil.disk_usage(self.root).free)} free"
        except OSError:
            free = ""
        complete = self.complete_checkpoints()
        kept = f"; the previous checkpoint {complete[-1][1]} is kept" if complete else ""
        return CheckpointSpaceError(
            f"no space left on {self.root}, the checkpoint needs about {_gb(self._needed_bytes(parts))}{free}{kept}"
        )

    def _mark_saved(self, step: int) -> None:
        self._last_saved_step = step
        self._last_save_time = time.monotonic()

    def maybe_finalize(self) -> bool:
        """Collective, cheap: commit the pending async save if every rank's write has finished.

        Called by the trainer once per step on every rank. Without a pending save it does nothing (no
        communication; every rank agrees because ``save`` is collective). With one, it all-reduces one
        "my write is done" flag so that all ranks take the same decision. Returns True if it committed.
        """
        if self._pending is None:
            return False
        done = self.engine.pending_done()
        flag = torch.tensor([1 if done else 0], dtype=torch.int32, device=self.dist.device)
        if tdist.is_initialized() and self.dist.world_size > 1:
            tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
        if not bool(flag.item()):
            return False
        self._finalize_pending()
        return True

    def _finalize_pending(self) -> None:
        """Collective: wait for this rank's async write, then commit (barrier inside)."""
        if self._pending is None:
            return
        step, tmp = self._pending
        self._pending = None
        self._saving(self.engine.wait, tmp, self._pending_parts)
        self._commit(step, tmp)

    def _commit(self, step: int, tmp: Path) -> None:
        barrier()  # every rank's files are written
        error: Optional[BaseException] = None
        if self.dist.is_main:
            pause = os.environ.get(PAUSE_BEFORE_COMMIT_ENV)
            if pause:  # test hook, see PAUSE_BEFORE_COMMIT_ENV
                Path(pause).write_text(str(step))
                while True:
                    time.sleep(3600)
            try:
                self._commit_on_main(step, tmp)
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                error = e
                if tmp.exists():  # never committed: leave no partial directory
                    shutil.rmtree(tmp, ignore_errors=True)
                if _out_of_space(e):
                    error = self._space_error(self._pending_parts)
                    error.__cause__ = e
        # Doubles as the closing barrier; a failed commit on rank 0 fails every rank instead of hanging them (rank 0
        # raises its own exception).
        failure: Optional[RuntimeError] = None
        try:
            raise_if_any_rank_failed(
                None if error is None else f"committing checkpoint {tmp} failed: {type(error).__name__}: {error}"
            )
        except RuntimeError as e:
            failure = e
        if failure is not None:
            raise error if error is not None else failure

    def _commit_on_main(self, step: int, tmp: Path) -> None:
        marker = {"step": step, "time": time.time(), "world_size": self.dist.world_size, "files": _file_sizes(tmp)}
        atomic_write_json(tmp / COMPLETE, marker)
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            fsync_dir(d)
        final = self.root / step_dirname(step)
        if final.exists():  # a leftover without COMPLETE (save() skips complete ones)
            log.warning("replacing incomplete checkpoint directory %s", final)
            shutil.rmtree(final)
        os.rename(tmp, final)  # the commit point (a directory rename)
        fsync_dir(self.root)
        log.info("checkpoint committed: %s", final)
        self._apply_retention()

    def _apply_retention(self) -> None:
        complete = self.complete_checkpoints()
        keep = retained_steps([s for s, _ in complete], self.keep_last, self.cfg.keep_every)
        for step, path in complete:
            if step not in keep:
                log.info("retention: removing checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Collective: finish and commit a pending async save. Idempotent."""
        self._finalize_pending()

    # ------------------------------------------------------------------ resume
    def _verify_files(self, path: Path) -> None:
        marker = json.loads((path / COMPLETE).read_text())
        for rel, size in marker.get("files", {}).items():
            f = path / rel
            if not f.is_file():
                raise FileNotFoundError(f"{f} listed in {COMPLETE} is missing")
            if f.stat().st_size != size:
                raise OSError(f"{f} has {f.stat().st_size} bytes, {COMPLETE} recorded {size} (truncated?)")

    def load_latest(self, parts: dict[str, TrainedPart]) -> Optional[dict[str, Any]]:
        """Collective. Restore the newest loadable complete checkpoint; return its ``extra`` (None if none).

        A checkpoint that fails to load (missing/truncated/corrupt file, on any rank) is reported with a
        WARNING and the previous one is tried; once one loads, the ones that failed are set aside
        (``step_N.damaged-<time>``); if none loads, raises RuntimeError listing every attempt (nothing renamed: the
        cause may be the setup, e.g. a changed model, rather than the files).
        """
        self._finalize_pending()
        candidates = broadcast_object(self.complete_checkpoints() if self.dist.is_main else None)
        return self._load_newest(candidates, parts)

    def restore_before(self, step: int, parts: dict[str, TrainedPart]) -> Optional[dict[str, Any]]:
        """Collective (a rollback): restore the newest loadable checkpoint at or before ``step``, set the newer ones
        aside (``step_N.rolled-back-<time>``) and return its ``extra``; None when there is none."""
        self._finalize_pending()
        candidates = broadcast_object(self.complete_checkpoints() if self.dist.is_main else None)
        extra = self._load_newest([(s, p) for s, p in candidates if s <= step], parts)
        if extra is not None:
            self._set_aside_after(int(extra["step"]), "rolled-back")
        return extra

    def resume(self, parts: dict[str, TrainedPart], resume_from: Any = None) -> Optional[dict[str, Any]]:
        """Collective. Without ``resume_from``: ``load_latest``. With it (``checkpoint.resume_from``: a step of this
        run, or a checkpoint directory of any run), the first time: restore that checkpoint (an error if it does
        not load: it was asked for by name), set this run's newer checkpoints aside (``step_N.superseded-<time>``)
        and record the choice in ``checkpoints/RESUMED_FROM``; once recorded, ``load_latest`` (a requeue of the
        forked run continues from its own checkpoints)."""
        if resume_from is None:
            return self.load_latest(parts)
        self._finalize_pending()
        marker = self.root / RESUMED_FROM
        problem: Optional[str] = None
        path: Optional[Path] = None
        recorded = None
        if self.dist.is_main:
            try:
                recorded = json.loads(marker.read_text()) if marker.is_file() else None
                if recorded is None or recorded.get("resume_from") != str(resume_from):
                    path = self._resolve_resume_from(resume_from)
            except (OSError, ValueError) as e:
                problem = f"checkpoint.resume_from={resume_from!r}: {e}"
        raise_if_any_rank_failed(problem, ValueError)
        recorded, path = broadcast_object((recorded, path) if self.dist.is_main else None)
        if path is None:
            log.info("checkpoint.resume_from=%r was applied before (%s): resuming normally", resume_from, marker)
            return self.load_latest(parts)
        extra, error = self._try_load(path, parts)
        if error is not None:
            raise RuntimeError(f"checkpoint.resume_from={resume_from!r}: could not load {path}: {error}") from error
        step = int(extra["step"])
        self._set_aside_after(step, "superseded")
        if self.dist.is_main:
            record = {"resume_from": str(resume_from), "path": str(path.resolve()), "step": step, "time": time.time()}
            atomic_write_json(marker, record)
            log.info("resumed from checkpoint %s (checkpoint.resume_from=%r)", path, resume_from)
        barrier()
        self._mark_saved(step)
        return extra

    def _resolve_resume_from(self, value: Any) -> Path:
        """The complete checkpoint directory that ``checkpoint.resume_from`` names. Local (rank 0)."""
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            path = self.root / step_dirname(int(value))
            if not (path / COMPLETE).is_file():
                kept = [s for s, _ in self.complete_checkpoints()]
                raise FileNotFoundError(f"no complete checkpoint of step {int(value)} in {self.root}; kept: {kept}")
            return path
        path = Path(value)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint directory (a step_N with {COMPLETE})")
        return path

    def _set_aside_after(self, step: int, reason: str) -> None:
        """Collective: rank 0 renames this run's complete checkpoints newer than ``step`` (``set_aside``)."""
        if self.dist.is_main:
            for s, path in self.complete_checkpoints():
                if s > step:
                    moved = set_aside(path, reason)
                    log.warning("checkpoint %s set aside as %s (%s)", path, moved.name, reason)
        barrier()

    def _try_load(self, path: Path, parts: dict[str, TrainedPart]) -> tuple[Optional[dict[str, Any]], Any]:
        """Collective: verify and load one checkpoint; ``(extra, None)`` or ``(None, error)`` on every rank alike."""
        error: Optional[BaseException] = None
        extra: Optional[dict[str, Any]] = None
        try:
            self._verify_files(path)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure: try the previous one
            error = e
        # Agree on the verification result before entering the engine's collectives.
        if not self._all_ok(error is None):
            return None, error or RuntimeError("file check failed on another rank")
        try:
            extra = load_checkpoint(self.engine, path, parts)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            error = e
        if not self._all_ok(error is None):
            return None, error or RuntimeError("load failed on another rank")
        return extra, None

    def _load_newest(self, candidates: list[tuple[int, Path]], parts: dict[str, TrainedPart]) -> Optional[dict]:
        if not candidates:
            return None
        tried: list[str] = []
        failed: list[Path] = []
        for step, path in reversed(candidates):
            extra, error = self._try_load(path, parts)
            if error is None:
                if self.dist.is_main:
                    log.info("resumed from checkpoint %s", path)
                    for bad in failed:  # damaged: an older one loaded, so the setup is fine
                        moved = set_aside(bad, "damaged")
                        log.warning("damaged checkpoint %s set aside as %s", bad, moved.name)
                barrier()
                self._mark_saved(step)
                return extra
            tried.append(f"{path}: {type(error).__name__}: {error}")
            failed.append(path)
            log.warning(
                "could not load checkpoint %s (%s: %s); trying the previous one", path, type(error).__name__, error
            )
        raise RuntimeError("no checkpoint could be loaded from " + str(self.root) + "; tried:\n  " + "\n  ".join(tried))

    def _all_ok(self, ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.dist.device)
        if tdist.is_initialized() and self.dist.world_size > 1:
            tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
        return bool(flag.item())
