"""Frozen DINOv2 (timm) patch features on a latent grid: [-1, 1] images (B, 3, H, W) -> (B, D, h, w).

    vf = DINOv2Features("vit_large_patch14_dinov2.lvd142m", weights="/data/weights/dinov2_vitl14.pth",
                        grid=(16, 16), config_key="vavae.vf.dinov2")
    feats = vf(images)                 # (B, 1024, 16, 16); vf(images, grid=(h, w)) for another grid

* The ViT is ``timm.create_model(model, pretrained=False, dynamic_img_size=True, num_classes=0)``: weights
  come only from the LOCAL file ``weights`` (timm or original DINOv2 key layout; loaded strictly), never a
  download. ``random_init=True`` skips the file (tests and demos only; a warning says so) and draws the weights
  from a fixed seed (``RANDOM_INIT_SEED``, whatever the global RNG), so that every process that builds the same
  model (extraction job, every training rank) gets the same random network. A missing file is a
  ``FileNotFoundError`` naming ``<config_key>.weights``.
* Input: resized (bilinear, or ``interpolation="bicubic"`` as REPA; align_corners=False) to ``patch * grid`` so that the token grid equals the
  latent grid (224 px for patch 14 and a 16 x 16 latent, the official VA-VAE setting). The official code
  feeds the [-1, 1] image *without* ImageNet mean/std normalisation (a known minor bug, hustvl/LightningDiT
  #78); ``imagenet_norm=True`` maps [-1, 1] -> [0, 1] and applies the ImageNet mean/std instead.
* Output: ``forward_features`` (after the final norm) minus the prefix tokens (CLS and any registers),
  reshaped to (B, D, h, w), float32. Frozen: eval mode, ``requires_grad=False``, run under no_grad.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from data.features import FeatureExtractor

log = logging.getLogger(__name__)

__all__ = [
    "DINOv2Features",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDOM_INIT_SEED",
    "load_timm_weights",
    "resolve_weights_path",
]

RANDOM_INIT_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_weights_path(weights: Optional[str], config_key: str, what: str) -> Path:
    """The local weights file of ``config_key``; clear errors for "not set" and "does not exist"."""
    if not weights:
        raise FileNotFoundError(
            f"{config_key}.weights: not set; give the path of a local {what} checkpoint file "
            f"(no downloads), or set {config_key}.random_init=true for a randomly initialised "
            f"model (tests only)"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{config_key}.weights: {what} weights file {path} does not exist (a local timm "
            f".safetensors/.pth or original checkpoint)"
        )
    return path


def load_timm_weights(model: nn.Module, path: Path, config_key: str, model_name: str) -> None:
    """Strictly load a local file into a timm model (original DINOv2 keys are converted by timm's filter)."""
    from timm.models import load_checkpoint
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    filter_fn = checkpoint_filter_fn if isinstance(model, VisionTransformer) else None
    try:
        load_checkpoint(model, str(path), strict=True, filter_fn=filter_fn)
    except Exception as err:  # noqa: BLE001 - name the key and the file
        raise ValueError(
            f"{config_key}.weights: cannot load {path} into {model_name}: {type(err).__name__}: {err}"
        ) from err
    log.info("%s: loaded %s weights from %s", config_key, model_name, path)


class DINOv2Features(FeatureExtractor):
    """See the module docstring. Attributes: ``model`` (the timm ViT), ``grid``, ``input_hw``, ``patch``,
    ``num_prefix_tokens``, ``dim``, ``imagenet_norm``; ``output_shape`` (D, h, w). Registered (lazily) as the
    feature extractor ``"dinov2"`` of data/features.py (what the extraction job builds)."""

    def __init__(
        self,
        model: str = "vit_large_patch14_dinov2.lvd142m",
        weights: Optional[str] = None,
        *,
        random_init: bool = False,
        grid: Sequence[int] = (16, 16),
        imagenet_norm: bool = False,
        model_kwargs: Optional[dict[str, Any]] = None,
        interpolation: str = "bilinear",
        config_key: str = "dinov2",
    ) -> None:
        super().__init__()
        import timm

        model_kwargs = dict(model_kwargs or {})
        path = None if random_init else resolve_weights_path(weights, config_key, "DINOv2")  # before building
        try:
            with torch.random.fork_rng(devices=[], enabled=random_init):
                if random_init:
                    torch.manual_seed(RANDOM_INIT_SEED)
                vit = timm.create_model(model, pretrained=False, dynamic_img_size=True, num_classes=0, **model_kwargs)
        except Exception as err:  # noqa: BLE001 - unknown model name, bad kwargs
            raise ValueError(
                f"{config_key}.model: cannot create timm model {model!r} with model_kwargs {model_kwargs}: {err}"
            ) from err
        if random_init:
            log.warning(
                "%s: %s is RANDOMLY INITIALISED (%s.random_init=true); its features are meaningless outside tests",
                config_key,
                model,
                config_key,
            )
        else:
            load_timm_weights(vit, path, config_key, model)
        patch = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
        if patch is None:
            raise ValueError(f"{config_key}.model: {model} has no patch_embed.patch_size (not a ViT?)")
        self.patch = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
        self.model = vit.eval().requires_grad_(False)
        self.model_name = model
        self.grid = (int(grid[0]), int(grid[1]))
        self.input_hw = self.input_size(self.grid)
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))
        self.dim = int(vit.num_features)
        self.imagenet_norm = bool(imagenet_norm)
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"{config_key}.interpolation: 'bilinear' or 'bicubic', got {interpolation!r}")
        self.interpolation = interpolation
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def input_size(self, grid: Sequence[int]) -> tuple[int, int]:
        return (self.patch[0] * int(grid[0]), self.patch[1] * int(grid[1]))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: Optional[Sequence[int]] = None) -> torch.Tensor:
        h, w = self.grid if grid is None else (int(grid[0]), int(grid[1]))
        size = self.input_size((h, w))
        x = images.to(torch.float32)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False)
        if self.imagenet_norm:
            x = ((x + 1.0) * 0.5 - self.mean) / self.std
        tokens = self.model.forward_features(x)[:, self.num_prefix_tokens :]
        if tokens.shape[1] != h * w:
            raise RuntimeError(
                f"DINOv2: {tokens.shape[1]} patch tokens for a {h}x{w} latent grid "
                f"(input {size}, {self.num_prefix_tokens} prefix tokens)"
            )
        return tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).float()
