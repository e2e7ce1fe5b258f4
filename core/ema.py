"""Exponential moving average of weights, as one fused multi-tensor op.

``ema <- decay * ema + (1 - decay) * src`` is ``torch.lerp(ema, src, 1 - decay)``; ``torch._foreach_lerp_``
does it for a whole list at once (no Python loop over parameters). PyTorch evaluates lerp as
``end - (end - start) * (1 - weight)`` when ``weight >= 0.5``, so ``decay = 0`` copies ``src`` exactly.

FSDP2 parameters are DTensors; both lists may hold DTensors (they are replaced by their local shards,
which must then be laid out identically — true when the EMA module is sharded like the model) or plain
tensors (e.g. already ``.to_local()`` shards).

``apply`` (a 0-dim bool tensor on the device, e.g. "this step's gradients were finite") decides on the device
whether the update happens, with no host read: the weight becomes ``apply * (1 - decay)``, a tensor, and a weight
of 0 leaves every EMA element as it was (``ema + 0 * (src - ema)``; ``src`` is finite). Same bits as the float
weight when ``apply`` is True (both kernels evaluate the same lerp with the same fp32 weight); the cost is one
lerp kernel per tensor (torch has no multi-tensor lerp with a tensor weight) instead of one multi-tensor kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = ()  # type: ignore[assignment,misc]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def ema_update_(
    ema_tensors: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    decay: float,
    apply: Optional[torch.Tensor] = None,
) -> None:
    """In place: ``ema = decay * ema + (1 - decay) * src`` for every pair of the two lists; with ``apply`` (0-dim
    bool tensor) only where it is True, decided on the device (see the module docstring)."""
    if len(ema_tensors) != len(tensors):
        raise ValueError(f"EMA update: {len(ema_tensors)} EMA tensors but {len(tensors)} source tensors")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    if not ema_tensors:
        return
    ema_local = [_local(t) for t in ema_tensors]
    src_local = [_local(t) for t in tensors]
    for e, s in zip(ema_local, src_local):
        if e.shape != s.shape:
            raise ValueError(
                f"EMA update: shape mismatch {tuple(e.shape)} vs {tuple(s.shape)} (is the EMA sharded like the model?)"
            )
    if any(s.dtype != e.dtype for e, s in zip(ema_local, src_local)):
        src_local = [s.to(e.dtype) for e, s in zip(ema_local, src_local)]
    if apply is None:
        torch._foreach_lerp_(ema_local, src_local, 1.0 - float(decay))
        return
    weights: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    for e in ema_local:
        key = (e.dtype, e.device)
        if key not in weights:
            # fp32(1 - decay) exactly as the float path rounds it (opmath of a float tensor), times 0 or 1.
            weights[key] = apply.to(device=e.device, dtype=e.dtype) * (1.0 - float(decay))
    torch._foreach_lerp_(ema_local, src_local, [weights[(e.dtype, e.device)] for e in ema_local])


# ---------------------------------------------------------------------------------------------------- several EMAs
def ema_decay_list(ema_decay: Optional[float | Sequence[float]]) -> list[float]:
    """The EMA decays of a part: ``None`` -> ``[]`` (no EMA), a float -> ``[decay]``, a sequence -> its floats.

    A part keeps one EMA per decay (``train.ema_decays``); the first is the primary EMA (``part.ema``, the one
    evaluated, sampled and exported by default, and the one a checkpoint written before several EMAs existed holds)."""
    if ema_decay is None:
        return []
    if isinstance(ema_decay, (int, float)):
        return [float(ema_decay)]
    return [float(d) for d in ema_decay]


def ema_key(index: int) -> str:
    """The name of EMA ``index`` of a part: ``"ema"`` for the primary one, ``"ema_<index>"`` for the others. It is
    the ``which`` of ``TrainedPart.full_state_dict`` / ``full_model``, the checkpoint entry (``<part>.ema_1``) and
    the prefix of the EMA's in-loop metrics (``eval/ema_1/fid``)."""
    return "ema" if index == 0 else f"ema_{index}"


def ema_index(which: str, count: int, owner: str = "part") -> int:
    """The index of EMA ``which`` (``"ema"``, ``"ema_<i>"``) among ``count`` EMAs; ValueError naming the choices."""
    index = None
    if which == "ema":
        index = 0
    elif which.startswith("ema_") and which[4:].isdigit():
        index = int(which[4:])
    if index is None or index >= count:
        choices = [ema_key(i) for i in range(count)]
        what = f"EMAs {choices}" if choices else "no EMA (ema_decay is None)"
        raise ValueError(f"{owner}: no EMA {which!r}: it has {what}")
    return index
