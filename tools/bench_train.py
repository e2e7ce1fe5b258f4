"""Training-step throughput benchmark: img/s, step time, peak memory and MFU, eager vs compiled, per precision.

    python tools/bench_train.py                                   # tiny DiT on CPU (seconds)
    python tools/bench_train.py --model LightningDiT-XL/1 --batch 64 128 --modes eager compiled
    python tools/bench_train.py --model LightningDiT-XL/1 --batch 64 --modes compiled --precision bf16 bf16-autocast
    python tools/bench_train.py --config configs/vavae_f16d32_stage1.yaml --random-frozen --batch 8 32 \\
        --modes eager compiled --precision fp32 bf16-autocast bf16 --baseline eager:fp32:8   # VA-VAE f16d32

Without ``--config`` the task is the DiT of ``--model`` ("tiny" or a registry name). ``--config PATH [KEY=VALUE
...]`` takes any experiment YAML with the launcher's dotted overrides and benchmarks its task (``dit`` or ``vavae``)
and model; ``--batch``, ``--modes``, ``--precision``, ``--engine`` and ``--activation-checkpointing`` replace the
config's per-GPU batch and engine settings (the precision defaults to the config's). ``--random-frozen`` builds
the VA-VAE's frozen DINOv2 and LPIPS with random weights instead of reading weight files (same FLOPs and speed).

One timed step is the trainer's own step (``core.trainer.train_step``) on one micro-batch: for every phase of the
task (DiT: ``model``; VA-VAE: ``autoencoder`` then ``discriminator``), the task loss under the engine's autocast,
the engine's backward, and the part's step (clipping, optimizer, EMA), including the trainer's one host read of
each phase's grad norm (its non-finite guard). The batch is random (``Task.example_batch``) and reused, so the data
loader is not measured (``data_wait_frac`` in the trainer's logs covers that). The step context is a late step
(``--step``, default past every step-dependent switch): the VA-VAE's GAN term and its adaptive weight are on.

FLOPs per image: the task's analytic count when it has one (DiT: ``LightningDiT.flops_per_image``), otherwise
COUNTED: ``torch.utils.flop_counter.FlopCounterMode`` over one whole eager fp32 training step (FSDP2-wrapped, the
smallest benchmarked batch, attention through the math SDPA backend so that it is counted on every device),
divided by the batch. For the VA-VAE that is both phases: the autoencoder forward, LPIPS on the images and the
reconstruction, DINOv2 on the images (online features), the adaptive weights' ``autograd.grad`` passes, the
discriminator on the reconstruction (generator term) and, in its phase, on images and reconstructions, and every
backward. FlopCounterMode counts matmuls, convolutions (forward and the parts of their backward that autograd
asks for) and attention, 2 FLOPs per multiply-add; elementwise ops, normalisations and the optimizer are not
counted (as in the DiT's analytic count). MFU = img/s x FLOP/img / the device's bf16 dense peak.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from core.config import ConfigError, EngineConfig, TrainConfig, apply_overrides
from core.distributed import init_distributed, teardown
from core.engines import build_engine
from core.metrics import bench_threads, format_table, peak_flops
from core.task import StepContext, prepare_parts
from core.trainer import train_step
from launchers.experiment import ExperimentConfig, load_config, validate
from models.lightningdit import ModelConfig
from models.tasks import build_task

TINY = ModelConfig(
    type="custom", hidden_size=64, depth=2, num_heads=4, patch_size=2, in_channels=4, input_size=16, num_classes=10
)
LATE_STEP = 1 << 30  # default step of the timed context: every warm-up threshold (disc_start) is passed
RANDOM_FROZEN = (
    "vavae.vf.dinov2.random_init=true",
    "vavae.vf.dinov2.weights=null",
    "vavae.lpips.random_init=true",
    "vavae.lpips.vgg_weights=null",
    "vavae.lpips.lin_weights=null",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument(
        "--config",
        nargs="+",
        metavar=("PATH", "KEY=VALUE"),
        default=None,
        help="experiment YAML, then dotted overrides (KEY=VALUE ...): benchmark its task and model",
    )
    p.add_argument(
        "--model",
        default=None,
        help="without --config: 'tiny' (default) or a DiT registry name such "
        "as LightningDiT-XL/1 (with --config use the override model.type=...)",
    )
    p.add_argument(
        "--random-frozen",
        action="store_true",
        help="VA-VAE: random-init DINOv2 and LPIPS, no weight files (same FLOPs and speed)",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="per-GPU batch sizes to measure")
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"])
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend of compiled mode (default: inductor on CUDA, aot_eager on CPU)",
    )
    p.add_argument(
        "--engine",
        default=None,
        choices=["fsdp2", "deepspeed"],
        help="default: the config's engine.kind (fsdp2 without --config)",
    )
    p.add_argument(
        "--zero-stage",
        type=int,
        nargs="+",
        default=[2],
        choices=[1, 2, 3],
        help="DeepSpeed ZeRO stages to measure (--engine deepspeed)",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        default=None,
        choices=["bf16", "bf16-autocast", "fp32"],
        help="engine.precision values to measure; default: the config's, without --config bf16 on GPU and fp32 on CPU",
    )
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument(
        "--sync-check",
        action="store_true",
        help="after the timed steps, one more step under torch.cuda.set_sync_debug_mode('error'): the "
        "'host syncs' column says 'none' or 'present' (with the count and first place, from a step "
        "in 'warn' mode); 'n/a (cpu)' without CUDA (the step still runs)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument(
        "--step",
        type=int,
        default=LATE_STEP,
        help="training step the timed context claims (default: a late step, every switch on)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="MODE:PRECISION:BATCH|IMG_S",
        help="add a 'vs baseline' column, img/s relative to this row (e.g. eager:fp32:8, the official "
        "VA-VAE setting; it must be one of the measured rows) or to an img/s measured before",
    )
    args = p.parse_args(argv)
    if args.config is not None and args.model is not None:
        p.error("--model is for the DiT without --config; with --config, override model.type=<name>")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.baseline is not None:
        try:
            if ":" in args.baseline:
                mode, precision, batch = args.baseline.split(":")
                args.baseline = (mode, precision, int(batch))
            else:
                args.baseline = float(args.baseline)
                if not args.baseline > 0:
                    raise ValueError
        except ValueError:
            p.error(
                f"--baseline: expected MODE:PRECISION:BATCH (e.g. eager:fp32:8) or an img/s > 0, got {args.baseline!r}"
            )
    return args


def experiment_config(args) -> ExperimentConfig:
    """The benchmarked experiment: the --config file with its overrides (+ --random-frozen), or the DiT of --model."""
    if args.config is None:
        name = args.model or "tiny"
        model = TINY if name == "tiny" else replace(ModelConfig(), type=name)
        return ExperimentConfig(model=model, train=TrainConfig(global_batch_size=8, epochs=1))
    path, *overrides = args.config
    cfg = load_config(path, overrides)
    if args.random_frozen and cfg.task == "vavae":
        apply_overrides(cfg, list(RANDOM_FROZEN))
    return cfg


def row_config(cfg: ExperimentConfig, args, mode: str, precision: str, zero_stage: int) -> ExperimentConfig:
    """``cfg`` with this row's engine settings (the task reads them too, e.g. the VA-VAE's frozen-network autocast)."""
    e = cfg.engine if args.config is not None else EngineConfig()
    engine = replace(
        e,
        kind=args.engine or e.kind,
        precision=precision,
        compile=(mode == "compiled"),
        activation_checkpointing=args.activation_checkpointing
        or (args.config is not None and e.activation_checkpointing),
        zero_stage=zero_stage,
    )
    out = replace(cfg, engine=engine)
    if args.config is not None:
        validate(out, source="bench_train")  # e.g. the VA-VAE refuses engine.kind=deepspeed
    return out


def step_context(cfg: ExperimentConfig, step: int) -> StepContext:
    """The timed step's context: ``step`` for the step-dependent switches (VA-VAE: disc_start); no steps_per_epoch,
    so the DiT samples timesteps with its first phase."""
    return StepContext(step=step, epoch=0.0)


def build(cfg: ExperimentConfig, dist, compile_kwargs: Optional[dict] = None):
    """(engine, task, parts) as the trainer builds them (same seeding of the initial weights)."""
    torch.manual_seed(cfg.seed)
    engine = build_engine(cfg.engine, dist, compile_kwargs=dict(compile_kwargs or {}))
    task = build_task(cfg, dist)
    parts = prepare_parts(engine, task.build_models())
    return engine, task, parts


class _NoModuleTracking:
    """Stands in for FlopCounterMode's ModuleTracker: every count goes to "Global" only. The tracker's backward hooks
    on module inputs raise under ``torch.autograd.grad`` w.r.t. a leaf that is a module input ("A leaf node was
    passed to _will_engine_execute_node ..."), which the VA-VAE generator term does (dg/dx_hat on a detached x_hat)."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter():
    """``FlopCounterMode`` (total only: ``get_total_flops()``) that works through ``autograd.grad`` passes."""
    from torch.utils.flop_counter import FlopCounterMode  # lazy: it imports triton (~0.2 s); not for --help

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    return counter


def counted_flops_per_image(cfg: ExperimentConfig, dist, batch: int, step: int) -> float:
    """FlopCounterMode over one eager fp32 training step (all phases) of a fresh FSDP2 build, / batch."""
    eager = replace(
        cfg, engine=replace(cfg.engine, kind="fsdp2", precision="fp32", compile=False, activation_checkpointing=False)
    )
    engine, task, parts = build(eager, dist)
    data = task.example_batch(batch, torch.Generator(device=dist.device).manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), flop_counter() as counter:
        train_step(task, engine, parts, [data], step_context(cfg, step))
    del engine, task, parts, data
    if dist.device.type == "cuda":
        torch.cuda.empty_cache()
    return counter.get_total_flops() / batch


def bench_one(dist, cfg: ExperimentConfig, batch: int, args, flops_cache: dict) -> dict:
    cuda = dist.device.type == "cuda"
    compiled = cfg.engine.compile
    if compiled:
        torch._dynamo.reset()  # fresh graphs per row (new modules; no recompile limit across rows)
    backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    engine, task, parts = build(cfg, dist, {"backend": backend})
    data = task.example_batch(batch, torch.Generator(device=dist.device).manual_seed(0))
    step = functools.partial(train_step, task, engine, parts, [data], step_context(cfg, args.step))

    if cuda:
        torch.cuda.synchronize(dist.device)
        torch.cuda.reset_peak_memory_stats(dist.device)
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(dist.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize(dist.device)
    elapsed = time.perf_counter() - t0
    peak_mem = (torch.cuda.max_memory_allocated(dist.device) / 2**30) if cuda else float("nan")
    syncs = {"host syncs": host_sync_check(step, dist.device)} if args.sync_check else {}
    flops = task.flops_per_image()
    del step, engine, task, parts, data
    if cuda:
        torch.cuda.empty_cache()
    if flops is None:
        if "counted" not in flops_cache:
            flops_cache["counted"] = counted_flops_per_image(cfg, dist, min(args.batch), args.step)
        flops = flops_cache["counted"]
        flops_cache["source"] = "counted"
    else:
        flops_cache["source"] = "analytic"
    img_s = batch * args.steps / elapsed
    peak = peak_flops(dist.device)
    return {
        **row_identity(cfg, batch),
        "img/s": img_s,
        "step ms": 1000 * elapsed / args.steps,
        "GFLOP/img": flops / 1e9,
        "MFU": (img_s * flops / peak) if peak else float("nan"),
        "peak mem GiB": peak_mem,
        **syncs,
    }


def host_sync_check(step, device: torch.device) -> str:
    """Run ``step`` once under ``torch.cuda.set_sync_debug_mode("error")``: "none" when it completes, else "present"
    with the number of synchronising operations per step and the first one's place (from one more step in "warn"
    mode, whose warnings name the Python line). Without CUDA the step runs plainly: "n/a (cpu)"."""
    if device.type != "cuda":
        step()
        return "n/a (cpu)"

    torch.cuda.synchronize(device)
    try:
        torch.cuda.set_sync_debug_mode("error")
        step()
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(device)
        return "none"
    except RuntimeError:
        pass
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    found = [w for w in caught if "synchroniz" in str(w.message)]
    where = f", first at {Path(found[0].filename).name}:{found[0].lineno}" if found else ""
    return f"present ({len(found)}/step{where})"


def row_identity(cfg: ExperimentConfig, batch: int) -> dict:
    """The columns naming a row: engine (ZeRO stage), batch, mode, precision."""
    e = cfg.engine
    return {
        "engine": e.kind if e.kind == "fsdp2" else f"zero{e.zero_stage}",
        "batch": batch,
        "mode": "compiled" if e.compile else "eager",
        "precision": e.precision,
    }


def bench_row(dist, cfg: ExperimentConfig, batch: int, args, flops_cache: dict) -> dict:
    """``bench_one``, or a row of NaNs noted "OOM" when the GPU runs out of memory (e.g. fp32 at a large batch)."""
    try:
        return bench_one(dist, cfg, batch, args, flops_cache)
    except torch.OutOfMemoryError:
        pass  # outside the handler, the traceback's frames are gone
    gc.collect()
    torch.cuda.empty_cache()
    nan = float("nan")
    return {
        **row_identity(cfg, batch),
        "img/s": nan,
        "step ms": nan,
        "GFLOP/img": (flops_cache.get("counted") or nan) / 1e9,
        "MFU": nan,
        "peak mem GiB": nan,
        **({"host syncs": "-"} if args.sync_check else {}),
        "note": "OOM",
    }


def describe(cfg: ExperimentConfig, args) -> str:
    if cfg.task == "vavae":
        m = cfg.vavae.model
        f = 2 ** (len(m.ch_mult) - 1)
        return (
            f"task vavae ({cfg.name}: f{f}d{m.embed_dim} ch {m.ch}, {cfg.data.image_size} px, "
            f"VF {'off' if not cfg.vavae.vf.enabled else cfg.vavae.vf.features})"
        )
    if args.config is None:
        return f"task dit (model {args.model or 'tiny'})"
    m = cfg.model
    return f"task dit ({cfg.name}: model {m.type}, {m.in_channels}x{m.input_size}x{m.input_size} latents)"


def baseline_text(baseline) -> str:
    return ":".join(map(str, baseline)) if isinstance(baseline, tuple) else f"{baseline:g} img/s"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = experiment_config(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dist = init_distributed()
    try:
        kind = args.engine or cfg.engine.kind
        stages = args.zero_stage if kind == "deepspeed" else [cfg.engine.zero_stage]
        if args.precision:
            precisions = args.precision
        elif args.config is not None:
            precisions = [cfg.engine.precision]
        else:
            precisions = ["bf16" if dist.device.type == "cuda" else "fp32"]
        grid = [(z, p, b, m) for z in stages for p in precisions for b in args.batch for m in args.modes]
        if isinstance(args.baseline, tuple) and not any((m, p, b) == args.baseline for _, p, b, m in grid):
            print(f"error: --baseline {baseline_text(args.baseline)} is not one of the measured rows", file=sys.stderr)
            return 2
        try:
            configs = [(row_config(cfg, args, m, p, z), b) for z, p, b, m in grid]
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        flops_cache: dict = {}
        with bench_threads(dist.device, None):  # one intra-op thread on a CPU
            rows = [bench_row(dist, c, b, args, flops_cache) for c, b in configs]
        if args.baseline is not None:
            base = (
                args.baseline
                if isinstance(args.baseline, float)
                else next(r["img/s"] for r in rows if (r["mode"], r["precision"], r["batch"]) == args.baseline)
            )
            for r in rows:
                r["vs baseline"] = r["img/s"] / base
        if any("note" in r for r in rows):
            rows = [{**{k: v for k, v in r.items() if k != "note"}, "note": r.get("note", "")} for r in rows]
        if dist.is_main:
            backend = args.compile_backend or ("inductor" if dist.device.type == "cuda" else "aot_eager")
            print(
                f"{describe(cfg, args)}, engine {kind}, device {dist.device}, torch {torch.__version__}, "
                f"{args.steps} timed steps after {args.warmup} warm-up, compile backend {backend}, "
                f"FLOPs {flops_cache.get('source')}"
                + (" (FlopCounterMode, one eager fp32 step)" if flops_cache.get("source") == "counted" else "")
                + (f", baseline {baseline_text(args.baseline)}" if args.baseline is not None else "")
            )
            if dist.device.type == "cuda":  # "fp32" = PyTorch's defaults, as in training (nothing sets them)
                print(
                    f"TF32: cuDNN convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, "
                    f"matmuls {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
                )
            if args.random_frozen:
                print(
                    "--random-frozen: DINOv2 and LPIPS are randomly initialised (no weight files; same FLOPs "
                    "and speed as the real weights)"
                    if cfg.task == "vavae"
                    else f"--random-frozen: ignored (task {cfg.task} has no frozen networks)"
                )
            print(format_table(rows))
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
