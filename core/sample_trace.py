"""Debug trace of the samples each optimizer step trains on (data-order checks across resumes and world sizes).

Enabled by the environment variable ``LLAT_DEBUG_SAMPLE_IDS=1`` (off otherwise: no cost, no file). Every step,
the ranks gather the ``sample_id`` column of their micro-batches (the MDS readers of data/streaming.py provide
it) and rank 0 appends one JSON line to ``<run_dir>/sample_ids.jsonl``:

    {"step": 7, "world_size": 2, "ranks": [[ids of rank 0's micro-batches, in order], [rank 1's], ...]}

``step`` is the 0-based index of the optimizer step that uses the samples (``StepContext.step``; metrics.jsonl
numbers the same step ``step + 1``, after the update). The sorted union of ``ranks`` is the step's global batch.
A resumed run appends to the same file, so a step redone after a kill appears twice: the last line is the one
that counts. It is a collective per step (an all-gather of a few integers): keep it for tests and debugging.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from core.distributed import all_gather_object

ENV_VAR = "LLAT_DEBUG_SAMPLE_IDS"
FILENAME = "sample_ids.jsonl"


class SampleIdTrace:
    def __init__(self, run_dir: Path, is_main: bool):
        self.path = Path(run_dir) / FILENAME
        self.is_main = is_main

    @classmethod
    def from_env(cls, run_dir: Path, is_main: bool) -> Optional[SampleIdTrace]:
        """A trace when ``LLAT_DEBUG_SAMPLE_IDS`` is set to a true value (same on every rank), else None."""
        if os.environ.get(ENV_VAR, "").strip().lower() in ("", "0", "false", "no", "off"):
            return None
        return cls(run_dir, is_main)

    def record(self, step: int, batches: list[dict[str, Any]]) -> None:
        """Collective: log the sample ids of this rank's micro-batches for optimizer step ``step``."""
        ids: list[int] = []
        for batch in batches:
            if "sample_id" in batch:
                ids.extend(int(i) for i in batch["sample_id"].reshape(-1).tolist())
        ranks = all_gather_object(ids)
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": int(step), "world_size": len(ranks), "ranks": ranks}) + "\n")


def read_global_batches(run_dir: Path) -> dict[int, list[int]]:
    """``{step: sorted sample ids of the global batch}`` from a run's trace (the last line of a step wins)."""
    out: dict[int, list[int]] = {}
    for line in (Path(run_dir) / FILENAME).read_text().splitlines():
        rec = json.loads(line)
        out[int(rec["step"])] = sorted(i for ids in rec["ranks"] for i in ids)
    return out
