"""The engine-neutral parts of the engine interface: ``TrainedPart.full_model`` / ``full_state_dict`` (a plain, callable
copy of the full weights for evaluation) on REAL 2-process gloo groups under FSDP2 and DeepSpeed ZeRO-1/2/3, the
engine registry, ``LocalPart``, and the layering of core/engines (base imports no engine, no engine imports another).
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_utils import ToyModel, run_distributed

REPO = Path(__file__).resolve().parents[2]
DECAY = 0.9
STEPS = 4
ATOL = 1e-5  # fp32: sharded training vs the unsharded reference (the engine parity tests' bound)


def _batch(step, n=16):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)


def _kinds():
    from core.config import EngineConfig

    return {
        "fsdp2": EngineConfig(kind="fsdp2", precision="fp32"),
        **{f"zero{s}": EngineConfig(kind="deepspeed", precision="fp32", zero_stage=s) for s in (1, 2, 3)},
    }


def _full_model_worker(dist):
    """Train the toy model a few steps under each engine and, side by side, an unsharded reference (+ hand EMA);
    return how far the outputs of ``full_model("ema")`` / ``full_model("model")`` are from the reference's."""
    from core.config import OptimizerConfig
    from core.engines import build_engine, build_optimizer

    ocfg = OptimizerConfig(lr=1e-2, weight_decay=0.01)
    torch.manual_seed(3)
    init = ToyModel()
    x_eval = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))

    ref, ref_ema = copy.deepcopy(init), copy.deepcopy(init).requires_grad_(False)
    opt = build_optimizer([p for p in ref.parameters() if p.requires_grad], ocfg, torch.device("cpu"))
    for step in range(STEPS):
        x, y = _batch(step)
        F.mse_loss(ref(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ref_ema.parameters(), ref.parameters()):
                e.lerp_(p, 1 - DECAY)
    with torch.no_grad():
        want = {"model": ref.eval()(x_eval), "ema": ref_ema.eval()(x_eval)}

    out = {"ema_differs": float((want["ema"] - want["model"]).abs().max())}
    lo, hi = dist.rank * 16 // dist.world_size, (dist.rank + 1) * 16 // dist.world_size
    for name, ecfg in _kinds().items():
        engine = build_engine(ecfg, dist)
        part = engine.prepare("model", copy.deepcopy(init), ocfg, DECAY, "blocks")
        for step in range(STEPS):
            x, y = _batch(step)
            part.backward(F.mse_loss(part.module(x[lo:hi]), y[lo:hi]))
            part.step()
        res = {}
        for which in ("ema", "model"):
            with part.full_model(which) as model:
                assert type(model) is ToyModel, type(model)  # a plain module, not a wrapper
                assert not model.training and not any(p.requires_grad for p in model.parameters())
                assert all(p.device == dist.device for p in model.parameters())
                with torch.no_grad():
                    for _ in range(dist.rank + 1):  # local forward: any number of calls
                        got = model(x_eval)
                res[which] = float((got - want[which]).abs().max())
                model.gate.data.fill_(0.0)  # the copy is the context's own
            sd = part.full_state_dict(which, rank0_only=False)
            assert list(sd) == list(init.state_dict()), name
            assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in sd.values())
            assert float(sd["gate"].abs().max()) > 0, "changing the full_model copy changed the part"
        with part.full_model("ema", rank0_only=True) as model:
            res["rank0_only"] = (model is None) if dist.rank else float((model(x_eval) - want["ema"]).abs().max())
        assert part.full_state_dict("ema", rank0_only=True) == {} or dist.rank == 0
        out[name] = res
    return out


@pytest.mark.timeout(300)
def test_full_model_equals_unsharded_reference_on_every_engine():
    """FSDP2 and DeepSpeed ZeRO-1/2/3 on 2 gloo ranks: the plain model that ``full_model`` yields (EMA or raw
    weights, every rank or rank 0 only) computes what the unsharded reference computes, after training."""
    results = run_distributed(_full_model_worker, world_size=2, timeout_s=240)
    for rank, out in enumerate(results):
        assert out["ema_differs"] > 1e-3, out  # EMA and raw weights are told apart
        for name in _kinds():
            res = out[name]
            assert res["ema"] < ATOL and res["model"] < ATOL, (rank, name, res)
            if rank == 0:
                assert res["rank0_only"] < ATOL, (name, res)
            else:
                assert res["rank0_only"] is True, (name, res)


def _one_rank_worker(dist):
    """FSDP2 on one rank (full_tensor of a 1-rank shard may be the local storage itself): the copy owns its tensors."""
    from core.config import EngineConfig, OptimizerConfig
    from core.engines import build_engine

    torch.manual_seed(3)
    init = ToyModel()
    part = build_engine(EngineConfig(precision="fp32"), dist).prepare(
        "model", copy.deepcopy(init), OptimizerConfig(), DECAY
    )
    x = torch.randn(5, 4)
    with part.full_model("model") as model:
        same = torch.equal(model(x), init(x))
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.zero_()
    after = part.full_state_dict("model")
    return same, all(torch.equal(after[k], v) for k, v in init.state_dict().items())


def test_full_model_on_one_rank_is_a_copy():
    [(same, untouched)] = run_distributed(_one_rank_worker, world_size=1)
    assert same and untouched


# ------------------------------------------------------------------------------------------------ one process
def test_local_part_full_model_is_the_module_itself():
    from core.engines import LocalPart

    torch.manual_seed(0)
    model, ema = ToyModel().train(), ToyModel().train()
    part = LocalPart("model", model, ema=ema)
    with part.full_model("ema") as m:
        assert m is ema and not m.training
    assert ema.training  # mode restored
    with part.full_model("model") as m:
        assert m is model
    sd = part.full_state_dict("ema")
    assert list(sd) == list(ema.state_dict()) and all(torch.equal(sd[k], v) for k, v in ema.state_dict().items())
    with pytest.raises(ValueError, match="no EMA"):
        with LocalPart("m", model).full_model("ema"):
            pass
    with pytest.raises(RuntimeError, match="no optimizer"):
        part.step()


def test_engine_registry():
    from core.config import EngineConfig
    from core.engines import ENGINES, build_engine, engine_class, register_engine
    from core.engines.fsdp2 import FSDP2Engine

    assert engine_class("fsdp2") is FSDP2Engine
    assert set(ENGINES) == {"fsdp2", "deepspeed"}
    with pytest.raises(ValueError, match=r"engine\.kind: unknown engine 'ddp' \(expected 'fsdp2' or 'deepspeed'\)"):
        build_engine(EngineConfig(kind="ddp"), None)
    with pytest.raises(ValueError, match="module:Class"):
        register_engine("x", "no_colon")


def test_meta_skeleton_keeps_buffers_and_costs_no_parameter_memory():
    from core.engines.base import meta_skeleton

    torch.manual_seed(0)
    model = ToyModel()
    model.register_buffer("table", torch.arange(3.0), persistent=False)  # like RoPE tables: not in state dicts
    skel = meta_skeleton(model)
    assert all(p.is_meta for p in skel.parameters())
    assert [n for n, _ in skel.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [p.requires_grad for p in skel.parameters()] == [p.requires_grad for p in model.parameters()]
    assert torch.equal(skel.table, model.table) and skel.table is not model.table
    assert all(not p.is_meta for p in model.parameters())  # the model itself is untouched


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engines_layering():
    """base.py imports no engine, no engine imports another, and core/engines imports nothing above core."""
    root = REPO / "core" / "engines"
    engines = {"core.engines.fsdp2", "core.engines.deepspeed"}
    assert not _imports(root / "base.py") & (engines | {"core.engines"})
    for name in ("fsdp2", "deepspeed"):
        assert not _imports(root / f"{name}.py") & (engines - {f"core.engines.{name}"}), name
    for path in root.glob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] in ("data", "models", "tools", "launchers", "train")}
        assert not bad, (path.name, bad)
        assert "core.checkpoint" not in _imports(path) and "core.trainer" not in _imports(path), path.name
