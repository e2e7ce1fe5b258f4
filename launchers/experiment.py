"""The experiment config: one YAML per training run, assembled from the sections of every layer.

Each section is defined (and checked) next to the code that owns it: the trainer's sections in core/config.py,
``data`` in data/config.py, ``model`` in models/lightningdit.py, ``transport``/``sampling``/``eval``/``repa`` in
models/dit_config.py, ``vavae`` in models/vavae_config.py, ``launcher`` in launchers/config.py. The loader
(``load_config``: YAML, dotted CLI overrides, types and unknown keys checked, errors naming the file or the command
line, the dotted key and the problem) is core/config.py's; ``validate`` runs every section's checks, then the
checks of the task named by ``task`` (``models.tasks.TASKS``: ``Task.check_config``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.config import (
    CheckpointConfig,
    Checks,
    ConfigError,
    EngineConfig,
    LRScheduleConfig,
    OptimizerConfig,
    TrainConfig,
    WandbConfig,
    build_config,
    check_training_config,
    load_typed_config,
)
from data.config import DataConfig, check_data_config
from launchers.config import LauncherConfig
from models.dit_config import (
    EvalConfig,
    RepaConfig,
    SamplingConfig,
    TransportConfig,
    check_eval_config,
    check_repa_config,
    check_sampling_config,
    check_transport_config,
)
from models.lightningdit import ModelConfig, check_model_config
from models.tasks import TASKS
from models.vavae_config import VAVAEConfig

__all__ = ["ExperimentConfig", "load_config", "config_from_dict", "validate"]


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    run_dir: str = ""  # "" -> runs/<name>
    seed: int = 0
    task: Literal["dit", "vavae"] = "dit"
    model: ModelConfig = field(default_factory=ModelConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # Slurm settings (launchers/slurm.py)
    vavae: VAVAEConfig = field(default_factory=VAVAEConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)  # REPA alignment of the DiT (models/repa.py); off


def config_from_dict(data: dict | None, source: str = "<dict>") -> ExperimentConfig:
    """Build an ExperimentConfig from a plain dict (types checked, values not; call ``validate`` for that).
    Used for YAML files and for the config dict embedded in checkpoints."""
    return build_config(ExperimentConfig, data, source)


def load_config(
    path: str | Path, overrides: Sequence[str] = (), *, world_size: int | None = None, check: bool = True
) -> ExperimentConfig:
    """Read one YAML file, apply dotted overrides, convert to the dataclass tree and validate it.

    ``world_size`` (optional) also checks the batch divisibility; ``check=False`` skips value validation (types
    and keys are always checked). Problems raise ConfigError naming the file (or "command line"), key and problem.
    """
    return load_typed_config(
        path, overrides, ExperimentConfig, check=(lambda cfg: _collect_errors(cfg, world_size)) if check else None
    )


def _collect_errors(cfg: ExperimentConfig, world_size: int | None) -> list[tuple[str, str, tuple[str, ...]]]:
    """(dotted key, problem, other keys involved) for every problem found: the sections' checks, then the task's."""
    checks = Checks()
    checks.need(bool(cfg.name.strip()), "name", "must not be empty")
    checks.need(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    check_model_config(cfg.model, checks)
    check_eval_config(cfg.eval, checks)
    check_transport_config(cfg.transport, checks)
    check_data_config(cfg.data, checks)
    check_training_config(cfg, checks, world_size)  # optimizer, lr_schedule, train, engine, checkpoint
    check_sampling_config(cfg.sampling, checks)
    check_repa_config(cfg.repa, checks)
    if cfg.task in TASKS:
        TASKS.get(cfg.task).check_config(cfg, checks)
    return checks.errors


def validate(cfg: ExperimentConfig, world_size: int | None = None, *, source: str = "config") -> ExperimentConfig:
    """Check values: positive sizes, lr > 0, 0 <= ema_decay < 1, betas in [0, 1), timestep-phase order, at least one
    of epochs/max_steps, model.type in the registry (or "custom"), the task's own needs, and batch divisibility when
    ``world_size`` is given. Raises ConfigError listing every problem as ``<source>: <dotted.key>: <problem>``;
    returns ``cfg``."""
    errors = _collect_errors(cfg, world_size)
    if errors:
        raise ConfigError("\n".join(f"{source}: {key}: {problem}" for key, problem, _ in errors))
    return cfg
