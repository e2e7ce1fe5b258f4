"""The final evaluation of a training run (e.g. FID-50K from ``tools/evaluate.py``), recorded with the run.

``record_final_evaluation(run_dir, result)`` writes ``<run_dir>/eval/final.json`` and logs ``final/fid``,
``final/is``, ``final/precision``, ``final/recall`` ... to the summary of the training's own W&B run: the run id
stored in the run directory (``wandb_run_id``) is resumed (``resume="allow"``) with the ``wandb:`` settings of the
run's ``config.yaml``, so the numbers land beside the in-loop FID of the same run. The leaderboard shows both
(``models/evaluation/leaderboard.py``: ``FID final`` beside ``FID in-loop``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import yaml

from core.config import WandbConfig
from core.fileio import atomic_write_json
from core.metrics import open_wandb_run, wandb_run_id

__all__ = ["FINAL_JSON", "FINAL_KEYS", "record_final_evaluation"]

log = logging.getLogger("llat")
FINAL_JSON = "eval/final.json"
FINAL_KEYS = ("fid", "sfid", "is", "is_std", "kid", "kid_std", "precision", "recall", "num_samples")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def record_final_evaluation(
    run_dir: str | Path, result: Mapping[str, Any], *, wandb_mode: Optional[str] = None
) -> dict[str, Any]:
    """Write ``eval/final.json`` into the training run directory and log ``final/*`` to its W&B run (unless its
    ``wandb.mode`` (or ``wandb_mode``) is ``disabled`` or it has no stored W&B run id). Returns the record."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir}: not a training run directory (no config.yaml)")
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    metrics = {k: result[k] for k in FINAL_KEYS if _number(result.get(k))}
    record = {
        "metrics": metrics,
        "samples": result.get("samples"),
        "reference": result.get("reference"),
        "feature_extractor": result.get("feature_extractor"),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_json(run_dir / FINAL_JSON, record, indent=2)
    section = cfg.get("wandb") or {}
    names = {f.name for f in dataclasses.fields(WandbConfig)}
    wcfg = WandbConfig(**{k: v for k, v in section.items() if k in names})
    if wandb_mode:
        wcfg.mode = wandb_mode
    if wcfg.mode == "disabled" or wandb_run_id(run_dir) is None:
        return record
    run = open_wandb_run(run_dir, wcfg, cfg.get("name") or run_dir.name)
    try:
        run.summary.update(
            {
                **{f"final/{k}": v for k, v in metrics.items()},
                "final/reference": str(record["reference"]),
                "final/feature_extractor": str(record["feature_extractor"]),
            }
        )
        record["wandb_run_id"] = run.id
    finally:
        run.finish()
    return record
