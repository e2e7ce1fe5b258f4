"""Checkpoint loading into an FSDP2-sharded model on a 1-rank gloo process group of this process (the other
layouts and errors: tests/unit/test_loading.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from models.lightningdit import LightningDiT
from models.loading import load_into_model

from test_loading import TINY, weights  # noqa: F401 - a fixture


def test_meta_model_refused_and_fsdp2_sharded_model(tmp_path, weights):
    import torch.distributed as dist

    ema, _ = weights
    path = tmp_path / "ema.pt"
    torch.save({"ema": ema}, path)
    with torch.device("meta"):
        model = LightningDiT(**TINY)
    with pytest.raises(ValueError, match="meta device"):
        load_into_model(model, path)
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or a process group is already initialised in this process")
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            model.to_empty(device="cpu")
            model.init_weights()  # the engine's path: meta build -> shard -> materialise -> init
            ref = LightningDiT(**TINY)
            assert torch.equal(model.pos_embed.full_tensor(), ref.pos_embed)
            assert torch.equal(model.feat_rope.freqs_cos, ref.feat_rope.freqs_cos)
            assert load_into_model(model, path, which="ema").ok
            full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        assert all(torch.equal(full[k], ema[k]) for k in ema)
    finally:
        dist.destroy_process_group()
