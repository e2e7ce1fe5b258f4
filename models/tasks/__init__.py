"""The training tasks by name (the config's ``task:``), for the composition root (train.py, tools).

An entry is the Task class (core/task.py), imported lazily: ``TASKS.get(name)`` gives the class, whose
``check_config`` holds the task's config checks (run by ``launchers.experiment.validate``), and
``build_task(cfg, dist)`` builds the task the trainer runs.
"""

from __future__ import annotations

from core.registry import Registry
from core.task import Task

__all__ = ["TASKS", "build_task"]

TASKS = Registry("task")
TASKS.register("dit", "models.tasks.dit:DiTTask")  # LightningDiT on precomputed latents
TASKS.register("vavae", "models.tasks.vavae:VAVAETask")  # VA-VAE tokenizer (autoencoder + discriminator)


def build_task(cfg, dist) -> Task:
    """The task named by ``cfg.task``, built for this process (``dist``: core.distributed.DistInfo)."""
    return TASKS.get(cfg.task)(cfg, dist)
