"""Checkpoint retention rule (core.checkpoint.retained_steps); the checkpoints themselves, on real gloo process
groups: tests/integration/test_checkpoint.py."""

from __future__ import annotations

import pytest

from core.checkpoint import retained_steps


@pytest.mark.parametrize(
    "steps,keep_last,keep_every,expected",
    [
        ([1, 2, 3, 4, 5, 6], 2, 4, {4, 5, 6}),
        ([100, 200, 300], 1, None, {300}),
        ([5, 10, 15, 20, 25], 2, 10, {10, 20, 25}),
        ([3], 5, 2, {3}),
    ],
)
def test_retained_steps(steps, keep_last, keep_every, expected):
    assert retained_steps(steps, keep_last, keep_every) == expected
