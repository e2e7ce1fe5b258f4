"""Process-group setup from the launcher's environment (torchrun or Slurm), and a few small collectives.

``init_distributed()`` always returns with a process group initialised, even for a single process:
FSDP2 and torch.distributed.checkpoint need one. Environments, in order of precedence:

* torchrun / torch elastic: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``.
* Slurm (``srun``): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``), ``SLURM_LOCALID``,
  tasks per node from ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` / ``SLURM_NTASKS_PER_NODE``
  (the ``"4(x2),3"`` syntax is understood), master address from ``MASTER_ADDR`` when exported, else
  ``SLURM_LAUNCH_NODE_IPADDR``; master port from ``MASTER_PORT`` when exported, else derived from
  ``SLURM_JOB_ID`` (identical on every task). The torchrun variables are then exported too, because other
  libraries (MosaicML streaming, ...) read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``.
* Nothing: one process, rank 0 of 1, on 127.0.0.1 and a free port (also exported).

Backend: NCCL with ``torch.cuda.set_device(local_rank)`` when CUDA is available, gloo otherwise.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _parse_tasks_per_node(value: str) -> list[int]:
    """Expand Slurm's compressed tasks-per-node list: ``"4(x2),3"`` -> ``[4, 4, 3]``."""
    out: list[int] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if m is None:
            raise ValueError(f"cannot parse Slurm tasks-per-node value {value!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _slurm_env(env: dict[str, str]) -> dict[str, str]:
    """Torchrun-style variables derived from a Slurm task's environment."""
    rank = int(env["SLURM_PROCID"])
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    local_rank = int(env.get("SLURM_LOCALID", "0"))
    local_world: Optional[int] = None
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key):
            per_node = _parse_tasks_per_node(env[key])
            node = int(env.get("SLURM_NODEID", "0"))
            local_world = per_node[node] if node < len(per_node) else per_node[-1]
            break
    if local_world is None:
        local_world = max(1, world // max(1, int(env.get("SLURM_NNODES", "1"))))
    addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR")
    if not addr:
        raise RuntimeError(
            "Slurm environment without MASTER_ADDR or SLURM_LAUNCH_NODE_IPADDR: export MASTER_ADDR "
            "(e.g. the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`)"
        )
    port = env.get("MASTER_PORT") or str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
    }


def _resolve_env(env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(source, torchrun-style variables) for the current environment."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = env["WORLD_SIZE"]
        if int(world) > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            raise RuntimeError(
                f"RANK/WORLD_SIZE={world} are set but MASTER_ADDR/MASTER_PORT are not: "
                "launch with torchrun (or export both)"
            )
        return "torchrun", {
            "RANK": env["RANK"],
            "WORLD_SIZE": world,
            "LOCAL_RANK": env.get("LOCAL_RANK", env["RANK"]),
            "LOCAL_WORLD_SIZE": env.get("LOCAL_WORLD_SIZE", world),
            "MASTER_ADDR": env.get("MASTER_ADDR") or "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port()),
        }
    if "SLURM_PROCID" in env and ("SLURM_NTASKS" in env or "SLURM_STEP_NUM_TASKS" in env):
        return "slurm", _slurm_env(env)
    return "single", {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }


def _info_from_group() -> DistInfo:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = str(tdist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    return DistInfo(rank, world, local_rank, local_world, device, backend)


def init_distributed(timeout: Optional[timedelta] = None) -> DistInfo:
    """Initialise the default process group from the environment (see module doc) and return where we are.

    Idempotent: when a default group already exists, its description is returned unchanged.
    """
    if tdist.is_initialized():
        return _info_from_group()
    source, values = _resolve_env(dict(os.environ))
    os.environ.update(values)
    rank, world = int(values["RANK"]), int(values["WORLD_SIZE"])
    local_rank, local_world = int(values["LOCAL_RANK"]), int(values["LOCAL_WORLD_SIZE"])
    kwargs: dict[str, Any] = {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
        kwargs["device_id"] = device
    else:
        device, backend = torch.device("cpu"), "gloo"
    tdist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    info = DistInfo(rank, world, local_rank, local_world, device, backend)
    log.debug("process group from %s env: %s", source, info)
    return info


def teardown() -> None:
    """Destroy the process groups (no-op when there is none), after a last barrier: a rank that tears its
    gloo/NCCL connections down while a peer is still finishing its last collective can abort that peer."""
    if tdist.is_available() and tdist.is_initialized():
        try:
            barrier()
        except Exception as err:  # a peer already died: nothing to wait for
            log.warning("teardown: final barrier failed (%s)", err)
        tdist.destroy_process_group()


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def barrier() -> None:
    """Barrier over the default group (no-op without one)."""
    if not _active():
        return
    if tdist.get_backend() == "nccl":
        tdist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        tdist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean of a floating-point ``tensor`` over all ranks; returns it. Must be on the group's device."""
    if _active() and tdist.get_world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        tensor.div_(tdist.get_world_size())
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects)."""
    if not _active() or tdist.get_world_size() == 1:
        return obj
    box = [obj if tdist.get_rank() == src else None]
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else None
    tdist.broadcast_object_list(box, src=src, device=device)
    return box[0]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default group, or (0, 1) without one."""
    if _active():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (picklable objects; ``[obj]`` without a group)."""
    if not _active() or tdist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def raise_if_any_rank_failed(error: Optional[str], exc_type: type[Exception] = RuntimeError) -> None:
    """Collective: every rank raises ``exc_type`` when any rank reports an error message (``None`` = this rank is
    fine), so no rank waits forever in a later collective for a peer that gave up. The message names the first
    failing rank."""
    errors = [(rank, e) for rank, e in enumerate(all_gather_object(error)) if e]
    if errors:
        rank, message = errors[0]
        more = f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
        raise exc_type(message if rank_and_world()[1] == 1 else f"rank {rank}: {message}{more}")
