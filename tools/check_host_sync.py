"""Check that the training step reads nothing from the device on the host (issue #18, item 2; core/hostsync.py).

Runs the real trainer (tiny DiT of configs/tiny_dit.yaml unless overridden, toy latents written as MDS shards under
``--out``) for a few steps with its ``step_guard`` (the step itself and the stop agreement of every step; not the
log / evaluation / checkpoint blocks, which read on purpose) under

* ``torch.cuda.set_sync_debug_mode("error")`` on CUDA: any synchronizing CUDA call (a device->host copy, ``.item()``,
  a blocking ``cudaMemcpy``, ``nonzero``...) raises; that is the ground truth;
* ``core.hostsync.HostSyncCounter``: records every op a host read goes through (on CUDA: of device tensors only),
  also on the CPU, where it is what the test suite checks (tests/integration/test_no_host_sync.py).

The optimizer is fused (``optimizer.fused=true``: the device-side skip of a non-finite step needs it; the default
on CUDA anyway). One rank, FSDP2 by default; pass overrides for other settings, e.g. ``engine.precision=bf16``,
``engine.compile=true``. DeepSpeed's ZeRO optimizers read their overflow flag on the host inside their step (see
core/engines/deepspeed.py): with ``engine.kind=deepspeed`` the check reports that sync.

    python tools/check_host_sync.py --out /tmp/hostsync [--steps 8] [key=value ...]

From Python (e.g. the GPU report): ``check_host_sync(out_dir, steps=8, overrides=[...])`` returns a dict with
``ok``, ``host_reads`` (op, device) and ``error`` (the sync-debug error, if any); it initialises a single-rank
process group when none exists (and tears it down again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from core.distributed import init_distributed, teardown  # noqa: E402
from core.hostsync import HostSyncCounter, cuda_sync_debug  # noqa: E402
from core.metrics import format_table  # noqa: E402

CONFIG = str(REPO / "configs/tiny_dit.yaml")


def write_toy_latents(out: Path, n: int = 64, size_limit: int = 1 << 20) -> Path:
    """``n`` class-dependent 3x16x16 'latents' with their flips (sample ids 0..n-1) as MDS shards of at most
    ``size_limit`` bytes at ``out`` (the tiny DiT's input; the tests' toy dataset too)."""
    from data.streaming import write_latent_dataset  # lazy: mosaicml-streaming takes seconds; --help without it

    if (out / "index.json").exists():
        return out
    rng = np.random.default_rng(0)

    def samples():
        for i in range(n):
            img = rng.normal(size=(3, 16, 16)).astype(np.float32) * 0.5 + (i % 10 - 4.5) / 5
            yield {"latent": img, "latent_flip": img[:, :, ::-1].copy(), "label": i % 10, "sample_id": i}

    write_latent_dataset(out, samples(), latent_dtype="float32", size_limit=size_limit)
    return out


def check_host_sync(
    out_dir: str | Path,
    steps: int = 8,
    log_every: Optional[int] = None,
    overrides: Sequence[str] = (),
    config: str = CONFIG,
    warmup: int = 1,
    count_ops: bool = True,
) -> dict[str, Any]:
    """Train ``steps`` steps with the step guard on from step ``warmup`` (0-based; the first steps initialise
    lazily: FSDP2's lazy init, compilation); see the module docstring. ``log_every`` defaults to ``steps`` (one log
    step, at the end). ``count_ops=False``: sync-debug mode only (no dispatch mode, e.g. under ``engine.compile``)."""
    # lazy: the config and training stack (~0.4 s over torch) only for a check, not for --help
    from core.trainer import Trainer
    from launchers.experiment import load_config, validate
    from models.tasks import build_task

    out_dir = Path(out_dir)
    data = write_toy_latents(out_dir / "data")
    run_dir = out_dir / "run"
    own_group = not tdist.is_initialized()
    dist = init_distributed()
    cuda = dist.device.type == "cuda"
    counter = HostSyncCounter(device_only=cuda)
    trainer = None

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        if trainer is None or trainer.step < warmup:
            yield
            return
        with (
            cuda_sync_debug("error") if cuda else contextlib.nullcontext(),
            counter if count_ops else contextlib.nullcontext(),
        ):
            yield

    result: dict[str, Any] = {
        "device": str(dist.device),
        "steps": steps,
        "warmup": warmup,
        "overrides": list(overrides),
    }
    try:
        cfg = validate(
            load_config(
                config,
                [
                    f"data.path={data}",
                    f"run_dir={run_dir}",
                    "wandb.mode=disabled",
                    "checkpoint.resume=false",
                    "checkpoint.every_steps=1000000",
                    "optimizer.fused=true",
                    f"train.max_steps={steps}",
                    f"train.log_every={log_every or steps}",
                    *overrides,
                ],
            ),
            world_size=dist.world_size,
        )
        trainer = Trainer(cfg, dist, build_task(cfg, dist))
        trainer.step_guard = guard
        try:
            trainer.train()
            result["error"] = None
        except RuntimeError as e:  # the sync-debug error of a synchronizing call
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            result["trained_steps"] = trainer.step
            trainer.close()
    finally:
        if own_group:
            teardown()
    result["host_reads"] = [list(c) for c in counter.calls]
    result["ok"] = result["error"] is None and not counter.calls
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="scratch directory (toy data + run directory)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--warmup", type=int, default=1, help="unguarded first steps (lazy initialisation)")
    ap.add_argument("--no-op-counter", action="store_true", help="sync-debug mode only (e.g. engine.compile=true)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)
    result = check_host_sync(
        args.out, args.steps, args.log_every, args.overrides, args.config, args.warmup, not args.no_op_counter
    )
    reads = result["host_reads"]
    row = {
        "device": result["device"],
        "steps checked": result["steps"],
        "host reads": len(reads) if isinstance(reads, list) else reads,
        "first read": (str(reads[0])[:80] if isinstance(reads, list) and reads else "-"),
        "sync-debug error": (str(result["error"])[:80] if result["error"] else "-"),
        "ok": result["ok"],
    }
    print(format_table([row]))
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
