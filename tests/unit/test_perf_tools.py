"""Performance tools: the sampling / extraction benchmarks run tiny on CPU and print their tables, the fast sampler
agrees with the reference sampler, the sampling FLOP count matches FlopCounterMode over a real sampling run, and
the scaling model's tables (its collective volumes against a REAL 2-rank gloo step, bench_train's launch and the
compiled VA-VAE: tests/integration/test_perf_tools_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tools import scaling_model  # light: the spawned ranks of the collective test import this file too


def _imports():
    """The benchmark modules, imported lazily so that the 2-rank workers (which import this file) start fast."""
    from models.dit_config import SamplingConfig
    from models.fast_sampling import FastEulerSampler, euler_plan, forward_images
    from models.sampling import Sampler
    from tools import bench_extract, bench_sample

    return bench_extract, bench_sample, SamplingConfig, FastEulerSampler, euler_plan, forward_images, Sampler


# Few steps keep the CPU runs short; the interval start is chosen so that both step kinds occur.
STEPS = ["--num-steps", "10", "--cfg-interval-start", "0.3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _table(out: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in out.splitlines() if " | " in ln]
    header = [h.strip() for h in lines[0].split("|")]
    return header, [[c.strip() for c in ln.split("|")] for ln in lines[1:]]


def _tiny(seed=0):
    bench_sample = _imports()[1]
    return bench_sample.build_random_model(bench_sample.TINY, torch.device("cpu"), seed)


# ------------------------------------------------------------------------------------------------ sampling
def test_bench_sample_table_and_compiled_agrees_with_eager(capsys):
    bench_sample = _imports()[1]
    rc = bench_sample.main([*STEPS, "--batch", "2", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    header, rows = _table(out)
    assert header == [
        "mode",
        "precision",
        "batch",
        "img/s",
        "s/batch",
        "NFE/img",
        "fwd/img",
        "GFLOP/img",
        "MFU",
        "peak mem GiB",
        "max diff",
        "rel diff",
        "ok",
    ]
    assert [(r[0], r[1]) for r in rows] == [("eager", "fp32"), ("compiled", "fp32")]
    for r in rows:
        assert float(r[3]) > 0 and r[5] == "9" and float(r[7]) > 0 and r[12] == "yes"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 difference of ``a`` to ``b`` (as tools/bench_sample.py reports it)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_fast_eager_path_is_bitwise_the_reference():
    """fp32: bitwise. bf16 autocast: the two paths batch and order their bf16 kernels differently, and the bf16 CPU
    kernels round differently per CPU family (AVX2 vs AVX-512 BF16), so the fast path must be no further from the
    reference bf16 samples than bf16 itself is from fp32 (tools/bench_sample.py's bf16 floor)."""
    _, _, SamplingConfig, FastEulerSampler, euler_plan, _, Sampler = _imports()
    model = _tiny()
    sampler = Sampler.from_config(SamplingConfig(num_steps=6, cfg_interval_start=0.3), null_class=10)
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(2, 4, 16, 16, generator=g), torch.randint(0, 10, (2,), generator=g)
    plan = euler_plan(sampler)
    assert any(gd for *_, gd in plan) and not all(gd for *_, gd in plan)
    fp32 = sampler.sample(model, z, y)
    assert torch.equal(FastEulerSampler(sampler, model).sample(z, y), fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = sampler.sample(model, z, y)
    fast = FastEulerSampler(sampler, model, autocast_dtype=torch.bfloat16).sample(z, y)
    floor = _rel(ref, fp32)  # the error bf16 itself makes
    assert 0 < floor < 0.1, floor  # bf16 did run, and stays near fp32
    assert _rel(fast, ref) <= floor, (_rel(fast, ref), floor)
    # cfg_scale <= 1: guidance off, every step runs the conditional batch only
    plain = Sampler.from_config(SamplingConfig(num_steps=4, cfg_scale=1.0), null_class=10)
    assert not any(gd for *_, gd in euler_plan(plain))
    assert torch.equal(FastEulerSampler(plain, model).sample(z, y), plain.sample(model, z, y))


def test_sampling_flops_match_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    _, bench_sample, SamplingConfig, _, _, forward_images, Sampler = _imports()
    model = _tiny()
    sampler = Sampler.from_config(SamplingConfig(num_steps=10, cfg_interval_start=0.3), null_class=10)
    n_calls, n_fwd, flops = bench_sample.sampling_flops_per_image(model, sampler)
    assert n_calls == 9 and n_calls < n_fwd < 2 * n_calls
    # the paper's 800-epoch settings: 81 of 249 steps unguided
    paper = Sampler.from_config(SamplingConfig(), null_class=1000)
    assert forward_images(paper) == 81 + 2 * 168
    batch = 3
    z, y = torch.randn(batch, 4, 16, 16), torch.randint(0, 10, (batch,))
    # The math SDPA backend decomposes attention into matmuls, which FlopCounterMode counts on every device
    # (it has no formula for the CPU flash kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        sampler.sample(model, z, y)
    measured = counter.get_total_flops() / batch
    assert abs(measured - flops) / measured < 0.02, (measured, flops)


# ------------------------------------------------------------------------------------------------ extraction
def test_bench_extract_table_with_counted_flops(capsys):
    bench_extract = _imports()[0]
    rc = bench_extract.main(["--batch", "2", "--repeats", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    header, rows = _table(out)
    assert header[:8] == ["what", "mode", "precision", "batch", "img/s", "ms/batch", "tok GFLOP/img", "dino GFLOP/img"]
    assert rows[0][:4] == ["network", "eager", "fp32", "2"]
    assert float(rows[0][4]) > 0
    assert float(rows[0][6]) > 0 and float(rows[0][7]) > 0  # the tiny VA-VAE's and ViT's FLOPs were counted


# ------------------------------------------------------------------------------------------------ scaling model
def test_scaling_model_table_and_recommendation(capsys):
    rc = scaling_model.main(["--nodes", "1", "8", "64"])
    out = capsys.readouterr().out
    assert rc == 0
    assert sum(ln.startswith("recommended ") for ln in out.splitlines()) == 6
    rows, best = scaling_model.run(scaling_model.parse_args(["--models", "LightningDiT-XL/1", "--nodes", "1", "8"]))
    by = {(r.nodes, r.strategy): r for r in rows}
    # sharding lowers memory; the DDP baseline at 128/GPU needs accumulation (the official step OOMs at 128)
    assert by[(1, "FSDP2-full")].mem_gib < by[(1, "ZeRO-1")].mem_gib
    assert by[(1, "DDP")].micro < 128 and by[(1, "FSDP2-full")].micro == 128
    assert by[(8, "FSDP2-HSDP")].per_gpu == 16 and best[("LightningDiT-XL/1", 8)].fits
    # the ring cost model as stated in docs/scaling.md: intra-node all-gather of 1.6 GB on 8 GPUs
    cl = scaling_model.Cluster()
    t = scaling_model.collective_time("all_gather", 1.6e9, scaling_model.Group(8, 1), cl)
    assert t == pytest.approx((8.4 + 7 * 3.4) * 1e-6 + 7 / 8 * 1.6e9 / 160e9)


# ------------------------------------------------------------------------------------------------ VA-VAE training
# The tiny VA-VAE at 16 px (PatchGAN with 2 layers: 3 need more than 16 px); every loss term is on (late step).
TINY_VAVAE = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_vavae.yaml")
VAVAE_SMALL = [
    "data.image_size=16",
    "vavae.model.resolution=16",
    "vavae.model.attn_resolutions=[8]",
    "vavae.disc.n_layers=2",
]


def _vavae_task(overrides=()):
    from types import SimpleNamespace

    from launchers.experiment import load_config
    from models.tasks.vavae import VAVAETask

    cfg = load_config(TINY_VAVAE, VAVAE_SMALL + list(overrides))
    torch.manual_seed(cfg.seed)
    return cfg, VAVAETask(cfg, SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")))


def test_flop_counter_counts_through_autograd_grad_on_a_module_input():
    """bench_train's counter = FlopCounterMode without module tracking (whose hooks fail when autograd.grad is taken
    w.r.t. a leaf module input, as the VA-VAE generator term does): checked against a hand count of one conv."""
    from tools.bench_train import flop_counter

    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with flop_counter() as counter:
        (gx,) = torch.autograd.grad(conv(x).square().sum(), x)
    fwd = 2 * 2 * 5 * 3 * 9 * 8 * 8  # 2 FLOPs per multiply-add, B x Cout x Cin x k^2 x H x W
    assert counter.get_total_flops() == 2 * fwd  # forward + the input gradient (no weight gradient asked)
