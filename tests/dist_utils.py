"""Run a function on N real gloo ranks (separate processes) and bring back results or the worker's traceback.

    from dist_utils import run_distributed
    results = run_distributed(fn, world_size=2, args=(tmp_path,))   # fn(dist: DistInfo, *args) -> picklable

``fn`` must be picklable (a module-level function). Each worker gets the torchrun environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT, OMP_NUM_THREADS=1),
calls ``core.distributed.init_distributed()`` — the code path used in production — runs ``fn`` and tears
the group down. An exception in any worker fails the call with that worker's traceback; the other
workers are terminated.
"""
from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.multiprocessing as mp

_SCRUB = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "TORCHELASTIC_RUN_ID", "GROUP_RANK")


def _worker(local_rank: int, fn: Callable, world_size: int, port: int, args: Sequence[Any],
            result_dir: str, env: dict[str, str], timeout_s: float) -> None:
    for key in _SCRUB:
        os.environ.pop(key, None)
    os.environ.update(env)
    os.environ.update({"RANK": str(local_rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    from core.distributed import init_distributed, teardown
    dist = init_distributed(timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(dist, *args)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # e.g. DCP's CheckpointException: make spawn report it with its traceback
        if isinstance(e, Exception):
            raise
        raise RuntimeError(f"{type(e).__name__}: {e}") from e
    finally:
        teardown()
    torch.save(result, os.path.join(result_dir, f"result{local_rank}.pt"))


def run_distributed(fn: Callable, world_size: int = 2, args: Sequence[Any] = (),
                    env: Optional[dict[str, str]] = None, timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(dist, *args)`` on ``world_size`` gloo ranks; return the per-rank results (rank order)."""
    from core.distributed import free_port
    with tempfile.TemporaryDirectory(prefix="dist_results_") as result_dir:
        mp.start_processes(_worker, args=(fn, world_size, free_port(), tuple(args), result_dir, dict(env or {}),
                                          timeout_s),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(Path(result_dir) / f"result{r}.pt", weights_only=False) for r in range(world_size)]


# ---------------------------------------------------------------------------------------------- toy model
class ToyBlock(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class ToyModel(torch.nn.Module):
    """Blocks in ``self.blocks`` + a frozen parameter (like pos_embed) + a buffer + odd/size-1 dims
    (uneven and empty FSDP shards on 2 ranks)."""

    def __init__(self, d_in: int = 4, d: int = 6, d_out: int = 3, depth: int = 3):
        super().__init__()
        self.inp = torch.nn.Linear(d_in, d)
        self.pos = torch.nn.Parameter(torch.randn(d), requires_grad=False)
        self.register_buffer("scale", torch.tensor(0.75))
        self.blocks = torch.nn.ModuleList([ToyBlock(d) for _ in range(depth)])
        self.gate = torch.nn.Parameter(torch.ones(1))
        self.out = torch.nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Like LightningDiT: cast the input to the weight dtype (the engine does not cast inputs).
        h = self.inp(x.to(self.inp.weight.dtype)) + self.pos
        for block in self.blocks:
            h = block(h)
        # fp32 output whatever the compute dtype, as the tasks' losses are computed in fp32 (F.mse_loss of a bf16
        # output against fp32 targets returns an fp32 gradient for a bf16 input on torch 2.11: an autograd error).
        return (self.out(h) * self.gate * self.scale).float()
