"""Sampling throughput benchmark: img/s of the Euler + CFG-interval sampler, eager vs compiled vs CUDA graphs.

    python tools/bench_sample.py                                  # tiny model on CPU (seconds)
    python tools/bench_sample.py --model LightningDiT-XL/1 --batch 256 --precision bf16 fp32 \\
        --modes eager compiled graphs compiled+graphs reduce-overhead

The sampler is the paper's (the ``sampling:`` section: 250 grid points = 249 Euler steps, CFG 6.7 on channels
0-2 while t >= 0.125, timestep shift 0.3); ``--config`` reads that section from a YAML file and the flags
override single settings. Every mode runs the same model (random weights: speed does not depend on them) on
the same noise and labels:

* ``eager``: the reference ``models.sampling.Sampler.sample`` (under ``torch.autocast`` for bf16);
* ``compiled``: ``models.fast_sampling.FastEulerSampler(compile=True)`` (model + guidance + update compiled
  as one graph per batch shape);
* ``graphs`` / ``compiled+graphs`` (CUDA): the same with both step functions captured as CUDA graphs;
* ``reduce-overhead`` (CUDA): ``torch.compile(mode="reduce-overhead")`` (Inductor's CUDA graph trees).

Method: ``--warmup`` untimed sample calls first (compilation and graph capture happen there), then
``--repeats`` timed calls between ``torch.cuda.synchronize()``; img/s = batch * repeats / time.
NFE/img = model calls per image (249); fwd/img = forward passes per image (a guided step runs the doubled
batch: 81 + 2 * 168 = 417 for the paper settings); GFLOP/img = ``flops_per_image(training=False)`` * fwd/img
(matmul + attention FLOPs, 2 per MAC, checked against ``FlopCounterMode`` in tests/unit/test_perf_tools.py);
MFU = img/s * FLOP/img / ``core.metrics.peak_flops`` (vendor dense bf16 peak; fp32 rows use the same
denominator). ``max diff`` / ``rel diff`` = max-abs and relative-L2 difference of the samples to the eager samples
of the same precision; ``ok`` compares ``rel diff`` with the precision's tolerance (fp32 1e-4, bf16 1e-2; a bf16
row also passes when it is no further from eager bf16 than eager bf16 is from eager fp32, printed as ``eager
bf16 vs fp32`` when both precisions were run); the exit status is 1 if any check fails. ``--checkpoint`` loads
trained (EMA) weights instead of random ones.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from core.metrics import bench_threads, format_table, peak_flops
from launchers.experiment import load_config
from models.dit_config import SamplingConfig
from models.fast_sampling import FastEulerSampler, forward_images, nfe
from models.lightningdit import ModelConfig, build_model
from models.sampling import Sampler

TINY = ModelConfig(
    type="custom", hidden_size=64, depth=2, num_heads=4, patch_size=2, in_channels=4, input_size=16, num_classes=10
)
MODES = ("eager", "compiled", "graphs", "compiled+graphs", "reduce-overhead")
CUDA_ONLY = ("graphs", "compiled+graphs", "reduce-overhead")
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}  # relative L2 difference of the final samples


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' or a registry name such as LightningDiT-XL/1")
    p.add_argument(
        "--config",
        default=None,
        help="YAML config whose sampling: section is used (default: the "
        "schema defaults = the paper's 800-epoch settings)",
    )
    p.add_argument("--num-steps", type=int, default=None, help="grid points (250 = 249 Euler steps)")
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--cfg-interval-start", type=float, default=None)
    p.add_argument("--timestep-shift", type=float, default=None)
    p.add_argument("--guidance-mode", default=None, choices=["official", "all"])
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="images per sample call")
    p.add_argument(
        "--modes",
        nargs="+",
        default=None,
        choices=MODES,
        help="default: eager compiled (+ graphs compiled+graphs on CUDA)",
    )
    p.add_argument(
        "--precision", nargs="+", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU to keep the smoke run in seconds)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed sample calls first (compile/capture)")
    p.add_argument("--repeats", type=int, default=1, help="timed sample calls")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="load these weights (EMA; models.loading.load_into_model) instead of random ones: speed is the "
        "same, the numerics check is then on a trained model's trajectories",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default on CPU: 1; tiny models are dominated by per-op overhead and "
        "extra threads only add synchronisation, badly so on a shared machine)",
    )
    return p.parse_args(argv)


def sampling_config(args) -> SamplingConfig:
    cfg = load_config(args.config).sampling if args.config else SamplingConfig()
    pairs = {
        "num_steps": args.num_steps,
        "cfg_scale": args.cfg_scale,
        "cfg_interval_start": args.cfg_interval_start,
        "timestep_shift": args.timestep_shift,
        "guidance_mode": args.guidance_mode,
    }
    cfg = replace(cfg, **{k: v for k, v in pairs.items() if v is not None})
    if cfg.method != "euler":
        raise SystemExit(f"bench_sample measures the Euler sampler; the config says method={cfg.method!r}")
    return cfg


def build_random_model(
    model_cfg: ModelConfig, device: torch.device, seed: int, checkpoint: str | None = None
) -> torch.nn.Module:
    """The model with random weights, including the zero-initialised adaLN / final layers (so the velocity is
    not identically zero and the sample comparison means something), or the EMA weights of ``checkpoint``."""
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    if checkpoint:
        from models.loading import load_into_model  # lazy: checkpoint loading (DCP, ~0.2 s) only with --checkpoint

        load_into_model(model, checkpoint, which="ema")
    else:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn_like(p))
    return model.to(device).eval()


def sampling_flops_per_image(model, sampler: Sampler, labels: bool = True) -> tuple[int, int, int]:
    """(NFE per image, forward passes per image, FLOPs per image) of one Euler sample."""
    fwd = forward_images(sampler, labels)
    return nfe(sampler), fwd, model.flops_per_image(training=False) * fwd


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_sampler_fn(mode: str, sampler: Sampler, model, precision: str, device: torch.device, backend: str):
    """A callable (z, y) -> samples for one benchmark mode."""
    dtype = torch.bfloat16 if precision == "bf16" else None
    if mode == "eager":

        def run(z, y):
            if dtype is None:
                return sampler.sample(model, z, y)
            with torch.autocast(device_type=device.type, dtype=dtype):
                return sampler.sample(model, z, y)

        return run
    if mode in CUDA_ONLY and device.type != "cuda":
        raise ValueError(f"mode {mode!r} needs CUDA")
    fast = FastEulerSampler(
        sampler,
        model,
        compile=mode in ("compiled", "compiled+graphs", "reduce-overhead"),
        compile_mode="reduce-overhead" if mode == "reduce-overhead" else None,
        compile_backend=backend,
        cuda_graphs=mode in ("graphs", "compiled+graphs"),
        autocast_dtype=dtype,
    )
    return fast.sample


def bench_one(mode, precision, batch, model, sampler, device, args, backend, flops, refs) -> dict:
    g = torch.Generator(device="cpu").manual_seed(args.seed + batch)
    z = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    torch._dynamo.reset()
    run = make_sampler_fn(mode, sampler, model, precision, device, backend)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out = None
    for _ in range(args.warmup):
        out = run(z, y)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        out = run(z, y)
    _sync(device)
    elapsed = time.perf_counter() - t0
    n_calls, n_fwd, flop = flops
    img_s = batch * args.repeats / elapsed
    peak = peak_flops(device)
    row = {
        "mode": mode,
        "precision": precision,
        "batch": batch,
        "img/s": img_s,
        "s/batch": elapsed / args.repeats,
        "NFE/img": n_calls,
        "fwd/img": n_fwd,
        "GFLOP/img": flop / 1e9,
        "MFU": (img_s * flop / peak) if peak else float("nan"),
        "peak mem GiB": (torch.cuda.max_memory_allocated(device) / 2**30) if cuda else float("nan"),
    }
    key = (precision, batch)
    out = out.float()
    if mode == "eager":
        refs[key] = out
    ref = refs.get(key)
    if ref is None:  # eager not among the modes: compute the reference untimed
        ref = make_sampler_fn("eager", sampler, model, precision, device, backend)(z, y).float()
        refs[key] = ref
    diff = out - ref
    rel = (diff.norm() / ref.norm().clamp_min(1e-12)).item()
    row["max diff"] = diff.abs().max().item()
    row["rel diff"] = rel
    row["ok"] = "yes" if rel <= TOLERANCE[precision] else "NO"  # revisited in _run with the bf16 floor
    return row


def bf16_floor(refs: dict, batch: int) -> float | None:
    """Relative difference of the eager bf16 samples to the eager fp32 samples (the error bf16 itself makes)."""
    if ("bf16", batch) not in refs or ("fp32", batch) not in refs:
        return None
    d = refs[("bf16", batch)] - refs[("fp32", batch)]
    return (d.norm() / refs[("fp32", batch)].norm().clamp_min(1e-12)).item()


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with bench_threads(device, args.threads):
        return _run(args, device)


def _run(args, device: torch.device) -> int:
    cuda = device.type == "cuda"
    precisions = args.precision or (["bf16"] if cuda else ["fp32"])
    modes = args.modes or (["eager", "compiled", "graphs", "compiled+graphs"] if cuda else ["eager", "compiled"])
    modes = sorted(modes, key=lambda m: m != "eager")  # eager first: it is the reference
    backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    scfg = sampling_config(args)
    model_cfg = TINY if args.model == "tiny" else replace(ModelConfig(), type=args.model)
    model = build_random_model(model_cfg, device, args.seed, args.checkpoint)
    sampler = Sampler.from_config(scfg, null_class=model_cfg.num_classes)
    flops = sampling_flops_per_image(model, sampler)
    refs: dict = {}
    rows = [
        bench_one(m, p, b, model, sampler, device, args, backend, flops, refs)
        for b in args.batch
        for p in precisions
        for m in modes
    ]
    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(
        f"model {args.model}, device {dev_name}, torch {torch.__version__}, compile backend {backend}; "
        f"sampler euler, {scfg.num_steps} grid points, cfg {scfg.cfg_scale} ({scfg.guidance_mode}) for "
        f"t >= {scfg.cfg_interval_start}, shift {scfg.timestep_shift}; {args.repeats} timed call(s) after "
        f"{args.warmup} warm-up"
    )
    for r in rows:  # bf16: also within tolerance if no further from eager bf16 than bf16 is from fp32
        floor = bf16_floor(refs, r["batch"])
        if r["precision"] == "bf16" and r["ok"] != "yes" and floor is not None and r["rel diff"] <= floor:
            r["ok"] = "yes"
    notes = []
    for b in args.batch:
        floor = bf16_floor(refs, b)
        if floor is not None:
            d = refs[("bf16", b)] - refs[("fp32", b)]
            notes.append(f"batch {b}: eager bf16 vs fp32: max diff {d.abs().max().item():.3g}, rel diff {floor:.3g}")
    print(format_table(rows))
    for note in notes:
        print(note)
    failed = [r for r in rows if r["ok"] != "yes"]
    if failed:
        print(f"FAILED: {len(failed)} row(s) differ from the eager samples by more than the tolerance {TOLERANCE}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
