"""Configuration machinery: typed YAML loading with dotted overrides, clear errors, value checks, dumping.

A config is a tree of dataclasses; every field has a default, so a YAML file only states what differs. Each section
is defined next to the code that owns it (the experiment schema is assembled in ``launchers/experiment.py``); this
module holds what every config tree shares:

* ``load_typed_config`` / ``build_config`` / ``apply_overrides``: build a dataclass tree from YAML (types checked,
  unknown keys rejected with a did-you-mean suggestion) and apply ``dotted.key=value`` overrides;
* ``ConfigError``: problems reported as ``<source>: <dotted.key>: <problem>``, the source being the file or the
  command line when an override set the key;
* ``Checks``: the value-check collector (``checks.need(ok, key, problem, related)``) that section owners use;
* ``config_to_dict`` / ``config_to_yaml`` / ``save_config``;
* the sections of the shared trainer (optimizer, lr_schedule, train, engine, checkpoint, wandb), their checks
  (``check_training_config``) and the sizes derived from them (``derived``, ``epochs_to_steps``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from core.fileio import atomic_write_text

__all__ = [
    # sections of the shared trainer
    "OptimizerConfig",
    "LRScheduleConfig",
    "RollbackConfig",
    "TrainConfig",
    "EngineConfig",
    "CheckpointConfig",
    "WandbConfig",
    "check_training_config",
    "world_errors",
    "train_ema_decays",
    # machinery
    "ConfigError",
    "COMMAND_LINE",
    "Checks",
    "load_typed_config",
    "build_config",
    "apply_overrides",
    "config_to_dict",
    "config_to_yaml",
    "save_config",
    "resolve_run_dir",
    "Derived",
    "derived",
    "epochs_to_steps",
]


# ----------------------------------------------------------------------------------------------------------------
# Sections of the shared trainer (their owner: core/)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adam"] = "adamw"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    fused: Optional[bool] = None  # None: fused on CUDA, foreach elsewhere


@dataclass
class LRScheduleConfig:
    kind: Literal["constant", "warmup_constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass
class RollbackConfig:
    """``train.rollback``: on a failure, restore the last good checkpoint in-process instead of stopping.

    A failure is a streak of ``on_nonfinite_streak`` non-finite steps or (``loss_spike_factor``) a logged loss above
    that factor times the mean of the previous ``loss_window`` logged losses. The data the run saw between the
    restored checkpoint and the failure is skipped (the data position runs that many steps ahead of the optimizer
    step from then on, recorded in every later checkpoint); the LR is multiplied by ``lr_scale`` for
    ``lr_scale_steps`` steps; after ``max_rollbacks`` rollbacks the run stops with an error."""

    enabled: bool = False
    max_rollbacks: int = 3
    on_nonfinite_streak: Optional[int] = 3  # None: non-finite steps never roll back (max_consecutive_nonfinite stops)
    loss_spike_factor: Optional[float] = None  # None: no loss-spike detection
    loss_window: int = 10  # logged losses the spike is compared with (needs that many first)
    lr_scale: float = 1.0  # LR multiplier after a rollback ...
    lr_scale_steps: int = 0  # ... for this many steps


@dataclass
class TrainConfig:
    global_batch_size: int = 1024
    micro_batch_size: Optional[int] = None  # per rank; None = global / world (no accumulation)
    epochs: Optional[float] = 800.0  # stop after this many epochs ...
    max_steps: Optional[int] = None  # ... or this many optimizer steps (whichever comes first)
    ema_decay: float = 0.9999
    # Several EMAs, one per decay (e.g. [0.9999, 0.99995]): each sharded, checkpointed, evaluated and exportable;
    # the first is the primary EMA. null: the one EMA of `ema_decay` (its shorthand). Set, it replaces ema_decay.
    ema_decays: Optional[list[float]] = None
    grad_clip: Optional[float] = None  # max grad norm; None = off (official)
    max_consecutive_nonfinite: int = 10  # NaN/inf guard: skip bad steps, stop after this many in a row
    log_every: int = 100
    progress_bar: bool = True
    rollback: RollbackConfig = field(default_factory=RollbackConfig)


@dataclass
class EngineConfig:
    kind: Literal["fsdp2", "deepspeed"] = "fsdp2"
    # Compute precision; master weights, optimizer, gradient reduction and EMA stay fp32 in every mode.
    # bf16: parameters cast to bf16 for compute (FSDP2 param_dtype / DeepSpeed bf16).
    # bf16-autocast: fp32 parameters, forward under torch.autocast(bf16) (the official LightningDiT numerics).
    precision: Literal["bf16", "bf16-autocast", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile per block
    reshard_after_forward: bool = True
    # FSDP2 only: "full" shards over all ranks; "hybrid" (HSDP) shards within groups of `shard_group_size` ranks
    # and replicates across the groups (device mesh ("replicate", "shard")).
    sharding: Literal["full", "hybrid"] = "full"
    shard_group_size: Optional[int] = None  # hybrid: ranks per shard group; None = ranks per node (LOCAL_WORLD_SIZE)
    # DeepSpeed only
    zero_stage: int = 2
    offload_optimizer: bool = False
    overlap_comm: bool = True
    bucket_size: int = 500_000_000
    # ZeRO-3: parameters of at most this many elements stay gathered on every rank (DeepSpeed's
    # stage3_param_persistence_threshold; None = DeepSpeed's default, 1e5). 0 partitions every parameter.
    zero3_persistence_threshold: Optional[int] = None


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = 20000
    every_minutes: Optional[float] = None
    keep_last: int = 2  # keep the newest K ...
    keep_every: Optional[int] = None  # ... plus every checkpoint whose step is a multiple of N
    async_save: bool = False
    resume: bool = True  # auto-resume from the newest complete checkpoint in run_dir
    # Resume (or fork) once from a kept checkpoint: a step number of this run's checkpoints or a checkpoint
    # directory (any run's step_N). Newer checkpoints of this run are set aside (renamed), nothing is deleted; a
    # requeue of the run resumes from its own newest checkpoint (the choice is recorded in checkpoints/RESUMED_FROM).
    resume_from: Union[int, str, None] = None


@dataclass
class WandbConfig:
    # online: streams to the W&B server (needs WANDB_API_KEY or `wandb login`); offline: files under
    # <run_dir>/wandb/ only, uploaded later with `wandb sync <run_dir>/wandb/offline-run-*` (README)
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "lightning-latent"
    entity: Optional[str] = None  # team or user; None: the API key's default entity
    group: Optional[str] = None  # W&B run group, e.g. a sweep or an ablation
    tags: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Loading, conversion, overrides, checks, dumping
# ----------------------------------------------------------------------------------------------------------------

COMMAND_LINE = "command line"  # the error source named for overrides


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
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key_node.value!r} (first on line {seen[key_node.value].line + 1})",
                        key_node.start_mark,
                    )
                seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


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


def build_config(cls: type, data: dict | None, source: str = "<dict>") -> Any:
    """Build the dataclass tree ``cls`` from a plain dict (types checked, values not). ``None`` gives the defaults;
    a top level that is not a mapping is a ConfigError naming ``source``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(source, "", f"the top level must be a mapping of sections, got {_describe_value(data)}")
    return _build_dataclass(cls, data, source, "")


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


def _assign(cfg: Any, key: str, raw: str | None, value: Any = _UNSET) -> list[str]:
    """Set the dotted ``key`` from override text ``raw`` (or an already parsed ``value``).
    Returns the canonical keys that were set (list items as ``name[i]``)."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise _fail(COMMAND_LINE, key, "malformed key (empty component)")
    obj: Any = cfg
    tp: Any = type(cfg)
    walked = ""  # canonical form, e.g. transport.timestep_sampling[0]
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
                raise _fail(
                    COMMAND_LINE,
                    here,
                    f"index {index} out of range: {walked} has {len(obj)} items "
                    f"(replace the whole list with {walked}=[...])",
                )
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
            raise _fail(
                COMMAND_LINE,
                _join(walked, part),
                f"{walked} is {_describe_value(obj)}, not a section; set it as a whole with {walked}=...",
            )
        walked = here
    raise AssertionError("unreachable")  # pragma: no cover


def _apply(cfg: Any, overrides: Sequence[str]) -> list[str]:
    if isinstance(overrides, str):
        overrides = [overrides]
    touched: list[str] = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(
                f"{COMMAND_LINE}: {item!r}: malformed override, no '='; expected KEY=VALUE "
                f"(e.g. train.global_batch_size=256)"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(c.isspace() for c in key):
            raise ConfigError(f"{COMMAND_LINE}: {item!r}: malformed override; expected KEY=VALUE with a dotted key")
        touched += _assign(cfg, key, raw)
    return touched


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Apply ``dotted.key=value`` overrides in place (values parsed as YAML) and return ``cfg``.

    ``optimizer.betas=[0.9,0.999]`` and ``checkpoint.every_steps=null`` work as expected; a whole list is replaced
    with a YAML list (``transport.timestep_sampling=[{kind: uniform}]``), one item is addressed by index
    (``transport.timestep_sampling.0.until_epoch=400``), and a mapping given for a section is merged into it."""
    _apply(cfg, overrides)
    return cfg


# --- Loading ------------------------------------------------------------------------------------------------------


def load_typed_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    cls: Optional[type] = None,
    *,
    check: Optional[Callable[[Any], Sequence[tuple]]] = None,
) -> Any:
    """Read one YAML file, build the dataclass tree ``cls`` from it (types checked, unknown keys rejected with a
    suggestion), apply dotted ``overrides`` and, with ``check``, validate values.

    ``check(cfg)`` returns ``(dotted.key, problem)`` or ``(dotted.key, problem, related keys)`` tuples (e.g.
    ``Checks.errors``); they are raised together as one ConfigError, each line naming the command line when an
    override set that key (or a related one), else the file. ``path=None`` reads no file (defaults plus
    overrides)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_typed_config: cls must be a dataclass type, got {cls!r}")
    if path is None:
        source, data = COMMAND_LINE, {}
    else:
        source, data = _read_yaml_file(path)
    cfg = build_config(cls, data, source)
    touched = _apply(cfg, overrides)
    if check is not None:
        problems = [(p[0], p[1], tuple(p[2]) if len(p) > 2 else ()) for p in check(cfg)]
        if problems:
            raise ConfigError(
                "\n".join(f"{_origin((k, *rel), touched, source)}: {k}: {problem}" for k, problem, rel in problems)
            )
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


# --- Value checks -------------------------------------------------------------------------------------------------


class Checks:
    """Collects the value problems of a config tree, to report them all in one ConfigError.

    Each section's owner writes a ``check_<section>(section, checks)`` function (e.g. ``data.config``,
    ``models.dit_config``) calling ``checks.need(ok, key, problem, related=())``: when ``ok`` is false it records
    ``(dotted.key, problem, related)``, ``related`` being the other keys involved (a problem is attributed to the
    command line when an override set any of them). ``errors`` is what ``load_typed_config(check=...)`` takes."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str, tuple[str, ...]]] = []

    def need(self, ok: bool, key: str, problem: str, related: Sequence[str] = ()) -> bool:
        """Record ``problem`` for ``key`` unless ``ok``; returns ``ok``."""
        if not ok:
            self.errors.append((key, problem, tuple(related)))
        return bool(ok)

    def positive(self, value: Any, key: str, allow_none: bool = False) -> None:
        """``value`` > 0 (or None with ``allow_none``): "must be > 0, got ..." otherwise."""
        if value is None and allow_none:
            return
        self.need(value is not None and value > 0, key, f"must be > 0, got {value!r}")

    def unit(self, value: float, key: str, closed: bool = False) -> None:
        """``value`` in [0, 1) (``closed``: [0, 1])."""
        ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
        self.need(ok, key, f"must be in [0, 1{']' if closed else ')'}, got {value!r}")

    def pairs(self) -> list[tuple[str, str]]:
        """``(dotted.key, problem)`` of every problem."""
        return [(key, problem) for key, problem, _ in self.errors]


def train_ema_decays(t: TrainConfig) -> list[float]:
    """The EMA decays of ``train``: ``ema_decays`` when set, else ``[ema_decay]`` (its one-element shorthand)."""
    return [float(d) for d in t.ema_decays] if t.ema_decays else [float(t.ema_decay)]


def world_errors(cfg: Any, world_size: int) -> list[tuple[str, str, tuple[str, ...]]]:
    """Batch-split problems of ``cfg.train`` on ``world_size`` ranks (``(key, problem, related)``)."""
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        return [("world_size", f"must be a positive integer, got {world_size!r}", ())]
    if gbs <= 0 or (mbs is not None and mbs <= 0):
        return []  # reported by the positivity checks
    if gbs % world_size:
        return [("train.global_batch_size", f"global batch size {gbs} is not divisible by world size {world_size}", ())]
    if mbs is not None and gbs % (world_size * mbs):
        return [
            (
                "train.micro_batch_size",
                f"global batch size {gbs} is not divisible by world size {world_size} x micro batch size {mbs} "
                f"= {world_size * mbs}",
                ("train.global_batch_size",),
            )
        ]
    return []


def check_training_config(cfg: Any, checks: Checks, world_size: int | None = None) -> None:
    """Value checks of the trainer's sections of ``cfg``: optimizer, lr_schedule, train (with the batch split on
    ``world_size`` ranks when given), engine and checkpoint."""
    # optimizer + LR schedule
    o = cfg.optimizer
    checks.positive(o.lr, "optimizer.lr")
    for j, beta in enumerate(o.betas):
        checks.unit(beta, f"optimizer.betas[{j}]")
    checks.need(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay!r}")
    checks.positive(o.eps, "optimizer.eps")
    s = cfg.lr_schedule
    checks.need(s.warmup_steps >= 0, "lr_schedule.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    checks.unit(s.min_lr_ratio, "lr_schedule.min_lr_ratio", closed=True)

    # train
    t = cfg.train
    checks.positive(t.global_batch_size, "train.global_batch_size")
    checks.positive(t.micro_batch_size, "train.micro_batch_size", allow_none=True)
    if t.micro_batch_size is not None and 0 < t.global_batch_size < t.micro_batch_size:
        checks.need(
            False,
            "train.micro_batch_size",
            f"micro batch size {t.micro_batch_size} exceeds global batch size {t.global_batch_size}",
            ("train.global_batch_size",),
        )
    checks.need(
        t.epochs is not None or t.max_steps is not None,
        "train.epochs",
        "set at least one of train.epochs and train.max_steps",
        ("train.max_steps",),
    )
    checks.positive(t.epochs, "train.epochs", allow_none=True)
    checks.positive(t.max_steps, "train.max_steps", allow_none=True)
    checks.unit(t.ema_decay, "train.ema_decay")
    if t.ema_decays is not None:
        checks.need(len(t.ema_decays) > 0, "train.ema_decays", "needs at least one decay (null: train.ema_decay)")
        for j, decay in enumerate(t.ema_decays):
            checks.unit(decay, f"train.ema_decays[{j}]")
        checks.need(
            len(set(t.ema_decays)) == len(t.ema_decays), "train.ema_decays", f"has repeated decays: {t.ema_decays}"
        )
    checks.positive(t.grad_clip, "train.grad_clip", allow_none=True)
    checks.positive(t.max_consecutive_nonfinite, "train.max_consecutive_nonfinite")
    checks.positive(t.log_every, "train.log_every")
    r = t.rollback
    if r.enabled:
        checks.positive(r.max_rollbacks, "train.rollback.max_rollbacks")
        checks.positive(r.on_nonfinite_streak, "train.rollback.on_nonfinite_streak", allow_none=True)
        checks.need(
            r.on_nonfinite_streak is None or r.on_nonfinite_streak <= t.max_consecutive_nonfinite,
            "train.rollback.on_nonfinite_streak",
            f"must be <= train.max_consecutive_nonfinite ({t.max_consecutive_nonfinite}), got {r.on_nonfinite_streak}",
            ("train.max_consecutive_nonfinite",),
        )
        checks.need(
            r.loss_spike_factor is None or r.loss_spike_factor > 1,
            "train.rollback.loss_spike_factor",
            f"must be > 1 (or null), got {r.loss_spike_factor!r}",
        )
        checks.positive(r.loss_window, "train.rollback.loss_window")
        checks.positive(r.lr_scale, "train.rollback.lr_scale")
        checks.need(r.lr_scale_steps >= 0, "train.rollback.lr_scale_steps", f"must be >= 0, got {r.lr_scale_steps}")
        checks.need(
            r.on_nonfinite_streak is not None or r.loss_spike_factor is not None,
            "train.rollback.enabled",
            "set train.rollback.on_nonfinite_streak or train.rollback.loss_spike_factor (nothing would roll back)",
        )
    if world_size is not None:
        checks.errors.extend(world_errors(cfg, world_size))

    # engine (a task may add its own engine needs: Task.check_config)
    e = cfg.engine
    if e.kind == "deepspeed":
        checks.need(
            e.zero_stage in (1, 2, 3),
            "engine.zero_stage",
            f"must be 1, 2 or 3 with engine.kind=deepspeed, got {e.zero_stage}",
        )
    checks.positive(e.bucket_size, "engine.bucket_size")
    checks.need(
        e.zero3_persistence_threshold is None or e.zero3_persistence_threshold >= 0,
        "engine.zero3_persistence_threshold",
        f"must be >= 0 or null, got {e.zero3_persistence_threshold!r}",
    )
    checks.positive(e.shard_group_size, "engine.shard_group_size", allow_none=True)
    if e.sharding == "hybrid":
        checks.need(
            e.kind == "fsdp2",
            "engine.sharding",
            f"hybrid sharding (HSDP) needs engine.kind=fsdp2, got "
            f"{e.kind!r} (DeepSpeed partitions over all ranks: use engine.zero_stage)",
            ("engine.kind",),
        )
        size = e.shard_group_size
        if isinstance(world_size, int) and world_size > 0 and size is not None and size > 0 and world_size % size:
            checks.need(
                False,
                "engine.shard_group_size",
                f"world size {world_size} is not divisible by "
                f"shard_group_size {size} (hybrid sharding replicates whole shard groups)",
            )
    elif e.shard_group_size is not None:
        checks.need(
            False,
            "engine.shard_group_size",
            f"is only used with engine.sharding=hybrid (sharding is "
            f"{e.sharding!r}): set engine.sharding=hybrid or leave shard_group_size null",
            ("engine.sharding",),
        )

    # checkpoint
    c = cfg.checkpoint
    checks.positive(c.every_steps, "checkpoint.every_steps", allow_none=True)
    checks.positive(c.every_minutes, "checkpoint.every_minutes", allow_none=True)
    checks.positive(c.keep_last, "checkpoint.keep_last")
    checks.positive(c.keep_every, "checkpoint.keep_every", allow_none=True)
    if isinstance(c.resume_from, int):
        checks.need(c.resume_from >= 0, "checkpoint.resume_from", f"a step must be >= 0, got {c.resume_from}")
    elif isinstance(c.resume_from, str):
        checks.need(bool(c.resume_from.strip()), "checkpoint.resume_from", "must be a step or a checkpoint path")


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


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML, atomically (temp file + rename); the file loads back with the loader of its schema."""
    path = Path(path)
    atomic_write_text(path, config_to_yaml(cfg))
    return path


def resolve_run_dir(cfg: Any) -> Path:
    """``cfg.run_dir`` when set, else ``runs/<name>`` (relative to the working directory)."""
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


# --- Derived quantities -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Derived:
    """Numbers that follow from the config, the world size and (when known) the dataset size."""

    world_size: int
    dataset_size: Optional[int]
    global_batch_size: int
    micro_batch_size: int  # samples per rank per forward/backward
    grad_accum_steps: int  # micro-batches per optimizer step on each rank
    steps_per_epoch: Optional[int]  # dataset_size // global_batch_size (the last partial batch is dropped)
    total_steps: Optional[int]  # min(floor(epochs * steps_per_epoch), max_steps)

    @property
    def total_epochs(self) -> Optional[float]:
        if self.total_steps is None or not self.steps_per_epoch:
            return None
        return self.total_steps / self.steps_per_epoch


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """floor(epochs * steps_per_epoch), exact for decimal epochs as written (0.29 epochs x 100 = 29, not 28)."""
    return math.floor(Fraction(repr(float(epochs))) * steps_per_epoch)


def derived(cfg: Any, world_size: int, dataset_size: Optional[int]) -> Derived:
    """Micro batch, accumulation, steps per epoch and total steps of ``cfg.train`` for this world and dataset.

    With ``dataset_size=None`` only the batch split is computed (``steps_per_epoch``/``total_steps`` are None)."""
    errors = world_errors(cfg, world_size)
    if errors:
        raise ConfigError("\n".join(f"config: {k}: {p}" for k, p, _ in errors))
    gbs = cfg.train.global_batch_size
    mbs = cfg.train.micro_batch_size or gbs // world_size
    accum = gbs // (world_size * mbs)
    if dataset_size is None:
        return Derived(
            world_size=world_size,
            dataset_size=None,
            global_batch_size=gbs,
            micro_batch_size=mbs,
            grad_accum_steps=accum,
            steps_per_epoch=None,
            total_steps=None,
        )
    steps_per_epoch = dataset_size // gbs
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config: train.global_batch_size: the dataset has {dataset_size} samples, fewer than one "
            f"global batch of {gbs} (incomplete batches are dropped)"
        )
    candidates = []
    if cfg.train.epochs is not None:
        candidates.append(epochs_to_steps(cfg.train.epochs, steps_per_epoch))
    if cfg.train.max_steps is not None:
        candidates.append(cfg.train.max_steps)
    if not candidates:
        raise ConfigError("config: train.epochs: set at least one of train.epochs and train.max_steps")
    return Derived(
        world_size=world_size,
        dataset_size=dataset_size,
        global_batch_size=gbs,
        micro_batch_size=mbs,
        grad_accum_steps=accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=min(candidates),
    )
