"""Engine / TrainedPart interfaces and what every engine shares: the only things the trainer, the checkpoint manager
and the tasks call.

An *engine* wraps models for distributed training (FSDP2, DeepSpeed ZeRO) and owns their checkpoint state and
their compute precision (``Engine.autocast``). A *trained part* is one trainable model + its optimizer (+ EMA) as
wrapped by an engine. A task describes a part with a ``PartSpec``; ``Engine.prepare`` turns it into a
``TrainedPart``. Tasks never touch the engine's wrapped objects themselves: what they need from the wrapping
(keep parameters unsharded between forward and backward, a full state dict, a plain callable copy of the weights
for evaluation) is a ``TrainedPart`` method. See docs/architecture.md for the contract.

This module imports no engine; the engines (``core/engines/fsdp2.py``, ``core/engines/deepspeed.py``) import it
and never each other. ``core.engines.build_engine`` picks one by name (a registry of lazy entries).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as tdist
from torch import nn

from core.config import EngineConfig, OptimizerConfig
from core.ema import ema_decay_list, ema_index, ema_key

if TYPE_CHECKING:  # pragma: no cover
    from core.distributed import DistInfo

log = logging.getLogger(__name__)

__all__ = [
    "Engine",
    "LocalPart",
    "PartSpec",
    "TrainedPart",
    "block_container",
    "build_optimizer",
    "canonical_name",
    "cast_to_fp32_",
    "check_ema_decay",
    "compile_forwards",
    "meta_skeleton",
    "warn_skipped_block_options",
    "WRAPPER_PREFIXES",
]


@dataclass
class PartSpec:
    """A trainable model and how to train it; the engine turns it into a TrainedPart."""

    module: nn.Module
    optimizer: OptimizerConfig
    ema_decay: Optional[float | Sequence[float]] = None  # one EMA per decay (the first: `ema`)
    blocks_attr: Optional[str] = "blocks"  # attribute holding the repeated blocks (sharding / AC / compile unit)
    grad_clip: Optional[float] = None
    # Sub-modules whose forward the engine compiles (engine.compile) inside the part's sharding unit(s), for models
    # without repeated blocks (VA-VAE: encoder, decoder); the module objects and state_dict keys do not change.
    compile_attrs: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------- helpers
# Module-name components that wrappers add (activation checkpointing, torch.compile of a whole module).
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """Parameter / state-dict name without wrapper components (activation checkpointing, torch.compile)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def check_ema_decay(name: str, ema_decay: Optional[float | Sequence[float]]) -> None:
    """``ema_decay`` is None (no EMA), a decay in [0, 1] or a sequence of such decays (one EMA each)."""
    for decay in ema_decay_list(ema_decay):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"{name}: ema_decay must be in [0, 1], got {decay}")


def cast_to_fp32_(model: nn.Module) -> None:
    """Floating-point parameters to fp32, in place: master weights are always fp32 (both engines)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def block_container(model: nn.Module, blocks_attr: Optional[str]) -> Optional[nn.Module]:
    """The ``nn.ModuleList`` / ``nn.Sequential`` of repeated blocks named by ``blocks_attr`` (None: no blocks)."""
    if blocks_attr is None:
        return None
    try:
        blocks = model.get_submodule(blocks_attr)
    except AttributeError as e:
        raise AttributeError(
            f"{type(model).__name__} has no block container {blocks_attr!r} "
            "(pass blocks_attr=None to shard the model as one unit)"
        ) from e
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            f"{type(model).__name__}.{blocks_attr} must be an nn.ModuleList or nn.Sequential, "
            f"got {type(blocks).__name__}"
        )
    return blocks


def warn_skipped_block_options(
    has_blocks: bool, checkpointing: bool, compile_blocks: bool, compile_attrs: tuple[str, ...]
) -> None:
    """Warn about activation checkpointing / compile settings that have nothing to apply to (no blocks)."""
    if has_blocks:
        return
    if checkpointing:
        log.warning("activation checkpointing applies per block, but no blocks_attr was given: skipped")
    if compile_blocks and not compile_attrs:
        log.warning("engine.compile applies per block or to PartSpec.compile_attrs, but neither was given: skipped")


def compile_forwards(model: nn.Module, attrs: tuple[str, ...], compile_kwargs: dict[str, Any]) -> None:
    """``torch.compile`` the ``forward`` of each named sub-module of ``model`` in place: the module objects and the
    state_dict keys stay the same, and whatever hooks the engine puts on its units stay outside the compiled regions.
    The engines call it for ``PartSpec.compile_attrs`` (models without repeated blocks, e.g. the VA-VAE)."""
    for attr in attrs:
        try:
            sub = model.get_submodule(attr)
        except AttributeError as e:
            raise AttributeError(
                f"{type(model).__name__} has no sub-module {attr!r} to compile (PartSpec.compile_attrs)"
            ) from e
        sub.forward = torch.compile(sub.forward, **compile_kwargs)


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters live on the meta device (no memory) and whose buffers are real copies
    (non-persistent buffers, e.g. RoPE tables, are not in state dicts). Taken by ``Engine.prepare`` before any
    wrapping, so it has the model's own structure and names; ``TrainedPart.full_model`` loads full weights into
    a copy of it."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def _is_main_rank() -> bool:
    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


# ---------------------------------------------------------------------------------------------------- parts
class TrainedPart(abc.ABC):
    """One trainable model + its optimizer (+ EMA), as wrapped by an engine.

    ``module`` is called for the forward pass (the engine's wrapper); ``ema`` is the EMA, held however the engine
    shards it (not necessarily callable: use ``full_model``); ``optimizer`` is the torch optimizer whose parameter
    groups carry the learning rate.
    """

    name: str
    module: nn.Module  # call for forward (wrapped: FSDP2 module / DeepSpeed engine)
    ema: Optional[nn.Module]  # EMA copy, sharded like the weights; eval mode
    optimizer: Optional[torch.optim.Optimizer]

    def __init__(
        self,
        name: str,
        module: nn.Module,
        ema: Optional[nn.Module],
        optimizer: Optional[torch.optim.Optimizer],
        ema_decay: Optional[float | Sequence[float]],
        device: torch.device,
        skeleton: Optional[nn.Module] = None,
    ):
        self.name = name
        self.module = module
        self.ema = ema
        self.optimizer = optimizer
        # One EMA per decay (train.ema_decays); the first is `ema`, the others follow in `emas` (core/ema.py).
        self.ema_decays = ema_decay_list(ema_decay)
        self.ema_decay = self.ema_decays[0] if self.ema_decays else None
        self.emas: list[nn.Module] = [ema] if ema is not None else []
        self.device = device
        self.skeleton = skeleton  # meta_skeleton of the model before wrapping (full_model)

    def ema_keys(self) -> list[str]:
        """The names of the part's EMAs, one per decay: ``["ema", "ema_1", ...]`` (``core.ema.ema_key``)."""
        return [ema_key(i) for i in range(len(self.ema_decays))]

    def ema_module(self, which: str) -> nn.Module:
        """EMA ``which`` (``"ema"``, ``"ema_<i>"``) as the engine holds it; ValueError naming the EMAs there are."""
        return self.emas[ema_index(which, len(self.emas), self.name)]

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Backpropagate ``loss``; ``sync=False`` on non-final micro-batches (no gradient reduction)."""

    @abc.abstractmethod
    def step(self) -> torch.Tensor:
        """Clip (if configured), optimizer step, zero grad, EMA update; returns the grad norm (pre-clip)."""

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def set_reshard_after_forward(self, reshard: bool) -> None:
        """Whether the part's parameters are re-sharded right after its forward (the engine's default) or stay
        unsharded until its backward, so that the module's parameter attributes are the very tensors the forward
        used (VA-VAE's adaptive weights take ``autograd.grad`` w.r.t. them). Idempotent. A no-op for engines that
        never shard parameters between forward and backward (the default here)."""

    def set_partial_grads(self, enabled: bool) -> None:
        """Whether the task takes ``torch.autograd.grad`` through this part's forward outputs (w.r.t. the part's
        parameters or its inputs) before the part's ``backward`` — VA-VAE's adaptive weights. Such partial passes
        must not start the engine's gradient machinery (reduction, partition bookkeeping); only ``backward`` does.
        Idempotent. A no-op for engines whose forward does not hook its outputs (the default here; FSDP2's
        per-unit hooks handle partial passes). Combine with ``set_reshard_after_forward(False)`` for gradients
        w.r.t. the parameters."""

    @abc.abstractmethod
    def full_state_dict(self, which: str = "model", rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """Collective: the model's full (unsharded) fp32 state dict on the CPU, with the model's own key names.

        ``which``: ``"model"`` (the trained weights), ``"ema"`` or another EMA ``"ema_<i>"`` (``ema_keys``). With
        ``rank0_only`` the other ranks get ``{}``."""

    @contextlib.contextmanager
    def full_model(self, which: str = "ema", rank0_only: bool = False) -> Iterator[Optional[nn.Module]]:
        """Collective: a plain, callable ``nn.Module`` holding the full weights (``which="ema"`` or ``"model"``) on
        this rank's device, in eval mode with ``requires_grad=False`` — for evaluation whatever the engine and its
        sharding (the forward is local: ranks may call it different numbers of times). With ``rank0_only`` the
        other ranks get ``None``. The copy is this context's own: it is dropped on exit, and changing it does not
        change the part."""
        if which != "model":
            self.ema_module(which)  # ValueError naming the EMAs there are
        if self.skeleton is None:
            raise RuntimeError(f"{self.name}: the engine kept no model skeleton for full_model")
        state = self.full_state_dict(which, rank0_only=rank0_only)
        if rank0_only and not _is_main_rank():
            yield None
            return
        model = copy.deepcopy(self.skeleton)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model.to(self.device).requires_grad_(False).eval()
        try:
            yield model
        finally:
            del model


class LocalPart(TrainedPart):
    """A plain model (and EMA) that no engine wraps, e.g. a model loaded from an exported file, for evaluation code
    that takes parts (``Task.evaluate``) and for unsharded references in tests. Every rank holds it whole; it has no
    optimizer and does not train (``backward`` is ``loss.backward()``; ``step`` is refused)."""

    def __init__(
        self, name: str, module: nn.Module, ema: Optional[nn.Module] = None, device: Optional[torch.device] = None
    ):
        if device is None:
            device = next((t.device for t in module.parameters()), torch.device("cpu"))
        super().__init__(name, module, ema, None, None, device)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        raise RuntimeError(f"{self.name}: a LocalPart has no optimizer (wrap the model with an engine to train it)")

    def set_lr(self, lr: float) -> None:
        raise RuntimeError(f"{self.name}: a LocalPart has no optimizer")

    @torch.no_grad()
    def full_state_dict(self, which: str = "model", rank0_only: bool = True) -> dict[str, torch.Tensor]:
        module = self.module if which == "model" else self.ema_module(which)
        if rank0_only and not _is_main_rank():
            return {}
        return {
            canonical_name(k): (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in module.state_dict().items()
        }

    @contextlib.contextmanager
    def full_model(self, which: str = "ema", rank0_only: bool = False) -> Iterator[Optional[nn.Module]]:
        """The module itself (no copy), in eval mode for the context (its mode is restored on exit)."""
        module = self.module if which == "model" else self.ema_module(which)
        if rank0_only and not _is_main_rank():
            yield None
            return
        was_training = module.training
        module.eval()
        try:
            yield module
        finally:
            module.train(was_training)


# ---------------------------------------------------------------------------------------------------- engines
class Engine(abc.ABC):
    """Wraps models for distributed training and owns their checkpoint state.

    ``async_save`` (set by the constructor or by ``CheckpointManager`` from ``CheckpointConfig.async_save``
    when ``supports_async_save``): ``save`` may return before the files are written; ``wait()`` finishes
    the write on this rank.
    """

    supports_async_save: bool = False

    def __init__(self, cfg: EngineConfig, dist: DistInfo):
        self.cfg = cfg
        self.dist = dist
        self.async_save = False

    @abc.abstractmethod
    def prepare(
        self,
        name: str,
        model: nn.Module,
        optim_cfg: OptimizerConfig,
        ema_decay: Optional[float | Sequence[float]],
        blocks_attr: Optional[str] = "blocks",
        *,
        grad_clip: Optional[float] = None,
        compile_attrs: tuple[str, ...] = (),
    ) -> TrainedPart:
        """Wrap ``model`` (fp32, not yet sharded) and build its optimizer and EMA. With ``engine.compile``, the blocks
        of ``blocks_attr`` and the sub-modules named in ``compile_attrs`` get their ``forward`` compiled in place
        (``compile_forwards``)."""

    @abc.abstractmethod
    def save(self, ckpt_dir: Path, parts: dict[str, TrainedPart]) -> None:
        """Collective: write every part's state (model, optimizer, EMA) under ``ckpt_dir``. The per-rank extra state
        (step, RNG states, ...) is the checkpoint manager's (``core.checkpoint.save_checkpoint``)."""

    @abc.abstractmethod
    def load(self, ckpt_dir: Path, parts: dict[str, TrainedPart]) -> None:
        """Collective: restore every part's state from ``ckpt_dir``, written by any number of ranks."""

    def autocast(self) -> AbstractContextManager:
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


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, device: torch.device
) -> torch.optim.Optimizer:
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
