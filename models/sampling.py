"""Sampling for the linear flow-matching path: Euler / Heun / dopri5 / Euler-Maruyama,
timestep shift, classifier-free guidance (CFG) with an interval.

Time runs forward from noise (t = 0, z ~ N(0, I)) to data (t = 1); the model returns the velocity
``model_fn(x, t_batch, y)`` (the LightningDiT forward signature; ``t_batch`` is float32 [B]).

Grid
----
``timestep_grid(num_steps, shift)`` = ``shift_timesteps(linspace(0, 1, num_steps), shift)`` in float32,
with ``shift_timesteps(t, s) = s*t / (1 + (s-1)*t)``. ``num_steps`` counts grid *points*, as in the
official code: 250 points = 249 Euler steps = 249 model calls (each on a doubled batch while CFG is
on). s < 1 puts the small steps near t = 0 (official s = 0.3: first dt 0.0012, last 0.0133).

CFG
---
``guided = uncond + w * (cond - uncond)``. ``guidance_mode="official"`` guides only latent channels
0-2 and keeps the conditional output on channels 3: (exactly the released code, a DiT legacy);
``"all"`` guides every channel. Guidance is off while ``t < cfg_interval_start`` (the comparison is
made in float32, as the official ``t[0] < start`` on a float32 tensor) and when ``cfg_scale <= 1`` (as the official ``cfg_scale > 1.0`` test);
there the conditional prediction is used and only the conditional half of the batch is run (same
numbers as computing and discarding the unconditional half, half the FLOPs). For the fixed-grid
samplers the decision comes from the known grid value (a Python float), never from a device read.
For dopri5 the solver picks the times, so each function evaluation reads its scalar t on the host.

The official sampler runs ``torchdiffeq.odeint(method="euler")`` on the doubled state ``[z, z]``
with labels ``[y, null]`` and ``forward_with_cfg``, and keeps the first half. ``method="euler"``
with ``guidance_mode="official"`` reproduces it: same grid arithmetic, same t values, same update
``x + dt * v``, same guidance arithmetic (tested to agree with that odeint construction).

Methods
-------
* ``euler``: x <- x + dt * v(x, t_i) on the grid; num_steps - 1 model calls.
* ``heun``: explicit trapezoidal rule = torchdiffeq's fixed-grid ``"heun2"`` (Butcher tableau c=[0,1],
  a21=1, b=[1/2,1/2]), reproduced operation for operation: k1 = v(x, t_i),
  k2 = v(x + dt*k1, t_i + dt), x <- x + dt*(k1/2 + k2/2). The second evaluation time is
  ``t_i + dt`` in float32 as torchdiffeq computes it (equal to t_{i+1} up to one ulp). The last step
  is a full Heun step (v is finite at t = 1 for the linear path): 2*(num_steps - 1) model calls.
  (SiT's ODE sampler passes any torchdiffeq name through, so this is its "heun2".)
* ``dopri5``: adaptive ``torchdiffeq.odeint(method="dopri5", atol, rtol)`` from t=0 to t=1. The
  official code passes the whole (shifted) grid as output times; torchdiffeq's adaptive step
  sequence does not depend on the output times (it interpolates at them), so integrating over the
  endpoints gives the same final state without storing 250 intermediate states (tested). The shift
  therefore has no effect on dopri5. Unlike the released code, the state is not doubled, so the
  solver's error norm covers only the samples themselves, not the discarded second half: dopri5
  step sizes (not the method or tolerances) can differ from an official dopri5 run.
* ``euler_maruyama``: SiT-style SDE sampler, see below.

Euler-Maruyama (SDE)
--------------------
For x_t = t x1 + (1-t) x0 the score follows from the velocity: with
x1_hat = E[x1|x_t], x0_hat = E[x0|x_t], we have x_t = t x1_hat + (1-t) x0_hat and
v = x1_hat - x0_hat, hence x0_hat = x_t - t v, and Tweedie's formula for the Gaussian noise
gives score = -x0_hat / (1-t):

    s(x, t) = (t * v - x) / (1 - t)          (SiT's get_score_from_velocity for the Linear path)

For any diffusion g(t) >= 0 the SDE  dx = [v + 1/2 g(t)^2 s] dt + g(t) dW  has the same marginals as
the probability-flow ODE dx = v dt (the extra Fokker-Planck drift term -div(1/2 g^2 s p) =
-1/2 g^2 Laplacian(p) cancels the diffusion term). SiT writes g^2 = 2 w(t), i.e. drift = v + w s,
noise sqrt(2 w dt). SiT's default "SBDM" coefficient for this path is w = (1-t)/t, which diverges at
t = 0 (drift v - x/t), so the EM sampler here uses SiT's "sigma" form w(t) = norm * (1 - t), for
which w * s = norm * (t v - x) is bounded on all of [0, 1]:

    drift = v + norm * (t * v - x),   x <- x + drift * dt + sqrt(2 * norm * (1 - t) * dt) * N(0, I)

Like SiT (last_step_size=0.04) the noisy grid ends at 1 - eps (the shifted grid scaled by 1 - eps;
num_steps - 1 EM steps) and one deterministic step of size eps lands on t = 1, so the score is never
evaluated at t = 1 and the final step adds no noise (num_steps model calls). That last step uses
the probability-flow velocity v (SiT's last_step="Euler"), not the SDE drift without its noise
(SiT's default "Mean"), which would shrink the variance. With eps = 0 the last grid interval is
that deterministic step instead (num_steps - 1 calls).
Noise comes from ``generator`` (must live on z's device).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import numpy as np
import torch

__all__ = [
    "shift_timesteps",
    "timestep_grid",
    "guided_velocity",
    "score_from_velocity",
    "Sampler",
    "OFFICIAL_GUIDED_CHANNELS",
    "METHODS",
    "GUIDANCE_MODES",
    "describe_sampling",
]

OFFICIAL_GUIDED_CHANNELS = 3
METHODS = ("euler", "heun", "dopri5", "euler_maruyama")
GUIDANCE_MODES = ("official", "all")

ModelFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def shift_timesteps(t: Union[torch.Tensor, float], shift: float) -> Union[torch.Tensor, float]:
    """t' = s*t / (1 + (s-1)*t); identity for s = 1. Same elementwise float32 arithmetic as the
    official grid code when given a float32 tensor."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def timestep_grid(num_steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """Shifted ``linspace(0, 1, num_steps)`` in float32 (``num_steps`` points, num_steps - 1 steps).
    Computed on the CPU (like the official code) and then moved to ``device``."""
    if num_steps < 2:
        raise ValueError(f"num_steps counts grid points and must be >= 2, got {num_steps}")
    grid = torch.linspace(0, 1, num_steps, dtype=torch.float32)
    grid = shift_timesteps(grid, shift)
    return grid if device is None else grid.to(device)


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float, mode: str = "official") -> torch.Tensor:
    """CFG combination ``uncond + scale * (cond - uncond)``.

    ``mode="official"``: only channels 0..2 are guided; channels 3.. are the conditional output.
    ``mode="all"``: every channel is guided.
    """
    if mode == "all":
        return uncond + scale * (cond - uncond)
    if mode == "official":
        c = OFFICIAL_GUIDED_CHANNELS
        guided = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1)
    raise ValueError(f"unknown guidance mode {mode!r}; expected one of {GUIDANCE_MODES}")


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """Score of the linear path's marginal from the velocity: s = (t*v - x) / (1 - t), t < 1."""
    if not t < 1:
        raise ValueError("the score is singular at t = 1")
    return (t * v - x) / (1 - t)


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32 (returned as a Python float)."""
    return float(np.float32(x))


class Sampler:
    """Draws samples from noise ``z`` for labels ``y`` with a velocity model.

    ``Sampler(method, num_steps, timestep_shift, cfg_scale, cfg_interval_start, guidance_mode,
    null_class, atol, rtol, *, diffusion_norm=1.0, last_step_size=0.04)``; see the module docstring.
    ``sample(model_fn, z, y, generator=None)`` returns the final state (same shape/dtype as z).
    """

    def __init__(
        self,
        method: str = "euler",
        num_steps: int = 250,
        timestep_shift: float = 1.0,
        cfg_scale: float = 1.0,
        cfg_interval_start: float = 0.0,
        guidance_mode: str = "official",
        null_class: int = 1000,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        *,
        diffusion_norm: float = 1.0,
        last_step_size: float = 0.04,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
        if guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance mode {guidance_mode!r}; expected one of {GUIDANCE_MODES}")
        if num_steps < 2:
            raise ValueError(f"num_steps counts grid points and must be >= 2, got {num_steps}")
        if timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0, got {timestep_shift}")
        if not 0 <= last_step_size < 1:
            raise ValueError(f"last_step_size must be in [0, 1), got {last_step_size}")
        if diffusion_norm < 0:
            raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
        self.method = method
        self.num_steps = int(num_steps)
        self.timestep_shift = float(timestep_shift)
        self.cfg_scale = float(cfg_scale)
        self.cfg_interval_start = float(cfg_interval_start)
        self.guidance_mode = guidance_mode
        self.null_class = int(null_class)
        self.atol = float(atol)
        self.rtol = float(rtol)
        self.diffusion_norm = float(diffusion_norm)
        self.last_step_size = float(last_step_size)
        self._start_f32 = _f32(self.cfg_interval_start)

    @classmethod
    def from_config(cls, cfg, null_class: int = 1000, **kwargs) -> Sampler:
        """From a ``models.dit_config.SamplingConfig``; ``null_class`` is the model's num_classes."""
        return cls(
            method=cfg.method,
            num_steps=cfg.num_steps,
            timestep_shift=cfg.timestep_shift,
            cfg_scale=cfg.cfg_scale,
            cfg_interval_start=cfg.cfg_interval_start,
            guidance_mode=cfg.guidance_mode,
            null_class=null_class,
            atol=cfg.atol,
            rtol=cfg.rtol,
            **kwargs,
        )

    # ------------------------------------------------------------------ guidance
    @property
    def uses_cfg(self) -> bool:
        # As the official inference (`using_cfg = cfg_scale > 1.0`): a scale <= 1 samples unguided.
        return self.cfg_scale > 1.0

    def guidance_on(self, t: float) -> bool:
        """Whether CFG is applied at time t (a host float): cfg_scale > 1 and fp32(t) >= fp32(start)."""
        return self.uses_cfg and not (_f32(t) < self._start_f32)

    def grid(self, device=None) -> torch.Tensor:
        return timestep_grid(self.num_steps, self.timestep_shift, device=device)

    def velocity(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        t: float,
        y: Optional[torch.Tensor],
        y_null: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(Guided) velocity at host time ``t``. Runs the doubled batch [x, x] / [y, null] only where
        guidance is on; otherwise the conditional batch alone."""
        b = x.shape[0]
        if y is None or not self.guidance_on(t):
            t_b = torch.full((b,), t, dtype=torch.float32, device=x.device)
            return model_fn(x, t_b, y).to(x.dtype)
        if y_null is None:
            y_null = torch.full_like(y, self.null_class)
        t_b = torch.full((2 * b,), t, dtype=torch.float32, device=x.device)
        out = model_fn(torch.cat([x, x], dim=0), t_b, torch.cat([y, y_null], dim=0)).to(x.dtype)
        cond, uncond = out[:b], out[b:]
        return guided_velocity(cond, uncond, self.cfg_scale, self.guidance_mode)

    # ------------------------------------------------------------------ samplers
    @torch.no_grad()
    def sample(
        self, model_fn: ModelFn, z: torch.Tensor, y: Optional[torch.Tensor], generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        y_null = None if y is None else torch.full_like(y, self.null_class)
        if self.method == "euler":
            return self._euler(model_fn, z, y, y_null)
        if self.method == "heun":
            return self._heun(model_fn, z, y, y_null)
        if self.method == "dopri5":
            return self._dopri5(model_fn, z, y, y_null)
        return self._euler_maruyama(model_fn, z, y, y_null, generator)

    def _euler(self, model_fn, x, y, y_null):
        grid = self.grid()
        ts = grid.tolist()
        dts = (grid[1:] - grid[:-1]).tolist()  # float32 differences, as torchdiffeq
        for t, dt in zip(ts[:-1], dts):
            v = self.velocity(model_fn, x, t, y, y_null)
            x = x + dt * v
        return x

    def _heun(self, model_fn, x, y, y_null):
        grid = self.grid()
        dt_t = grid[1:] - grid[:-1]
        ts = grid[:-1].tolist()
        t2s = (grid[:-1] + dt_t).tolist()  # torchdiffeq heun2: t0 + dt * c2, c2 = 1
        dts = dt_t.tolist()
        for t, t2, dt in zip(ts, t2s, dts):
            k1 = self.velocity(model_fn, x, t, y, y_null)
            k2 = self.velocity(model_fn, x + dt * k1, t2, y, y_null)
            x = x + dt * (k1 * 0.5 + k2 * 0.5)
        return x

    def _dopri5(self, model_fn, x, y, y_null):
        from torchdiffeq import odeint

        def func(t, state):
            return self.velocity(model_fn, state, float(t), y, y_null)  # host read of t: unavoidable

        grid = self.grid()
        t_span = torch.stack([grid[0], grid[-1]]).to(x.device)
        return odeint(func, x, t_span, method="dopri5", atol=self.atol, rtol=self.rtol)[-1]

    def _sde_drift(self, model_fn, x, t: float, y, y_null):
        v = self.velocity(model_fn, x, t, y, y_null)
        # v + w(t) * s(x, t) with w = norm * (1 - t) and s = (t v - x) / (1 - t), simplified.
        return v + self.diffusion_norm * (t * v - x)

    def _euler_maruyama(self, model_fn, x, y, y_null, generator):
        eps = self.last_step_size
        grid = self.grid() * (1 - eps)
        ts = grid.tolist()
        dts = (grid[1:] - grid[:-1]).tolist()
        last = len(dts) - 1
        for i, (t, dt) in enumerate(zip(ts[:-1], dts)):
            if eps == 0 and i == last:  # deterministic final step onto t = 1
                return x + dt * self.velocity(model_fn, x, t, y, y_null)
            x_mean = x + self._sde_drift(model_fn, x, t, y, y_null) * dt
            var = 2.0 * self.diffusion_norm * (1.0 - t) * dt
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x_mean + (var**0.5) * noise
        # SiT last_step="Euler": one probability-flow (noise-free) step of size eps onto t = 1
        return x + eps * self.velocity(model_fn, x, ts[-1], y, y_null)

    def num_model_calls(self) -> Optional[int]:
        """Model forward calls (doubled or not) of a fixed-grid method; None for adaptive dopri5."""
        steps = self.num_steps - 1
        return {
            "euler": steps,
            "heun": 2 * steps,
            "dopri5": None,
            "euler_maruyama": steps + (1 if self.last_step_size > 0 else 0),
        }[self.method]


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def describe_sampling(s: Any) -> str:
    """One line for a sampling config (dataclass or dict): e.g. ``euler 250pt shift 0.3 cfg 6.7 (t>=0.125, 3ch)``."""
    method = _get(s, "method", "euler")
    text = f"{method}"
    if method == "dopri5":
        text += f" atol {_get(s, 'atol', 1e-6):g} rtol {_get(s, 'rtol', 1e-3):g}"
    else:
        text += f" {_get(s, 'num_steps', 250)}pt"
    shift = float(_get(s, "timestep_shift", 1.0))
    if shift != 1.0 and method != "dopri5":
        text += f" shift {shift:g}"
    scale = float(_get(s, "cfg_scale", 1.0))
    if scale > 1.0:
        start = float(_get(s, "cfg_interval_start", 0.0))
        details = ([f"t>={start:g}"] if start > 0 else []) + (
            ["3ch"] if _get(s, "guidance_mode", "official") == "official" else ["all ch"]
        )
        text += f" cfg {scale:g} ({', '.join(details)})"
    else:
        text += " no cfg"
    return text
