"""Run a function on N real gloo ranks (separate processes) and bring back results or the worker's traceback.

    from dist_utils import run_distributed
    results = run_distributed(fn, world_size=2, args=(tmp_path,))   # fn(dist: DistInfo, *args) -> picklable

``fn`` must be picklable (a module-level function). Each worker gets the torchrun environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT, OMP_NUM_THREADS=1),
calls ``core.distributed.init_distributed()`` — the code path used in production — and runs ``fn``. An exception
in any worker fails the call with that worker's traceback; the other workers are terminated.

Shared ranks: the workers of one world size are started once per test session (a "gang": spawning 2 ranks that
import torch costs seconds each time) and run every call of that world size, one after the other, in the same
process group. Before each call a worker puts back what a fresh process would have: the environment (plus ``env``),
the working directory, torch's default seed, grad mode, default dtype and thread count, logging handlers and levels,
and torch.compile's caches and counters. A call whose ``fn`` destroys the default group (a tool's ``main()`` that
tears down) retires its gang; a failed call kills it; the next call starts a new one. ``fresh=True`` (or
``LLAT_TEST_FRESH_RANKS=1`` for every call) runs ``fn`` in new processes that tear the group down afterwards.

``train_on_shared_ranks(config, overrides)``: train.py's run (console logging, validate, build the task and the
trainer, train, close) on the shared ranks, without train.py's own process-group setup and teardown: a whole
training run without a launch (a launch costs seconds of interpreter start and imports per rank). For runs whose
launch is not what a test checks, e.g. the uninterrupted reference, or the resume of a run that was SIGKILLed (its
launch is what the kill needs; each such test file launches at least that run for real).
``train_on_shared_ranks_logged`` also returns what the ranks logged ("resumed from step 4", warnings).
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Optional

import torch
import torch.multiprocessing as mp

_SCRUB = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "TORCHELASTIC_RUN_ID", "GROUP_RANK")


def _worker(
    local_rank: int,
    fn: Callable,
    world_size: int,
    port: int,
    args: Sequence[Any],
    result_dir: str,
    env: dict[str, str],
    timeout_s: float,
) -> None:
    for key in _SCRUB:
        os.environ.pop(key, None)
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
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


def run_distributed(
    fn: Callable,
    world_size: int = 2,
    args: Sequence[Any] = (),
    env: Optional[dict[str, str]] = None,
    timeout_s: float = 120.0,
    fresh: bool = False,
) -> list[Any]:
    """Run ``fn(dist, *args)`` on ``world_size`` gloo ranks; return the per-rank results (rank order).

    ``timeout_s``: the process group's timeout (a collective that waits longer fails). The shared ranks' group has
    ``GANG_TIMEOUT_S``; a call that asks for more, or ``fresh=True``, gets new processes."""
    from core.distributed import free_port

    with tempfile.TemporaryDirectory(prefix="dist_results_") as result_dir:
        if fresh or timeout_s > GANG_TIMEOUT_S or os.environ.get("LLAT_TEST_FRESH_RANKS", "") not in ("", "0"):
            mp.start_processes(
                _worker,
                args=(fn, world_size, free_port(), tuple(args), result_dir, dict(env or {}), timeout_s),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
        else:
            gang = _GANGS.get(world_size)
            if gang is None:
                gang = _GANGS[world_size] = _Gang(world_size)
            gang.call(fn, tuple(args), dict(env or {}), result_dir)
        return [torch.load(Path(result_dir) / f"result{r}.pt", weights_only=False) for r in range(world_size)]


# ------------------------------------------------------------------------------------------- shared ranks
GANG_TIMEOUT_S = 300.0  # the process group timeout of the shared ranks (the longest any test asks for)
_GANGS: dict[int, _Gang] = {}


class _Gang:
    """``world_size`` spawned ranks in one process group, running the calls sent to them one at a time."""

    def __init__(self, world_size: int):
        from core.distributed import free_port

        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.conns, self.procs = [], []
        port = free_port()
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_gang_worker,
                args=(rank, world_size, port, child, GANG_TIMEOUT_S),
                name=f"test-rank{rank}of{world_size}",
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def call(self, fn: Callable, args: tuple, env: dict[str, str], result_dir: str) -> None:
        buf = io.BytesIO()
        torch.save({"fn": fn, "args": args, "env": env, "result_dir": result_dir}, buf)
        replies: dict[int, tuple] = {}
        try:
            for conn in self.conns:
                conn.send_bytes(buf.getvalue())
            while len(replies) < self.world_size:
                pending = [r for r in range(self.world_size) if r not in replies]
                wait([self.conns[r] for r in pending] + [self.procs[r].sentinel for r in pending], timeout=1.0)
                for r in pending:
                    if self.conns[r].poll():
                        try:
                            replies[r] = self.conns[r].recv()
                        except EOFError:
                            replies[r] = ("error", f"rank {r} exited (code {self.procs[r].exitcode})")
                    elif not self.procs[r].is_alive():
                        replies[r] = ("error", f"rank {r} exited (code {self.procs[r].exitcode}) during the call")
                    if replies.get(r, ("ok",))[0] == "error":
                        raise mp.ProcessRaisedException(
                            f"\n\n-- Process {r} terminated with the following error:\n{replies[r][1]}",
                            r,
                            self.procs[r].pid,
                        )
        except BaseException:
            self.kill()
            raise
        if not all(alive for _, alive in replies.values()):  # fn destroyed the default group
            self.close()

    def _forget(self) -> None:
        if _GANGS.get(self.world_size) is self:
            del _GANGS[self.world_size]

    def close(self) -> None:
        self._forget()
        for conn in self.conns:
            try:
                conn.send_bytes(b"stop")
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=30)
        self.kill()

    def kill(self) -> None:
        self._forget()
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=30)
        for conn in self.conns:
            conn.close()


def close_gangs() -> None:
    """Stop the shared ranks (end of the test session; also at exit)."""
    for gang in list(_GANGS.values()):
        gang.close()


atexit.register(close_gangs)


def _fresh_state(seed: int, env: dict[str, str], cwd: str) -> None:
    """What a newly spawned rank would have: its environment, working directory, default seed and torch state."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    torch.manual_seed(seed)
    torch.set_grad_enabled(True)
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()
        sys.modules["torch._dynamo.utils"].counters.clear()


def _logging_state() -> list[tuple]:
    loggers = [logging.root] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]


def _restore_logging(state: list[tuple]) -> None:
    for lg, handlers, level, propagate, disabled in state:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled


def _gang_worker(rank: int, world_size: int, port: int, conn, timeout_s: float) -> None:
    for key in _SCRUB:
        os.environ.pop(key, None)
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    import torch.distributed as tdist

    from core.distributed import init_distributed

    init_distributed(timeout=timedelta(seconds=timeout_s))
    seed, env, cwd, logs = torch.initial_seed(), dict(os.environ), os.getcwd(), _logging_state()
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            break
        if message == b"stop":
            from core.distributed import teardown

            teardown()
            break
        try:
            call = torch.load(io.BytesIO(message), weights_only=False)
            _fresh_state(seed, {**env, **call["env"]}, cwd)
            result = call["fn"](init_distributed(), *call["args"])
            torch.save(result, os.path.join(call["result_dir"], f"result{rank}.pt"))
        except BaseException:  # noqa: BLE001 - reported to the parent, which ends this gang
            conn.send(("error", f"rank {rank}:\n{traceback.format_exc()}"))
            break
        finally:
            _restore_logging(logs)
        alive = tdist.is_initialized()
        conn.send(("ok", alive))
        if not alive:
            break
    conn.close()


def _train_worker(dist, config: str, overrides: list[str]) -> tuple[int, str]:
    """train.py's run on this rank; returns (exit code, what it logged: train.py's console logging, rank 0 at INFO,
    the others at WARNING)."""
    from core.metrics import setup_console_logging
    from core.trainer import Trainer
    from launchers.experiment import load_config, validate
    from models.tasks import build_task

    setup_console_logging(dist.rank)  # as train.py; the shared ranks put the logging state back after the call
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setFormatter(logging.root.handlers[0].formatter)
    logging.root.addHandler(handler)
    cfg = validate(load_config(config, overrides), world_size=dist.world_size)
    trainer = Trainer(cfg, dist, build_task(cfg, dist))
    try:
        code = trainer.train().exit_code
    finally:
        trainer.close()
    return code, text.getvalue()


def train_on_shared_ranks_logged(
    config: str | os.PathLike, overrides: Sequence[str] = (), world_size: int = 2, env: Optional[dict] = None
) -> tuple[int, str]:
    """A training run of ``config`` with ``overrides`` (train.py's, see the module doc) on ``world_size`` shared
    ranks; returns its exit code (0: finished) and what its ranks logged (rank 0 first)."""
    results = run_distributed(_train_worker, world_size=world_size, args=(str(config), list(overrides)), env=env)
    codes = [code for code, _ in results]
    assert len(set(codes)) == 1, codes
    return codes[0], "".join(text for _, text in results)


def train_on_shared_ranks(
    config: str | os.PathLike, overrides: Sequence[str] = (), world_size: int = 2, env: Optional[dict] = None
) -> int:
    """``train_on_shared_ranks_logged`` without the log: the exit code."""
    return train_on_shared_ranks_logged(config, overrides, world_size, env)[0]


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
