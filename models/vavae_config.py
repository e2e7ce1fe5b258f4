"""The ``vavae:`` section of an experiment config (VA-VAE training: models/tasks/vavae.py) and the VA-VAE task's
value checks (``check_vavae_task``: the section and what the task needs of the shared ones)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from core.config import Checks, OptimizerConfig

__all__ = [
    "VAVAEConfig",
    "VAVAEModelConfig",
    "VAVAELossConfig",
    "DiscriminatorConfig",
    "DINOv2Config",
    "VFConfig",
    "LPIPSConfig",
    "check_vavae_task",
]


@dataclass
class VAVAEModelConfig:
    """LDM autoencoder ``ddconfig`` + ``embed_dim`` (official keyword names); defaults: the released f16d32."""

    embed_dim: int = 32
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    z_channels: int = 32
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = True
    dropout: float = 0.0


@dataclass
class VAVAELossConfig:
    """Autoencoder objective: nll (L1 + LPIPS) + kl_weight * KL + adaptive GAN term + adaptive VF term."""

    perceptual_weight: float = 1.0  # LPIPS weight inside the reconstruction loss (0 = L1 only, no LPIPS)
    kl_weight: float = 1e-6
    logvar_init: float = 0.0  # the official nll's log-variance: a constant (never optimised)
    disc_start: int = 2501  # GAN terms on from this AE optimizer step (official 5001 PL steps ~ 2500)
    disc_factor: float = 1.0
    disc_weight: float = 0.5  # times the adaptive generator weight
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    sample_posterior: bool = True  # decode a posterior sample (official) rather than the mean


@dataclass
class DiscriminatorConfig:
    """taming PatchGAN NLayerDiscriminator (BatchNorm)."""

    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3


@dataclass
class DINOv2Config:
    """The frozen timm DINOv2 of the VF loss (models/dinov2.py); weights from a LOCAL file only."""

    model: str = "vit_large_patch14_dinov2.lvd142m"
    weights: Optional[str] = None
    random_init: bool = False  # random weights instead of `weights` (tests / demos only)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (tiny test ViTs)
    imagenet_norm: bool = False  # official: [-1, 1] input without ImageNet mean/std (#78)


@dataclass
class VFConfig:
    """Vision-foundation alignment loss (official `use_vf: dinov2`, `reverse_proj: true`, combined_v3)."""

    enabled: bool = True  # false = plain LDM KL-VAE (no projection, no DINOv2)
    weight: float = 0.1  # vf_weight: multiplies the adaptive weight
    adaptive: bool = True  # adaptive_vf: grad-norm ratio at encoder.conv_out.weight
    cos_margin: float = 0.5  # m1
    distmat_margin: float = 0.25  # m2
    cos_weight: float = 1.0
    distmat_weight: float = 1.0
    proj_fix: bool = False  # freeze linear_proj (not in the optimizer)
    # "online": DINOv2 on each batch; "precomputed": the `features` column of a data.kind=streaming dataset
    # (data/extract.py with images and features on the latent grid; center crops, no flips; README "Training VA-VAE")
    features: Literal["online", "precomputed"] = "online"
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)


@dataclass
class LPIPSConfig:
    """LPIPS VGG16 weights from LOCAL files (models/losses/lpips.py)."""

    vgg_weights: Optional[str] = None  # torchvision vgg16 state dict (or a full LPIPS state dict)
    lin_weights: Optional[str] = None  # LPIPS linear heads (lin{i}.model.1.weight)
    random_init: bool = False  # random VGG + heads (tests only)


@dataclass
class VAVAEConfig:
    """VA-VAE training (task: vavae). The autoencoder uses `optimizer`; the discriminator `disc_optimizer`."""

    model: VAVAEModelConfig = field(default_factory=VAVAEModelConfig)
    loss: VAVAELossConfig = field(default_factory=VAVAELossConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    vf: VFConfig = field(default_factory=VFConfig)
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)
    disc_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=1e-4, betas=(0.5, 0.9))
    )
    init_from: Optional[str] = None  # previous stage: our checkpoint dir or an official .ckpt/.pt
    init_discriminator: bool = True  # also take the discriminator from init_from when it has one
    init_proj: bool = True  # also take linear_proj from init_from (error if missing)
    ema_decay: Optional[float] = None  # official: no EMA


def check_vavae_task(cfg: Any, checks: Checks) -> None:
    """Problems of the VA-VAE section of the experiment ``cfg``, of the image-data fields it uses and of its engine
    (only checked for task "vavae")."""
    need = checks.need
    v, d = cfg.vavae, cfg.data
    m = v.model
    for k in ("embed_dim", "ch", "num_res_blocks", "z_channels", "resolution", "in_channels", "out_ch"):
        need(getattr(m, k) > 0, f"vavae.model.{k}", f"must be > 0, got {getattr(m, k)!r}")
    need(m.ch % 32 == 0, "vavae.model.ch", f"must be a multiple of 32 (GroupNorm(32)), got {m.ch}")
    need(
        len(m.ch_mult) > 0 and all(c > 0 for c in m.ch_mult),
        "vavae.model.ch_mult",
        f"must be a non-empty list of positive multipliers, got {m.ch_mult!r}",
    )
    need(m.double_z, "vavae.model.double_z", "must be true (the KL posterior needs mean and log-variance)")
    need(0.0 <= m.dropout < 1.0, "vavae.model.dropout", f"must be in [0, 1), got {m.dropout!r}")
    need(d.image_size > 0, "data.image_size", f"must be > 0, got {d.image_size}")
    if m.ch_mult and d.image_size > 0:
        factor = 2 ** (len(m.ch_mult) - 1)
        need(
            d.image_size % factor == 0,
            "data.image_size",
            f"image size {d.image_size} is not divisible by the autoencoder's downsampling factor {factor} "
            f"(2^(len(ch_mult)-1))",
            ("vavae.model.ch_mult",),
        )
    if d.kind == "images":
        need(bool(d.path), "data.path", "set the image folder (root/<class>/<image>) or a '<path> <label>' list file")
    if d.kind == "streaming":
        need(
            bool(d.path),
            "data.path",
            "set the MDS dataset directory (data/extract.py with images: true; with "
            "data.remote, the local cache directory)",
        )
    if d.kind == "synthetic":
        need(d.synthetic_num_samples > 0, "data.synthetic_num_samples", f"must be > 0, got {d.synthetic_num_samples}")
        need(d.synthetic_num_classes > 0, "data.synthetic_num_classes", f"must be > 0, got {d.synthetic_num_classes}")

    lo = v.loss
    for k in ("perceptual_weight", "kl_weight", "disc_factor", "disc_weight"):
        need(getattr(lo, k) >= 0, f"vavae.loss.{k}", f"must be >= 0, got {getattr(lo, k)!r}")
    need(lo.disc_start >= 0, "vavae.loss.disc_start", f"must be >= 0, got {lo.disc_start}")
    need(
        v.disc.ndf > 0 and v.disc.n_layers > 0 and v.disc.in_channels > 0,
        "vavae.disc",
        f"ndf, n_layers and in_channels must be > 0, got {v.disc}",
    )

    vf = v.vf
    if vf.enabled:
        need(vf.weight >= 0, "vavae.vf.weight", f"must be >= 0, got {vf.weight!r}")
        need(0.0 <= vf.cos_margin <= 2.0, "vavae.vf.cos_margin", f"must be in [0, 2], got {vf.cos_margin!r}")
        need(
            0.0 <= vf.distmat_margin <= 2.0, "vavae.vf.distmat_margin", f"must be in [0, 2], got {vf.distmat_margin!r}"
        )
        need(
            vf.cos_weight >= 0 and vf.distmat_weight >= 0,
            "vavae.vf.cos_weight",
            f"cos_weight and distmat_weight must be >= 0, got {vf.cos_weight!r}, {vf.distmat_weight!r}",
            ("vavae.vf.distmat_weight",),
        )
        if vf.features == "online":
            need(
                vf.dinov2.random_init or bool(vf.dinov2.weights),
                "vavae.vf.dinov2.weights",
                "not set; give the path of a local DINOv2 checkpoint file (no downloads), or set "
                "vavae.vf.dinov2.random_init=true (tests only), or vavae.vf.enabled=false",
            )
        else:  # precomputed: the stored features of the stored (center-cropped, non-flipped) images
            need(
                d.kind == "streaming",
                "vavae.vf.features",
                f"'precomputed' reads the DINOv2 `features` column of an MDS dataset: set data.kind=streaming and "
                f"data.path to a dataset from data/extract.py with images and features (got data.kind "
                f"{d.kind!r})",
                ("data.kind",),
            )
            need(
                not d.random_flip,
                "data.random_flip",
                "must be false with vavae.vf.features=precomputed: the stored DINOv2 features belong to the "
                "non-flipped image",
                ("vavae.vf.features",),
            )
    if lo.perceptual_weight > 0 and not v.lpips.random_init:
        need(
            bool(v.lpips.vgg_weights),
            "vavae.lpips.vgg_weights",
            "not set; give a local torchvision vgg16 state dict (no downloads), set vavae.lpips.random_init=true "
            "(tests only), or vavae.loss.perceptual_weight=0",
        )

    od = v.disc_optimizer
    need(od.lr > 0, "vavae.disc_optimizer.lr", f"must be > 0, got {od.lr!r}")
    for j, beta in enumerate(od.betas):
        need(0.0 <= beta < 1.0, f"vavae.disc_optimizer.betas[{j}]", f"must be in [0, 1), got {beta!r}")
    need(od.weight_decay >= 0, "vavae.disc_optimizer.weight_decay", f"must be >= 0, got {od.weight_decay!r}")
    if v.ema_decay is not None:
        need(0.0 <= v.ema_decay <= 1.0, "vavae.ema_decay", f"must be in [0, 1] or null, got {v.ema_decay!r}")
