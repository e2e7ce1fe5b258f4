"""Training-step throughput benchmark: img/s, step time, peak memory and MFU, eager vs compiled.

    python tools/bench_train.py                                   # tiny model on CPU (seconds)
    python tools/bench_train.py --model LightningDiT-XL/1 --batch 64 128 --modes eager compiled
    python tools/bench_train.py --model LightningDiT-XL/1 --batch 64 --modes compiled --precision bf16 bf16-autocast

It runs the real training step of the shared trainer (DiT task loss under the engine's autocast → engine backward
→ engine step with clipping, optimizer and EMA) on random latents in one process, so the data loader is not measured
(`data_wait_frac` in the trainer's logs covers that). FLOPs per image come from the model's analytic
count (models.lightningdit.LightningDiT.flops_per_image), not a guess.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from core.config import EngineConfig, ExperimentConfig, ModelConfig, TrainConfig
from core.distributed import init_distributed, teardown
from core.engines.base import build_engine
from core.metrics import format_table, peak_flops
from core.task import StepContext
from models.tasks.dit import DiTTask

TINY = ModelConfig(type="custom", hidden_size=64, depth=2, num_heads=4, patch_size=2, in_channels=4,
                   input_size=16, num_classes=10)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' or a registry name such as LightningDiT-XL/1")
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="per-GPU batch sizes to measure")
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"])
    p.add_argument("--engine", default="fsdp2", choices=["fsdp2", "deepspeed"])
    p.add_argument("--zero-stage", type=int, nargs="+", default=[2], choices=[1, 2, 3],
                   help="DeepSpeed ZeRO stages to measure (--engine deepspeed)")
    p.add_argument("--precision", nargs="+", default=None, choices=["bf16", "bf16-autocast", "fp32"],
                   help="engine.precision values to measure; default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    return p.parse_args(argv)


def bench_one(dist, model_cfg: ModelConfig, batch: int, mode: str, precision: str, args, zero_stage: int = 2) -> dict:
    cfg = ExperimentConfig(model=model_cfg, train=TrainConfig(global_batch_size=batch, epochs=1))
    engine_cfg = EngineConfig(kind=args.engine, precision=precision, compile=(mode == "compiled"),
                              activation_checkpointing=args.activation_checkpointing, zero_stage=zero_stage)
    engine = build_engine(engine_cfg, dist)
    task = DiTTask(cfg, dist)
    spec = task.build_models()["model"]
    part = engine.prepare("model", spec.module, spec.optimizer, spec.ema_decay, blocks_attr=spec.blocks_attr,
                          grad_clip=spec.grad_clip)
    parts = {"model": part}
    c, s = model_cfg.in_channels, model_cfg.input_size
    g = torch.Generator(device=dist.device).manual_seed(0)
    data = {"latent": torch.randn(batch, c, s, s, device=dist.device, generator=g),
            "label": torch.randint(0, model_cfg.num_classes, (batch,), device=dist.device, generator=g)}
    ctx = StepContext(step=0, epoch=0.0, timestep_phase=cfg.transport.timestep_sampling[0])

    def step():
        with engine.autocast():
            loss, _ = task.loss("model", data, parts, ctx)
        part.backward(loss)
        part.step()

    cuda = dist.device.type == "cuda"
    if cuda:
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
    flops = task.flops_per_image()
    img_s = batch * args.steps / elapsed
    peak = peak_flops(dist.device)
    row = {"engine": args.engine if args.engine == "fsdp2" else f"zero{zero_stage}",
           "batch": batch, "mode": mode, "precision": precision, "img/s": img_s,
           "step ms": 1000 * elapsed / args.steps, "GFLOP/img": flops / 1e9,
           "MFU": (img_s * flops / peak) if peak else float("nan"),
           "peak mem GiB": (torch.cuda.max_memory_allocated(dist.device) / 2**30) if cuda else float("nan")}
    del part, parts, engine
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    dist = init_distributed()
    try:
        model_cfg = TINY if args.model == "tiny" else replace(ModelConfig(), type=args.model)
        stages = args.zero_stage if args.engine == "deepspeed" else [None]
        precisions = args.precision or ["bf16" if dist.device.type == "cuda" else "fp32"]
        rows = [bench_one(dist, model_cfg, b, m, p, args, zero_stage=z or 2)
                for z in stages for p in precisions for b in args.batch for m in args.modes]
        if dist.is_main:
            print(f"model {args.model}, engine {args.engine}, device {dist.device}, "
                  f"torch {torch.__version__}, {args.steps} timed steps after {args.warmup} warm-up")
            print(format_table(rows))
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
