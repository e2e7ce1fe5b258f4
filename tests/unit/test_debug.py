"""core/debug.py: the LLAT_DEBUG_<STAGE>_SLEEP test hooks (used by the Slurm preemption tests)."""

from __future__ import annotations

import pytest

from core.debug import debug_sleep_seconds


def test_off_unless_set_and_read_per_stage(monkeypatch):
    for stage in ("STEP", "SAMPLE", "EVAL"):
        monkeypatch.delenv(f"LLAT_DEBUG_{stage}_SLEEP", raising=False)
        assert debug_sleep_seconds(stage) == 0.0
    monkeypatch.setenv("LLAT_DEBUG_EVAL_SLEEP", " 1.5 ")
    monkeypatch.setenv("LLAT_DEBUG_STEP_SLEEP", "")
    assert debug_sleep_seconds("EVAL") == 1.5 and debug_sleep_seconds("STEP") == 0.0


def test_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("LLAT_DEBUG_SAMPLE_SLEEP", "soon")
    with pytest.raises(ValueError, match=r"LLAT_DEBUG_SAMPLE_SLEEP='soon': expected a number of seconds"):
        debug_sleep_seconds("SAMPLE")
    monkeypatch.setenv("LLAT_DEBUG_SAMPLE_SLEEP", "-1")
    with pytest.raises(ValueError, match=r">= 0"):
        debug_sleep_seconds("SAMPLE")
    with pytest.raises(ValueError, match="unknown debug stage 'TRAIN'"):
        debug_sleep_seconds("TRAIN")
