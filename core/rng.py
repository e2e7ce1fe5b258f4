"""Random state of a training process: the global generators (torch CPU/CUDA, numpy, python) and the seeds of
fresh streams.

* Same world size: a checkpoint carries every rank's random state (``rng_state`` / ``set_rng_state`` for the
  global generators, ``Task.state_dict`` for the task's own generators), so a resumed run draws exactly what the
  uninterrupted one would have drawn.
* Another world size: per-rank streams cannot be mapped onto the new ranks. Every generator is then re-seeded
  from ``seed_for(seed, step, rank, stream)`` (``reseed_global`` and ``Task.reseed``): a hash of the run's seed,
  the step it resumes at, the rank and the stream's name. The continuation therefore never replays the draws of
  step 0 (or of an earlier resume at another step), ranks and streams draw independent values, and the same
  resume done twice is the same run.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

__all__ = ["reseed_global", "rng_state", "seed_everything", "seed_for", "set_rng_state"]


def seed_for(seed: int, step: int, rank: int, stream: str) -> int:
    """A 63-bit seed for the random stream named ``stream`` of ``rank`` from optimizer step ``step`` on: a hash
    of the four values, so distinct (step, rank, stream) never share a seed in practice (unlike sums such as
    ``seed + rank + k * step``). Stable across processes, platforms and Python versions."""
    key = f"llat-rng/{int(seed)}/{int(step)}/{int(rank)}/{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and python's ``random`` from one integer."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def reseed_global(seed: int, step: int, rank: int) -> None:
    """Fresh global streams for ``rank`` resuming at ``step`` (another world size than the checkpoint's)."""
    torch.manual_seed(seed_for(seed, step, rank, "torch"))
    np.random.seed(seed_for(seed, step, rank, "numpy") % 2**32)
    random.seed(seed_for(seed, step, rank, "python"))


def rng_state() -> dict[str, Any]:
    """This process's global random state (checkpointed per rank)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (the CUDA part only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
