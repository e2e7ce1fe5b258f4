"""Engine / TrainedPart interfaces: the only things the trainer and the checkpoint manager call.

An *engine* wraps models for distributed training (FSDP2, DeepSpeed ZeRO) and owns their checkpoint state and
their compute precision (``Engine.autocast``). A *trained part* is one trainable model + its optimizer (+ EMA) as
wrapped by an engine. See docs/architecture.md for the contract.
"""
from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterable, Optional

import torch
from torch import nn

from core.config import EngineConfig, OptimizerConfig

if TYPE_CHECKING:  # pragma: no cover
    from core.distributed import DistInfo


class TrainedPart(abc.ABC):
    """One trainable model + its optimizer (+ EMA), as wrapped by an engine."""

    name: str
    module: nn.Module                 # call for forward (wrapped: FSDP2 module / DeepSpeed engine)
    ema: Optional[nn.Module]          # EMA copy, sharded like the weights; eval mode

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Backpropagate ``loss``; ``sync=False`` on non-final micro-batches (no gradient reduction)."""

    @abc.abstractmethod
    def step(self) -> torch.Tensor:
        """Clip (if configured), optimizer step, zero grad, EMA update; returns the grad norm (pre-clip)."""

    @abc.abstractmethod
    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group."""


class Engine(abc.ABC):
    """Wraps models for distributed training and owns their checkpoint state.

    ``async_save`` (set by the constructor or by ``CheckpointManager`` from ``CheckpointConfig.async_save``
    when ``supports_async_save``): ``save`` may return before the files are written; ``wait()`` finishes
    the write on this rank.
    """

    supports_async_save: bool = False

    def __init__(self, cfg: EngineConfig, dist: "DistInfo"):
        self.cfg = cfg
        self.dist = dist
        self.async_save = False

    @abc.abstractmethod
    def prepare(self, name: str, model: nn.Module, optim_cfg: OptimizerConfig, ema_decay: Optional[float],
                blocks_attr: Optional[str] = "blocks", *, grad_clip: Optional[float] = None,
                compile_attrs: tuple[str, ...] = ()) -> TrainedPart:
        """Wrap ``model`` (fp32, not yet sharded) and build its optimizer and EMA. With ``engine.compile``, the blocks
        of ``blocks_attr`` and the sub-modules named in ``compile_attrs`` get their ``forward`` compiled in place
        (``compile_forwards``)."""

    @abc.abstractmethod
    def save(self, ckpt_dir: Path, parts: dict[str, TrainedPart], extra: dict[str, Any]) -> None:
        """Collective: write every part's state and this rank's ``extra`` under ``ckpt_dir``."""

    @abc.abstractmethod
    def load(self, ckpt_dir: Path, parts: dict[str, TrainedPart]) -> dict[str, Any]:
        """Collective: restore every part's state from ``ckpt_dir``; returns the saved ``extra``."""

    def autocast(self) -> ContextManager:
        """The context every forward through the trained parts runs in (the trainer wraps ``Task.loss`` in it):
        ``torch.autocast(bf16)`` for ``precision="bf16-autocast"`` (fp32 parameters, per-op bf16 compute: the
        official LightningDiT numerics), a no-op for "bf16" (the engine casts the parameters instead) and "fp32"."""
        if self.cfg.precision == "bf16-autocast":
            return torch.autocast(device_type=self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def wait(self) -> None:
        """Finish this rank's async save in flight and re-raise its error (no-op for synchronous engines)."""

    def pending_done(self) -> bool:
        """Non-blocking: True when this rank has no async save still writing."""
        return True


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW / Adam from the config: fused kernels on CUDA (unless ``cfg.fused`` says otherwise), foreach elsewhere."""
    params = list(params)
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if cfg.name == "adam":
        return torch.optim.Adam(params, **kwargs)
    raise ValueError(f"optimizer.name: unknown optimizer {cfg.name!r} (expected 'adamw' or 'adam')")


def build_engine(cfg: EngineConfig, dist: "DistInfo", **kwargs: Any) -> Engine:
    """The engine named by ``cfg.kind``. Extra keyword arguments go to the engine's constructor."""
    if cfg.kind == "fsdp2":
        from core.engines.fsdp2 import FSDP2Engine
        return FSDP2Engine(cfg, dist, **kwargs)
    if cfg.kind == "deepspeed":
        from core.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(cfg, dist, **kwargs)
    raise ValueError(f"engine.kind: unknown engine {cfg.kind!r} (expected 'fsdp2' or 'deepspeed')")


def compile_forwards(model: nn.Module, attrs: tuple[str, ...], compile_kwargs: dict[str, Any]) -> None:
    """``torch.compile`` the ``forward`` of each named sub-module of ``model`` in place: the module objects and the
    state_dict keys stay the same, and whatever hooks the engine puts on its units stay outside the compiled regions.
    The engines call it for ``PartSpec.compile_attrs`` (models without repeated blocks, e.g. the VA-VAE)."""
    for attr in attrs:
        try:
            sub = model.get_submodule(attr)
        except AttributeError as e:
            raise AttributeError(f"{type(model).__name__} has no sub-module {attr!r} to compile "
                                 "(PartSpec.compile_attrs)") from e
        sub.forward = torch.compile(sub.forward, **compile_kwargs)
