"""Samplers, timestep shift and interval CFG (models/sampling.py).

The analytic test case: data x1 ~ N(mu_y, diag(S^2)) per class y, noise x0 ~ N(0, I). Then
x_t ~ N(t mu, t^2 S^2 + (1-t)^2) and the exact velocity E[x1 - x0 | x_t = x] is
    v(x, t) = mu + (t S^2 - (1-t)) / (t^2 S^2 + (1-t)^2) * (x - t mu)
(Cov(x1 - x0, x_t) = t S^2 - (1 - t), Var(x_t) = t^2 S^2 + (1-t)^2). The ODE flow map is linear:
x_t = t mu + sqrt(t^2 S^2 + (1-t)^2) * z, so the exact sample from noise z is mu + S * z.
The null class (index NULL) has mu = 0, which serves as the "unconditional" model for CFG tests.
"""

import pytest
import torch
from torchdiffeq import odeint

from models.dit_config import SamplingConfig
from models.sampling import (
    OFFICIAL_GUIDED_CHANNELS,
    Sampler,
    guided_velocity,
    score_from_velocity,
    shift_timesteps,
    timestep_grid,
)

C = 4
MU = torch.tensor(
    [[1.0, -0.5, 0.3, 2.0], [-1.0, 0.7, -0.2, 0.5], [0.4, 0.4, -1.5, -0.3], [0.0, 0.0, 0.0, 0.0]]
)  # row 3 = null class
NULL = 3
S = torch.tensor([0.5, 0.8, 0.3, 1.2])


def gaussian_velocity(x, t, y):
    mu = MU[y].reshape(-1, C, 1, 1)
    s2 = (S**2).reshape(1, C, 1, 1)
    t = t.reshape(-1, 1, 1, 1)
    return mu + (t * s2 - (1 - t)) / (t * t * s2 + (1 - t) ** 2) * (x - t * mu)


def exact_sample(z, y):
    return MU[y].reshape(-1, C, 1, 1) + S.reshape(1, C, 1, 1) * z


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _noise(b, seed=0, hw=2):
    return torch.randn(b, C, hw, hw, generator=_gen(seed))


class Recorder:
    """Wraps a model_fn and records (batch size, t[0]) per call."""

    def __init__(self, fn=gaussian_velocity):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, y):
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
        self.calls.append((x.shape[0], float(t[0])))
        return self.fn(x, t, y)


class AlwaysDoubled(Sampler):
    """Reference: always runs the doubled batch [x, x] / [y, null], then selects cond where guidance is
    off (decided like the official code: float32 tensor t < start)."""

    def velocity(self, model_fn, x, t, y, y_null=None):
        b = x.shape[0]
        t_b = torch.full((2 * b,), t, dtype=torch.float32)
        out = model_fn(torch.cat([x, x]), t_b, torch.cat([y, torch.full_like(y, self.null_class)]))
        cond, uncond = out[:b], out[b:]
        if self.cfg_scale == 1.0 or bool(t_b[0] < self.cfg_interval_start):
            return cond
        return guided_velocity(cond, uncond, self.cfg_scale, self.guidance_mode)


def official_cfg_func(model, y2, cfg_scale, cfg_interval_start):
    """The released sampling construction: an odeint drift on the doubled state with 3-channel CFG
    (forward_with_cfg semantics: run the first half twice, guide eps = channels 0..2 only, the
    rest of the channels come straight from the batched forward)."""

    def fn(t, x2):
        t_b = torch.ones(x2.shape[0]) * t
        half = x2[: len(x2) // 2]
        out = model(torch.cat([half, half], dim=0), t_b, y2)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        if t_b[0] < cfg_interval_start:
            half_eps = cond_eps
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    return fn


def official_grid(num_steps, shift):
    """The released grid code: per-element shift of a float32 linspace."""
    lin = torch.linspace(0, 1, num_steps)
    return torch.stack([shift * tn / (1 + (shift - 1) * tn) for tn in lin])


# --------------------------------------------------------------------------- grid and shift


def test_shift_and_grid():
    assert shift_timesteps(0.5, 0.3) == pytest.approx(0.15 / 0.65)
    lin = torch.linspace(0, 1, 50)
    assert torch.equal(timestep_grid(50, 1.0), lin)  # shift 1 = identity
    g = timestep_grid(250, 0.3)
    assert g.dtype == torch.float32 and g.shape == (250,)
    assert float(g[0]) == 0.0 and float(g[-1]) == 1.0
    assert bool((g[1:] > g[:-1]).all())
    dt = g[1:] - g[:-1]
    assert float(dt[0]) == pytest.approx(0.0012, abs=5e-5) and float(dt[-1]) == pytest.approx(0.0133, abs=5e-5)
    assert torch.equal(g, official_grid(250, 0.3))  # bit-identical to the released code
    torch.testing.assert_close(
        shift_timesteps(g, 1 / 0.3), torch.linspace(0, 1, 250), atol=1e-6, rtol=0
    )  # s and 1/s are inverse maps
    with pytest.raises(ValueError):
        timestep_grid(1)


def test_from_config_and_validation():
    s = Sampler.from_config(SamplingConfig(), null_class=1000)
    assert (
        s.method,
        s.num_steps,
        s.timestep_shift,
        s.cfg_scale,
        s.cfg_interval_start,
        s.guidance_mode,
        s.null_class,
        s.atol,
        s.rtol,
    ) == ("euler", 250, 0.3, 6.7, 0.125, "official", 1000, 1e-6, 1e-3)
    assert s.num_model_calls() == 249
    with pytest.raises(ValueError):
        Sampler("rk45")
    with pytest.raises(ValueError):
        Sampler(guidance_mode="some")


# --------------------------------------------------------------------------- CFG interval / skipping


@pytest.mark.parametrize("start,unguided", [(0.125, 81), (0.10, 68), (0.11, 73)])
def test_cfg_interval_switch_count_on_shifted_grid(start, unguided):
    b = 2
    rec = Recorder()
    Sampler("euler", 250, 0.3, cfg_scale=6.7, cfg_interval_start=start, null_class=NULL).sample(
        rec, _noise(b, hw=1), torch.tensor([0, 1])
    )
    assert len(rec.calls) == 249
    single = [t for n, t in rec.calls if n == b]
    double = [t for n, t in rec.calls if n == 2 * b]
    assert len(single) == unguided and len(double) == 249 - unguided
    # the switch is exactly at the start value: every cond-only call is before it, every guided one after
    assert max(single) < start <= min(double)
    assert rec.calls[:unguided] == [(b, t) for t in single]  # contiguous prefix


def test_cfg_scale_one_runs_cond_only():
    rec = Recorder()
    Sampler("heun", 20, 0.3, cfg_scale=1.0, cfg_interval_start=0.0, null_class=NULL).sample(
        rec, _noise(2), torch.tensor([0, 2])
    )
    assert len(rec.calls) == 38 and all(n == 2 for n, _ in rec.calls)


@pytest.mark.parametrize("method", ["euler", "heun", "dopri5", "euler_maruyama"])
@pytest.mark.parametrize("mode", ["official", "all"])
def test_skipped_uncond_pass_is_bit_identical(method, mode):
    z, y = _noise(3), torch.tensor([0, 1, 2])
    kw = dict(
        method=method,
        num_steps=40,
        timestep_shift=0.3,
        cfg_scale=4.0,
        cfg_interval_start=0.125,
        guidance_mode=mode,
        null_class=NULL,
        atol=1e-6,
        rtol=1e-4,
    )
    rec = Recorder()
    ours = Sampler(**kw).sample(rec, z, y, generator=_gen(11))
    ref = AlwaysDoubled(**kw).sample(gaussian_velocity, z, y, generator=_gen(11))
    assert torch.equal(ours, ref)
    assert any(n == 3 for n, _ in rec.calls) and any(n == 6 for n, _ in rec.calls)


def test_euler_official_mode_equals_torchdiffeq_on_doubled_batch():
    b = 3
    z, y = _noise(b, seed=4), torch.tensor([2, 0, 1])
    scale, start = 6.7, 0.125
    ours = Sampler(
        "euler", 250, 0.3, cfg_scale=scale, cfg_interval_start=start, guidance_mode="official", null_class=NULL
    ).sample(gaussian_velocity, z, y)
    y2 = torch.cat([y, torch.full_like(y, NULL)])
    off = odeint(
        official_cfg_func(gaussian_velocity, y2, scale, start),
        torch.cat([z, z]),
        official_grid(250, 0.3),
        method="euler",
    )[-1][:b]
    torch.testing.assert_close(ours, off, atol=1e-6, rtol=0)
    assert torch.equal(ours, off)  # in fact bit-identical


def test_heun_equals_torchdiffeq_heun2():
    z, y = _noise(3, seed=5), torch.tensor([0, 1, 2])
    kw = dict(
        num_steps=30, timestep_shift=0.3, cfg_scale=3.0, cfg_interval_start=0.2, guidance_mode="all", null_class=NULL
    )
    ours = Sampler("heun", **kw).sample(gaussian_velocity, z, y)
    ref = AlwaysDoubled("heun", **kw)
    func = lambda t, x: ref.velocity(gaussian_velocity, x, float(t), y)  # noqa: E731
    theirs = odeint(func, z, timestep_grid(30, 0.3), method="heun2")[-1]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- guided channels


def test_guided_velocity_channels():
    cond = torch.randn(2, 8, 2, 2, generator=_gen(1))
    uncond = torch.randn(2, 8, 2, 2, generator=_gen(2))
    k = OFFICIAL_GUIDED_CHANNELS
    full = uncond + 5.0 * (cond - uncond)
    off = guided_velocity(cond, uncond, 5.0, "official")
    assert torch.equal(off[:, k:], cond[:, k:])
    assert torch.equal(off[:, :k], full[:, :k])
    assert torch.equal(guided_velocity(cond, uncond, 5.0, "all"), full)
    torch.testing.assert_close(guided_velocity(cond, uncond, 1.0, "all"), cond)


@pytest.mark.parametrize("mode,changed", [("official", [True, True, True, False]), ("all", [True] * 4)])
def test_sampler_guidance_touches_expected_channels(mode, changed):
    # the analytic velocity is per channel, so unguided channels follow exactly the cond-only flow
    z, y = _noise(3, seed=6), torch.tensor([0, 1, 2])
    base = Sampler("euler", 30, 0.3, cfg_scale=1.0).sample(gaussian_velocity, z, y)
    guided = Sampler(
        "euler", 30, 0.3, cfg_scale=4.0, cfg_interval_start=0.1, guidance_mode=mode, null_class=NULL
    ).sample(gaussian_velocity, z, y)
    diff = [not torch.equal(base[:, c], guided[:, c]) for c in range(C)]
    assert diff == changed


# --------------------------------------------------------------------------- convergence on the analytic case


def _err(method, n, shift, z, y):
    out = Sampler(method, n, shift, cfg_scale=1.0).sample(gaussian_velocity, z, y)
    return (out - exact_sample(z, y)).abs().max().item()


@pytest.mark.parametrize("shift", [1.0, 0.3])
def test_euler_heun_convergence_orders(shift):
    z, y = _noise(3, seed=7), torch.tensor([0, 1, 2])
    ns = [9, 17, 33, 65]
    e_euler = [_err("euler", n, shift, z, y) for n in ns]
    e_heun = [_err("heun", n, shift, z, y) for n in ns]
    for e in (e_euler, e_heun):
        assert all(a > b for a, b in zip(e, e[1:]))
    r_euler = [a / b for a, b in zip(e_euler, e_euler[1:])]
    r_heun = [a / b for a, b in zip(e_heun, e_heun[1:])]
    assert all(1.8 < r < 2.2 for r in r_euler), r_euler  # first order
    assert all(3.0 < r < 5.0 for r in r_heun), r_heun  # second order
    # Heun beats Euler even at equal model calls (Heun n points = Euler 2n-1 points)
    for n, eh in zip(ns, e_heun):
        assert eh < _err("euler", 2 * n - 1, shift, z, y)
    assert e_heun[-1] < 2e-3 and e_heun[-1] < e_euler[-1] / 20


def test_dopri5_converges_with_tolerance():
    z, y = _noise(3, seed=8), torch.tensor([0, 1, 2])
    errs = []
    for rtol in (1e-3, 1e-5, 1e-7):
        out = Sampler("dopri5", 250, 0.3, atol=rtol * 1e-3, rtol=rtol).sample(gaussian_velocity, z, y)
        errs.append((out - exact_sample(z, y)).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[1] < 1e-4 and errs[2] < 1e-5, errs


def test_dopri5_full_grid_output_times_equal_endpoints():
    # the official code asks odeint for all grid points; the adaptive steps do not depend on them
    z, y = _noise(2, seed=9), torch.tensor([0, 2])
    ours = Sampler("dopri5", 250, 0.3).sample(gaussian_velocity, z, y)
    f = lambda t, x: gaussian_velocity(x, torch.full((2,), float(t)), y)  # noqa: E731
    full = odeint(f, z, timestep_grid(250, 0.3), method="dopri5", atol=1e-6, rtol=1e-3)[-1]
    assert torch.equal(ours, full)


def test_euler_maruyama_moments():
    n = 2000
    z = torch.randn(n, C, 4, 4, generator=_gen(10))
    y = torch.randint(0, 3, (n,), generator=_gen(11))
    s = Sampler("euler_maruyama", 250, 0.3, cfg_scale=1.0)
    assert s.num_model_calls() == 250
    out = s.sample(gaussian_velocity, z, y, generator=_gen(12))
    r = (out - MU[y].reshape(-1, C, 1, 1)) / S.reshape(1, C, 1, 1)  # should be N(0, 1) per channel
    mean, std = r.mean(dim=(0, 2, 3)), r.std(dim=(0, 2, 3))
    # Monte-Carlo std error ~ 1/sqrt(32000) = 0.006; EM discretisation bias at 250 steps < 0.02
    assert mean.abs().max() < 0.03, mean
    assert (std - 1).abs().max() < 0.03, std
    # it is stochastic: the result differs from the deterministic flow map and across seeds
    assert (out - exact_sample(z, y)).abs().mean() > 0.05
    out2 = s.sample(gaussian_velocity, z, y, generator=_gen(13))
    assert not torch.equal(out, out2)
    assert torch.equal(out, s.sample(gaussian_velocity, z, y, generator=_gen(12)))


def test_score_from_velocity_matches_gaussian_score():
    # for x_t ~ N(t mu, var_t) the score is -(x - t mu) / var_t
    x = _noise(2, seed=3)
    y = torch.tensor([0, 1])
    for t in (0.0, 0.3, 0.9):
        v = gaussian_velocity(x, torch.full((2,), t), y)
        mu = MU[y].reshape(-1, C, 1, 1)
        var = t * t * (S**2).reshape(1, C, 1, 1) + (1 - t) ** 2
        torch.testing.assert_close(score_from_velocity(v, x, t), -(x - t * mu) / var, atol=1e-5, rtol=1e-5)
