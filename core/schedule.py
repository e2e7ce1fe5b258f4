"""Training schedules as pure functions of the global optimizer step.

``step`` is always the number of optimizer steps already taken (0 before the first update), so the value for
``step`` applies to the update that turns step into step + 1. Nothing here keeps state that is not derivable from
the step, so a resumed run computes exactly what an uninterrupted run would.

* Timestep-sampling phases are epoch-based: phase i applies while ``epoch_of(step) < until_epoch_i``.
  Official 800-epoch recipe: logit-normal(0, 1) until epoch 480 (600,480 steps at 1251 steps/epoch), then uniform.
* LR schedules: ``constant`` (official), ``warmup_constant`` and ``cosine``.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

from core.config import LRScheduleConfig, TimestepPhase

__all__ = [
    "epoch_of", "phase_switch_steps", "timestep_phase_at", "describe_phase", "describe_phases", "lr_at",
    "PhaseTracker",
]


def _check_spe(steps_per_epoch: int) -> None:
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")


def epoch_of(step: int, steps_per_epoch: int) -> float:
    """Fractional epoch reached after ``step`` optimizer steps: ``step / steps_per_epoch``."""
    _check_spe(steps_per_epoch)
    return step / steps_per_epoch


def _switch_step(until_epoch: float, steps_per_epoch: int) -> int:
    # First step whose epoch is >= until_epoch, in exact rational arithmetic (until_epoch as written in decimal),
    # so the boundary does not depend on float rounding of step / steps_per_epoch.
    return math.ceil(Fraction(repr(float(until_epoch))) * steps_per_epoch)


def phase_switch_steps(steps_per_epoch: int, phases: Sequence[TimestepPhase]) -> list[int]:
    """The global step at which each phase but the last ends (= the first step of the next phase)."""
    _check_spe(steps_per_epoch)
    return [_switch_step(p.until_epoch, steps_per_epoch) for p in phases if p.until_epoch is not None]


def timestep_phase_at(step: int, steps_per_epoch: int,
                      phases: Sequence[TimestepPhase]) -> tuple[int, TimestepPhase]:
    """(index, phase) in force at ``step``: the first phase whose ``until_epoch`` has not been reached yet.

    A phase without ``until_epoch`` never ends (it should be the last one; the config validation enforces that).
    """
    _check_spe(steps_per_epoch)
    if not phases:
        raise ValueError("no timestep-sampling phases configured")
    for i, phase in enumerate(phases):
        if phase.until_epoch is None or step < _switch_step(phase.until_epoch, steps_per_epoch):
            return i, phase
    # Every phase has an end and all of them are over: keep the last one.
    return len(phases) - 1, phases[-1]


def _num(x: float) -> str:
    return f"{x:g}"


def describe_phase(phase: TimestepPhase) -> str:
    """Short name of a sampler: ``lognorm(0,1)`` or ``uniform``."""
    if phase.kind == "lognorm":
        return f"lognorm({_num(phase.mean)},{_num(phase.std)})"
    return phase.kind


def describe_phases(phases: Sequence[TimestepPhase], steps_per_epoch: int | None = None) -> str:
    """One line for the start-of-run log, e.g.
    ``lognorm(0,1) until epoch 480 (step 600480), then uniform``."""
    parts = []
    for phase in phases:
        text = describe_phase(phase)
        if phase.until_epoch is not None:
            text += f" until epoch {_num(phase.until_epoch)}"
            if steps_per_epoch:
                text += f" (step {_switch_step(phase.until_epoch, steps_per_epoch)})"
        parts.append(text)
    return ", then ".join(parts)


def lr_at(step: int, base_lr: float, cfg: LRScheduleConfig, total_steps: int) -> float:
    """Learning rate for the update taken at ``step`` (0-based).

    * ``constant``: ``base_lr`` (official LightningDiT: no warmup, no decay).
    * ``warmup_constant``: linear from 0 at step 0 to ``base_lr`` at ``warmup_steps``, then constant.
    * ``cosine``: the same warmup, then half a cosine from ``base_lr`` (at ``warmup_steps``) down to
      ``min_lr_ratio * base_lr`` (at ``total_steps``, and after).
    """
    if cfg.kind == "constant":
        return base_lr
    warmup = max(0, cfg.warmup_steps)
    if warmup > 0 and step < warmup:
        return base_lr * max(step, 0) / warmup
    if cfg.kind == "warmup_constant":
        return base_lr
    if cfg.kind == "cosine":
        decay_steps = total_steps - warmup
        progress = 1.0 if decay_steps <= 0 else min(max((step - warmup) / decay_steps, 0.0), 1.0)
        floor = cfg.min_lr_ratio
        return base_lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown LR schedule kind {cfg.kind!r}")


class PhaseTracker:
    """Remembers the current timestep-sampling phase and says when it changes (for logging).

    Its state is a function of the step alone, so a resumed run reports correctly: give the step the run starts (or
    resumes) at, or let the first ``update`` call set the baseline silently. ``update(step)`` returns a message
    when the phase in force at ``step`` differs from the last one seen, else None.
    """

    def __init__(self, phases: Sequence[TimestepPhase], steps_per_epoch: int | None = None,
                 start_step: int | None = None):
        self.phases = list(phases)
        self.steps_per_epoch = steps_per_epoch
        self.index: int | None = None
        self.phase: TimestepPhase | None = None
        if steps_per_epoch is not None and start_step is not None:
            self.index, self.phase = timestep_phase_at(start_step, steps_per_epoch, self.phases)

    def update(self, step: int, steps_per_epoch: int | None = None) -> str | None:
        if steps_per_epoch is not None:
            self.steps_per_epoch = steps_per_epoch
        if self.steps_per_epoch is None:
            raise ValueError("PhaseTracker needs steps_per_epoch (in the constructor or in update)")
        index, phase = timestep_phase_at(step, self.steps_per_epoch, self.phases)
        old_index, old = self.index, self.phase
        self.index, self.phase = index, phase
        if old is None or old_index == index:
            return None
        return (f"step {step} (epoch {epoch_of(step, self.steps_per_epoch):.2f}): timestep sampling switches "
                f"{describe_phase(old)} -> {describe_phase(phase)}")
