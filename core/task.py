"""The task contract: what a model family (DiT, VA-VAE) supplies to the shared trainer.

A task builds its trainable parts, names the optimisation phases of one training step and computes
the loss of each phase. Engines, checkpointing, data loading, logging and the loop are shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from core.config import TimestepPhase
from core.engines.base import PartSpec

if TYPE_CHECKING:
    from core.engines.base import Engine, TrainedPart
    from data.sources import DataSource


@dataclass
class StepContext:
    """What a task may know about the current step (all derived from the global step)."""
    step: int
    epoch: float
    timestep_phase: Optional[TimestepPhase] = None


class Task:
    """Base class. Subclasses override build_models, phases and loss."""

    def build_models(self) -> dict[str, PartSpec]:
        raise NotImplementedError

    def phases(self) -> list[str]:
        """Names of the parts stepped, in order, during one training step."""
        raise NotImplementedError

    def build_data(self, *, micro_batch_size: int, global_batch_size: int) -> "DataSource":
        """The training data (data/sources.py): micro-batches of this rank, resumable at any step."""
        raise NotImplementedError

    def check(self) -> None:
        """Cheap start-up checks of what the task will need later (e.g. the files in-loop evaluation reads), so
        a bad setting fails before training rather than hours in. Raises an error naming the config key."""

    def evaluate(self, parts: dict[str, Any], step: int) -> dict[str, Any]:
        """In-loop evaluation (collective; every `eval.every_epochs`): metrics to log, e.g. FID of EMA samples."""
        return {}

    def loss(self, phase: str, batch: dict[str, torch.Tensor], parts: dict[str, Any],
             ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss to back-propagate for `phase`, and detached metrics to log."""
        raise NotImplementedError

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A random micro-batch shaped like the training data, on the task's device (benchmarks, tests)."""
        raise NotImplementedError

    def flops_per_image(self) -> Optional[float]:
        """Training FLOPs (forward + backward) per image, for MFU; None if unknown."""
        return None

    # Task-owned random state (e.g. the timestep/noise generator) goes into checkpoints.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def prepare_parts(engine: "Engine", specs: dict[str, PartSpec]) -> dict[str, "TrainedPart"]:
    """Every part wrapped by ``engine`` as its spec says (the trainer and tools/bench_train.py)."""
    return {name: engine.prepare(name, spec.module, spec.optimizer, spec.ema_decay, blocks_attr=spec.blocks_attr,
                                 grad_clip=spec.grad_clip, compile_attrs=tuple(spec.compile_attrs))
            for name, spec in specs.items()}


def build_task(cfg, dist) -> Task:
    """The task named by `cfg.task`."""
    if cfg.task == "dit":
        from models.tasks.dit import DiTTask
        return DiTTask(cfg, dist)
    if cfg.task == "vavae":
        from models.tasks.vavae import VAVAETask
        return VAVAETask(cfg, dist)
    raise ValueError(f"task: unknown task {cfg.task!r}; known: 'dit', 'vavae'")
