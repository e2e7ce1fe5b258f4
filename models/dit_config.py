"""The DiT's config sections (``transport``, ``sampling``, ``eval``; ``model`` is ``models.lightningdit.ModelConfig``)
with their value checks, and the DiT task's own checks of the shared sections (``check_dit_task``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from core.config import Checks

__all__ = [
    "TimestepPhase",
    "TransportConfig",
    "SamplingConfig",
    "EvalConfig",
    "check_transport_config",
    "check_sampling_config",
    "check_eval_config",
    "check_dit_task",
]


@dataclass
class TimestepPhase:
    """One phase of timestep sampling. Phases apply in order; the last has no ``until_epoch``."""

    kind: Literal["lognorm", "uniform"] = "lognorm"
    until_epoch: Optional[float] = None  # phase ends when epoch (fractional, from the global step) reaches this
    mean: float = 0.0  # logit-normal location (lognorm only)
    std: float = 1.0  # logit-normal scale (lognorm only)


@dataclass
class TransportConfig:
    use_cosine_loss: bool = True  # official "velocity direction" loss, weight 1
    timestep_sampling: list[TimestepPhase] = field(
        default_factory=lambda: [TimestepPhase("lognorm", 480.0), TimestepPhase("uniform")]
    )


@dataclass
class SamplingConfig:
    method: Literal["euler", "heun", "dopri5", "euler_maruyama"] = "euler"
    num_steps: int = 250  # grid points (official: 250 points = 249 model calls)
    cfg_scale: float = 6.7
    cfg_interval_start: float = 0.125  # guidance off while t < start
    timestep_shift: float = 0.3
    guidance_mode: Literal["official", "all"] = "official"
    atol: float = 1e-6
    rtol: float = 1e-3
    # Decoding the samples (models/evaluation/generation.py): "" = what data.path holds (manifest.json, stats)
    tokenizer: str = ""  # VA-VAE checkpoint (file / run checkpoint dir), or "identity"
    latent_stats: str = ""  # latents_stats.pt ({'mean','std'}) when data.latent_norm is true


@dataclass
class EvalConfig:
    """In-loop evaluation: every `every_epochs` the trainer samples with the EMA weights and logs metrics."""

    every_epochs: Optional[float] = None  # None = no in-loop evaluation
    num_samples: int = 10000  # images generated per evaluation (FID-10K by default)
    batch_size: int = 64  # per rank
    reference: str = ""  # image folder, .npz of uint8 images, or ADM reference-statistics .npz
    feature_extractor_weights: str = ""  # local weights file of the Inception feature extractor (no download)
    metrics: list[str] = field(default_factory=lambda: ["fid"])  # any of fid, sfid, is, kid, pr (or "all")
    seed: int = 0  # image i's label and noise depend on (seed, i) only (tools/sample.py)
    feature_extractor: str = "inception-v3-compat"  # torch-fidelity extractor; "tiny-random" = CPU tests only
    cache_dir: str = ""  # reference cache; "": $LLAT_FID_CACHE or ~/.cache/lightning_latent/fid
    labels: Literal["uniform", "balanced"] = "uniform"  # uniform random labels (official) or i mod num_classes
    sampling_overrides: list[str] = field(default_factory=list)  # e.g. ["num_steps=50"]: the in-loop sampler only
    grid_size: int = 64  # samples shown in the logged grid (0 = no grid)
    # Validation loss (models/evaluation/validation.py): flow-matching MSE of the held-out samples (data.val_path)
    # at `val_timesteps` evenly spaced t in [0, 1], noise fixed per sample id (seed: eval.seed), EMA(s) and raw weights
    val_every_epochs: Optional[float] = None  # None = no validation loss
    val_timesteps: int = 8
    val_batch_size: int = 64  # per forward (fixed: the losses do not depend on the number of ranks)


def check_transport_config(t: TransportConfig, checks: Checks) -> None:
    """The timestep-sampling phases: at least one, every one but the last ends (strictly increasing
    ``until_epoch`` > 0), the last does not; a logit-normal std > 0."""
    phases = t.timestep_sampling
    checks.need(len(phases) > 0, "transport.timestep_sampling", "needs at least one phase")
    prev: float | None = None
    for i, ph in enumerate(phases):
        key = f"transport.timestep_sampling[{i}]"
        if ph.kind == "lognorm":
            checks.positive(ph.std, f"{key}.std")
        if i == len(phases) - 1:
            checks.need(
                ph.until_epoch is None,
                f"{key}.until_epoch",
                f"the last phase runs to the end of training and must have until_epoch null, got {ph.until_epoch!r}",
            )
        elif ph.until_epoch is None:
            checks.need(False, f"{key}.until_epoch", "every phase but the last needs until_epoch")
        elif ph.until_epoch <= 0:
            checks.need(False, f"{key}.until_epoch", f"must be > 0, got {ph.until_epoch!r}")
        elif prev is not None and ph.until_epoch <= prev:
            checks.need(
                False,
                f"{key}.until_epoch",
                f"until_epoch must be strictly increasing: {ph.until_epoch!r} after {prev!r}",
            )
        if ph.until_epoch is not None:
            prev = ph.until_epoch if prev is None else max(prev, ph.until_epoch)


def check_sampling_config(sm: SamplingConfig, checks: Checks) -> None:
    checks.need(sm.num_steps >= 2, "sampling.num_steps", f"must be >= 2 (grid points), got {sm.num_steps}")
    checks.need(sm.cfg_scale >= 0, "sampling.cfg_scale", f"must be >= 0, got {sm.cfg_scale!r}")
    checks.unit(sm.cfg_interval_start, "sampling.cfg_interval_start", closed=True)
    checks.positive(sm.timestep_shift, "sampling.timestep_shift")
    checks.positive(sm.atol, "sampling.atol")
    checks.positive(sm.rtol, "sampling.rtol")


def check_eval_config(ev: EvalConfig, checks: Checks) -> None:
    """Sizes of the in-loop evaluation (its files and metric names: ``DiTTask.check`` at start-up)."""
    checks.positive(ev.every_epochs, "eval.every_epochs", allow_none=True)
    checks.positive(ev.val_every_epochs, "eval.val_every_epochs", allow_none=True)
    checks.need(ev.val_timesteps >= 2, "eval.val_timesteps", f"must be >= 2, got {ev.val_timesteps}")
    checks.positive(ev.val_batch_size, "eval.val_batch_size")
    checks.positive(ev.num_samples, "eval.num_samples")
    checks.positive(ev.batch_size, "eval.batch_size")


def check_dit_task(cfg: Any, checks: Checks) -> None:
    """What the DiT task needs of the experiment ``cfg`` beyond its sections' own checks."""
    d = cfg.data
    if cfg.eval.val_every_epochs:
        checks.need(
            bool(cfg.data.val_path),
            "data.val_path",
            "eval.val_every_epochs needs the held-out samples (python -m data.holdout SRC OUT: data.val_path=OUT/val)",
            ("eval.val_every_epochs",),
        )
    checks.need(
        d.kind == "streaming",
        "data.kind",
        f"the DiT task trains on latent MDS shards (data.kind 'streaming'), got {d.kind!r}",
        ("task",),
    )
