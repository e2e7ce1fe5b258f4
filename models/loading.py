"""Load model weights from checkpoint files: official LightningDiT files and our own checkpoints.

Accepted sources (``load_checkpoint_state``):

* an official training file ``{"model": sd, "ema": sd, "opt": ..., "config": ...}``;
* ``{"model": sd}`` / ``{"ema": sd}`` (also ``{"state_dict": sd}``, treated as the raw model);
* a bare state dict (all values tensors), e.g. a released inference file; it is returned for any
  ``which`` because nothing says whether it holds EMA or raw weights;
* our consolidated export (same ``{"model", "ema"}`` layout as the official file);
* our DCP checkpoint directory (contains ``.metadata``, or a step directory holding one such ``state/``
  directory); model/EMA under the top-level keys ``model``/``ema`` or the FSDP2 engine's
  ``<part>.model``/``<part>.ema``; read by ``_load_our_checkpoint_dir``.

Key clean-up: leading ``module.`` / ``_orig_mod.`` prefixes are stripped (repeatedly, in any order), and
wrapper path components that never name real modules (``_orig_mod``, ``_checkpoint_wrapped_module``,
``_fsdp_wrapped_module``) are removed wherever they appear (per-block compile / activation checkpointing).

``load_into_model`` compares against the model's own state dict and, on any mismatch, raises a
``ValueError`` listing missing, unexpected and mis-shaped keys together with the file path. A REPA projector in the
file (``repa_projector.*``) is ignored when the model has none (sampling from a REPA run's checkpoint).
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.tensor import DTensor

from core.checkpoint import resolve_checkpoint_dir
from core.ema import ema_index
from core.engines.deepspeed import EMA_FILE, consolidated_state_dicts, part_dir
from core.fileio import atomic_torch_save
from models.repa import REPA_PREFIX, strip_repa

__all__ = [
    "CheckpointReadError",
    "LoadReport",
    "load_checkpoint_state",
    "load_into_model",
    "clean_state_dict",
    "is_dcp_dir",
    "checkpoint_engine",
    "export_state",
    "save_export",
]

PathLike = Union[str, os.PathLike]
WHICH = ("ema", "model", "auto")
_LEADING_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_COMPONENTS = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}
_MODEL_ALIASES = ("model", "state_dict")


class CheckpointReadError(RuntimeError):
    """A checkpoint file or directory exists but cannot be read (truncated, corrupt, wrong format)."""


@dataclass
class LoadReport:
    path: str
    which: str  # the entry actually loaded ("ema", "model", "bare")
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, expected, got)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 50) -> str:
        lines = [f"checkpoint {self.path} ({self.which!r} weights) does not match the model:"]

        def section(title: str, items: list[str]) -> None:
            if not items:
                return
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {s}" for s in items[:limit])
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")

        section("missing keys (in model, not in checkpoint)", self.missing)
        section("unexpected keys (in checkpoint, not in model)", self.unexpected)
        section(
            "mis-shaped keys (name: expected shape vs got shape)",
            [f"{k}: expected {list(e)} vs got {list(g)}" for k, e, g in self.mismatched],
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Key clean-up
# ---------------------------------------------------------------------------------------------------


def _clean_key(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _LEADING_PREFIXES:
            if key.startswith(p):
                key = key[len(p) :]
                changed = True
    parts = [s for s in key.split(".") if s not in _WRAPPER_COMPONENTS]
    return ".".join(parts)


def clean_state_dict(sd: Mapping[str, Any], source: str = "<state dict>") -> dict[str, Any]:
    """Strip wrapper prefixes (see module docstring); raises ValueError if two keys collide."""
    out: dict[str, Any] = {}
    for k, v in sd.items():
        ck = _clean_key(k)
        if ck in out:
            raise ValueError(f"{source}: keys collide after removing wrapper prefixes: {k!r} -> {ck!r}")
        out[ck] = v
    return out


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def is_dcp_dir(path: PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    """torch.load on CPU with ``weights_only=True``; if the file needs arbitrary pickled objects (e.g. the
    official ``config`` entry), fall back to ``weights_only=False`` with a warning (trusted files only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        msg = str(err)
        if "Weights only load failed" not in msg and "weights_only" not in msg:
            raise CheckpointReadError(f"cannot read checkpoint file {path}: {type(err).__name__}: {err}") from err
        if not allow_pickle:
            raise CheckpointReadError(
                f"checkpoint file {path} contains non-tensor Python objects and allow_pickle=False: {err}"
            ) from err
        warnings.warn(
            f"{path}: not loadable with weights_only=True (it holds pickled Python objects, e.g. "
            f"the official 'config' entry); retrying with weights_only=False. Only load files "
            f"you trust.",
            stacklevel=3,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:  # noqa: BLE001 - reported with the path
            raise CheckpointReadError(f"cannot read checkpoint file {path}: {type(err2).__name__}: {err2}") from err2
    except Exception as err:  # noqa: BLE001 - truncated zip, bad magic number, EOF, ...
        raise CheckpointReadError(f"cannot read checkpoint file {path}: {type(err).__name__}: {err}") from err


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _select(obj: Any, which: str, path: Path) -> tuple[str, Mapping[str, Any]]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    has_ema = isinstance(obj.get("ema"), Mapping)
    model_key = next((k for k in _MODEL_ALIASES if isinstance(obj.get(k), Mapping)), None)
    if which == "auto":
        which = "ema" if has_ema else "model"
    if which == "ema" and has_ema:
        return "ema", obj["ema"]
    if which == "model" and model_key is not None:
        return "model", obj[model_key]
    if not has_ema and model_key is None and _is_state_dict(obj):
        return "bare", obj
    if which not in WHICH and isinstance(obj.get(which), Mapping):  # explicit top-level key
        return which, obj[which]
    raise ValueError(f"{path}: no {which!r} weights in checkpoint; top-level keys: {sorted(map(str, obj))}")


def load_checkpoint_state(path: PathLike, which: str = "auto", *, allow_pickle: bool = True) -> dict[str, Any]:
    """Return the model state dict stored in ``path`` (file or DCP directory), keys cleaned, on CPU.

    ``which``: ``"ema"`` (error if the checkpoint has model weights but no EMA), ``"model"`` (raw
    weights), ``"auto"`` (EMA when present, else model). A bare state dict is returned for any ``which``.
    Raises ``FileNotFoundError`` (no such path), ``CheckpointReadError`` (unreadable) or ``ValueError``
    (readable but no such entry).
    """
    return _load_with_source(path, which, allow_pickle=allow_pickle)[1]


def _load_with_source(path: PathLike, which: str, allow_pickle: bool = True) -> tuple[str, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        entry, sd = _load_our_checkpoint_dir(path, which)
    else:
        entry, sd = _select(_torch_load(path, allow_pickle), which, path)
    return entry, clean_state_dict(sd, source=str(path))


# ---------------------------------------------------------------------------------------------------
# Our DCP checkpoint directories  (hook: keep in sync with core/engines/fsdp2.py's save layout)
# ---------------------------------------------------------------------------------------------------


def _find_dcp_dir(path: Path) -> Path:
    if is_dcp_dir(path):
        return path
    subs = sorted(p for p in path.iterdir() if is_dcp_dir(p))
    if len(subs) == 1:  # e.g. <run>/checkpoints/step_0000100/<state>/.metadata
        return subs[0]
    listing = sorted(p.name for p in path.iterdir())
    raise CheckpointReadError(
        f"{path} is a directory but not a DCP checkpoint (no .metadata here"
        + (f"; several candidate sub-directories: {[s.name for s in subs]}" if subs else "")
        + f"); contents: {listing[:20]}"
    )


def _resolve_dcp_entry(tops: set[str], which: str, path: Path) -> str:
    """Top-level DCP entry for ``which``: ``"ema"``/``"model"`` match the entry of that name, else the one
    entry ending in ``".ema"``/``".model"`` (core/engines/fsdp2.py saves ``"<part>.model"``, ``"<part>.ema"``,
    ``"<part>.optim"``); ``"auto"`` prefers EMA; any other string must name an entry exactly."""
    if which not in WHICH:
        if which in tops:
            return which
        raise ValueError(f"{path}: no {which!r} entry in DCP checkpoint; top-level entries: {sorted(tops)}")
    for wanted in ("ema", "model") if which == "auto" else (which,):
        if wanted in tops:
            return wanted
        candidates = sorted(t for t in tops if t.endswith("." + wanted))
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise ValueError(
                f"{path}: several {wanted!r} entries in DCP checkpoint {candidates}; pass which=<one of them>"
            )
    raise ValueError(f"{path}: no {which!r} entry in DCP checkpoint; top-level entries: {sorted(tops)}")


def _load_our_checkpoint_dir(path: PathLike, which: str) -> tuple[str, dict[str, Any]]:
    """HOOK for our engine's checkpoint directories (DCP format, ``.metadata`` inside).

    ``path`` is the DCP directory or a directory holding exactly one (``step_0000100/state``). Layouts:
    ``dcp.save({"model": sd, "ema": sd2}, ...)`` and the FSDP2 engine's
    ``{"<part>.model": sd, "<part>.ema": sd2, "<part>.optim": ...}`` (see ``_resolve_dcp_entry``).
    Tensors are stored flattened under ``<entry>.<key>``. Only the requested entry is read (never the
    optimizer), as full unsharded CPU tensors, in this process alone (no process group needed; safe to
    call on one rank). Returns ``(entry, state_dict)``.
    """
    # Private helpers, the same ones torch's public ``format_utils.dcp_to_torch_save`` uses; they read
    # locally (no_dist=True) so this is safe on any single rank, with or without a process group.
    path = _find_dcp_dir(Path(path))
    reader = dcp.FileSystemReader(str(path))
    try:
        metadata = reader.read_metadata()
    except Exception as err:  # noqa: BLE001
        raise CheckpointReadError(f"cannot read DCP metadata in {path}: {type(err).__name__}: {err}") from err
    tops: set[str] = set()
    planner_data = metadata.planner_data or {}
    for key in metadata.state_dict_metadata:
        fqn_path = planner_data.get(key)
        tops.add(str(fqn_path[0]) if fqn_path else key.split(".", 1)[0])
    entry = _resolve_dcp_entry(tops, which, path)

    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys={entry}), no_dist=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointReadError(f"cannot read DCP checkpoint {path}: {type(err).__name__}: {err}") from err
    sd = state.get(entry)
    if not isinstance(sd, Mapping):
        raise CheckpointReadError(f"DCP checkpoint {path}: entry {entry!r} is not a state dict")
    return entry, {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------
# Into a model
# ---------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def compare_state(model_sd: Mapping[str, Any], ckpt_sd: Mapping[str, Any], path: str, which: str) -> LoadReport:
    report = LoadReport(path=path, which=which)
    report.missing = [k for k in model_sd if k not in ckpt_sd]
    report.unexpected = [k for k in ckpt_sd if k not in model_sd]
    for k, v in model_sd.items():
        if k in ckpt_sd and isinstance(v, torch.Tensor) and isinstance(ckpt_sd[k], torch.Tensor):
            if tuple(v.shape) != tuple(ckpt_sd[k].shape):
                report.mismatched.append((k, tuple(v.shape), tuple(ckpt_sd[k].shape)))
    return report


def load_into_model(
    model: nn.Module, path: PathLike, which: str = "ema", strict: bool = True, *, allow_pickle: bool = True
) -> LoadReport:
    """Load weights from ``path`` into ``model`` (plain, ``torch.compile``-wrapped or FSDP2-sharded; any
    device; not meta). For a sharded model call it on every rank (each reads the file).

    ``strict=True``: any missing / unexpected / mis-shaped key raises ``ValueError`` naming all of them and
    the file. ``strict=False``: loads the keys whose shapes match, warns about the rest. Returns a
    ``LoadReport``. Values are cast to the model's dtypes by ``load_state_dict``.
    """
    target = _unwrap(model)
    model_sd = target.state_dict()
    meta = [k for k, v in model_sd.items() if isinstance(v, torch.Tensor) and v.is_meta]
    if meta:
        raise ValueError(
            f"cannot load {path} into a model on the meta device ({meta[0]!r}, ...): "
            f"materialise it first (model.to_empty(device=...); model.init_weights())"
        )
    entry, sd = _load_with_source(path, which, allow_pickle=allow_pickle)
    if not any(k.startswith(REPA_PREFIX) for k in model_sd):
        sd = strip_repa(sd)  # a REPA run's training checkpoint into the plain model: the projector is not needed
    report = compare_state(model_sd, sd, str(path), entry)
    if not report.ok:
        if strict:
            raise ValueError(report.describe())
        warnings.warn(report.describe(), stacklevel=2)
    skip = {k for k, _, _ in report.mismatched} | set(report.unexpected)
    usable = {k: v for k, v in sd.items() if k not in skip}
    if any(_is_dtensor(v) for v in model_sd.values()):
        # FSDP2-sharded model: every rank passes the full tensors; each keeps its own shard.
        set_model_state_dict(target, usable, options=StateDictOptions(full_state_dict=True, strict=strict))
    else:
        target.load_state_dict(usable, strict=strict)
    return report


def _is_dtensor(v: Any) -> bool:
    return isinstance(v, DTensor)


# ------------------------------------------------------------------------------------------ export (tools/export.py)
def checkpoint_engine(ckpt_dir: Path) -> str:
    """Which engine wrote checkpoint directory ``ckpt_dir``: "fsdp2" (``state/.metadata``) or "deepspeed"."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "state" / ".metadata").is_file():
        return "fsdp2"
    if (ckpt_dir / "deepspeed").is_dir():
        return "deepspeed"
    raise FileNotFoundError(f"{ckpt_dir}: not an FSDP2 (state/.metadata) or DeepSpeed (deepspeed/) checkpoint")


def _fsdp2_state_dicts(ckpt_dir: Path, part: str, emas: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for which in ["model"] + emas:
        try:
            _, sd = _load_our_checkpoint_dir(ckpt_dir / "state", f"{part}.{which}")
        except ValueError:
            if which == "ema":  # a part trained without EMA
                continue
            raise
        sd = strip_repa(clean_state_dict(sd, source=str(ckpt_dir)))
        out[which] = {k: (v.float() if v.is_floating_point() else v).detach().contiguous() for k, v in sd.items()}
    return out


def checkpoint_ema_keys(ckpt_dir: PathLike, part: str = "model") -> list[str]:
    """The EMAs of ``part`` stored in checkpoint directory ``ckpt_dir`` (``["ema", "ema_1", ...]``, one per
    ``train.ema_decays`` entry; ``[]`` without EMA), written by either engine. Reads metadata only."""
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    if checkpoint_engine(ckpt_dir) == "fsdp2":
        metadata = dcp.FileSystemReader(str(ckpt_dir / "state")).read_metadata()
        if not metadata.planner_data:  # no entry names recorded: try the primary EMA only
            return ["ema"]
        tops = {str(p[0]) for p in metadata.planner_data.values() if p}
        keys = [t[len(part) + 1 :] for t in tops if t.startswith(f"{part}.ema")]
    else:
        saved = torch.load(part_dir(ckpt_dir, part) / EMA_FILE, map_location="cpu", weights_only=False, mmap=True)
        keys = (["ema"] if saved["ema"] is not None else []) + sorted(saved.get("emas") or {})
    return sorted(keys, key=_ema_order)


def _ema_order(key: str) -> tuple[bool, int]:
    return key != "ema", int(key[4:]) if key[4:].isdigit() else 0


def _check_ema_choice(ema: str, available: list[str], ckpt_dir: Path, part: str) -> None:
    if ema != "all" and available:
        ema_index(ema, len(available), f"{ckpt_dir} part {part!r}")  # ValueError naming the EMAs there are


def export_state(ckpt_dir: PathLike, part: str = "model", ema: str = "ema") -> dict[str, dict[str, torch.Tensor]]:
    """``{"model": sd, "ema": sd}`` (``ema`` only if the part has one) of ``part`` in checkpoint directory
    ``ckpt_dir`` (a run or ``checkpoints/`` directory: its newest complete checkpoint), written by either engine:
    fp32 CPU tensors under the model's own (official) key names. FSDP2: read with ``_load_our_checkpoint_dir``
    (DCP's local reader, full tensors, optimizer never read); DeepSpeed: ``consolidated_state_dicts``. A REPA
    projector (``repa_projector.*``, models/repa.py) is a training-only head: it is dropped, so the export loads
    into the plain model.

    ``ema``: which of the part's EMAs (``train.ema_decays``: ``"ema"``, ``"ema_1"``, ...) is written under
    ``"ema"`` (the official layout, what ``load_into_model(which="ema")`` reads); ``"all"`` keeps every EMA under
    its own name instead."""
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    if checkpoint_engine(ckpt_dir) == "fsdp2":
        available = checkpoint_ema_keys(ckpt_dir, part)
        _check_ema_choice(ema, available, ckpt_dir, part)
        state = _fsdp2_state_dicts(ckpt_dir, part, available if ema == "all" else [ema] if available else [])
    else:
        # every EMA (ema.pt holds them all)
        state = {k: strip_repa(sd) for k, sd in consolidated_state_dicts(ckpt_dir, part).items()}
        available = sorted((k for k in state if k != "model"), key=_ema_order)
        _check_ema_choice(ema, available, ckpt_dir, part)
    wanted = available if ema == "all" else [ema] if available else []
    out = {"model": state["model"]}
    if ema == "all":
        out.update({k: state[k] for k in wanted})
    elif wanted:
        out["ema"] = state[ema]
    return out


def save_export(state: dict, out: PathLike) -> Path:
    """``torch.save`` of an ``export_state`` result, atomically (never leaves a half-written file)."""
    atomic_torch_save(state, out)
    return Path(out)
