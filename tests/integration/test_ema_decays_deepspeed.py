"""Several EMAs (train.ema_decays) on the DeepSpeed engine (ZeRO-2), REAL 2-process gloo groups, the real DeepSpeed
(CPU accelerator), the toy model of tests/dist_utils.py (issue #19, item 3).

Each EMA follows its own decay (against a hand EMA of the full fp32 weights), is saved and loaded back bit for bit
(``ema.pt``'s ``emas``) and read offline for export (``consolidated_state_dicts``). (An EMA the checkpoint lacks:
tests/integration/test_val_ema.py, FSDP2.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_utils import ToyModel, run_distributed
from test_engine_deepspeed import _ds, _engine_step, _ocfg

pytestmark = pytest.mark.timeout(300)
DECAYS = [0.9, 0.5]


def _worker(dist, ckpt_dir):
    from core.engines import build_engine

    torch.manual_seed(0)
    engine = build_engine(_ds(2), dist)
    part = engine.prepare("model", ToyModel(), _ocfg(), DECAYS, "blocks")
    assert part.ema_keys() == ["ema", "ema_1"] and part.ema_decay == 0.9
    hand = [part.full_state_dict("model", rank0_only=False) for _ in DECAYS]
    for step in range(2):
        _engine_step(part, dist, step)
        weights = part.full_state_dict("model", rank0_only=False)
        for sd, decay in zip(hand, DECAYS):
            for k in sd:
                sd[k] = decay * sd[k] + (1 - decay) * weights[k]
    got = {key: part.full_state_dict(key, rank0_only=False) for key in part.ema_keys()}
    for key, sd in zip(part.ema_keys(), hand):
        for k in sd:
            torch.testing.assert_close(got[key][k], sd[k], atol=1e-6, rtol=0, msg=lambda m: f"{key} {k}: {m}")
    assert any(not torch.equal(got["ema"][k], got["ema_1"][k]) for k in got["ema"])
    engine.save(Path(ckpt_dir), {"model": part})
    _engine_step(part, dist, 2)  # moves both EMAs; the load below must restore them
    engine.load(Path(ckpt_dir), {"model": part})
    for key in part.ema_keys():
        back = part.full_state_dict(key, rank0_only=False)
        assert all(torch.equal(back[k], got[key][k]) for k in back), key
    return got if dist.rank == 0 else None


def test_several_emas_deepspeed(tmp_path):
    from core.engines.deepspeed import consolidated_state_dicts

    got = run_distributed(_worker, world_size=2, args=(str(tmp_path / "ckpt"),))[0]
    offline = consolidated_state_dicts(tmp_path / "ckpt")
    assert sorted(offline) == ["ema", "ema_1", "model"]
    for key in ("ema", "ema_1"):
        assert all(torch.equal(offline[key][k], got[key][k]) for k in got[key]), key
