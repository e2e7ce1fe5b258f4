"""REPA (Yu et al., "Representation Alignment for Generation", arXiv 2410.06940) for LightningDiT, fed by the
DINOv2 patch features stored beside the latents.

Facts from the official code (github sihyun-yu/REPA):

* the tokens ``h`` (B, T, D) right after block ``depth`` (1-based; default 8 for 28-block XL models) go through a
  token-wise MLP projector ``Linear(D, P) -> SiLU -> Linear(P, P) -> SiLU -> Linear(P, Z)`` (P = 2048, Z the
  encoder's width: 768 for DINOv2-B/14, 1024 for L/14), initialised like every Linear of SiT (xavier-uniform
  weights, zero biases);
* loss per sample: the mean over tokens of ``-cos(proj(h)_t, y_t)`` with both vectors L2-normalised along the
  feature dim (``F.normalize``, eps 1e-12), averaged over samples; total = diffusion loss + ``weight`` x that
  (weight 0.5);
* the targets ``y`` are DINOv2's final-norm patch tokens of the clean training image (no CLS). Here they are
  computed once by the extraction job (data/extract.py, ``features.enabled`` + ``features.flip``: the image and its
  horizontal flip, since the features of a flipped image are not a flipped feature map), and ``LatentDataset``
  returns those of the image whose latent it returns (``latent`` or ``latent_flip``).

The projector is attached to the model (``attach_repa``: submodule ``repa_projector``), so it is trained, sharded,
checkpointed and EMA-averaged with it by every engine; ``LightningDiT.forward(..., return_repa=True)`` returns the
prediction and the projected tokens. The official model is unchanged: without ``attach_repa`` it has the official
state-dict keys, and exported weights drop ``repa_projector.*`` (``strip_repa``), so they load into the plain model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "REPA_PREFIX",
    "RepaCapture",
    "RepaProjector",
    "attach_repa",
    "features_to_tokens",
    "repa_loss_per_sample",
    "strip_repa",
]

REPA_PREFIX = "repa_projector."  # state-dict keys of the projector (never part of an exported model)


class RepaProjector(nn.Sequential):
    """REPA's ``build_mlp``: ``Linear(D, P) SiLU Linear(P, P) SiLU Linear(P, Z)`` applied token-wise."""

    def __init__(self, hidden_size: int, projector_dim: int, z_dim: int):
        super().__init__(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, z_dim),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SiT's ``_basic_init`` (REPA builds the projectors before ``initialize_weights``): xavier-uniform, zero bias."""
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def flops_per_token(self) -> int:
        """Matmul FLOPs (2 per multiply-add) of one token's forward pass."""
        return sum(2 * m.in_features * m.out_features for m in self if isinstance(m, nn.Linear))


def attach_repa(model: nn.Module, depth: int, projector_dim: int, z_dim: int) -> RepaProjector:
    """Give a LightningDiT its REPA projector (submodule ``repa_projector``) and the block whose output it reads.
    The projector's weights are drawn from the global RNG, after the model's."""
    if not 1 <= depth <= len(model.blocks):
        raise ValueError(f"repa.depth must be in [1, {len(model.blocks)}] (the model's blocks), got {depth}")
    model.repa_projector = RepaProjector(model.hidden_size, projector_dim, z_dim)
    model.repa_depth = int(depth)
    return model.repa_projector


class RepaCapture:
    """A model callable for ``Transport.training_losses``: runs ``model(x, t, ..., return_repa=True)``, returns the
    prediction and keeps the projected tokens in ``projected``."""

    def __init__(self, model: Any):
        self.model = model
        self.projected: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out, self.projected = self.model(x, t, return_repa=True, **kwargs)
        return out


def features_to_tokens(features: torch.Tensor) -> torch.Tensor:
    """Stored features (B, Z, h, w) -> tokens (B, h*w, Z) in the DiT's row-major token order."""
    return features.flatten(2).transpose(1, 2)


def repa_loss_per_sample(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_t -(normalize(projected_t) . normalize(target_t))`` per sample, in float32: (B, T, Z) x2 -> (B,)."""
    if projected.shape != target.shape:
        raise ValueError(
            f"REPA: projected tokens {tuple(projected.shape)} vs stored features {tuple(target.shape)}: the "
            f"features must hold one {projected.shape[-1]}-d vector per DiT token (repa.z_dim, the token grid)"
        )
    z = F.normalize(projected.float(), dim=-1)
    z_tilde = F.normalize(target.float(), dim=-1)
    return -(z * z_tilde).sum(dim=-1).mean(dim=-1)


def strip_repa(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the projector's keys (what the plain model loads)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(REPA_PREFIX)}
