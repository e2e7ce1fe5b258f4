"""The DiT's config sections (``transport``, ``sampling``, ``eval``, ``repa``; ``model`` is
``models.lightningdit.ModelConfig``) with their value checks, and the DiT task's own checks of the shared sections
(``check_dit_task``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from core.config import Checks
from models.lightningdit import LightningDiT_models

__all__ = [
    "TimestepPhase",
    "TransportConfig",
    "SamplingConfig",
    "EvalConfig",
    "RepaConfig",
    "REPA_ENCODERS",
    "check_transport_config",
    "check_sampling_config",
    "check_eval_config",
    "check_repa_config",
    "repa_z_dim",
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


# REPA encoders: name -> (timm model the extraction job runs (data/extract.py `features.model`), feature width).
REPA_ENCODERS = {
    "dinov2-b": ("vit_base_patch14_dinov2.lvd142m", 768),  # REPA's default (dinov2-vit-b)
    "dinov2-l": ("vit_large_patch14_dinov2.lvd142m", 1024),  # the VA-VAE's foundation model
}


@dataclass
class RepaConfig:
    """REPA (arXiv 2410.06940; models/repa.py): align the tokens after block ``depth`` with DINOv2 patch features
    stored beside the latents (data/extract.py ``features.enabled`` + ``features.flip``). Off by default."""

    enabled: bool = False
    encoder: str = "dinov2-b"  # a REPA_ENCODERS name: the encoder whose features the dataset holds
    z_dim: Optional[int] = None  # feature width; None = the encoder's (768 / 1024); set it for other extractors
    depth: int = 8  # tokens after this block (1-based; REPA's default for 28-block XL models)
    weight: float = 0.5  # loss = diffusion loss + weight * REPA loss (REPA's proj_coeff)
    projector_dim: int = 2048  # MLP hidden width: Linear(D, P) SiLU Linear(P, P) SiLU Linear(P, z_dim)


def repa_z_dim(r: RepaConfig) -> int:
    """The feature width the projector outputs (``repa.z_dim`` or the encoder's)."""
    return int(r.z_dim) if r.z_dim is not None else REPA_ENCODERS[r.encoder][1]


def check_repa_config(r: RepaConfig, checks: Checks) -> None:
    """Sizes and the encoder name of the ``repa`` section (its fit to the model: ``check_dit_task``)."""
    checks.need(
        r.encoder in REPA_ENCODERS,
        "repa.encoder",
        f"unknown encoder {r.encoder!r}; known: {', '.join(REPA_ENCODERS)}",
    )
    checks.positive(r.z_dim, "repa.z_dim", allow_none=True)
    checks.positive(r.depth, "repa.depth")
    checks.positive(r.projector_dim, "repa.projector_dim")
    checks.need(r.weight >= 0, "repa.weight", f"must be >= 0, got {r.weight!r}")


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
    r = getattr(cfg, "repa", None)
    if r is not None and r.enabled:
        depth = _model_depth(cfg.model)
        checks.need(
            depth is None or r.depth <= depth,
            "repa.depth",
            f"must be at most the model's depth {depth}, got {r.depth}",
            ("model.type", "model.depth"),
        )
        checks.need(
            d.use_features,
            "data.use_features",
            "repa.enabled needs the stored DINOv2 features: set data.use_features=true (the dataset must hold "
            "`features` and, with data.random_flip, `features_flip`: data/extract.py features.enabled/flip)",
            ("repa.enabled",),
        )


def _model_depth(m: Any) -> Optional[int]:
    """Number of blocks of ``model`` (a registry type or custom); None for an unknown type (reported elsewhere)."""
    if m.type == "custom":
        return m.depth
    if m.type not in LightningDiT_models:
        return None
    with torch.device("meta"):
        return LightningDiT_models[m.type](input_size=m.input_size, in_channels=m.in_channels).depth
