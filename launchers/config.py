"""The ``launcher:`` section of an experiment config (Slurm settings read by launchers/slurm.py) and the cluster
profile: site settings (partition, account, QoS, constraint, setup lines) that every launcher command reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["JOB_KINDS", "LauncherConfig", "merge_launcher", "profile_path", "split_profile"]


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


# ------------------------------------------------------------------------------------------ cluster profile
PROFILE_ENV = "LLAT_SLURM_PROFILE"
DEFAULT_PROFILE = Path("~/.config/lightning_latent/slurm.yaml")
JOB_KINDS = ("train", "extract", "sample", "evaluate")


def profile_path(explicit: Optional[str] = None) -> Optional[Path]:
    """The cluster profile every launcher command reads: ``--profile PATH``, else ``$LLAT_SLURM_PROFILE``, else
    ``~/.config/lightning_latent/slurm.yaml`` when it exists; ``none`` (flag or variable) reads none."""
    value = explicit if explicit is not None else os.environ.get(PROFILE_ENV)
    if value is not None:
        if value.strip().lower() in ("", "none"):
            return None
        return Path(value).expanduser()
    default = DEFAULT_PROFILE.expanduser()
    return default if default.is_file() else None


def split_profile(data: Any, source: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(settings for every job, per-kind settings) of a profile's YAML mapping::

    partition: gpu          # any LauncherConfig field
    account: my-project
    setup: [module load cuda/12.4]
    kinds:                  # per job kind, on top of the above
      evaluate: {time_min: 120}
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a cluster profile is a mapping of launcher settings")
    data = dict(data)
    kinds = data.pop("kinds", None) or {}
    if not isinstance(kinds, dict) or any(k not in JOB_KINDS for k in kinds):
        bad = sorted(set(kinds) - set(JOB_KINDS)) if isinstance(kinds, dict) else kinds
        raise ValueError(f"{source}: kinds: expected a mapping of {', '.join(JOB_KINDS)}, got {bad!r}")
    return data, {k: dict(v or {}) for k, v in kinds.items()}


def merge_launcher(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; ``setup`` lines are concatenated and ``additional_parameters`` merged."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key == "setup" and isinstance(value, list):
                out["setup"] = [*out.get("setup", []), *value]
            elif key == "additional_parameters" and isinstance(value, dict):
                out["additional_parameters"] = {**out.get("additional_parameters", {}), **value}
            else:
                out[key] = value
    return out
