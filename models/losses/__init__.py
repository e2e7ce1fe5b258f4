"""VA-VAE training losses: LPIPS (VGG16), PatchGAN discriminator + GAN losses + adaptive weight, VF loss.

The composition into the autoencoder / discriminator objectives (and how the adaptive weights get their
gradients under FSDP2) lives in ``models/tasks/vavae.py``.
"""

from models.losses.discriminator import (
    NLayerDiscriminator,
    adaptive_weight,
    adopt_weight,
    generator_loss,
    hinge_d_loss,
    vanilla_d_loss,
    weights_init,
)
from models.losses.lpips import LPIPS, build_lpips
from models.losses.vf import VFLossTerms, distmat_loss, marginal_cosine_loss, vf_loss

__all__ = [
    "LPIPS",
    "NLayerDiscriminator",
    "VFLossTerms",
    "adaptive_weight",
    "adopt_weight",
    "build_lpips",
    "distmat_loss",
    "generator_loss",
    "hinge_d_loss",
    "marginal_cosine_loss",
    "vanilla_d_loss",
    "vf_loss",
    "weights_init",
]
