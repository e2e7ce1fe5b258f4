"""Image tokenizers: the interface the extraction job and samplers use, the pixel-space identity, a registry.

A tokenizer maps images in [-1, 1] (B, 3, H, W) to latents (B, C, H/f, W/f) and back:

    tok = build_tokenizer("identity")
    z = tok.encode(x, sample=True, generator=g)      # posterior sample (VAE) or mean (sample=False)
    x_hat = tok.decode(z)
    tok.latent_shape(256) -> (C, 256 // f, 256 // f); tok.downsample == f; tok.channels == C

Tokenizers are ``nn.Module``s, so ``.to(device)`` / ``.eval()`` work on whatever weights they hold.

Extension point: ``TOKENIZERS`` (a core.registry.Registry). A kind implemented in a higher layer is listed here as
a lazy ``"module:attr"`` entry, imported on first use, so ``build_tokenizer("name")`` finds it without the caller
importing that module first: ``"vavae"`` is ``models.vavae:VAVAETokenizer`` (its factory takes e.g. the checkpoint
path as keyword arguments, which the extraction config passes through as ``tokenizer.kwargs``). Code that may
import this module (tests, plugins) registers with ``@register_tokenizer("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

from core.registry import Registry

__all__ = [
    "IdentityTokenizer",
    "TOKENIZERS",
    "Tokenizer",
    "available_tokenizers",
    "build_tokenizer",
    "register_tokenizer",
]


class Tokenizer(nn.Module):
    """Interface. Subclasses set ``downsample`` (spatial factor f) and ``channels`` (latent channels C)."""

    downsample: int = 1
    channels: int = 3

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> latents (B, C, H/f, W/f). ``sample`` picks a posterior sample
        (drawn with ``generator`` when given) instead of the mean, where the tokenizer has a posterior."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, h*f, w*f), nominally in [-1, 1] (not clamped)."""
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a square ``image_size`` image."""
        if image_size % self.downsample:
            raise ValueError(
                f"image size {image_size} is not divisible by the tokenizer's downsampling factor {self.downsample}"
            )
        side = image_size // self.downsample
        return (int(self.channels), side, side)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # reconstruction, for convenience
        return self.decode(self.encode(images))


class IdentityTokenizer(Tokenizer):
    """Pixel space: the latent *is* the image (C=3, f=1), exactly; ``sample`` and ``generator`` are ignored."""

    downsample = 1
    channels = 3

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"IdentityTokenizer.encode expects images (B, 3, H, W), got {tuple(images.shape)}")
        return images.clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or latents.shape[1] != 3:
            raise ValueError(f"IdentityTokenizer.decode expects latents (B, 3, H, W), got {tuple(latents.shape)}")
        return latents.clone()


# ------------------------------------------------------------------------------------------------ registry
# kind -> factory (a Tokenizer subclass or a function returning one), or a lazy "module:attr" entry for kinds that
# a higher layer implements (imported on first use; see the module docstring).
TOKENIZERS = Registry("tokenizer", "tokenizer.kind", unknown="unknown tokenizer kind {name!r}; available: {known}")
TOKENIZERS.register("identity", IdentityTokenizer)
# VAVAETokenizer: build_tokenizer("vavae", checkpoint=<file or run checkpoint dir>)
TOKENIZERS.register("vavae", "models.vavae:VAVAETokenizer")


def register_tokenizer(kind: str) -> Callable[[Callable[..., Tokenizer]], Callable[..., Tokenizer]]:
    """Decorator registering a factory (a Tokenizer subclass or a function returning one) under ``kind``."""
    return TOKENIZERS.register(kind)


def available_tokenizers() -> list[str]:
    return sorted(TOKENIZERS.names())


def build_tokenizer(kind: str, **kwargs: Any) -> Tokenizer:
    """A tokenizer of registered ``kind`` built with ``kwargs``, in eval mode."""
    factory = TOKENIZERS.get(kind)
    try:
        tokenizer = factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"tokenizer {kind!r}: bad arguments {sorted(kwargs)}: {err}") from err
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer factory for {kind!r} returned {type(tokenizer).__name__}, not a Tokenizer")
    return tokenizer.eval()
