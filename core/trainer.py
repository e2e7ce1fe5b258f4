"""The training loop, shared by every task (DiT, VA-VAE) and every engine (FSDP2, DeepSpeed).

One optimizer step = for each phase of the task: `accum` micro-batches of forward/backward, then the
part's step (clip, optimizer, EMA). Everything that decides what happens at a step (LR, epoch, data position,
and what the task derives from its StepContext, e.g. the DiT's timestep phase) is a function of the global step,
so a resumed run continues exactly where the checkpoint left it: same data order and flips, same RNG draws, same
optimizer moments, same EMA.

The trainer gets a built Task (models.tasks.build_task at the composition root, e.g. train.py) and a validated
config (launchers.experiment.validate); it knows nothing of a task's concepts beyond core/task.py.

Preemption: SIGTERM / SIGUSR1 / SIGUSR2 set a flag; all ranks agree on it at a step boundary (at most one step
later, core.hostsync.StopAgreement), write a checkpoint and exit with REQUEUE_EXIT_CODE so that a launcher can
requeue the job.

No host syncs between log steps (core/hostsync.py): a non-finite update is skipped on the device by the engine, the
skipped-step counters live on the device and are read on log steps, before checkpoints and evaluation, and at the
end (the consecutive non-finite limit is enforced at most ``train.log_every - 1`` steps late, for the step at which
it was reached); the stop agreement is a CPU all-reduce started at one step and read at the next.

Rollback (``train.rollback``): where the counters are read, a streak of ``on_nonfinite_streak`` non-finite steps (or,
on a log step, a loss spike) restores the newest checkpoint before the failure in-process (the engine's load path,
``CheckpointManager.restore_before``; newer checkpoints are set aside), skips the data the run read since that
checkpoint (``data_offset``: the data position is ``step + data_offset``, kept in every later checkpoint and in
``<run_dir>/rollbacks.jsonl``, so a resume reproduces it), scales the LR for a while and logs the event; after
``max_rollbacks`` rollbacks it raises ``RollbackLimitError``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm import tqdm

from core.checkpoint import CheckpointManager
from core.config import config_to_dict, derived, resolve_run_dir, save_config
from core.debug import debug_sleep_seconds
from core.distributed import DistInfo, barrier, broadcast_object
from core.engines import build_engine
from core.fileio import atomic_write_text
from core.hostsync import NonFiniteCounter, StopAgreement
from core.metrics import MetricLogger, Throughput, peak_flops
from core.rng import reseed_global, rng_state, seed_everything, set_rng_state
from core.sample_trace import SampleIdTrace
from core.schedule import lr_at
from core.task import StepContext, Task, prepare_parts

log = logging.getLogger("llat")

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "checkpointed on a signal, run me again"
REQUEUE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class NonFiniteLossError(RuntimeError):
    pass


class RollbackLimitError(RuntimeError):
    """A failure that a rollback cannot handle: ``train.rollback.max_rollbacks`` reached, or no checkpoint to restore."""


ROLLBACK_LOG = "rollbacks.jsonl"  # in the run directory: one JSON line per rollback (train.rollback)


@dataclass
class TrainResult:
    step: int
    exit_code: int  # 0 finished, REQUEUE_EXIT_CODE stopped on a signal after checkpointing


def train_step(
    task: Task, engine, parts: dict[str, Any], batches: list[dict[str, torch.Tensor]], ctx: StepContext
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step over all phases of ``task`` on ``batches`` (the micro-batches of this rank): for each
    phase, forward (``Task.loss`` under ``engine.autocast()``) and backward per micro-batch (gradients reduced on
    the last), then the part's step. Returns the metrics (averaged over the micro-batches, per phase) and whether
    every grad norm was finite, as a 0-dim bool tensor on the device (nothing is read on the host here). Also timed
    by tools/bench_train.py."""
    accum = len(batches)
    metrics: dict[str, torch.Tensor] = {}
    finite = None
    for phase in task.phases():
        part = parts[phase]
        sums: dict[str, torch.Tensor] = {}
        for k, batch in enumerate(batches):
            with engine.autocast():
                loss, m = task.loss(phase, batch, parts, ctx)
            part.backward(loss / accum, sync=(k == accum - 1))
            for key, value in m.items():
                sums[key] = sums.get(key, 0) + value / accum
        grad_norm = part.step()
        prefix = "" if len(task.phases()) == 1 else f"{phase}/"
        metrics.update({prefix + k: v for k, v in sums.items()})
        metrics[prefix + "grad_norm"] = grad_norm
        ok = torch.isfinite(grad_norm)
        finite = ok if finite is None else torch.logical_and(finite, ok)
    return metrics, finite


class Trainer:
    def __init__(self, cfg: Any, dist: DistInfo, task: Task):
        """``cfg``: the experiment config (launchers/experiment.py), validated for ``dist.world_size``; ``task``:
        built for ``cfg`` and this process (its construction must not depend on the global RNG state: the trainer
        seeds it before ``task.build_models()``, the same on every rank)."""
        self.cfg = cfg
        self.dist = dist
        self.run_dir = resolve_run_dir(cfg)
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        # The same initial weights on every rank (whatever the engine and world size), then per-rank streams.
        seed_everything(cfg.seed)
        self.task = task
        self.task.check()
        specs = self.task.build_models()
        seed_everything(cfg.seed + dist.rank)

        # Data: every rank reads micro-batches of its share of the global batch.
        d = derived(cfg, dist.world_size, dataset_size=None)
        self.micro_batch = d.micro_batch_size
        self.accum = d.grad_accum_steps
        self.data = self.task.build_data(
            micro_batch_size=self.micro_batch, global_batch_size=cfg.train.global_batch_size
        )
        self.steps_per_epoch = self.data.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"data.path: the dataset at {cfg.data.path!r} has {self.data.num_samples} samples, "
                f"fewer than one global batch (train.global_batch_size={cfg.train.global_batch_size})"
            )
        self.total_steps = derived(
            cfg, dist.world_size, dataset_size=self.steps_per_epoch * cfg.train.global_batch_size
        ).total_steps

        self.engine = build_engine(cfg.engine, dist)
        self._base_lr = {name: spec.optimizer.lr for name, spec in specs.items()}
        self.parts = prepare_parts(self.engine, specs)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint, self.engine, dist)

        self.step = 0
        self.nonfinite_streak = 0
        self.skipped_steps = 0
        # Rollback state (train.rollback): the data position is step + data_offset; the LR is scaled before
        # lr_scale_until; rollback_events: how many events of ROLLBACK_LOG this state includes.
        self.data_offset = 0
        self.lr_scale_until = 0
        self.rollback_events = 0
        self.loss_history: list[float] = []
        self._rollback_log = self.run_dir / ROLLBACK_LOG
        rb = cfg.train.rollback
        self._nonfinite_limit = (
            rb.on_nonfinite_streak
            if rb.enabled and rb.on_nonfinite_streak is not None
            else cfg.train.max_consecutive_nonfinite
        )
        if cfg.checkpoint.resume or cfg.checkpoint.resume_from is not None:
            extra = self.checkpoints.resume(self.parts, cfg.checkpoint.resume_from)
            if extra is not None:
                self._restore(extra)
                self._replay_rollbacks()
        # Device-side copies of the two counters above (read back by _sync_nonfinite) and the stop agreement.
        self.nonfinite = NonFiniteCounter(dist.device, self._nonfinite_limit, self.nonfinite_streak, self.skipped_steps)
        self._stop_agreement = StopAgreement(dist.world_size)

        self.metrics = MetricLogger(
            self.run_dir, cfg.wandb, cfg.name, config_to_dict(cfg), dist.is_main, resume_step=self.step
        )
        self.throughput = Throughput(self.task.flops_per_image(), dist.world_size, peak_flops(dist.device))
        self._stop_requested = False
        # Debug/test knob: sleep after every step, so that preemption tests can hit a run mid-way (core/debug.py).
        self._debug_step_sleep = debug_sleep_seconds("STEP")
        self._sample_trace = SampleIdTrace.from_env(self.run_dir, dist.is_main)
        self._installed_handlers: dict[int, Any] = {}
        # Opened around the parts of every step that must not read the device on the host (the step itself and the
        # stop agreement; not the log / evaluation / checkpoint blocks): a check hook, e.g.
        # core.hostsync.HostSyncCounter or cuda_sync_debug("error") (tools/check_host_sync.py, the tests).
        self.step_guard: Callable[[], AbstractContextManager] = contextlib.nullcontext
        self.metrics.event(
            f"run {cfg.name}: {dist.world_size} rank(s), global batch {cfg.train.global_batch_size} "
            f"(micro {self.micro_batch} x accum {self.accum}), {self.steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps total, starting at step {self.step}, run dir {self.run_dir}"
        )

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "rng": rng_state(),
            "task": self.task.state_dict(),
            "data": self.data.state_dict(),
            "nonfinite_streak": self.nonfinite_streak,
            "skipped_steps": self.skipped_steps,
            "data_offset": self.data_offset,
            "lr_scale_until": self.lr_scale_until,
            "rollback_events": self.rollback_events,
            "loss_history": list(self.loss_history),
            "config": config_to_dict(self.cfg),
            "world_size": self.dist.world_size,
        }

    def _restore(self, extra: dict[str, Any]) -> None:
        self.step = int(extra["step"])
        self.data.load_state_dict(extra["data"])
        self.nonfinite_streak = int(extra.get("nonfinite_streak", 0))
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self.data_offset = int(extra.get("data_offset", 0))
        self.lr_scale_until = int(extra.get("lr_scale_until", 0))
        self.rollback_events = int(extra.get("rollback_events", 0))
        self.loss_history = [float(v) for v in extra.get("loss_history", [])]
        if extra.get("world_size_changed"):
            # Per-rank random streams cannot map onto a new world size: fresh ones for the global generators and
            # the task's own, derived from (seed, step, rank) (core/rng.py), so that the continuation neither
            # replays the draws of step 0 nor depends on anything but the checkpoint and the new world size.
            reseed_global(self.cfg.seed, self.step, self.dist.rank)
            self.task.reseed(self.step, self.dist.rank)
            log.warning(
                "resumed on a different world size: data order is kept, per-rank RNG streams "
                "(global and the task's) are re-seeded from (seed, step, rank); bitwise continuation "
                "needs the same world size"
            )
        else:
            set_rng_state(extra["rng"])
            self.task.load_state_dict(extra["task"])
        log.info("resumed from step %d", self.step)

    # ------------------------------------------------------------------ rollback
    def _read_rollback_log(self) -> list[dict[str, Any]]:
        """The events of ROLLBACK_LOG (rank 0 reads, every rank gets them). Collective."""
        events = None
        if self.dist.is_main:
            path = self._rollback_log
            events = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        return broadcast_object(events)

    def _replay_rollbacks(self) -> None:
        """After a resume: apply the rollbacks recorded after the checkpoint was written that restored this very
        checkpoint (the run rolled back to it and stopped before its next checkpoint), so that the data skip and the
        LR scaling are the same as in the run that rolled back. Collective."""
        events = self._read_rollback_log()
        for event in events[self.rollback_events :]:
            if int(event["to_step"]) == self.step:
                self._apply_rollback_event(event)
                log.warning("resume: re-applied rollback %d (data offset %d)", event["rollback"], self.data_offset)

    def _apply_rollback_event(self, event: dict[str, Any]) -> None:
        self.data_offset = int(event["data_offset"])
        self.lr_scale_until = int(event["lr_scale_until"])
        self.rollback_events = int(event["rollback"])

    def _rollback(self, reason: str, good_step: int) -> None:
        """Collective: restore the newest checkpoint at or before ``good_step`` in-process, skip the data read since
        then, log the event; raise RollbackLimitError when ``max_rollbacks`` is reached or nothing can be restored."""
        rb = self.cfg.train.rollback
        failed_at, offset = self.step, self.data_offset
        events = self._read_rollback_log()
        if len(events) >= rb.max_rollbacks:
            raise RollbackLimitError(
                f"{reason}; gave up after {len(events)} rollback(s) (train.rollback.max_rollbacks={rb.max_rollbacks}, "
                f"see {self._rollback_log})"
            )
        extra = self.checkpoints.restore_before(good_step, self.parts)
        if extra is None:
            raise RollbackLimitError(f"{reason}; no checkpoint at or before step {good_step} to roll back to")
        self._restore(extra)
        event = {
            "rollback": len(events) + 1,
            "reason": reason,
            "failed_at": failed_at,
            "to_step": self.step,
            "skipped_data_steps": failed_at - self.step,
            "data_offset": offset + failed_at - self.step,
            "lr_scale": rb.lr_scale,
            "lr_scale_until": self.step + rb.lr_scale_steps,
            "time": time.time(),
        }
        if self.dist.is_main:
            old = self._rollback_log.read_text() if self._rollback_log.is_file() else ""
            atomic_write_text(self._rollback_log, old + json.dumps(event) + "\n")
        barrier()
        self._apply_rollback_event(event)
        self.nonfinite = NonFiniteCounter(
            self.dist.device, self._nonfinite_limit, self.nonfinite_streak, self.skipped_steps
        )
        self.metrics.log(
            failed_at,
            {
                "rollback/count": event["rollback"],
                "rollback/to_step": self.step,
                "rollback/skipped_data_steps": event["skipped_data_steps"],
            },
        )
        self.metrics.event(
            f"rollback {event['rollback']}/{rb.max_rollbacks} at step {failed_at}: {reason}; restored step "
            f"{self.step}, skipping {event['skipped_data_steps']} step(s) of data (data offset "
            f"{event['data_offset']})"
            + (f", LR x{rb.lr_scale} until step {event['lr_scale_until']}" if rb.lr_scale_steps else "")
        )

    def _loss_spike(self, metrics: dict[str, torch.Tensor]) -> Optional[str]:
        """On a log step: the loss-spike failure (train.rollback.loss_spike_factor), or None (the loss joins the
        window). A host read, done where the step is logged anyway."""
        rb = self.cfg.train.rollback
        if not (rb.enabled and rb.loss_spike_factor):
            return None
        key = "loss" if "loss" in metrics else next((k for k in metrics if k.endswith("/loss")), None)
        if key is None:
            return None
        value = float(metrics[key])
        history = self.loss_history
        if len(history) >= rb.loss_window and math.isfinite(value):
            mean = sum(history) / len(history)
            if value > rb.loss_spike_factor * mean:
                return (
                    f"loss spike: {key}={value:.4g} > {rb.loss_spike_factor} x {mean:.4g} (the mean of the last "
                    f"{len(history)} logged values)"
                )
        if math.isfinite(value):
            self.loss_history = (history + [value])[-rb.loss_window :]
        return None

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        self._stop_requested = True
        log.warning(
            "received signal %d: will checkpoint at the next step boundary and exit %d", signum, REQUEUE_EXIT_CODE
        )

    def _install_signal_handlers(self) -> None:
        for sig in REQUEUE_SIGNALS:
            self._installed_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._installed_handlers.items():
            signal.signal(sig, handler)
        self._installed_handlers.clear()

    def _any_rank_stopping(self) -> bool:
        """Non-blocking poll of the stop agreement (no device sync): True on every rank at the same step."""
        return self._stop_agreement.poll(self._stop_requested)

    def _sync_nonfinite(self) -> Optional[tuple[str, int]]:
        """Read the device's skipped-step counters (a host sync: log steps, checkpoints, evaluation, the end), log the
        steps skipped since the last read, and raise if the consecutive limit was reached at some step; with
        ``train.rollback`` on non-finite streaks, return ``(reason, last good step)`` instead."""
        state = self.nonfinite.read()
        new = state.skipped - self.skipped_steps
        self.nonfinite_streak, self.skipped_steps = state.streak, state.skipped
        if new > 0:
            log.warning(
                "%d step(s) up to step %d had a non-finite gradient norm: update skipped (%d in a row now, %d in all)",
                new,
                self.step,
                state.streak,
                state.skipped,
            )
        if state.tripped_step is not None:
            rb = self.cfg.train.rollback
            if rb.enabled and rb.on_nonfinite_streak is not None:
                reason = (
                    f"{rb.on_nonfinite_streak} consecutive steps with a non-finite loss/gradient at step "
                    f"{state.tripped_step} (train.rollback.on_nonfinite_streak={rb.on_nonfinite_streak})"
                )
                return reason, state.tripped_step - rb.on_nonfinite_streak
            limit = self.cfg.train.max_consecutive_nonfinite
            raise NonFiniteLossError(
                f"{limit} consecutive steps with a non-finite loss/gradient at step {state.tripped_step} "
                f"(train.max_consecutive_nonfinite={limit}); "
                f"try a lower optimizer.lr, train.grad_clip, or model.use_qknorm=true"
            )
        return None

    # ------------------------------------------------------------------ loop
    def _next_micro_batches(self, it) -> tuple[list[dict[str, torch.Tensor]], float]:
        t0 = time.perf_counter()
        batches = [next(it) for _ in range(self.accum)]
        waited = time.perf_counter() - t0
        if self._sample_trace is not None:  # LLAT_DEBUG_SAMPLE_IDS (core/sample_trace.py)
            self._sample_trace.record(self.step, batches)
        return batches, waited

    def _train_step(self, batches, ctx: StepContext) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step over all phases; returns metrics and whether every update was finite (on the device)."""
        return train_step(self.task, self.engine, self.parts, batches, ctx)

    def _eval_due(self) -> frozenset[str]:
        """The evaluations due after this step: ``"samples"`` every ``eval.every_epochs`` (in-loop FID ...), ``"val"``
        every ``eval.val_every_epochs`` (a validation loss), each also at the last step; empty when none is."""
        due = set()
        for kind, every in (
            ("samples", self.cfg.eval.every_epochs),
            ("val", getattr(self.cfg.eval, "val_every_epochs", None)),
        ):
            if every:
                interval = max(1, round(every * self.steps_per_epoch))
                if self.step % interval == 0 or self.step == self.total_steps:
                    due.add(kind)
        return frozenset(due)

    def _save(self) -> bool:
        """Checkpoint the current step, unless the counters (read first: current counters in the checkpoint; never
        save past the limit) call for a rollback: then roll back instead and return False."""
        failure = self._sync_nonfinite()
        if failure is not None:
            self._rollback(*failure)
            return False
        self.checkpoints.save(self.step, self.parts, self._extra_state())
        return True

    def train(self) -> TrainResult:
        cfg = self.cfg
        self._install_signal_handlers()
        try:
            return self._train_loop(cfg)
        finally:
            self._restore_signal_handlers()

    def _train_loop(self, cfg) -> TrainResult:
        bar = None
        if self.dist.is_main and cfg.train.progress_bar and sys.stderr.isatty():  # log lines when not a terminal
            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        exit_code = 0
        while self.step < self.total_steps:
            # The data position runs data_offset steps ahead of the optimizer step after a rollback.
            epoch, step_in_epoch = divmod(self.step + self.data_offset, self.steps_per_epoch)
            it = self.data.iterator(epoch, step_in_epoch)
            rolled_back = False
            for _ in range(step_in_epoch, self.steps_per_epoch):
                if self.step >= self.total_steps:
                    break
                ctx = StepContext(
                    step=self.step, epoch=self.step / self.steps_per_epoch, steps_per_epoch=self.steps_per_epoch
                )
                for message in self.task.on_step(ctx):
                    self.metrics.event(message)
                # Each part follows the schedule relative to its own base LR (VA-VAE: autoencoder and
                # discriminator); the logged `lr` is the one of `optimizer.lr`.
                scale = lr_at(self.step, 1.0, cfg.lr_schedule, self.total_steps)
                if self.step < self.lr_scale_until:  # after a rollback (train.rollback.lr_scale)
                    scale *= cfg.train.rollback.lr_scale
                lr = scale * cfg.optimizer.lr
                for name, part in self.parts.items():
                    part.set_lr(scale * self._base_lr[name])
                batches, data_wait = self._next_micro_batches(it)
                with self.step_guard():
                    metrics, finite = self._train_step(batches, ctx)
                    self.nonfinite.update(finite, self.step + 1)
                self.step += 1
                self.throughput.add(cfg.train.global_batch_size, data_wait)
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    failure = self._sync_nonfinite()
                    if failure is None:
                        spike = self._loss_spike(metrics)
                        if spike is not None:  # the last log step was fine: restore no later than it
                            failure = (spike, self.step - cfg.train.log_every)
                    if failure is not None:
                        self._rollback(*failure)
                        rolled_back = True
                        break
                    record = {
                        **metrics,
                        "lr": lr,
                        "epoch": self.step / self.steps_per_epoch,
                        **self.task.step_metrics(ctx),
                        "skipped_steps": self.skipped_steps,
                        **self.throughput.summary(),
                    }
                    self.metrics.log(self.step, record, console=bar is None)
                    if bar is not None:
                        bar.set_postfix(loss=f"{float(metrics.get('loss', float('nan'))):.4f}")
                if bar is not None:
                    bar.update(1)
                if self._debug_step_sleep:
                    time.sleep(self._debug_step_sleep)
                due = self._eval_due()
                if due:
                    failure = self._sync_nonfinite()
                    if failure is not None:
                        self._rollback(*failure)
                        rolled_back = True
                        break
                    results = self.task.evaluate(self.parts, self.step, due)
                    if results:
                        self.metrics.log(self.step, {f"eval/{k}": v for k, v in results.items()})
                with self.step_guard():
                    self.checkpoints.maybe_finalize()
                    stopping = self._any_rank_stopping()
                is_last = self.step == self.total_steps
                if stopping or self.checkpoints.should_save(self.step, is_last):
                    rolled_back = not self._save()
                if stopping:
                    self.checkpoints.close()
                    self.metrics.event(
                        f"stopped on a signal at step {self.step}: checkpoint written, "
                        f"exit code {REQUEUE_EXIT_CODE} (requeue)"
                    )
                    exit_code = REQUEUE_EXIT_CODE
                    break
                if rolled_back:
                    break
            del it
            if exit_code:
                break
        self._sync_nonfinite()
        self._stop_agreement.close()
        if bar is not None:
            bar.close()
        return TrainResult(step=self.step, exit_code=exit_code)

    def close(self) -> None:
        self.checkpoints.close()
        self.metrics.close()
