"""A training step with no device->host reads: what the trainer needs to keep the GPU queue full between log steps.

A host read (``.item()``, ``bool(t)``, ``.cpu()``, ``.tolist()`` of a device tensor) makes the CPU wait until the
GPU has run everything queued before it; once per step, that stalls the queue at every step boundary (the GPU idles
while the host prepares the next step's first kernels). The trainer reads nothing from the device except on log
steps, checkpoints, evaluation and the end of the run. Three pieces make that possible:

* ``NonFiniteCounter``: skipped-step bookkeeping on the device. The engines skip a non-finite update on the device
  (FSDP2 with a fused optimizer: ``found_inf`` in the fused kernel, see ``core.engines.fsdp2.FSDP2Part.step``);
  the trainer feeds the per-step "every grad norm was finite" flag into three device counters: the current streak
  of non-finite steps, all skipped steps, and the first step at which the streak reached
  ``train.max_consecutive_nonfinite``. They are read (one small copy) when the trainer syncs anyway; the limit is
  then enforced for the step at which it was reached, with the same error, at most ``train.log_every - 1`` steps
  late, and never after a checkpoint written past that step (the trainer reads them before every save).
* ``StopAgreement``: every rank stops at the same step after a signal, with no device collective: the local flags
  are all-reduced (MAX) on the CPU over a gloo group of their own, asynchronously: started at the end of step k,
  waited for and read at the end of step k+1 (by then long finished: a step takes far longer than a tiny gloo
  all-reduce). A signal received before the end of step k therefore stops the run after step k+1 (world size 1:
  after step k, no communication), one step later at most than a blocking agreement.
* ``HostSyncCounter``: a ``TorchDispatchMode`` that records every op through which a host read goes
  (``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``float()``, ``int()``; ``nonzero`` and friends, whose
  output size the host must know; copies from a non-CPU device to the CPU), for tests on any device, including
  the CPU (tests/integration/test_no_host_sync.py). On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` is the ground truth
  (``tools/check_host_sync.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as tdist
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "NonFiniteCounter", "NonFiniteState", "StopAgreement", "cuda_sync_debug"]


@contextlib.contextmanager
def cuda_sync_debug(mode: str = "error") -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` for the context ("error": a synchronizing CUDA call raises, "warn":
    it warns), restored on exit. A no-op without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@dataclass
class NonFiniteState:
    """The counters as read on the host."""

    streak: int  # consecutive non-finite steps, up to the last step
    skipped: int  # all skipped steps of the run (resumed runs included)
    tripped_step: Optional[int]  # the first step at which the streak reached the limit (None: not reached)


class NonFiniteCounter:
    """Skipped-step counters on the device (see the module docstring). ``update`` launches a few tiny kernels and
    reads nothing; ``read`` is one device->host copy of three integers."""

    def __init__(self, device: torch.device, limit: int, streak: int = 0, skipped: int = 0):
        self.limit = int(limit)
        # [streak, skipped, step at which the streak reached the limit (-1: not yet)]
        self._state = torch.tensor([int(streak), int(skipped), -1], dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, finite: torch.Tensor, step: int) -> None:
        """Count the optimizer step numbered ``step`` (1-based: the trainer's step count after it); ``finite``: a
        0-dim bool tensor, True when every update of the step was applied."""
        bad = torch.logical_not(finite).to(torch.int64)
        streak, skipped, tripped = self._state.unbind()
        streak.add_(1).mul_(bad)  # +1 on a skipped step, back to 0 otherwise
        skipped.add_(bad)
        hit = torch.logical_and(streak >= self.limit, tripped < 0)
        tripped.copy_(torch.where(hit, step, tripped))

    def read(self) -> NonFiniteState:
        """Host read (a sync on an accelerator): call it where the trainer syncs anyway."""
        streak, skipped, tripped = (int(v) for v in self._state.tolist())
        return NonFiniteState(streak, skipped, tripped if tripped >= 0 else None)


class StopAgreement:
    """Agree across ranks on "stop now" without a device sync; see the module docstring. Collective: constructed
    and polled by every rank, the same number of times."""

    def __init__(self, world_size: int):
        self._group = None
        self._work = None
        self._flag = torch.zeros(1, dtype=torch.int32)  # CPU: gloo reduces it in its own thread
        self._view = self._flag.numpy()  # host access without any tensor op
        if world_size > 1 and tdist.is_available() and tdist.is_initialized():
            self._group = tdist.new_group(backend="gloo")

    @property
    def delay(self) -> int:
        """Steps between the poll that first sees a request and the poll that returns True (0 or 1)."""
        return 0 if self._group is None else 1

    def poll(self, requested: bool) -> bool:
        """Called once per step on every rank with this rank's request; True on every rank at the same step: the
        step after the first one at which some rank passed True (world size 1: that very step)."""
        if self._group is None:
            return bool(requested)
        agreed = False
        if self._work is not None:
            self._work.wait()  # host-side only (gloo); normally already done
            self._work = None
            agreed = bool(self._view[0] > 0)
        if not agreed:  # every rank decides alike: none starts another
            self._view[0] = 1 if requested else 0
            self._work = tdist.all_reduce(self._flag, op=tdist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def close(self) -> None:
        """Finish the all-reduce in flight (every rank started it). Call on the normal exit paths only."""
        work, self._work = self._work, None
        if work is not None:
            work.wait()


_SIZE_FROM_DATA = {
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "repeat_interleave",
    "_assert_async",
}


class HostSyncCounter(TorchDispatchMode):
    """Records the ops that read device data on the host (see the module docstring) while it is active::

        with HostSyncCounter() as syncs:
            ...
        assert not syncs.calls, syncs.calls

    ``calls``: ``(op name, device type)`` per host read. On the CPU every tensor is on the host, so such an op is
    not a sync there, but it would be one on an accelerator: count them all (``device_only=False``, the default);
    ``device_only=True`` ignores the ones on CPU tensors (a step count that an optimizer keeps on the host)."""

    def __init__(self, device_only: bool = False):
        super().__init__()
        self.device_only = bool(device_only)
        self.calls: list[tuple[str, Optional[str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "_local_scalar_dense" or name in _SIZE_FROM_DATA:
            self._record(name, first.device if first is not None else None)
        elif name in ("_to_copy", "copy_") and first is not None:
            src = args[1] if name == "copy_" else first
            dst = first.device if name == "copy_" else kwargs.get("device", first.device)
            if (
                isinstance(src, torch.Tensor)
                and dst is not None
                and torch.device(dst).type == "cpu"
                and src.device.type != "cpu"
            ):
                self._record(name, src.device)
        return func(*args, **kwargs)

    def _record(self, name: str, device: Optional[torch.device]) -> None:
        if self.device_only and (device is None or device.type == "cpu"):
            return
        self.calls.append((name, None if device is None else device.type))
