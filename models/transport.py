"""Linear flow-matching path, velocity target, MSE + cosine loss and timestep samplers.

Time convention (official LightningDiT = SiT "Linear" path, velocity prediction):

    x_t = t * x1 + (1 - t) * x0,   x0 ~ N(0, I) (noise, t = 0),  x1 = data latent (t = 1)
    u   = d x_t / dt = x1 - x0                                   (target velocity)

The model sees raw t in [0, 1] and returns a velocity. No epsilon is cut off either end
(SiT uses train_eps = 0 for the linear path with velocity prediction).

Loss (official, per sample; the task averages over the batch):

    mse = mean_{C,H,W} (v_hat - u)^2
    cos = mean_{H,W} [1 - cos_sim(v_hat, u) across channels (dim 1), eps 1e-8]
    loss = mse + cos        (cos only when ``use_cosine_loss``; official: always, weight 1)

Since both terms are per-sample, ``loss.mean()`` equals the official ``mean(mse) + mean(cos)``.

Timesteps: logit-normal ``sigmoid(N(mean, std))`` (official: N(0, 1), drawn there with the numpy
global RNG) or uniform U[0, 1). Here every draw comes from an explicit ``torch.Generator`` so
that it is reproducible and checkpointable, and is made on the device of the data (pass a
generator that lives on that device; otherwise the draw is made on the generator's device and
copied over).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "sample_timesteps",
    "sample_timesteps_for_phase",
    "interpolate",
    "velocity_target",
    "mse_per_sample",
    "cosine_loss_per_sample",
    "Transport",
]

TIMESTEP_KINDS = ("lognorm", "uniform")


def _draw_device(generator: Optional[torch.Generator], device) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def sample_timesteps(n: int, kind: str, *, mean: float = 0.0, std: float = 1.0,
                     generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Draw ``n`` training timesteps in [0, 1] as float32.

    ``kind="lognorm"``: logit-normal, ``t = sigmoid(n)`` with ``n ~ N(mean, std^2)``.
    ``kind="uniform"``: ``t ~ U[0, 1)``.
    The draw uses ``generator`` (on its device); the result is placed on ``device``
    (default: the generator's device, else CPU).
    """
    if kind not in TIMESTEP_KINDS:
        raise ValueError(f"unknown timestep sampling kind {kind!r}; expected one of {TIMESTEP_KINDS}")
    draw_dev = _draw_device(generator, device)
    if kind == "lognorm":
        if not std > 0:
            raise ValueError(f"logit-normal std must be > 0, got {std}")
        z = torch.randn(n, generator=generator, device=draw_dev, dtype=torch.float32)
        t = torch.sigmoid(z * std + mean)
    else:
        t = torch.rand(n, generator=generator, device=draw_dev, dtype=torch.float32)
    if device is not None and t.device != torch.device(device):
        t = t.to(device, non_blocking=True)
    return t


def sample_timesteps_for_phase(n: int, phase: Any, generator: Optional[torch.Generator] = None,
                               device=None) -> torch.Tensor:
    """``sample_timesteps`` driven by a ``core.config.TimestepPhase``-like object
    (attributes ``kind`` and, for lognorm, ``mean`` / ``std``)."""
    return sample_timesteps(n, phase.kind, mean=float(getattr(phase, "mean", 0.0)),
                            std=float(getattr(phase, "std", 1.0)), generator=generator, device=device)


def _expand_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample t of shape [B] -> [B, 1, ..., 1] broadcastable against x."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t * x1 + (1 - t) * x0 for per-sample t of shape [B]."""
    te = _expand_t(t, x1).to(x1.dtype)
    return te * x1 + (1 - te) * x0


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """u = x1 - x0 (the time derivative of the linear path)."""
    return x1 - x0


def mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over all non-batch dims of (pred - target)^2 -> [B]."""
    return ((pred - target) ** 2).mean(dim=tuple(range(1, pred.dim())))


def cosine_loss_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over spatial positions of 1 - cos_sim(pred, target) across channels (dim 1) -> [B].

    Uses ``F.cosine_similarity`` with its default eps (1e-8), like the official code.
    """
    cos = F.cosine_similarity(pred, target, dim=1)
    return (1 - cos).mean(dim=tuple(range(1, cos.dim()))) if cos.dim() > 1 else 1 - cos


class Transport:
    """Linear-path flow-matching loss.

    ``training_losses(model, x1, model_kwargs, *, t=None, noise=None, phase=None, generator=None)``
    returns ``{"loss", "mse", "cos", "t"}``, each of shape [B] (float32). ``loss`` is what to
    average and backpropagate. ``t`` and ``noise`` default to draws from ``generator``: t from
    ``phase`` (a ``TimestepPhase``-like object; default logit-normal(0, 1), the official choice),
    noise ``torch.randn`` of x1's shape. All tensors stay on x1's device; nothing reads a device
    value on the host.
    """

    def __init__(self, use_cosine_loss: bool = True):
        self.use_cosine_loss = bool(use_cosine_loss)

    @classmethod
    def from_config(cls, cfg) -> "Transport":
        """From a ``core.config.TransportConfig`` (only ``use_cosine_loss`` is read; timestep phases
        are chosen per step by the trainer's schedule and passed as ``phase``)."""
        return cls(use_cosine_loss=cfg.use_cosine_loss)

    def sample_noise(self, x1: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        dev = generator.device if generator is not None else x1.device
        noise = torch.randn(x1.shape, generator=generator, device=dev, dtype=x1.dtype)
        return noise.to(x1.device, non_blocking=True) if noise.device != x1.device else noise

    def sample_t(self, n: int, phase: Any = None, generator: Optional[torch.Generator] = None,
                 device=None) -> torch.Tensor:
        if phase is None:
            return sample_timesteps(n, "lognorm", mean=0.0, std=1.0, generator=generator, device=device)
        return sample_timesteps_for_phase(n, phase, generator=generator, device=device)

    def training_losses(self, model: Callable[..., torch.Tensor], x1: torch.Tensor,
                        model_kwargs: Optional[dict] = None, *, t: Optional[torch.Tensor] = None,
                        noise: Optional[torch.Tensor] = None, phase: Any = None,
                        generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        model_kwargs = {} if model_kwargs is None else model_kwargs
        b = x1.shape[0]
        if t is None:
            t = self.sample_t(b, phase, generator=generator, device=x1.device)
        else:
            t = t.to(device=x1.device, dtype=torch.float32)
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
        if noise is None:
            noise = self.sample_noise(x1, generator)
        elif noise.shape != x1.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != data shape {tuple(x1.shape)}")
        x0 = noise.to(device=x1.device, dtype=x1.dtype)

        xt = interpolate(x0, x1, t)
        ut = velocity_target(x0, x1)
        pred = model(xt, t, **model_kwargs)
        if pred.shape != x1.shape:
            raise ValueError(f"model output shape {tuple(pred.shape)} != data shape {tuple(x1.shape)}")
        # Loss in fp32 even when the model ran under bf16 autocast (as the official code, where the
        # bf16 output is promoted against the fp32 target).
        pred = pred.float()
        ut = ut.float()
        mse = mse_per_sample(pred, ut)
        if self.use_cosine_loss:
            cos = cosine_loss_per_sample(pred, ut)
            loss = mse + cos
        else:
            with torch.no_grad():
                cos = cosine_loss_per_sample(pred.detach(), ut)   # logged only
            loss = mse
        return {"loss": loss, "mse": mse, "cos": cos, "t": t}
