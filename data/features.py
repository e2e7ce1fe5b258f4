"""Frozen feature extractors (DINOv2, ...) for the extraction job: the interface and a registry by name.

A feature extractor maps images in [-1, 1] (B, 3, H, W) to features on a token grid (B, D, h, w):

    fx = build_feature_extractor("dinov2", model="vit_large_patch14_dinov2.lvd142m", weights=PATH, grid=(16, 16),
                                 config_key="features")
    feats = fx(x)                       # (B, D, 16, 16); fx.output_shape == (D, 16, 16); fx.dim == D

Extractors are frozen ``nn.Module``s (always eval mode, no gradients), so ``.to(device)`` works on their weights.

Extension point, as for tokenizers (data/tokenizers.py): ``FEATURE_EXTRACTORS`` (a core.registry.Registry). The
models live in ``models/`` (a higher layer), so data/ lists them here as lazy ``"module:attr"`` entries, imported
on first use, and never imports them at module level: ``"dinov2"`` is ``models.dinov2:DINOv2Features``. Code that
may import this module registers with ``@register_feature_extractor("name")``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from core.registry import Registry

__all__ = [
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "available_feature_extractors",
    "build_feature_extractor",
    "register_feature_extractor",
]


class FeatureExtractor(nn.Module):
    """Interface. Subclasses set ``dim`` (D) and ``grid`` ((h, w), the default token grid) and implement
    ``forward(images, grid=None) -> (B, D, h, w)`` (float32, no gradients)."""

    dim: int
    grid: tuple[int, int]

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(D, h, w) of one image's features on the default grid."""
        return (int(self.dim), int(self.grid[0]), int(self.grid[1]))

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # always frozen, always eval

    def forward(self, images: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ registry
# name -> factory (a FeatureExtractor subclass or a function returning one), or a lazy "module:attr" entry for
# extractors that a higher layer implements (imported on first use; see the module docstring).
FEATURE_EXTRACTORS = Registry("feature extractor", unknown="unknown feature extractor {name!r}; available: {known}")
# DINOv2Features(model, weights, random_init=, grid=, imagenet_norm=, model_kwargs=)
FEATURE_EXTRACTORS.register("dinov2", "models.dinov2:DINOv2Features")


def register_feature_extractor(
    name: str,
) -> Callable[[Callable[..., FeatureExtractor]], Callable[..., FeatureExtractor]]:
    """Decorator registering a factory (a FeatureExtractor subclass or a function returning one) under ``name``."""
    return FEATURE_EXTRACTORS.register(name)


def available_feature_extractors() -> list[str]:
    return sorted(FEATURE_EXTRACTORS.names())


def build_feature_extractor(name: str, **kwargs: Any) -> FeatureExtractor:
    """The feature extractor registered as ``name``, built with ``kwargs``, in eval mode. Errors of the factory
    itself (missing weights file, unknown model, ...) pass through unchanged."""
    factory = FEATURE_EXTRACTORS.get(name)
    extractor = factory(**kwargs)
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(
            f"feature extractor factory for {name!r} returned {type(extractor).__name__}, not a FeatureExtractor"
        )
    return extractor.eval()
