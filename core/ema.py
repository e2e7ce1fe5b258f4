"""Exponential moving average of weights, as one fused multi-tensor op.

``ema <- decay * ema + (1 - decay) * src`` is ``torch.lerp(ema, src, 1 - decay)``; ``torch._foreach_lerp_``
does it for a whole list at once (no Python loop over parameters). PyTorch evaluates lerp as
``end - (end - start) * (1 - weight)`` when ``weight >= 0.5``, so ``decay = 0`` copies ``src`` exactly.

FSDP2 parameters are DTensors; both lists may hold DTensors (they are replaced by their local shards,
which must then be laid out identically — true when the EMA module is sharded like the model) or plain
tensors (e.g. already ``.to_local()`` shards).
"""
from __future__ import annotations

from typing import Sequence

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = ()  # type: ignore[assignment,misc]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def ema_update_(ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], decay: float) -> None:
    """In place: ``ema = decay * ema + (1 - decay) * src`` for every pair of the two lists."""
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
            raise ValueError(f"EMA update: shape mismatch {tuple(e.shape)} vs {tuple(s.shape)} "
                             "(is the EMA sharded like the model?)")
    if any(s.dtype != e.dtype for e, s in zip(ema_local, src_local)):
        src_local = [s.to(e.dtype) for e, s in zip(ema_local, src_local)]
    torch._foreach_lerp_(ema_local, src_local, 1.0 - float(decay))
