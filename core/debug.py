"""Test hooks that slow a job down, so that a test can preempt it (``scontrol requeue``, SIGKILL) in the middle
of a stage instead of racing it.

``LLAT_DEBUG_<STAGE>_SLEEP=<seconds>`` sleeps that long after each unit of work of one stage:

* ``STEP``: every optimizer step of the trainer (core/trainer.py);
* ``SAMPLE``: every batch of images of the sampling job (models/evaluation/generation.py);
* ``EVAL``: every batch of the FID feature pass, reference and samples (models/evaluation/metrics.py).

Unset, empty or 0: off (nothing is slept, nothing else changes). The extraction job has a config key for the same
purpose (``throttle_s``, data/extract.py).
"""

from __future__ import annotations

import os

STAGES = ("STEP", "SAMPLE", "EVAL")


def debug_sleep_seconds(stage: str) -> float:
    """Seconds to sleep after each unit of work of ``stage`` (one of ``STAGES``); 0.0 when off."""
    if stage not in STAGES:
        raise ValueError(f"unknown debug stage {stage!r}; one of {', '.join(STAGES)}")
    name = f"LLAT_DEBUG_{stage}_SLEEP"
    text = os.environ.get(name, "").strip()
    if not text:
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a number of seconds") from None
    if seconds < 0:
        raise ValueError(f"{name}={text!r}: expected a number of seconds >= 0")
    return seconds
