"""In-loop evaluation of a class-conditional latent generator: sample, decode, featurise, score, record.

``InLoopEvaluator(cfg, dist, ...)`` is what ``DiTTask.evaluate`` / ``DiTTask.check`` call. ``evaluate(part,
step)`` samples ``eval.num_samples`` images with the part's EMA weights (raw weights when it has no EMA) and
scores them (collective: every rank calls it).

Image i's label and noise depend on (``eval.seed``, i) only (models/evaluation/generation.py), so every
evaluation of a run scores the same noise. Chunks of ``eval.batch_size`` indices go round-robin over the ranks;
every rank runs the same number of sampler batches of the same shape (the last round is padded), with a plain
full copy of the EMA (else raw) weights (``TrainedPart.full_model``: any engine, any sharding). Each rank
decodes its images (``generation.decoder_from_config``: ``sampling.tokenizer`` / ``sampling.latent_stats`` or what ``data.path``
holds; a missing tokenizer is an error at start-up) and extracts their features; rank 0 gathers the features and
computes the metrics against ``eval.reference`` (models/evaluation/metrics.py), writes
``<run_dir>/eval/step_XXXXXXX.{json,png}`` (metrics, sampler settings, a sample grid) and, when a W&B run is
active in this process, logs the grid as ``eval/samples``. Every rank returns the same dict: the metrics
(``fid``, ...), ``num_samples`` and the sampler settings (``cfg_scale``, ``num_steps``, ``cfg_interval_start``,
``timestep_shift``), plus ``time_s``.

The sampler is ``sampling`` with ``eval.sampling_overrides`` applied. The copy is local, so adaptive samplers
(``dopri5``) may call it a different number of times on each rank.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as tdist

from core.config import ConfigError, apply_overrides, config_to_dict, resolve_run_dir
from core.distributed import all_gather_object, broadcast_object
from core.fileio import atomic_write_json
from models.evaluation.generation import (
    check_decoding,
    chunk_range,
    decoder_from_config,
    image_grid,
    sample_indices,
    save_png,
)
from models.evaluation.metrics import (
    Extractor,
    Reference,
    check_weights,
    compute_metrics,
    normalize_metrics,
    reference_data,
    resolve_extractor,
)
from models.sampling import Sampler, describe_sampling

log = logging.getLogger("llat")

__all__ = ["InLoopEvaluator", "check_eval_config"]


def _sampling_config(cfg):
    """``cfg.sampling`` with ``eval.sampling_overrides`` applied (ValueError naming that key)."""

    sampling_cfg = copy.deepcopy(cfg)
    try:
        apply_overrides(sampling_cfg, [f"sampling.{o}" for o in cfg.eval.sampling_overrides])
    except ConfigError as err:
        raise ValueError(f"eval.sampling_overrides: {err}") from None
    return sampling_cfg


def check_eval_config(cfg) -> None:
    """Cheap, local checks of the ``eval`` section (metric names, sampler overrides, decoding settings, reference
    and weights files), so that a bad setting fails at start-up rather than at the first evaluation; a no-op when
    in-loop evaluation is off. Raises ValueError / FileNotFoundError naming the key."""
    ec = cfg.eval
    if not ec.every_epochs:
        return

    normalize_metrics(ec.metrics, key="eval.metrics")
    check_decoding(_sampling_config(cfg))
    check_weights(
        resolve_extractor(ec.feature_extractor), ec.feature_extractor_weights or None, "eval.feature_extractor_weights"
    )
    Reference.open(ec.reference, key="eval.reference")


class InLoopEvaluator:
    """The in-loop evaluation of one run (module doc). ``num_classes`` / ``latent_shape``: what the model
    samples."""

    def __init__(self, cfg, dist, *, num_classes: int, latent_shape: Sequence[int]):
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device
        self.num_classes = num_classes
        self.latent_shape = tuple(latent_shape)
        self._state: Optional[dict[str, Any]] = None

    def check(self) -> None:
        check_eval_config(self.cfg)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, part: Any, step: int, which: Optional[str] = None) -> dict[str, Any]:
        """Sample and score with ``part.ema`` (else ``part.module``), or the weights ``which`` (another EMA
        ``"ema_1"``, ...: its record goes to ``<run_dir>/eval/<which>/``); collective, every rank (module doc)."""
        primary = "ema" if getattr(part, "ema", None) is not None else "model"
        which = which or primary

        ev = self._setup()
        ec = self.cfg.eval
        t0 = time.perf_counter()
        # A plain copy of the full EMA (else raw) weights on every rank, whatever the engine and its sharding
        # (a collective gather, then local forwards: adaptive samplers may call it different numbers of times).
        full = contextlib.ExitStack()
        model = full.enter_context(part.full_model(which))
        was_training = model.training  # the raw weights (no EMA) are in training mode: label dropout
        model.eval()
        rank, world = self.dist.rank, self.dist.world_size
        n, b = ec.num_samples, ec.batch_size
        chunks = math.ceil(n / b)
        feats: dict[str, list[torch.Tensor]] = {}
        grid: list[torch.Tensor] = []
        kept = 0
        try:
            for k in range(math.ceil(chunks / world)):
                c = k * world + rank
                indices = list(chunk_range(c, b, n)) if c < chunks else []
                images, _ = sample_indices(
                    ev["sampler"],
                    model,
                    ev["decode"],
                    indices,
                    ec.seed,
                    self.num_classes,
                    self.latent_shape,
                    ec.labels,
                    self.device,
                    chunk=c,
                    pad_to=b,
                )
                if not indices:
                    continue
                feats.setdefault("_index", []).append(torch.tensor(indices, dtype=torch.long))
                for key, value in ev["extractor"](images).items():
                    feats.setdefault(key, []).append(value)
                if rank == 0 and kept < ec.grid_size:
                    grid.append(images[: ec.grid_size - kept].cpu())
                    kept += len(grid[-1])
        finally:
            model.train(was_training)
            full.close()
        local = {key: torch.cat(v) for key, v in feats.items()}
        gathered: list[Any] = [None] * world if rank == 0 else None
        if world > 1:
            tdist.gather_object(local, gathered, dst=0)
        else:
            gathered = [local]
        outcome: tuple[Optional[dict], Optional[str]] = (None, None)
        if rank == 0:
            try:
                sub = None if which == primary else which
                outcome = (self._finish(ev, gathered, grid, step, time.perf_counter() - t0, sub), None)
            except Exception as err:  # noqa: BLE001 - every rank must learn about it
                outcome = (None, f"{type(err).__name__}: {err}")
        result, error = broadcast_object(outcome) if world > 1 else outcome
        if error is not None:
            raise RuntimeError(f"in-loop evaluation at step {step} failed: {error}")
        return result

    def _setup(self) -> dict[str, Any]:
        """Built once, on the first evaluation: sampler, decoder, feature extractor, reference (rank 0).
        A problem on any rank (missing weights file, tokenizer or reference, bad override) is raised on every
        rank."""
        if self._state is not None:
            return self._state

        ec = self.cfg.eval
        state: dict[str, Any] = {}
        error = None
        try:
            if ec.batch_size < 1 or ec.num_samples < 1:
                raise ValueError("eval.num_samples and eval.batch_size must be >= 1")
            if ec.grid_size < 0:
                raise ValueError(f"eval.grid_size: must be >= 0, got {ec.grid_size}")
            metrics = normalize_metrics(ec.metrics, key="eval.metrics")
            sampling_cfg = _sampling_config(self.cfg)
            sampling = sampling_cfg.sampling
            state["sampling"] = sampling
            state["sampler"] = Sampler.from_config(sampling, null_class=self.num_classes)
            state["decode"] = decoder_from_config(sampling_cfg, str(self.device))
            state["tokenizer"] = state["decode"].tokenizer_kind
            state["extractor"] = Extractor(
                ec.feature_extractor, ec.feature_extractor_weights or None, metrics, self.device
            )
            if self.dist.rank == 0:
                reference = Reference.open(ec.reference, key="eval.reference")
                state["reference"] = reference
                state["reference_data"] = reference_data(reference, state["extractor"], ec.cache_dir or None)
            state["describe"] = describe_sampling(sampling)
        except Exception as err:  # noqa: BLE001 - collected from every rank below
            error = f"rank {self.dist.rank}: {type(err).__name__}: {err}"
        errors = [e for e in (all_gather_object(error) if self.dist.world_size > 1 else [error]) if e]
        if errors:
            raise ValueError("in-loop evaluation cannot start: " + "; ".join(errors))
        self._state = state
        return state

    def _finish(
        self, ev: dict[str, Any], gathered: list, grid: list, step: int, seconds: float, sub: Optional[str] = None
    ) -> dict:
        """Rank 0: metrics from the gathered features, grid + JSON under <run_dir>/eval (``sub``: another EMA's,
        under <run_dir>/eval/<sub>), W&B image."""
        parts = [g for g in gathered if g]
        index = torch.cat([g["_index"] for g in parts])
        order = torch.argsort(index)  # image order: the metrics do not depend on the world size
        feats = {k: torch.cat([g[k] for g in parts])[order] for k in parts[0] if k != "_index"}
        metrics = compute_metrics(feats, ev["extractor"], ev["reference_data"])
        skipped = metrics.pop("skipped", [])
        if skipped:
            log.warning("eval: %s need reference images; %s has none", skipped, ev["reference"].describe())
        s = ev["sampling"]
        result: dict[str, Any] = {
            **metrics,
            "cfg_scale": float(s.cfg_scale),
            "num_steps": int(s.num_steps),
            "cfg_interval_start": float(s.cfg_interval_start),
            "timestep_shift": float(s.timestep_shift),
            "time_s": round(seconds, 3),
        }
        out_dir = resolve_run_dir(self.cfg) / "eval" / (sub or "")
        out_dir.mkdir(parents=True, exist_ok=True)
        grid_path = None
        if grid:
            images = torch.cat(grid)
            h = images.shape[-2]
            grid_path = save_png(
                image_grid(images, columns=8), out_dir / f"step_{step:07d}.png", scale=max(1, 64 // max(h, 1))
            )
        record = {
            "step": step,
            "metrics": result,
            "sampler": ev["describe"],
            "sampling": config_to_dict(s),
            "tokenizer": ev["tokenizer"],
            "reference": ev["reference"].describe(),
            "feature_extractor": ev["extractor"].name,
            "labels": self.cfg.eval.labels,
            "seed": self.cfg.eval.seed,
            "grid": str(grid_path) if grid_path else None,
            **({"weights": sub} if sub else {}),
        }
        atomic_write_json(out_dir / f"step_{step:07d}.json", record, indent=2)
        wandb = sys.modules.get("wandb")  # the trainer's W&B run, when one is active in this process
        run = getattr(wandb, "run", None) if wandb is not None else None
        if run is not None:
            try:
                if grid_path is not None:
                    run.log(
                        {
                            f"eval/{sub + '/' if sub else ''}samples": wandb.Image(
                                str(grid_path), caption=ev["describe"]
                            )
                        },
                        step=step,
                    )
                run.summary.update(
                    {
                        "eval/sampler": ev["describe"],
                        "eval/tokenizer": ev["tokenizer"],
                        "eval/reference": record["reference"],
                        "eval/feature_extractor": record["feature_extractor"],
                    }
                )
            except Exception as err:  # noqa: BLE001 - logging must never stop training
                log.warning("eval: could not log the sample grid to W&B: %s", err)
        log.info(
            "eval step %d%s: %s (%s, %.0f s)",
            step,
            f" ({sub})" if sub else "",
            " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)),
            ev["describe"],
            seconds,
        )
        return result
