"""core.ema on FSDP2 DTensor shards of a REAL 2-process gloo group: equals the textbook formula (the plain-tensor
checks are in tests/unit/test_ema.py)."""

from __future__ import annotations

import torch

from core.ema import ema_update_

from dist_utils import run_distributed
from test_ema import _tensors


def _dtensor_worker(dist):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.world_size,))
    full_ema, full_src = _tensors(0, ((5, 3), (4,))), _tensors(1, ((5, 3), (4,)))
    ema = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in full_ema]
    src = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in full_src]
    ema_update_(ema, src, 0.75)  # DTensor lists
    ema_update_([e.to_local() for e in ema], [s.to_local() for s in src], 0.75)  # local shards
    out = []
    for e, fe, fs in zip(ema, full_ema, full_src):
        hand = fe
        for _ in range(2):
            hand = 0.75 * hand + 0.25 * fs
        torch.testing.assert_close(e.full_tensor(), hand, atol=1e-6, rtol=1e-6)
        out.append(e.full_tensor())
    return out


def test_dtensor_shards_two_ranks():
    r0, r1 = run_distributed(_dtensor_worker, world_size=2)
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))
