"""Vision-foundation (VF) alignment loss of VA-VAE (official ``vf_loss_type: combined_v3``).

With ``z'`` the projected latent (B, D, h, w) (``linear_proj(z)``, z a posterior sample) and ``F`` the frozen
DINOv2 features on the same grid (B, D, h, w):

* marginal cosine loss   ``L_mcos = mean_{b,h,w} relu(1 - m1 - cos(z'_{b,:,h,w}, F_{b,:,h,w}))``
  (cosine over channels, torch ``cosine_similarity`` eps 1e-8; m1 = ``cos_margin``);
* marginal distance-matrix loss: every token L2-normalised over channels (``F.normalize``, eps 1e-12),
  Gram matrices ``S_z, S_F`` (B, hw, hw), ``L_mdms = mean relu(|S_z - S_F| - m2)`` (m2 = ``distmat_margin``);
* ``vf = distmat_weight * L_mdms + cos_weight * L_mcos``.

Terms are zero where the similarity is already within the margin. The adaptive weight of the VF loss
(``adaptive_weight`` with max 1e8, times ``vf_weight``) is computed by the caller from the gradients of the
reconstruction NLL and of ``vf`` at the *encoder's* last conv (``encoder.conv_out.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["VFLossTerms", "distmat_loss", "marginal_cosine_loss", "vf_loss"]


def marginal_cosine_loss(z_proj: torch.Tensor, features: torch.Tensor, margin: float) -> torch.Tensor:
    return F.relu(1.0 - margin - F.cosine_similarity(features, z_proj, dim=1)).mean()


def distmat_loss(z_proj: torch.Tensor, features: torch.Tensor, margin: float) -> torch.Tensor:
    z = F.normalize(z_proj.flatten(2), dim=1)  # (B, D, N)
    f = F.normalize(features.flatten(2), dim=1)
    s_z = torch.einsum("bci,bcj->bij", z, z)
    s_f = torch.einsum("bci,bcj->bij", f, f)
    return F.relu(torch.abs(s_z - s_f) - margin).mean()


@dataclass
class VFLossTerms:
    total: torch.Tensor
    distmat: torch.Tensor
    cos: torch.Tensor


def vf_loss(
    z_proj: torch.Tensor,
    features: torch.Tensor,
    *,
    cos_margin: float = 0.5,
    distmat_margin: float = 0.25,
    cos_weight: float = 1.0,
    distmat_weight: float = 1.0,
) -> VFLossTerms:
    if z_proj.shape != features.shape:
        raise ValueError(
            f"VF loss: projected latent {tuple(z_proj.shape)} and foundation features "
            f"{tuple(features.shape)} differ (the feature grid must be the latent grid)"
        )
    features = features.detach().to(z_proj.dtype)
    mdms = distmat_loss(z_proj, features, distmat_margin)
    mcos = marginal_cosine_loss(z_proj, features, cos_margin)
    return VFLossTerms(total=distmat_weight * mdms + cos_weight * mcos, distmat=mdms, cos=mcos)
