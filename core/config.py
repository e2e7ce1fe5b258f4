"""Typed experiment configuration: one YAML per experiment, dotted CLI overrides, clear errors.

The schema is a tree of dataclasses. Every field has a default, so a YAML file only states what differs.
Loading (``load_config``) validates types and values and reports the file, the dotted key and the problem.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ModelConfig:
    """LightningDiT architecture (official keyword names)."""
    type: str = "LightningDiT-XL/1"          # registry name; see models.lightningdit.LightningDiT_models
    input_size: int = 16                     # latent grid (image_size / tokenizer downsampling)
    in_channels: int = 32
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    use_qknorm: bool = False
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    wo_shift: bool = False
    # Only for the "custom" type (tiny test / demo models); ignored for registry names.
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    patch_size: int = 1
    mlp_ratio: float = 4.0
    init_from: Optional[str] = None          # path of a checkpoint to initialise weights from (ours or official)


@dataclass
class TimestepPhase:
    """One phase of timestep sampling. Phases apply in order; the last has no ``until_epoch``."""
    kind: Literal["lognorm", "uniform"] = "lognorm"
    until_epoch: Optional[float] = None      # phase ends when epoch (fractional, from the global step) reaches this
    mean: float = 0.0                        # logit-normal location (lognorm only)
    std: float = 1.0                         # logit-normal scale (lognorm only)


@dataclass
class TransportConfig:
    use_cosine_loss: bool = True             # official "velocity direction" loss, weight 1
    timestep_sampling: list[TimestepPhase] = field(
        default_factory=lambda: [TimestepPhase("lognorm", 480.0), TimestepPhase("uniform")])


@dataclass
class DataConfig:
    """Training data: MDS shards of precomputed latents (see data/streaming.py)."""
    kind: Literal["streaming"] = "streaming"
    path: str = ""                           # local MDS directory (or the local cache of `remote`)
    remote: Optional[str] = None             # optional remote for streaming (s3://..., gs://...)
    latent_norm: bool = True                 # per-channel (z - mean) / std with the stats stored with the dataset
    latent_multiplier: float = 1.0
    random_flip: bool = True                 # pick latent_flip with p = 0.5
    use_features: bool = False               # also read the DINOv2 `features` column
    num_workers: int = 2
    shuffle: bool = True
    predownload: Optional[int] = None


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adam"] = "adamw"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    fused: Optional[bool] = None             # None: fused on CUDA, foreach elsewhere


@dataclass
class LRScheduleConfig:
    kind: Literal["constant", "warmup_constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0                # cosine floor as a fraction of lr


@dataclass
class TrainConfig:
    global_batch_size: int = 1024
    micro_batch_size: Optional[int] = None   # per rank; None = global / world (no accumulation)
    epochs: Optional[float] = 800.0          # stop after this many epochs ...
    max_steps: Optional[int] = None          # ... or this many optimizer steps (whichever comes first)
    ema_decay: float = 0.9999
    grad_clip: Optional[float] = None        # max grad norm; None = off (official)
    max_consecutive_nonfinite: int = 10      # NaN/inf guard: skip bad steps, stop after this many in a row
    log_every: int = 100
    progress_bar: bool = True


@dataclass
class EngineConfig:
    kind: Literal["fsdp2", "deepspeed"] = "fsdp2"
    precision: Literal["bf16", "fp32"] = "bf16"   # compute dtype; master weights, optimizer and reductions stay fp32
    activation_checkpointing: bool = False
    compile: bool = False                    # torch.compile per block
    reshard_after_forward: bool = True
    # DeepSpeed only
    zero_stage: int = 2
    offload_optimizer: bool = False
    overlap_comm: bool = True
    bucket_size: int = 500_000_000


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = 20000
    every_minutes: Optional[float] = None
    keep_last: int = 2                       # keep the newest K ...
    keep_every: Optional[int] = None         # ... plus every checkpoint whose step is a multiple of N
    async_save: bool = False
    resume: bool = True                      # auto-resume from the newest complete checkpoint in run_dir


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "lightning-latent"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class SamplingConfig:
    method: Literal["euler", "heun", "dopri5", "euler_maruyama"] = "euler"
    num_steps: int = 250                     # grid points (official: 250 points = 249 model calls)
    cfg_scale: float = 6.7
    cfg_interval_start: float = 0.125        # guidance off while t < start
    timestep_shift: float = 0.3
    guidance_mode: Literal["official", "all"] = "official"
    atol: float = 1e-6
    rtol: float = 1e-3


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    run_dir: str = ""                        # "" -> runs/<name>
    seed: int = 0
    task: Literal["dit"] = "dit"
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
