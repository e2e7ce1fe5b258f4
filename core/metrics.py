"""Metrics: throughput/MFU bookkeeping and the logging backends (console, JSONL file, W&B).

Only rank 0 writes. The W&B run id lives in `<run_dir>/wandb_run_id` so that a resumed job (after a
preemption, a requeue or on another world size) continues the same W&B run (``resume="allow"``, same id: one W&B
run per training, not per job); `metrics.jsonl` is cut back to the resumed step so that it always describes one
uninterrupted run. The W&B run plots against ``epoch`` (``define_metric``), keeps the best in-loop FID in its summary
(``eval/fid`` with ``summary="min"``) and, beside it, ``best/*``: every ``eval/*`` value of that best evaluation with
its step and epoch (what the leaderboard reads of an online run). ``open_run_of_dir`` resumes the W&B run of a run
directory from another process (the final evaluation, ``models/evaluation/final.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

from core.fileio import atomic_write_text

WANDB_ID_FILE = "wandb_run_id"
BEST_METRIC = "eval/fid"  # the metric whose minimum marks a run's best evaluation (summary "min", best/*)

log = logging.getLogger("llat")

# Dense bf16 tensor-core peak per GPU (vendor figures), for MFU. Overridable with LLAT_PEAK_FLOPS.
_PEAK_BF16 = {
    "H100": 989e12,
    "H800": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
}


def peak_flops(device: torch.device) -> Optional[float]:
    """Peak FLOP/s of one device, or None when unknown (CPU)."""
    if os.environ.get("LLAT_PEAK_FLOPS"):
        return float(os.environ["LLAT_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


def setup_console_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    # Streaming explains its defaults at INFO on every start; keep its warnings only.
    logging.getLogger("streaming").setLevel(logging.WARNING)


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


class MetricLogger:
    """Rank-0 sink for scalar metrics: console line, metrics.jsonl and (optionally) W&B."""

    def __init__(self, run_dir: Path, wandb_cfg, run_name: str, config_dict: dict, is_main: bool, resume_step: int = 0):
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        if not is_main:
            return
        self._truncate_jsonl(resume_step)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if wandb_cfg.mode != "disabled":
            self._wandb = self._init_wandb(wandb_cfg, run_name, config_dict)

    def _truncate_jsonl(self, resume_step: int) -> None:
        if not self.jsonl_path.exists():
            return
        kept = []
        for line in self.jsonl_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if rec.get("step", 0) <= resume_step:
                kept.append(line)
        atomic_write_text(self.jsonl_path, "".join(k + "\n" for k in kept))

    def _init_wandb(self, wandb_cfg, run_name: str, config_dict: dict):
        self._best, self._epoch = _best_so_far(self.jsonl_path)
        return open_wandb_run(self.run_dir, wandb_cfg, run_name, config_dict)

    @property
    def wandb_run(self):
        return self._wandb

    def log(self, step: int, metrics: dict[str, Any], console: bool = True) -> None:
        if not self.is_main:
            return
        rec = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "step"}, step=step)
            self._track_best(rec)
        if console:
            parts = []
            for k, v in rec.items():
                if k == "step":
                    continue
                parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
            log.info("step %d | %s", step, " ".join(parts))

    def _track_best(self, rec: dict[str, Any]) -> None:
        if isinstance(rec.get("epoch"), (int, float)):
            self._epoch = rec["epoch"]
        value = rec.get(BEST_METRIC)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value >= self._best:
            return
        self._best = value
        best = {"best/" + k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith("eval/")}
        self._wandb.summary.update({**best, "best/step": rec["step"], "best/epoch": self._epoch})

    def event(self, message: str) -> None:
        """A one-off, human-readable event (phase switch, resume, checkpoint)."""
        if self.is_main:
            log.info(message)
            if self._wandb is not None:
                self._wandb.summary["last_event"] = message

    def close(self) -> None:
        if not self.is_main:
            return
        self._jsonl.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as err:  # e.g. the W&B service got the job's SIGTERM (preemption / requeue)
                log.warning("W&B run did not close cleanly (%s); its files are in %s", err, self.run_dir / "wandb")
            self._wandb = None


def _best_so_far(jsonl: Path) -> tuple[float, Optional[float]]:
    """(lowest BEST_METRIC, last epoch) of the kept lines of a resumed run's metrics.jsonl."""
    best, epoch = math.inf, None
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            epoch = rec.get("epoch", epoch)
            value = rec.get(BEST_METRIC)
            if isinstance(value, (int, float)) and value < best:
                best = value
    return best, epoch


def wandb_run_id(run_dir: Path, create: bool = False) -> Optional[str]:
    """The W&B run id of a run directory (``<run_dir>/wandb_run_id``); a new one is stored when ``create``."""
    id_file = Path(run_dir) / WANDB_ID_FILE
    if id_file.exists():
        return id_file.read_text().strip()
    if not create:
        return None
    run_id = uuid.uuid4().hex[:8]  # W&B run ids: short [a-z0-9] strings
    atomic_write_text(id_file, run_id)
    return run_id


def open_wandb_run(run_dir: Path, wandb_cfg, run_name: str, config_dict: Optional[dict] = None, job_type=None):
    """Start or resume (``resume="allow"``, the run directory's stored id) the W&B run of a run directory, with
    entity, project, group and tags from ``wandb_cfg`` (the ``wandb:`` section); epoch is the x-axis of every
    metric and the summary keeps the lowest ``eval/fid``."""
    import wandb

    run = wandb.init(
        project=wandb_cfg.project,
        entity=wandb_cfg.entity,
        group=wandb_cfg.group,
        tags=list(wandb_cfg.tags),
        name=run_name,
        id=wandb_run_id(run_dir, create=True),
        resume="allow",
        dir=str(run_dir),
        mode=wandb_cfg.mode,
        config=config_dict,
        job_type=job_type,
    )
    run.define_metric("epoch")
    run.define_metric("*", step_metric="epoch")
    run.define_metric(BEST_METRIC, step_metric="epoch", summary="min,last")
    return run


class Throughput:
    """Images/s, step time, data-wait share and MFU over a logging window."""

    def __init__(self, flops_per_image: Optional[float], world_size: int, peak: Optional[float]):
        self.flops_per_image = flops_per_image
        self.world_size = world_size
        self.peak = peak
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self._images = 0
        self._steps = 0
        self._data_wait = 0.0

    def add(self, images: int, data_wait_s: float) -> None:
        self._images += images
        self._steps += 1
        self._data_wait += data_wait_s

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        out = {
            "img_per_s": self._images / elapsed,
            "step_time_s": elapsed / max(self._steps, 1),
            "data_wait_frac": self._data_wait / elapsed,
        }
        if self.flops_per_image and self.peak:
            out["mfu"] = self._images * self.flops_per_image / elapsed / (self.peak * self.world_size)
        self.reset()
        return out


def format_table(rows: list[dict]) -> str:
    """Right-aligned text table of dict rows (one header line, a rule, one line per row); floats as 3 digits."""
    headers = list(rows[0].keys())
    cells = [[f"{r[h]:.3g}" if isinstance(r[h], float) else str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(headers, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


@contextmanager
def bench_threads(device: torch.device, threads: Optional[int]) -> Iterator[None]:
    """Intra-op threads for a single-process benchmark: ``threads`` when given, else 1 on a CPU (several threads
    on small kernels of a shared machine spin and measure the scheduler); restored afterwards."""
    before = torch.get_num_threads()
    if threads or device.type == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
