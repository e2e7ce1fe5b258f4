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

Timestep-sampling phases (``transport.timestep_sampling``, models/dit_config.py) are epoch-based and a pure
function of the global optimizer step: phase i applies while ``epoch_of(step) < until_epoch_i``. Official
800-epoch recipe: logit-normal(0, 1) until epoch 480 (600,480 steps at 1251 steps/epoch), then uniform.
``timestep_phase_at`` picks the phase of a step; ``PhaseTracker`` reports the switches (the DiT task logs them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, Optional

import torch
import torch.nn.functional as F

from core.schedule import check_steps_per_epoch, epoch_of
from models.dit_config import TimestepPhase

__all__ = [
    "sample_timesteps",
    "sample_timesteps_for_phase",
    "phase_switch_steps",
    "timestep_phase_at",
    "describe_phase",
    "describe_phases",
    "PhaseTracker",
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


def sample_timesteps(
    n: int, kind: str, *, mean: float = 0.0, std: float = 1.0, generator: Optional[torch.Generator] = None, device=None
) -> torch.Tensor:
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


def sample_timesteps_for_phase(
    n: int, phase: Any, generator: Optional[torch.Generator] = None, device=None
) -> torch.Tensor:
    """``sample_timesteps`` driven by a ``models.dit_config.TimestepPhase``-like object
    (attributes ``kind`` and, for lognorm, ``mean`` / ``std``)."""
    return sample_timesteps(
        n,
        phase.kind,
        mean=float(getattr(phase, "mean", 0.0)),
        std=float(getattr(phase, "std", 1.0)),
        generator=generator,
        device=device,
    )


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
    def from_config(cls, cfg) -> Transport:
        """From a ``models.dit_config.TransportConfig`` (only ``use_cosine_loss`` is read; timestep phases
        are chosen per step by the DiT task (``timestep_phase_at``) and passed as ``phase``)."""
        return cls(use_cosine_loss=cfg.use_cosine_loss)

    def sample_noise(self, x1: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        dev = generator.device if generator is not None else x1.device
        noise = torch.randn(x1.shape, generator=generator, device=dev, dtype=x1.dtype)
        return noise.to(x1.device, non_blocking=True) if noise.device != x1.device else noise

    def sample_t(
        self, n: int, phase: Any = None, generator: Optional[torch.Generator] = None, device=None
    ) -> torch.Tensor:
        if phase is None:
            return sample_timesteps(n, "lognorm", mean=0.0, std=1.0, generator=generator, device=device)
        return sample_timesteps_for_phase(n, phase, generator=generator, device=device)

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x1: torch.Tensor,
        model_kwargs: Optional[dict] = None,
        *,
        t: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        phase: Any = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, torch.Tensor]:
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
                cos = cosine_loss_per_sample(pred.detach(), ut)  # logged only
            loss = mse
        return {"loss": loss, "mse": mse, "cos": cos, "t": t}


# --- Timestep-sampling phases: which sampler applies at a step -----------------------------------------------------


def _switch_step(until_epoch: float, steps_per_epoch: int) -> int:
    # First step whose epoch is >= until_epoch, in exact rational arithmetic (until_epoch as written in decimal),
    # so the boundary does not depend on float rounding of step / steps_per_epoch.
    return math.ceil(Fraction(repr(float(until_epoch))) * steps_per_epoch)


def phase_switch_steps(steps_per_epoch: int, phases: Sequence[TimestepPhase]) -> list[int]:
    """The global step at which each phase but the last ends (= the first step of the next phase)."""
    check_steps_per_epoch(steps_per_epoch)
    return [_switch_step(p.until_epoch, steps_per_epoch) for p in phases if p.until_epoch is not None]


def timestep_phase_at(step: int, steps_per_epoch: int, phases: Sequence[TimestepPhase]) -> tuple[int, TimestepPhase]:
    """(index, phase) in force at ``step``: the first phase whose ``until_epoch`` has not been reached yet.

    A phase without ``until_epoch`` never ends (it should be the last one; the config validation enforces that).
    """
    check_steps_per_epoch(steps_per_epoch)
    if not phases:
        raise ValueError("no timestep-sampling phases configured")
    for i, phase in enumerate(phases):
        if phase.until_epoch is None or step < _switch_step(phase.until_epoch, steps_per_epoch):
            return i, phase
    # Every phase has an end and all of them are over: keep the last one.
    return len(phases) - 1, phases[-1]


def _num(x: float) -> str:
    return f"{x:g}"


def describe_phase(phase: TimestepPhase) -> str:
    """Short name of a sampler: ``lognorm(0,1)`` or ``uniform``."""
    if phase.kind == "lognorm":
        return f"lognorm({_num(phase.mean)},{_num(phase.std)})"
    return phase.kind


def describe_phases(phases: Sequence[TimestepPhase], steps_per_epoch: int | None = None) -> str:
    """One line for the start-of-run log, e.g.
    ``lognorm(0,1) until epoch 480 (step 600480), then uniform``."""
    parts = []
    for phase in phases:
        text = describe_phase(phase)
        if phase.until_epoch is not None:
            text += f" until epoch {_num(phase.until_epoch)}"
            if steps_per_epoch:
                text += f" (step {_switch_step(phase.until_epoch, steps_per_epoch)})"
        parts.append(text)
    return ", then ".join(parts)


class PhaseTracker:
    """Remembers the current timestep-sampling phase and says when it changes (for logging).

    Its state is a function of the step alone, so a resumed run reports correctly: give the step the run starts (or
    resumes) at, or let the first ``update`` call set the baseline silently. ``update(step)`` returns a message
    when the phase in force at ``step`` differs from the last one seen, else None.
    """

    def __init__(
        self, phases: Sequence[TimestepPhase], steps_per_epoch: int | None = None, start_step: int | None = None
    ):
        self.phases = list(phases)
        self.steps_per_epoch = steps_per_epoch
        self.index: int | None = None
        self.phase: TimestepPhase | None = None
        if steps_per_epoch is not None and start_step is not None:
            self.index, self.phase = timestep_phase_at(start_step, steps_per_epoch, self.phases)

    def update(self, step: int, steps_per_epoch: int | None = None) -> str | None:
        if steps_per_epoch is not None:
            self.steps_per_epoch = steps_per_epoch
        if self.steps_per_epoch is None:
            raise ValueError("PhaseTracker needs steps_per_epoch (in the constructor or in update)")
        index, phase = timestep_phase_at(step, self.steps_per_epoch, self.phases)
        old_index, old = self.index, self.phase
        self.index, self.phase = index, phase
        if old is None or old_index == index:
            return None
        return (
            f"step {step} (epoch {epoch_of(step, self.steps_per_epoch):.2f}): timestep sampling switches "
            f"{describe_phase(old)} -> {describe_phase(phase)}"
        )
