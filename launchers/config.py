"""The ``launcher:`` section of an experiment config: Slurm settings read by launchers/slurm.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["LauncherConfig"]


@dataclass
class LauncherConfig:
    """The ``launcher:`` section of a config (all optional). CLI flags of the same name win."""

    nodes: int = 1
    gpus_per_node: int = 8  # one task per GPU; 0 = CPU nodes (then tasks_per_node, default 1)
    tasks_per_node: Optional[int] = None  # None: gpus_per_node, or 1 without GPUs
    cpus_per_task: Optional[int] = None  # None: the partition's default
    mem_gb: Optional[float] = None  # per node; None: the partition's default
    partition: Optional[str] = None
    time_min: int = 1440  # time limit of one run of the job (it requeues itself when reached)
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None  # nodes to avoid, e.g. "node[01-02]"
    exclusive: bool = False  # whole nodes only (no other job on them)
    signal_delay_s: int = 120  # pre-timeout warning (USR2) this long before the limit -> requeue
    max_requeues: int = 50  # stop requeuing once the job was restarted this many times
    job_name: Optional[str] = None  # default "<job>-<config name>"
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, env vars, ...)
    kill_on_bad_exit: bool = True  # srun --kill-on-bad-exit: a crashed rank stops the others at once
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # extra `#SBATCH --key=value` lines

    @property
    def num_tasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.num_tasks_per_node
