"""Engine and optimizer choices, and the distributed environment resolution, without a process group (the FSDP2
engine on real gloo ranks: tests/integration/test_engine_fsdp2.py)."""

from __future__ import annotations

import torch


def test_build_engine_and_optimizer_choices():
    import pytest

    from core.config import EngineConfig, OptimizerConfig
    from core.distributed import DistInfo
    from core.engines import build_engine, build_optimizer

    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(RuntimeError, match="process group"):  # DeepSpeed needs init_distributed()'s group
        build_engine(EngineConfig(kind="deepspeed"), info)
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(params, OptimizerConfig(name="adam", lr=0.5, betas=(0.8, 0.9)), torch.device("cpu"))
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["foreach"] and not opt.defaults["fused"] and opt.defaults["betas"] == (0.8, 0.9)
    opt = build_optimizer(params, OptimizerConfig(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)


def test_distributed_env_resolution():
    import pytest

    from core.distributed import _parse_tasks_per_node, _resolve_env

    assert _parse_tasks_per_node("4(x2),3") == [4, 4, 3] and _parse_tasks_per_node("8") == [8]
    src, v = _resolve_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node0",
            "MASTER_PORT": "29500",
            "SLURM_PROCID": "9",
            "SLURM_NTASKS": "9",
        }
    )
    assert src == "torchrun" and v == {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
    }
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "7",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4,3",
        "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.1",
        "SLURM_JOB_ID": "1234",
    }
    src, v = _resolve_env(slurm)
    assert src == "slurm" and v == {
        "RANK": "5",
        "WORLD_SIZE": "7",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "3",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": str(15000 + 1234),
    }
    src, v = _resolve_env(
        {
            **slurm,
            "MASTER_ADDR": "head",
            "MASTER_PORT": "4242",
            "SLURM_NODEID": "0",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        }
    )
    assert (v["MASTER_ADDR"], v["MASTER_PORT"], v["LOCAL_WORLD_SIZE"]) == ("head", "4242", "4")
    src, v = _resolve_env({})
    assert src == "single" and v["WORLD_SIZE"] == "1" and v["MASTER_ADDR"] == "127.0.0.1" and int(v["MASTER_PORT"]) > 0
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        _resolve_env({"RANK": "0", "WORLD_SIZE": "2"})
