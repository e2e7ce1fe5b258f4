"""Linear flow-matching path, MSE + cosine loss, timestep samplers (models/transport.py)."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from models.dit_config import TimestepPhase, TransportConfig
from models.transport import (
    Transport,
    cosine_loss_per_sample,
    interpolate,
    mse_per_sample,
    sample_timesteps,
    sample_timesteps_for_phase,
    velocity_target,
)


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# --------------------------------------------------------------------------- losses, hand computed


def test_cosine_loss_orthogonal_parallel_antiparallel_zero():
    # shape (B=1, C=2, H=1, W=4): one 2-vector per spatial position
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 4)
    targ = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-2.0, -4.0], [3.0, 1.0]]).T.reshape(1, 2, 1, 4)
    # 1 - cos: orthogonal 1, parallel 0, anti-parallel 2, zero vector (cos = 0 through eps) 1
    per_pos = 1 - torch.nn.functional.cosine_similarity(pred, targ, dim=1)
    torch.testing.assert_close(per_pos, torch.tensor([[[1.0, 0.0, 2.0, 1.0]]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cosine_loss_per_sample(pred, targ), torch.tensor([1.0]), atol=1e-6, rtol=0)


def test_mse_known_value_and_per_sample():
    pred = torch.zeros(2, 3, 2, 2)
    targ = torch.zeros(2, 3, 2, 2)
    targ[0] = 2.0  # every element off by 2 -> 4
    targ[1, 0, 0, 0] = 6.0  # one of 12 elements off by 6 -> 36 / 12 = 3
    torch.testing.assert_close(mse_per_sample(pred, targ), torch.tensor([4.0, 3.0]))


def test_interpolate_and_target():
    x0 = torch.full((2, 1, 1, 1), -2.0)
    x1 = torch.full((2, 1, 1, 1), 2.0)
    t = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(interpolate(x0, x1, t).flatten(), torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(interpolate(x0, x1, torch.zeros(2)), x0)  # t = 0: noise
    torch.testing.assert_close(interpolate(x0, x1, torch.ones(2)), x1)  # t = 1: data
    torch.testing.assert_close(velocity_target(x0, x1), torch.full((2, 1, 1, 1), 4.0))


def _shift_model(x, t, y):
    """v_hat = x_t + y (per-sample offset); records what it saw."""
    _shift_model.seen = (x.clone(), t.clone())
    return x + y.to(x.dtype).reshape(-1, 1, 1, 1)


def test_training_losses_exact_with_explicit_noise_and_t():
    x1 = torch.full((2, 4, 2, 2), 2.0)
    x0 = torch.full((2, 4, 2, 2), -2.0)
    t = torch.tensor([0.5, 0.25])
    y = torch.tensor([1, -3])
    terms = Transport(use_cosine_loss=True).training_losses(_shift_model, x1, {"y": y}, t=t, noise=x0)
    # x_t = 4t - 2 = [0, -1]; u = 4; v_hat = [1, -4]; mse = [(1-4)^2, (-4-4)^2] = [9, 64]
    # v_hat parallel to u for sample 0 (cos 1 -> 0), anti-parallel for sample 1 (cos -1 -> 2)
    torch.testing.assert_close(terms["mse"], torch.tensor([9.0, 64.0]))
    torch.testing.assert_close(terms["cos"], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(terms["loss"], torch.tensor([9.0, 66.0]), atol=1e-6, rtol=0)
    seen_x, seen_t = _shift_model.seen
    torch.testing.assert_close(seen_x[:, 0, 0, 0], torch.tensor([0.0, -1.0]))
    assert seen_t.dtype == torch.float32 and torch.equal(seen_t, t)

    no_cos = Transport(use_cosine_loss=False).training_losses(_shift_model, x1, {"y": y}, t=t, noise=x0)
    torch.testing.assert_close(no_cos["loss"], no_cos["mse"])
    torch.testing.assert_close(no_cos["cos"], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)  # still logged


def test_training_losses_gradient_flows_and_from_config():
    tr = Transport.from_config(TransportConfig())
    assert tr.use_cosine_loss
    w = torch.tensor(0.5, requires_grad=True)
    x1 = torch.randn(3, 4, 2, 2, generator=_gen(0))
    terms = tr.training_losses(lambda x, t, y: w * x, x1, {"y": torch.zeros(3)}, generator=_gen(1))
    terms["loss"].mean().backward()
    assert w.grad is not None and torch.isfinite(w.grad)


def test_training_losses_draws_t_then_noise_from_generator():
    x1 = torch.randn(5, 4, 2, 2, generator=_gen(0))
    phase = TimestepPhase("lognorm", mean=0.3, std=0.8)
    a = Transport().training_losses(_shift_model, x1, {"y": torch.zeros(5)}, phase=phase, generator=_gen(7))
    b = Transport().training_losses(_shift_model, x1, {"y": torch.zeros(5)}, phase=phase, generator=_gen(7))
    for k in ("loss", "mse", "cos", "t"):
        assert torch.equal(a[k], b[k])
    g = _gen(7)
    t_ref = sample_timesteps_for_phase(5, phase, generator=g)
    noise_ref = torch.randn(x1.shape, generator=g)
    assert torch.equal(a["t"], t_ref)
    xt_ref = interpolate(noise_ref, x1, t_ref)
    torch.testing.assert_close(_shift_model.seen[0], xt_ref, atol=0, rtol=0)
    c = Transport().training_losses(_shift_model, x1, {"y": torch.zeros(5)}, phase=phase, generator=_gen(8))
    assert not torch.equal(a["t"], c["t"])
    # default phase: logit-normal(0, 1)
    d = Transport().training_losses(_shift_model, x1, {"y": torch.zeros(5)}, generator=_gen(7))
    assert torch.equal(d["t"], sample_timesteps(5, "lognorm", generator=_gen(7)))


# --------------------------------------------------------------------------- timestep distributions


def _logitnorm_cdf(mean, std):
    def cdf(t):
        return stats.norm.cdf((special.logit(np.asarray(t, dtype=np.float64)) - mean) / std)

    return cdf


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.7)])
def test_lognorm_matches_logit_normal_cdf(mean, std):
    t = sample_timesteps(20000, "lognorm", mean=mean, std=std, generator=_gen(123))
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert float(t.min()) > 0 and float(t.max()) < 1
    assert stats.kstest(t.double().numpy(), _logitnorm_cdf(mean, std)).pvalue > 0.01
    # the test has power: the same draws are clearly not uniform / not another logit-normal
    assert stats.kstest(t.double().numpy(), "uniform").pvalue < 1e-6
    assert stats.kstest(t.double().numpy(), _logitnorm_cdf(mean + 0.2, std)).pvalue < 1e-6


def test_uniform_matches_uniform_cdf():
    t = sample_timesteps(20000, "uniform", generator=_gen(321))
    assert float(t.min()) >= 0 and float(t.max()) < 1
    assert stats.kstest(t.double().numpy(), "uniform").pvalue > 0.01
    assert stats.kstest(t.double().numpy(), _logitnorm_cdf(0.0, 1.0)).pvalue < 1e-6


@pytest.mark.parametrize("kind", ["lognorm", "uniform"])
def test_seeded_draws_reproducible_and_seed_dependent(kind):
    a = sample_timesteps(64, kind, generator=_gen(5))
    b = sample_timesteps(64, kind, generator=_gen(5))
    c = sample_timesteps(64, kind, generator=_gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a generator continues its stream: two halves == one draw of twice the size
    g = _gen(5)
    halves = torch.cat([sample_timesteps(32, kind, generator=g), sample_timesteps(32, kind, generator=g)])
    assert torch.equal(halves, a)


def test_phase_helper_and_errors():
    ph = TimestepPhase("uniform", until_epoch=None)
    assert torch.equal(sample_timesteps_for_phase(10, ph, _gen(1)), sample_timesteps(10, "uniform", generator=_gen(1)))
    ph = TimestepPhase("lognorm", mean=-0.4, std=2.0)
    assert torch.equal(
        sample_timesteps_for_phase(10, ph, _gen(1)),
        sample_timesteps(10, "lognorm", mean=-0.4, std=2.0, generator=_gen(1)),
    )
    with pytest.raises(ValueError):
        sample_timesteps(4, "beta")
    with pytest.raises(ValueError):
        sample_timesteps(4, "lognorm", std=0.0)
    # lognorm(0, 1) median is 0.5
    assert math.isclose(float(sample_timesteps(20001, "lognorm", generator=_gen(2)).median()), 0.5, abs_tol=0.02)
