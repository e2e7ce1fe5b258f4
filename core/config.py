"""Typed experiment configuration: one YAML per experiment, dotted CLI overrides, clear errors.

The schema is a tree of dataclasses. Every field has a default, so a YAML file only states what differs.
Loading (``load_config``) validates types and values and reports the file, the dotted key and the problem.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

__all__ = [
    # schema
    "ModelConfig", "TimestepPhase", "TransportConfig", "DataConfig", "OptimizerConfig", "LRScheduleConfig",
    "TrainConfig", "EngineConfig", "CheckpointConfig", "WandbConfig", "SamplingConfig", "EvalConfig", "LauncherConfig", "ExperimentConfig",
    "VAVAEConfig", "VAVAEModelConfig", "VAVAELossConfig", "DiscriminatorConfig", "DINOv2Config", "VFConfig",
    "LPIPSConfig",
    # machinery
    "ConfigError", "Derived", "CUSTOM_MODEL_TYPE", "load_config", "config_from_dict", "apply_overrides", "validate",
    "config_to_dict", "config_to_yaml", "save_config", "resolve_run_dir", "derived", "epochs_to_steps",
]


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
    """Training data: MDS shards of precomputed latents (see data/streaming.py) for the DiT; images for VA-VAE
    ("images": an ImageNet-style folder or a "<path> <label>" file list at `path`; "synthetic": the embedded
    procedural images of data/synthetic.py; "streaming": MDS shards with the `image` column and, for
    vavae.vf.features=precomputed, their DINOv2 `features`, written by data/extract.py)."""
    kind: Literal["streaming", "images", "synthetic"] = "streaming"
    path: str = ""                           # local MDS directory (or the local cache of `remote`)
    remote: Optional[str] = None             # optional remote for streaming (s3://..., gs://...)
    latent_norm: bool = True                 # per-channel (z - mean) / std with the stats stored with the dataset
    latent_multiplier: float = 1.0
    random_flip: bool = True                 # pick latent_flip (VA-VAE streaming: flip the image) with p = 0.5
    use_features: bool = False               # DiT: also read the DINOv2 `features` column (VA-VAE: vavae.vf.features)
    num_workers: int = 2
    shuffle: bool = True
    predownload: Optional[int] = None
    # image kinds ("images", "synthetic"; VA-VAE training)
    image_size: int = 256                    # training crop size ("streaming": the stored image size)
    image_crop: Literal["random", "center"] = "random"   # official: SmallestMaxSize + RandomCrop (val: center)
    synthetic_num_samples: int = 1024        # "synthetic": dataset size
    synthetic_num_classes: int = 10


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
    # Compute precision; master weights, optimizer, gradient reduction and EMA stay fp32 in every mode.
    # bf16: parameters cast to bf16 for compute (FSDP2 param_dtype / DeepSpeed bf16).
    # bf16-autocast: fp32 parameters, forward under torch.autocast(bf16) (the official LightningDiT numerics).
    precision: Literal["bf16", "bf16-autocast", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    compile: bool = False                    # torch.compile per block
    reshard_after_forward: bool = True
    # FSDP2 only: "full" shards over all ranks; "hybrid" (HSDP) shards within groups of `shard_group_size` ranks
    # and replicates across the groups (device mesh ("replicate", "shard")).
    sharding: Literal["full", "hybrid"] = "full"
    shard_group_size: Optional[int] = None   # hybrid: ranks per shard group; None = ranks per node (LOCAL_WORLD_SIZE)
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
    # Decoding the samples (models/evaluation/generation.py): "" = what data.path holds (manifest.json, stats)
    tokenizer: str = ""                      # VA-VAE checkpoint (file / run checkpoint dir), or "identity"
    latent_stats: str = ""                   # latents_stats.pt ({'mean','std'}) when data.latent_norm is true


@dataclass
class EvalConfig:
    """In-loop evaluation: every `every_epochs` the trainer samples with the EMA weights and logs metrics."""
    every_epochs: Optional[float] = None     # None = no in-loop evaluation
    num_samples: int = 10000                 # images generated per evaluation (FID-10K by default)
    batch_size: int = 64                     # per rank
    reference: str = ""                      # image folder, .npz of uint8 images, or ADM reference-statistics .npz
    feature_extractor_weights: str = ""      # local weights file of the Inception feature extractor (no download)
    metrics: list[str] = field(default_factory=lambda: ["fid"])   # any of fid, sfid, is, kid, pr (or "all")
    seed: int = 0                            # image i's label and noise depend on (seed, i) only (tools/sample.py)
    feature_extractor: str = "inception-v3-compat"   # torch-fidelity extractor; "tiny-random" = CPU tests only
    cache_dir: str = ""                      # reference cache; "": $LLAT_FID_CACHE or ~/.cache/lightning_latent/fid
    labels: Literal["uniform", "balanced"] = "uniform"   # uniform random labels (official) or i mod num_classes
    sampling_overrides: list[str] = field(default_factory=list)  # e.g. ["num_steps=50"]: the in-loop sampler only
    grid_size: int = 64                      # samples shown in the logged grid (0 = no grid)


@dataclass
class VAVAEModelConfig:
    """LDM autoencoder ``ddconfig`` + ``embed_dim`` (official keyword names); defaults: the released f16d32."""
    embed_dim: int = 32
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    z_channels: int = 32
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = True
    dropout: float = 0.0


@dataclass
class VAVAELossConfig:
    """Autoencoder objective: nll (L1 + LPIPS) + kl_weight * KL + adaptive GAN term + adaptive VF term."""
    perceptual_weight: float = 1.0           # LPIPS weight inside the reconstruction loss (0 = L1 only, no LPIPS)
    kl_weight: float = 1e-6
    logvar_init: float = 0.0                 # the official nll's log-variance: a constant (never optimised)
    disc_start: int = 2501                   # GAN terms on from this AE optimizer step (official 5001 PL steps ~ 2500)
    disc_factor: float = 1.0
    disc_weight: float = 0.5                 # times the adaptive generator weight
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    sample_posterior: bool = True            # decode a posterior sample (official) rather than the mean


@dataclass
class DiscriminatorConfig:
    """taming PatchGAN NLayerDiscriminator (BatchNorm)."""
    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3


@dataclass
class DINOv2Config:
    """The frozen timm DINOv2 of the VF loss (models/dinov2.py); weights from a LOCAL file only."""
    model: str = "vit_large_patch14_dinov2.lvd142m"
    weights: Optional[str] = None
    random_init: bool = False                # random weights instead of `weights` (tests / demos only)
    model_kwargs: dict[str, Any] = field(default_factory=dict)   # extra timm.create_model kwargs (tiny test ViTs)
    imagenet_norm: bool = False              # official: [-1, 1] input without ImageNet mean/std (#78)


@dataclass
class VFConfig:
    """Vision-foundation alignment loss (official `use_vf: dinov2`, `reverse_proj: true`, combined_v3)."""
    enabled: bool = True                     # false = plain LDM KL-VAE (no projection, no DINOv2)
    weight: float = 0.1                      # vf_weight: multiplies the adaptive weight
    adaptive: bool = True                    # adaptive_vf: grad-norm ratio at encoder.conv_out.weight
    cos_margin: float = 0.5                  # m1
    distmat_margin: float = 0.25             # m2
    cos_weight: float = 1.0
    distmat_weight: float = 1.0
    proj_fix: bool = False                   # freeze linear_proj (not in the optimizer)
    # "online": DINOv2 on each batch; "precomputed": the `features` column of a data.kind=streaming dataset
    # (data/extract.py with images and features on the latent grid; center crops, no flips; README "Training VA-VAE")
    features: Literal["online", "precomputed"] = "online"
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)


@dataclass
class LPIPSConfig:
    """LPIPS VGG16 weights from LOCAL files (models/losses/lpips.py)."""
    vgg_weights: Optional[str] = None        # torchvision vgg16 state dict (or a full LPIPS state dict)
    lin_weights: Optional[str] = None        # LPIPS linear heads (lin{i}.model.1.weight)
    random_init: bool = False                # random VGG + heads (tests only)


@dataclass
class VAVAEConfig:
    """VA-VAE training (task: vavae). The autoencoder uses `optimizer`; the discriminator `disc_optimizer`."""
    model: VAVAEModelConfig = field(default_factory=VAVAEModelConfig)
    loss: VAVAELossConfig = field(default_factory=VAVAELossConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    vf: VFConfig = field(default_factory=VFConfig)
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)
    disc_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=1e-4, betas=(0.5, 0.9)))
    init_from: Optional[str] = None          # previous stage: our checkpoint dir or an official .ckpt/.pt
    init_discriminator: bool = True          # also take the discriminator from init_from when it has one
    init_proj: bool = True                   # also take linear_proj from init_from (error if missing)
    ema_decay: Optional[float] = None        # official: no EMA


@dataclass
class LauncherConfig:
    """The ``launcher:`` section of a config (all optional). CLI flags of the same name win."""
    nodes: int = 1
    gpus_per_node: int = 8                   # one task per GPU; 0 = CPU nodes (then tasks_per_node, default 1)
    tasks_per_node: Optional[int] = None     # None: gpus_per_node, or 1 without GPUs
    cpus_per_task: Optional[int] = None      # None: the partition's default
    mem_gb: Optional[float] = None           # per node; None: the partition's default
    partition: Optional[str] = None
    time_min: int = 1440                     # time limit of one run of the job (it requeues itself when reached)
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None            # nodes to avoid, e.g. "node[01-02]"
    exclusive: bool = False                  # whole nodes only (no other job on them)
    signal_delay_s: int = 120                # pre-timeout warning (USR2) this long before the limit -> requeue
    max_requeues: int = 50                   # stop requeuing once the job was restarted this many times
    job_name: Optional[str] = None           # default "<job>-<config name>"
    setup: list[str] = field(default_factory=list)       # shell lines run before srun (module load, env vars, ...)
    kill_on_bad_exit: bool = True            # srun --kill-on-bad-exit: a crashed rank stops the others at once
    additional_parameters: dict[str, Any] = field(default_factory=dict)   # extra `#SBATCH --key=value` lines

    @property
    def num_tasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.num_tasks_per_node


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    run_dir: str = ""                        # "" -> runs/<name>
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
    launcher: LauncherConfig = field(default_factory=LauncherConfig)   # Slurm settings (launchers/slurm.py)
    vavae: VAVAEConfig = field(default_factory=VAVAEConfig)


# ----------------------------------------------------------------------------------------------------------------
# Loading, conversion, validation, dumping
# ----------------------------------------------------------------------------------------------------------------

CUSTOM_MODEL_TYPE = "custom"                 # model.type for a free-form model (hidden_size/depth/... are used)
COMMAND_LINE = "command line"                # the error source named for overrides


class ConfigError(ValueError):
    """A configuration problem. The message names the source (file or "command line"), the dotted key and the
    problem, as ``<source>: <dotted.key>: <problem>``; several problems are reported one per line."""


# --- YAML dialect -------------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that (a) reads ``1e-4`` as a float (YAML 1.2 rule; PyYAML's 1.1 rule needs a dot and would give
    the string "1e-4") and (b) rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key_node.value!r} (first on line {seen[key_node.value].line + 1})",
                        key_node.start_mark)
                seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_error_text(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is not None:
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"YAML syntax error: {problem}"


def _parse_yaml(text: str, source: str, key: str = "") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise _fail(source, key, _yaml_error_text(err)) from None


# --- Type introspection -------------------------------------------------------------------------------------------

_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS_CACHE.get(cls)
    if hints is None:
        hints = _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return hints


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(tp without None, whether None is allowed)."""
    if _is_union(tp):
        args = typing.get_args(tp)
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else Union[rest]), len(rest) < len(args)
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _split_optional(tp)
    if optional:
        return f"{_type_name(base)} or null"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(c) for c in args)
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _fail(source: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(choices)}"


def _join(key: str, part: str) -> str:
    return f"{key}.{part}" if key else part


# --- Conversion (raw YAML values -> typed values) ------------------------------------------------------------------

def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    """Convert a raw YAML value to ``tp``, or raise ConfigError naming ``source`` and ``key``.

    Rules: bool is not an int; an int is accepted (and converted) for a float; lists become tuples for tuple
    fields; mappings become dataclasses (unknown keys rejected with a suggestion)."""
    if tp is Any:
        return value
    base, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise _fail(source, key, f"expected {_type_name(tp)}, got null")
    if optional:
        if base in (bool, int, float, str):
            converted = _scalar(base, value)
            if converted is _NOT_CONVERTED:
                raise _fail(source, key, f"expected {_type_name(tp)}, got {_describe_value(value)}")
            return converted
        return _convert(base, value, source, key)
    if _is_union(tp):
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, source, key)
            except ConfigError:
                pass
        raise _fail(source, key, f"expected {_type_name(tp)}, got {_describe_value(value)}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return choice
        raise _fail(source, key, f"{value!r} is not one of: {', '.join(repr(c) for c in args)}")
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, source, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(source, key, f"expected {_type_name(tp)}, got {_describe_value(value)}")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            elem = args[0] if args else Any
            items = [_convert(elem, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if len(value) != len(args):
            raise _fail(source, key, f"expected {_type_name(tp)}, got {len(value)} items {list(value)!r}")
        return tuple(_convert(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, key, f"expected a mapping, got {_describe_value(value)}")
        ktp, vtp = args or (Any, Any)
        return {_convert(ktp, k, source, key): _convert(vtp, v, source, _join(key, str(k))) for k, v in value.items()}
    if not isinstance(tp, type):  # pragma: no cover - a schema annotation this converter does not know
        raise _fail(source, key, f"unsupported schema type {tp!r}")
    converted = _scalar(tp, value)
    if converted is _NOT_CONVERTED:
        raise _fail(source, key, f"expected {_type_name(tp)}, got {_describe_value(value)}")
    return converted


_NOT_CONVERTED = object()


def _scalar(tp: type, value: Any) -> Any:
    """``value`` as ``tp`` for leaf types (bool is not an int; an int is fine for a float), or _NOT_CONVERTED."""
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    return _NOT_CONVERTED


def _build_dataclass(cls: type, value: Any, source: str, key: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise _fail(source, key, f"expected {_type_name(cls)}, got {_describe_value(value)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, raw in value.items():
        if not isinstance(name, str):
            raise _fail(source, _join(key, str(name)), f"keys must be strings, got {_describe_value(name)}")
        if name not in fields:
            raise _fail(source, _join(key, name), "unknown key" + _did_you_mean(name, list(fields)))
        kwargs[name] = _convert(hints[name], raw, source, _join(key, name))
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail(source, _join(key, name), "missing required key")
    return cls(**kwargs)


def config_from_dict(data: dict | None, source: str = "<dict>") -> ExperimentConfig:
    """Build an ExperimentConfig from a plain dict (types checked, values not; call ``validate`` for that).
    Used for YAML files and for the config dict embedded in checkpoints."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(source, "", f"the top level must be a mapping of sections, got {_describe_value(data)}")
    return _build_dataclass(ExperimentConfig, data, source, "")


# --- Dotted overrides ---------------------------------------------------------------------------------------------

_UNSET = object()


def _override_value(raw: str, tp: Any, key: str) -> Any:
    """Parse an override value with YAML. For plain string fields the text is kept as typed, so ``name=2024`` gives
    "2024" and ``data.path=`` gives "" (``null`` still gives None where the field is Optional[str])."""
    value = _parse_yaml(raw, COMMAND_LINE, key)
    base, optional = _split_optional(tp)
    if base is str and not isinstance(value, str):
        if value is None and optional and raw.strip():
            return None
        if value is None or isinstance(value, (bool, int, float)):
            return raw.strip()
    return value


def _assign(cfg: ExperimentConfig, key: str, raw: str | None, value: Any = _UNSET) -> list[str]:
    """Set the dotted ``key`` from override text ``raw`` (or an already parsed ``value``).
    Returns the canonical keys that were set (list items as ``name[i]``)."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise _fail(COMMAND_LINE, key, "malformed key (empty component)")
    obj: Any = cfg
    tp: Any = ExperimentConfig
    walked = ""                      # canonical form, e.g. transport.timestep_sampling[0]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            here = _join(walked, part)
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                raise _fail(COMMAND_LINE, here, "unknown key" + _did_you_mean(part, names))
            field_tp = _hints(type(obj))[part]
            if last:
                if value is _UNSET:
                    value = _override_value(raw or "", field_tp, here)
                base, _ = _split_optional(field_tp)
                current = getattr(obj, part)
                if dataclasses.is_dataclass(base) and isinstance(value, dict) and current is not None:
                    # `model={depth: 4, hidden_size: 128}` merges into the section instead of resetting it
                    done = []
                    for sub, sub_value in value.items():
                        done += _assign(cfg, f"{key}.{sub}", None, sub_value)
                    return done
                setattr(obj, part, _convert(field_tp, value, COMMAND_LINE, here))
                return [here]
            obj, tp = getattr(obj, part), field_tp
        elif isinstance(obj, list):
            here = f"{walked}[{part}]"
            if not part.isdigit():
                raise _fail(COMMAND_LINE, here, f"{walked} is a list; address its items by index, e.g. {walked}.0")
            index = int(part)
            if index >= len(obj):
                raise _fail(COMMAND_LINE, here, f"index {index} out of range: {walked} has {len(obj)} items "
                                                f"(replace the whole list with {walked}=[...])")
            elem_tp = (typing.get_args(_split_optional(tp)[0]) or (Any,))[0]
            if last:
                if value is _UNSET:
                    value = _override_value(raw or "", elem_tp, here)
                if dataclasses.is_dataclass(elem_tp) and isinstance(value, dict) and obj[index] is not None:
                    done = []
                    for sub, sub_value in value.items():
                        done += _assign(cfg, f"{key}.{sub}", None, sub_value)
                    return done
                obj[index] = _convert(elem_tp, value, COMMAND_LINE, here)
                return [here]
            obj, tp = obj[index], elem_tp
        else:
            raise _fail(COMMAND_LINE, _join(walked, part),
                        f"{walked} is {_describe_value(obj)}, not a section; set it as a whole with {walked}=...")
        walked = here
    raise AssertionError("unreachable")  # pragma: no cover


def _apply(cfg: ExperimentConfig, overrides: Sequence[str]) -> list[str]:
    if isinstance(overrides, str):
        overrides = [overrides]
    touched: list[str] = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"{COMMAND_LINE}: {item!r}: malformed override, no '='; expected KEY=VALUE "
                              f"(e.g. train.global_batch_size=256)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(c.isspace() for c in key):
            raise ConfigError(f"{COMMAND_LINE}: {item!r}: malformed override; expected KEY=VALUE with a dotted key")
        touched += _assign(cfg, key, raw)
    return touched


def apply_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Apply ``dotted.key=value`` overrides in place (values parsed as YAML) and return ``cfg``.

    ``optimizer.betas=[0.9,0.999]`` and ``checkpoint.every_steps=null`` work as expected; a whole list is replaced
    with a YAML list (``transport.timestep_sampling=[{kind: uniform}]``), one item is addressed by index
    (``transport.timestep_sampling.0.until_epoch=400``), and a mapping given for a section is merged into it."""
    _apply(cfg, overrides)
    return cfg


# --- Public loading entry point -----------------------------------------------------------------------------------

def load_config(path: str | Path, overrides: Sequence[str] = (), *, world_size: int | None = None,
                check: bool = True) -> ExperimentConfig:
    """Read one YAML file, apply dotted overrides, convert to the dataclass tree and validate it.

    ``world_size`` (optional) also checks the batch divisibility; ``check=False`` skips value validation (types
    and keys are always checked). Problems raise ConfigError naming the file (or "command line"), key and problem.
    """
    source, data = _read_yaml_file(path)
    cfg = config_from_dict(data, source)
    touched = _apply(cfg, overrides)
    if check:
        errors = _collect_errors(cfg, world_size)
        if errors:
            raise ConfigError("\n".join(f"{_origin((k, *rel), touched, source)}: {k}: {problem}"
                                         for k, problem, rel in errors))
    return cfg


def _read_yaml_file(path: str | Path) -> tuple[str, Any]:
    """(source name for messages, parsed YAML) of one config file; errors name the file."""
    source = str(path)
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{source}: file not found")
    if not p.is_file():
        raise ConfigError(f"{source}: not a regular file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{source}: cannot read: {err}") from None
    return source, _parse_yaml(text, source)


def _origin(keys: Sequence[str], touched: Sequence[str], source: str) -> str:
    """Where a problem with any of `keys` came from: the command line if an override set one of them."""
    for key in keys:
        for t in touched:
            if key == t or key.startswith((t + ".", t + "[")) or t.startswith((key + ".", key + "[")):
                return COMMAND_LINE
    return source


# --- Value validation ---------------------------------------------------------------------------------------------

def _model_registry() -> dict[str, Any] | None:
    """``models.lightningdit.LightningDiT_models`` if that module exists (imported lazily), else None."""
    try:
        module = importlib.import_module("models.lightningdit")
    except ModuleNotFoundError as err:
        if err.name in ("models", "models.lightningdit"):
            return None
        raise
    registry = getattr(module, "LightningDiT_models", None)
    return registry if isinstance(registry, dict) else None


def _world_errors(cfg: ExperimentConfig, world_size: int) -> list[tuple[str, str, tuple[str, ...]]]:
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        return [("world_size", f"must be a positive integer, got {world_size!r}", ())]
    if gbs <= 0 or (mbs is not None and mbs <= 0):
        return []  # reported by the positivity checks
    if gbs % world_size:
        return [("train.global_batch_size",
                 f"global batch size {gbs} is not divisible by world size {world_size}", ())]
    if mbs is not None and gbs % (world_size * mbs):
        return [("train.micro_batch_size",
                 f"global batch size {gbs} is not divisible by world size {world_size} x micro batch size {mbs} "
                 f"= {world_size * mbs}", ("train.global_batch_size",))]
    return []


def _collect_errors(cfg: ExperimentConfig, world_size: int | None) -> list[tuple[str, str, tuple[str, ...]]]:
    """(dotted key, problem, other keys involved) for every problem found."""
    errors: list[tuple[str, str, tuple[str, ...]]] = []

    def need(ok: bool, key: str, problem: str, related: tuple[str, ...] = ()) -> None:
        if not ok:
            errors.append((key, problem, related))

    def positive(value: Any, key: str, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        need(value is not None and value > 0, key, f"must be > 0, got {value!r}")

    def unit(value: float, key: str, closed: bool = False) -> None:
        ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
        need(ok, key, f"must be in [0, 1{']' if closed else ')'}, got {value!r}")

    need(bool(cfg.name.strip()), "name", "must not be empty")
    need(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")

    # model
    m = cfg.model
    if m.type == CUSTOM_MODEL_TYPE:
        for k in ("hidden_size", "depth", "num_heads", "patch_size"):
            positive(getattr(m, k), f"model.{k}")
        positive(m.mlp_ratio, "model.mlp_ratio")
        if m.hidden_size > 0 and m.num_heads > 0:
            need(m.hidden_size % m.num_heads == 0, "model.hidden_size",
                 f"hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}", ("model.num_heads",))
        if m.patch_size > 0 and m.input_size > 0:
            need(m.input_size % m.patch_size == 0, "model.input_size",
                 f"input_size {m.input_size} is not divisible by patch_size {m.patch_size}", ("model.patch_size",))
    else:
        registry = _model_registry()
        if registry is not None and m.type not in registry:
            names = sorted(registry) + [CUSTOM_MODEL_TYPE]
            close = difflib.get_close_matches(m.type, names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            need(False, "model.type", f"unknown model {m.type!r}{hint} (known: {', '.join(names)})")
    positive(m.input_size, "model.input_size")
    positive(m.in_channels, "model.in_channels")
    positive(m.num_classes, "model.num_classes")
    unit(m.class_dropout_prob, "model.class_dropout_prob")

    # in-loop evaluation
    positive(cfg.eval.every_epochs, "eval.every_epochs", allow_none=True)
    positive(cfg.eval.num_samples, "eval.num_samples")
    positive(cfg.eval.batch_size, "eval.batch_size")

    # transport: timestep-sampling phases
    phases = cfg.transport.timestep_sampling
    need(len(phases) > 0, "transport.timestep_sampling", "needs at least one phase")
    prev: float | None = None
    for i, ph in enumerate(phases):
        key = f"transport.timestep_sampling[{i}]"
        if ph.kind == "lognorm":
            positive(ph.std, f"{key}.std")
        if i == len(phases) - 1:
            need(ph.until_epoch is None, f"{key}.until_epoch",
                 f"the last phase runs to the end of training and must have until_epoch null, got {ph.until_epoch!r}")
        elif ph.until_epoch is None:
            need(False, f"{key}.until_epoch", "every phase but the last needs until_epoch")
        elif ph.until_epoch <= 0:
            need(False, f"{key}.until_epoch", f"must be > 0, got {ph.until_epoch!r}")
        elif prev is not None and ph.until_epoch <= prev:
            need(False, f"{key}.until_epoch",
                 f"until_epoch must be strictly increasing: {ph.until_epoch!r} after {prev!r}")
        if ph.until_epoch is not None:
            prev = ph.until_epoch if prev is None else max(prev, ph.until_epoch)

    # data
    d = cfg.data
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    positive(d.latent_multiplier, "data.latent_multiplier")
    positive(d.predownload, "data.predownload", allow_none=True)

    # optimizer + LR schedule
    o = cfg.optimizer
    positive(o.lr, "optimizer.lr")
    for j, beta in enumerate(o.betas):
        unit(beta, f"optimizer.betas[{j}]")
    need(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay!r}")
    positive(o.eps, "optimizer.eps")
    s = cfg.lr_schedule
    need(s.warmup_steps >= 0, "lr_schedule.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    unit(s.min_lr_ratio, "lr_schedule.min_lr_ratio", closed=True)

    # train
    t = cfg.train
    positive(t.global_batch_size, "train.global_batch_size")
    positive(t.micro_batch_size, "train.micro_batch_size", allow_none=True)
    if t.micro_batch_size is not None and 0 < t.global_batch_size < t.micro_batch_size:
        need(False, "train.micro_batch_size",
             f"micro batch size {t.micro_batch_size} exceeds global batch size {t.global_batch_size}",
             ("train.global_batch_size",))
    need(t.epochs is not None or t.max_steps is not None, "train.epochs",
         "set at least one of train.epochs and train.max_steps", ("train.max_steps",))
    positive(t.epochs, "train.epochs", allow_none=True)
    positive(t.max_steps, "train.max_steps", allow_none=True)
    unit(t.ema_decay, "train.ema_decay")
    positive(t.grad_clip, "train.grad_clip", allow_none=True)
    positive(t.max_consecutive_nonfinite, "train.max_consecutive_nonfinite")
    positive(t.log_every, "train.log_every")
    if world_size is not None:
        errors.extend(_world_errors(cfg, world_size))

    # engine
    e = cfg.engine
    if e.kind == "deepspeed":
        need(e.zero_stage in (1, 2, 3), "engine.zero_stage", f"must be 1, 2 or 3 with engine.kind=deepspeed, "
             f"got {e.zero_stage}")
        # The VA-VAE adaptive weights take torch.autograd.grad through the model's output, which DeepSpeed 0.19's
        # gradient hooks do not support (ZeRO-1/2 IndexError in its reduce epilogue, ZeRO-3 hook state error).
        need(cfg.task != "vavae", "engine.kind", "the VA-VAE task runs on engine.kind=fsdp2 (its adaptive loss "
             "weights need autograd.grad through the model, which DeepSpeed's hooks do not support)", ("task",))
    positive(e.bucket_size, "engine.bucket_size")
    positive(e.shard_group_size, "engine.shard_group_size", allow_none=True)
    if e.sharding == "hybrid":
        need(e.kind == "fsdp2", "engine.sharding", f"hybrid sharding (HSDP) needs engine.kind=fsdp2, got {e.kind!r} "
             "(DeepSpeed partitions over all ranks: use engine.zero_stage)", ("engine.kind",))
        size = e.shard_group_size
        if isinstance(world_size, int) and world_size > 0 and size is not None and size > 0 and world_size % size:
            need(False, "engine.shard_group_size", f"world size {world_size} is not divisible by shard_group_size "
                 f"{size} (hybrid sharding replicates whole shard groups)")
    elif e.shard_group_size is not None:
        need(False, "engine.shard_group_size", f"is only used with engine.sharding=hybrid (sharding is "
             f"{e.sharding!r}): set engine.sharding=hybrid or leave shard_group_size null", ("engine.sharding",))

    # checkpoint
    c = cfg.checkpoint
    positive(c.every_steps, "checkpoint.every_steps", allow_none=True)
    positive(c.every_minutes, "checkpoint.every_minutes", allow_none=True)
    positive(c.keep_last, "checkpoint.keep_last")
    positive(c.keep_every, "checkpoint.keep_every", allow_none=True)

    # sampling
    sm = cfg.sampling
    need(sm.num_steps >= 2, "sampling.num_steps", f"must be >= 2 (grid points), got {sm.num_steps}")
    need(sm.cfg_scale >= 0, "sampling.cfg_scale", f"must be >= 0, got {sm.cfg_scale!r}")
    unit(sm.cfg_interval_start, "sampling.cfg_interval_start", closed=True)
    positive(sm.timestep_shift, "sampling.timestep_shift")
    positive(sm.atol, "sampling.atol")
    positive(sm.rtol, "sampling.rtol")

    # task <-> data kind; VA-VAE
    if cfg.task == "dit":
        need(d.kind == "streaming", "data.kind",
             f"the DiT task trains on latent MDS shards (data.kind 'streaming'), got {d.kind!r}", ("task",))
    if cfg.task == "vavae":        # every data.kind: image files, synthetic images, or MDS shards with images
        errors.extend(_vavae_errors(cfg))
    return errors


def _vavae_errors(cfg: ExperimentConfig) -> list[tuple[str, str, tuple[str, ...]]]:
    """Problems of the VA-VAE section (and the image-data fields it uses), only checked for task "vavae"."""
    errors: list[tuple[str, str, tuple[str, ...]]] = []

    def need(ok: bool, key: str, problem: str, related: tuple[str, ...] = ()) -> None:
        if not ok:
            errors.append((key, problem, related))

    v, d = cfg.vavae, cfg.data
    m = v.model
    for k in ("embed_dim", "ch", "num_res_blocks", "z_channels", "resolution", "in_channels", "out_ch"):
        need(getattr(m, k) > 0, f"vavae.model.{k}", f"must be > 0, got {getattr(m, k)!r}")
    need(m.ch % 32 == 0, "vavae.model.ch", f"must be a multiple of 32 (GroupNorm(32)), got {m.ch}")
    need(len(m.ch_mult) > 0 and all(c > 0 for c in m.ch_mult), "vavae.model.ch_mult",
         f"must be a non-empty list of positive multipliers, got {m.ch_mult!r}")
    need(m.double_z, "vavae.model.double_z", "must be true (the KL posterior needs mean and log-variance)")
    need(0.0 <= m.dropout < 1.0, "vavae.model.dropout", f"must be in [0, 1), got {m.dropout!r}")
    need(d.image_size > 0, "data.image_size", f"must be > 0, got {d.image_size}")
    if m.ch_mult and d.image_size > 0:
        factor = 2 ** (len(m.ch_mult) - 1)
        need(d.image_size % factor == 0, "data.image_size",
             f"image size {d.image_size} is not divisible by the autoencoder's downsampling factor {factor} "
             f"(2^(len(ch_mult)-1))", ("vavae.model.ch_mult",))
    if d.kind == "images":
        need(bool(d.path), "data.path", "set the image folder (root/<class>/<image>) or a '<path> <label>' list file")
    if d.kind == "streaming":
        need(bool(d.path), "data.path", "set the MDS dataset directory (data/extract.py with images: true; with "
             "data.remote, the local cache directory)")
    if d.kind == "synthetic":
        need(d.synthetic_num_samples > 0, "data.synthetic_num_samples",
             f"must be > 0, got {d.synthetic_num_samples}")
        need(d.synthetic_num_classes > 0, "data.synthetic_num_classes",
             f"must be > 0, got {d.synthetic_num_classes}")

    lo = v.loss
    for k in ("perceptual_weight", "kl_weight", "disc_factor", "disc_weight"):
        need(getattr(lo, k) >= 0, f"vavae.loss.{k}", f"must be >= 0, got {getattr(lo, k)!r}")
    need(lo.disc_start >= 0, "vavae.loss.disc_start", f"must be >= 0, got {lo.disc_start}")
    need(v.disc.ndf > 0 and v.disc.n_layers > 0 and v.disc.in_channels > 0, "vavae.disc",
         f"ndf, n_layers and in_channels must be > 0, got {v.disc}")

    vf = v.vf
    if vf.enabled:
        need(vf.weight >= 0, "vavae.vf.weight", f"must be >= 0, got {vf.weight!r}")
        need(0.0 <= vf.cos_margin <= 2.0, "vavae.vf.cos_margin", f"must be in [0, 2], got {vf.cos_margin!r}")
        need(0.0 <= vf.distmat_margin <= 2.0, "vavae.vf.distmat_margin",
             f"must be in [0, 2], got {vf.distmat_margin!r}")
        need(vf.cos_weight >= 0 and vf.distmat_weight >= 0, "vavae.vf.cos_weight",
             f"cos_weight and distmat_weight must be >= 0, got {vf.cos_weight!r}, {vf.distmat_weight!r}",
             ("vavae.vf.distmat_weight",))
        if vf.features == "online":
            need(vf.dinov2.random_init or bool(vf.dinov2.weights), "vavae.vf.dinov2.weights",
                 "not set; give the path of a local DINOv2 checkpoint file (no downloads), or set "
                 "vavae.vf.dinov2.random_init=true (tests only), or vavae.vf.enabled=false")
        else:   # precomputed: the stored features of the stored (center-cropped, non-flipped) images
            need(d.kind == "streaming", "vavae.vf.features",
                 f"'precomputed' reads the DINOv2 `features` column of an MDS dataset: set data.kind=streaming and "
                 f"data.path to a dataset from data/extract.py with images and features (got data.kind "
                 f"{d.kind!r})", ("data.kind",))
            need(not d.random_flip, "data.random_flip",
                 "must be false with vavae.vf.features=precomputed: the stored DINOv2 features belong to the "
                 "non-flipped image", ("vavae.vf.features",))
    if lo.perceptual_weight > 0 and not v.lpips.random_init:
        need(bool(v.lpips.vgg_weights), "vavae.lpips.vgg_weights",
             "not set; give a local torchvision vgg16 state dict (no downloads), set vavae.lpips.random_init=true "
             "(tests only), or vavae.loss.perceptual_weight=0")

    od = v.disc_optimizer
    need(od.lr > 0, "vavae.disc_optimizer.lr", f"must be > 0, got {od.lr!r}")
    for j, beta in enumerate(od.betas):
        need(0.0 <= beta < 1.0, f"vavae.disc_optimizer.betas[{j}]", f"must be in [0, 1), got {beta!r}")
    need(od.weight_decay >= 0, "vavae.disc_optimizer.weight_decay", f"must be >= 0, got {od.weight_decay!r}")
    if v.ema_decay is not None:
        need(0.0 <= v.ema_decay <= 1.0, "vavae.ema_decay", f"must be in [0, 1] or null, got {v.ema_decay!r}")
    return errors


def validate(cfg: ExperimentConfig, world_size: int | None = None, *, source: str = "config") -> ExperimentConfig:
    """Check values: positive sizes, lr > 0, 0 <= ema_decay < 1, betas in [0, 1), timestep-phase order, at least one
    of epochs/max_steps, model.type in the registry (or "custom"), and batch divisibility when ``world_size`` is
    given. Raises ConfigError listing every problem as ``<source>: <dotted.key>: <problem>``; returns ``cfg``."""
    errors = _collect_errors(cfg, world_size)
    if errors:
        raise ConfigError("\n".join(f"{source}: {key}: {problem}" for key, problem, _ in errors))
    return cfg


# --- Dumping ------------------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg: Any) -> dict:
    """Plain, YAML-able nested dict of a config tree or any section of it (tuples become lists)."""
    return _plain(cfg)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, width=120)


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML, atomically (temp file + rename); the file loads back with ``load_config``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(config_to_yaml(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path


def resolve_run_dir(cfg: ExperimentConfig) -> Path:
    """``cfg.run_dir`` when set, else ``runs/<name>`` (relative to the working directory)."""
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


# --- Derived quantities -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Derived:
    """Numbers that follow from the config, the world size and (when known) the dataset size."""
    world_size: int
    dataset_size: Optional[int]
    global_batch_size: int
    micro_batch_size: int                # samples per rank per forward/backward
    grad_accum_steps: int                # micro-batches per optimizer step on each rank
    steps_per_epoch: Optional[int]       # dataset_size // global_batch_size (the last partial batch is dropped)
    total_steps: Optional[int]           # min(floor(epochs * steps_per_epoch), max_steps)

    @property
    def total_epochs(self) -> Optional[float]:
        if self.total_steps is None or not self.steps_per_epoch:
            return None
        return self.total_steps / self.steps_per_epoch


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """floor(epochs * steps_per_epoch), exact for decimal epochs as written (0.29 epochs x 100 = 29, not 28)."""
    return math.floor(Fraction(repr(float(epochs))) * steps_per_epoch)


def derived(cfg: ExperimentConfig, world_size: int, dataset_size: Optional[int]) -> Derived:
    """Micro batch, accumulation, steps per epoch and total steps for this world and dataset.

    With ``dataset_size=None`` only the batch split is computed (``steps_per_epoch``/``total_steps`` are None)."""
    errors = _world_errors(cfg, world_size)
    if errors:
        raise ConfigError("\n".join(f"config: {k}: {p}" for k, p, _ in errors))
    gbs = cfg.train.global_batch_size
    mbs = cfg.train.micro_batch_size or gbs // world_size
    accum = gbs // (world_size * mbs)
    if dataset_size is None:
        return Derived(world_size=world_size, dataset_size=None, global_batch_size=gbs, micro_batch_size=mbs,
                       grad_accum_steps=accum, steps_per_epoch=None, total_steps=None)
    steps_per_epoch = dataset_size // gbs
    if steps_per_epoch < 1:
        raise ConfigError(f"config: train.global_batch_size: the dataset has {dataset_size} samples, fewer than one "
                          f"global batch of {gbs} (incomplete batches are dropped)")
    candidates = []
    if cfg.train.epochs is not None:
        candidates.append(epochs_to_steps(cfg.train.epochs, steps_per_epoch))
    if cfg.train.max_steps is not None:
        candidates.append(cfg.train.max_steps)
    if not candidates:
        raise ConfigError("config: train.epochs: set at least one of train.epochs and train.max_steps")
    return Derived(world_size=world_size, dataset_size=dataset_size, global_batch_size=gbs, micro_batch_size=mbs,
                   grad_accum_steps=accum, steps_per_epoch=steps_per_epoch, total_steps=min(candidates))


# --- Generic typed loading (configs of tools other than training, e.g. data/extract.py) --------------------------

def load_typed_config(path: str | Path | None, overrides: Sequence[str] = (), cls: type = ExperimentConfig, *,
                      check: Optional[typing.Callable[[Any], Sequence[tuple[str, str]]]] = None) -> Any:
    """``load_config`` for any dataclass tree ``cls``: read one YAML file, build ``cls`` from it (types checked,
    unknown keys rejected with a suggestion), apply dotted ``overrides`` and, with ``check``, validate values.

    ``check(cfg)`` returns ``(dotted.key, problem)`` pairs; they are raised together as one ConfigError, each
    line naming the command line when an override set that key, else the file. ``path=None`` reads no file
    (defaults plus overrides)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_typed_config: cls must be a dataclass type, got {cls!r}")
    if path is None:
        source, data = COMMAND_LINE, {}
    else:
        source, data = _read_yaml_file(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise _fail(source, "", f"the top level must be a mapping of sections, got {_describe_value(data)}")
    cfg = _build_dataclass(cls, data, source, "")
    touched = _apply(cfg, overrides)
    if check is not None:
        problems = list(check(cfg))
        if problems:
            raise ConfigError("\n".join(f"{_origin((k,), touched, source)}: {k}: {problem}" for k, problem in problems))
    return cfg


__all__.append("load_typed_config")
