"""Async-checkpoint stall: how long ``engine.save`` blocks training, with the model's optimizer state and EMA.

    python tools/bench_checkpoint.py                                  # tiny DiT on CPU (seconds)
    python tools/bench_checkpoint.py --model LightningDiT-XL/1         # XL/1 on one GPU: 10.8 GB to stage

The model is built as the trainer builds it (``tools/bench_train.build``: engine, task, parts; FSDP2, bf16 on a
GPU), takes ``--steps`` optimizer steps (so the Adam moments exist), and then saves ``--saves`` times with
``async_save`` on: ``blocking s`` = wall time of ``save_checkpoint(...)`` (the trainer's save: per-rank extra state + ``engine.save``) after ``torch.cuda.synchronize()`` (it
returns once the sharded model, EMA and optimizer state are staged in host memory), ``background s`` = the
``engine.wait()`` that follows (the files written by the background thread). The first save of a process also
creates the writer's process group: the figure is the second and later saves. ``state GiB`` = bytes of the
weights, EMA and optimizer state this rank stages.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from core.checkpoint import save_checkpoint
from core.distributed import init_distributed, teardown
from core.metrics import format_table
from core.trainer import train_step
from tools import bench_train


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--model", default="tiny", help="'tiny' or a DiT registry name such as LightningDiT-XL/1")
    p.add_argument(
        "--precision",
        default=None,
        choices=["bf16", "bf16-autocast", "fp32"],
        help="default: bf16 on a GPU, fp32 on a CPU",
    )
    p.add_argument("--batch", type=int, default=4, help="batch of the optimizer steps before the saves")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps before the first save")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    return p.parse_args(argv)


def _state_bytes(parts: dict) -> int:
    total = 0
    for part in parts.values():
        modules = [part.module] + ([part.ema] if getattr(part, "ema", None) is not None else [])
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                local = getattr(t, "_local_tensor", t)  # DTensor: this rank's shard
                total += local.numel() * local.element_size()
        optimizer = getattr(part, "optimizer", None)
        for state in optimizer.state.values() if optimizer is not None else []:
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    local = getattr(v, "_local_tensor", v)
                    total += local.numel() * local.element_size()
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    dist = init_distributed()
    cuda = dist.device.type == "cuda"
    out = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    try:
        targs = bench_train.parse_args(["--model", args.model])
        precision = args.precision or ("bf16" if cuda else "fp32")
        cfg = bench_train.row_config(bench_train.experiment_config(targs), targs, "eager", precision, 2)
        engine, task, parts = bench_train.build(cfg, dist)
        if not getattr(engine, "supports_async_save", False):
            print(f"error: the {cfg.engine.kind} engine has no async save", file=sys.stderr)
            return 2
        engine.async_save = True
        data = task.example_batch(args.batch, torch.Generator(device=dist.device).manual_seed(0))
        ctx = bench_train.step_context(cfg, bench_train.LATE_STEP)
        for _ in range(args.steps):  # the optimizer moments exist from the first step on
            train_step(task, engine, parts, [data], ctx)
        state_gib = _state_bytes(parts) / 2**30
        rows = []
        for i in range(args.saves):
            if cuda:
                torch.cuda.synchronize(dist.device)
            t0 = time.perf_counter()
            save_checkpoint(engine, out / f"step{i}", parts, {"step": i})  # returns after staging to host memory
            t1 = time.perf_counter()
            engine.wait()  # the background write
            t2 = time.perf_counter()
            rows.append(
                {
                    "save": i,
                    "blocking s": t1 - t0,
                    "background s": t2 - t1,
                    "state GiB": state_gib,
                    "note": "incl. writer group creation" if i == 0 else "",
                }
            )
        if dist.is_main:
            print(
                f"model {args.model}, engine {cfg.engine.kind}, precision {precision}, device "
                f"{torch.cuda.get_device_name(dist.device) if cuda else 'cpu'}, torch {torch.__version__}; "
                f"{args.steps} optimizer step(s) at batch {args.batch} first"
            )
            print(format_table(rows))
    finally:
        teardown()
        if args.dir is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
