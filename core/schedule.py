"""Training schedules as pure functions of the global optimizer step.

``step`` is always the number of optimizer steps already taken (0 before the first update), so the value for
``step`` applies to the update that turns step into step + 1. Nothing here keeps state that is not derivable from
the step, so a resumed run computes exactly what an uninterrupted run would.

* ``epoch_of``: the fractional epoch of a step (a task's own epoch-based schedules build on it, e.g. the DiT's
  timestep-sampling phases in models/transport.py).
* LR schedules: ``constant`` (official), ``warmup_constant`` and ``cosine``.
"""

from __future__ import annotations

import math

from core.config import LRScheduleConfig

__all__ = ["epoch_of", "check_steps_per_epoch", "lr_at"]


def check_steps_per_epoch(steps_per_epoch: int) -> None:
    """ValueError unless ``steps_per_epoch`` > 0."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")


def epoch_of(step: int, steps_per_epoch: int) -> float:
    """Fractional epoch reached after ``step`` optimizer steps: ``step / steps_per_epoch``."""
    check_steps_per_epoch(steps_per_epoch)
    return step / steps_per_epoch


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
