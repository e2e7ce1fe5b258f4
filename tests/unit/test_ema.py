"""core.ema: the fused lerp EMA equals the textbook formula on plain tensors (DTensor shards:
tests/integration/test_ema_dtensor.py)."""

from __future__ import annotations

import pytest
import torch

from core.ema import ema_update_


def _tensors(seed, shapes=((3, 5), (7,), (1,), (0, 4), (2, 2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("decay", [0.9999, 0.99, 0.5, 0.3])
def test_matches_hand_loop(decay):
    ema, hand = _tensors(0), _tensors(0)
    for step in range(5):
        src = _tensors(10 + step)
        ema_update_(ema, src, decay)
        for h, s in zip(hand, src):
            h.copy_(decay * h + (1 - decay) * s)
    for e, h in zip(ema, hand):
        torch.testing.assert_close(e, h, atol=1e-6, rtol=1e-6)


def test_decay_zero_copies_and_one_keeps():
    ema, src = _tensors(0), _tensors(1)
    ema[0][0, 0] = 1e10  # catastrophic cancellation would break a naive formula
    ema_update_(ema, src, 0.0)
    assert all(torch.equal(e, s) for e, s in zip(ema, src))
    before = [e.clone() for e in ema]
    ema_update_(ema, _tensors(2), 1.0)
    assert all(torch.equal(e, b) for e, b in zip(ema, before))


def test_no_grad_dtype_and_errors():
    p = torch.nn.Parameter(torch.ones(3))
    ema = torch.zeros(3)
    ema_update_([ema], [p], 0.5)  # parameters that require grad are fine (no_grad inside)
    assert not ema.requires_grad and torch.equal(ema, torch.full((3,), 0.5))
    ema_update_([ema], [torch.ones(3, dtype=torch.bfloat16)], 0.0)  # a lower-precision source is upcast
    assert ema.dtype == torch.float32 and torch.equal(ema, torch.ones(3))
    ema_update_([], [], 0.9)
    with pytest.raises(ValueError):
        ema_update_([ema], [], 0.9)
    with pytest.raises(ValueError):
        ema_update_([ema], [torch.ones(4)], 0.9)
    with pytest.raises(ValueError):
        ema_update_([ema], [torch.ones(3)], 1.5)
