"""The task contract: what a model family (DiT, VA-VAE) supplies to the shared trainer.

A task builds its trainable parts, names the optimisation phases of one training step and computes
the loss of each phase. Engines, checkpointing, data loading, logging and the loop are shared.
The tasks themselves are registered by name in ``models.tasks`` (``TASKS``, ``build_task``); the composition
root (train.py, tools) builds one and hands it to the trainer, so core never imports a task.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol

import torch

from core.config import Checks
from core.engines.base import PartSpec

if TYPE_CHECKING:
    from core.engines.base import Engine, TrainedPart


class DataSource(Protocol):
    """The training data of a task (``Task.build_data``; implementations in data/sources.py): micro-batches of
    this rank from any position, so that a resume needs only the global step."""

    steps_per_epoch: int
    num_samples: int

    def iterator(self, epoch: int, step_in_epoch: int) -> Iterator[dict[str, Any]]:
        """Micro-batches of `epoch` starting at optimizer step `step_in_epoch` (accum per step)."""

    def state_dict(self) -> dict[str, Any]:
        """What must stay fixed across resumes of the run (never the position)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StepContext:
    """What a task may know about the current step (all derived from the global step), e.g. to derive its own
    step-dependent choices (the DiT's timestep-sampling phase). ``steps_per_epoch`` is None outside the trainer's
    loop (benchmarks): the task then uses its first-step settings."""

    step: int
    epoch: float
    steps_per_epoch: Optional[int] = None


class Task:
    """Base class. Subclasses override build_models, phases and loss; the other methods have neutral defaults."""

    @classmethod
    def check_config(cls, cfg: Any, checks: Checks) -> None:
        """Value checks of the task's own config (its sections and what it needs of the shared ones, e.g.
        ``data.kind``), recorded with ``checks.need(ok, key, problem, related)``. The experiment's ``validate``
        (launchers/experiment.py) runs them after the shared sections' checks, before anything is built (the Slurm
        launcher validates before submitting)."""

    def build_models(self) -> dict[str, PartSpec]:
        raise NotImplementedError

    def phases(self) -> list[str]:
        """Names of the parts stepped, in order, during one training step."""
        raise NotImplementedError

    def build_data(self, *, micro_batch_size: int, global_batch_size: int) -> DataSource:
        """The training data (data/sources.py): micro-batches of this rank, resumable at any step."""
        raise NotImplementedError

    def check(self) -> None:
        """Cheap start-up checks of what the task will need later (e.g. the files in-loop evaluation reads), so
        a bad setting fails before training rather than hours in. Raises an error naming the config key."""

    def on_step(self, ctx: StepContext) -> list[str]:
        """Called by the trainer before each optimizer step: messages to log as run events (e.g. the DiT's
        "timestep sampling switches ..."). The first call (at the start or resume step) sets the baseline."""
        return []

    def step_metrics(self, ctx: StepContext) -> dict[str, Any]:
        """Values of the step ``ctx`` logged with the trainer's metrics (after ``lr`` and ``epoch``), e.g. the
        DiT's ``timestep_phase``; not averaged over micro-batches."""
        return {}

    def evaluate(
        self, parts: dict[str, Any], step: int, kinds: frozenset[str] = frozenset({"samples"})
    ) -> dict[str, Any]:
        """In-loop evaluation (collective): metrics to log (the trainer prefixes ``eval/``). ``kinds``: what is due,
        ``"samples"`` every ``eval.every_epochs`` (e.g. FID of EMA samples), ``"val"`` every
        ``eval.val_every_epochs`` (e.g. a validation loss)."""
        return {}

    def loss(
        self, phase: str, batch: dict[str, torch.Tensor], parts: dict[str, Any], ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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

    def reseed(self, step: int, rank: int) -> None:
        """Fresh task-owned random state for ``rank`` resuming at ``step`` when the checkpoint's cannot be used
        (written by another world size). Seed every generator from ``core.rng.seed_for(cfg.seed, step, rank,
        <stream name>)``, never from the start-of-run seed: a run resumed at step 600k must not draw the noise
        of its first steps again. A task with random state in ``state_dict`` must override this."""
        if self.state_dict():
            raise NotImplementedError(
                f"{type(self).__name__} checkpoints random state but cannot re-seed it "
                f"for a resume on another world size: implement Task.reseed"
            )


def prepare_parts(engine: Engine, specs: dict[str, PartSpec]) -> dict[str, TrainedPart]:
    """Every part wrapped by ``engine`` as its spec says (the trainer and tools/bench_train.py)."""
    return {
        name: engine.prepare(
            name,
            spec.module,
            spec.optimizer,
            spec.ema_decay,
            blocks_attr=spec.blocks_attr,
            grad_clip=spec.grad_clip,
            compile_attrs=tuple(spec.compile_attrs),
        )
        for name, spec in specs.items()
    }
