"""The DeepSpeed config built from the engine config (no process group; the engine on real gloo ranks:
tests/integration/test_engine_deepspeed.py)."""

from __future__ import annotations

import pytest


def _ds(stage, **kw):
    from core.config import EngineConfig

    return EngineConfig(kind="deepspeed", precision=kw.pop("precision", "fp32"), zero_stage=stage, **kw)


def test_ds_config_from_engine_config():
    from core.engines.deepspeed import ds_config

    cfg = ds_config(_ds(3, precision="bf16", offload_optimizer=True, overlap_comm=False, bucket_size=1001), 4, 0.5)
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["overlap_comm"] is False and z["reduce_bucket_size"] == 1000
    assert z["offload_optimizer"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and cfg["bf16"]["check_grad_overflow"] and cfg["gradient_clipping"] == 0.5
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["train_batch_size"] == 4
    assert cfg["data_types"]["grad_accum_dtype"] == "fp32" and cfg["communication_data_type"] == "fp32"
    assert "offload_optimizer" not in ds_config(_ds(2), 1)["zero_optimization"]
    assert ds_config(_ds(1), 1)["gradient_clipping"] == 0.0 and not ds_config(_ds(1), 1)["bf16"]["enabled"]
    assert "torch_autocast" not in ds_config(_ds(2, precision="bf16"), 1)
    autocast = ds_config(_ds(2, precision="bf16-autocast"), 1)
    assert not autocast["bf16"]["enabled"] and autocast["communication_data_type"] == "fp32"
    assert autocast["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    with pytest.raises(ValueError, match="zero_stage"):
        ds_config(_ds(0), 1)
