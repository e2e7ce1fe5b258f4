"""``engine.zero3_persistence_threshold``: DeepSpeed's ``stage3_param_persistence_threshold`` (ZeRO-3 parameters up to
this size stay gathered), unset by default; a negative value is a config error. The VA-VAE runs that use it:
tests/integration/test_vavae_deepspeed.py."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_persistence_threshold_reaches_deepspeed_config():
    from core.config import EngineConfig
    from core.engines.deepspeed import ds_config

    z = ds_config(EngineConfig(kind="deepspeed", zero_stage=3, zero3_persistence_threshold=0), 2)["zero_optimization"]
    assert z["stage3_param_persistence_threshold"] == 0
    default = ds_config(EngineConfig(kind="deepspeed", zero_stage=3), 2)["zero_optimization"]
    assert "stage3_param_persistence_threshold" not in default  # DeepSpeed's own default (1e5)


def test_negative_persistence_threshold_is_refused():
    from core.config import ConfigError
    from launchers.experiment import load_config

    with pytest.raises(ConfigError, match="engine.zero3_persistence_threshold: must be >= 0 or null, got -1"):
        load_config(
            REPO / "configs/tiny_vavae.yaml", ["engine.kind=deepspeed", "engine.zero3_persistence_threshold=-1"]
        )
    cfg = load_config(REPO / "configs/tiny_vavae.yaml", ["engine.kind=deepspeed", "engine.zero_stage=3"])
    assert cfg.engine.zero_stage == 3 and cfg.engine.zero3_persistence_threshold is None  # VA-VAE on ZeRO-3: accepted
