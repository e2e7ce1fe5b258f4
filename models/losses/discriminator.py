"""PatchGAN discriminator (taming ``NLayerDiscriminator``), GAN losses and the adaptive weight.

``NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)``: 4x4 convolutions (padding 1), LeakyReLU(0.2),
BatchNorm (so no conv bias) on every inner layer; strides 2, 2, 2 then 1, 1 for n_layers=3; channel
multipliers min(2^n, 8); a final 1-channel conv (with bias) gives a patch map of logits. Initialisation
(taming ``weights_init``): conv weights N(0, 0.02) (conv biases keep PyTorch's default), BatchNorm weight
N(1, 0.02), bias 0. Parameter names are taming's (``main.N.*``), so ``loss.discriminator.*`` of a released
VA-VAE training checkpoint loads as is.

``forward(x, *more)`` runs each input through the network *separately* (BatchNorm batch statistics per
input, as the official code's two calls for real and fake images) and returns one logits tensor per input,
as float32 (inputs are cast to the weight dtype, for bf16 mixed precision).

Losses (LDM): hinge ``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``; vanilla
``0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat)))``; generator ``g = -mean D(x_hat)``.
``adaptive_weight`` is LDM's ``calculate_adaptive_weight`` on precomputed gradients:
``clamp(||grad_num|| / (||grad_den|| + 1e-4), 0, max_value)``, detached.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BatchNorm2d",
    "NLayerDiscriminator",
    "adaptive_weight",
    "adopt_weight",
    "generator_loss",
    "hinge_d_loss",
    "vanilla_d_loss",
    "weights_init",
]


def weights_init(m: nn.Module) -> None:
    name = type(m).__name__
    if "Conv" in name:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and update rule) that computes in fp32 when the input or the
    affine parameters are low precision: under bf16 mixed precision the parameters arrive in bf16 while the
    running statistics stay fp32 buffers, a mix ``batch_norm`` rejects."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        if self.training:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(
            x.float(),
            self.running_mean,
            self.running_var,
            self.weight.float(),
            self.bias.float(),
            self.training,
            self.momentum,
            self.eps,
        )
        return out.to(x.dtype)


class NLayerDiscriminator(nn.Module):
    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        kw, padw = 4, 1
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=padw, bias=False),
                BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=padw, bias=False),
            BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor, *more: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        dtype = self.main[0].weight.dtype
        outs = tuple(self.main(t.to(dtype)).float() for t in (x,) + more)
        return outs if more else outs[0]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -torch.mean(logits_fake)


def adopt_weight(weight: float, step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from step ``threshold`` on, ``value`` before (LDM's adopt_weight)."""
    return value if step < threshold else weight


def adaptive_weight(
    grad_num: torch.Tensor, grad_den: torch.Tensor, max_value: float, eps: float = 1e-4
) -> torch.Tensor:
    """``clamp(||grad_num|| / (||grad_den|| + eps), 0, max_value)`` as a detached fp32 scalar."""
    ratio = torch.linalg.vector_norm(grad_num.float()) / (torch.linalg.vector_norm(grad_den.float()) + eps)
    return torch.clamp(ratio, 0.0, max_value).detach()
