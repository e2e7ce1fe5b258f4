"""tools/export.py: FSDP2 and DeepSpeed checkpoints of the same training export the same plain state dicts.

A 2-rank gloo job trains the toy model (identical init on every rank, same batches, fp32) for 10 optimizer
steps — the last 4 as 2 accumulated micro-batches — under FSDP2 and under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3,
each checkpointed by the CheckpointManager. Every export has the model's own key names (DeepSpeed's also in
the model's key order) and loads strictly with ``models.loading.load_into_model``; DeepSpeed's exports match
FSDP2's within ``EXPORT_ATOL`` (fp32; measured differences are ~1e-8, the bound leaves room for
reduction-order rounding).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_utils import ToyModel, run_distributed

EXPORT_ATOL = 1e-6
STEPS = 10
ENGINES = ("fsdp2", "zero1", "zero2", "zero3")


def _train_worker(dist, root):
    from core.checkpoint import CheckpointManager
    from core.config import CheckpointConfig, EngineConfig, OptimizerConfig
    from core.engines import build_engine

    ocfg = OptimizerConfig(lr=1e-2, weight_decay=0.01)
    torch.manual_seed(0)
    init = ToyModel()  # the same on every rank
    for name in ENGINES:
        ecfg = (
            EngineConfig(kind="fsdp2", precision="fp32")
            if name == "fsdp2"
            else EngineConfig(kind="deepspeed", precision="fp32", zero_stage=int(name[-1]))
        )
        engine = build_engine(ecfg, dist)
        part = engine.prepare("model", copy.deepcopy(init), ocfg, 0.9, "blocks")
        mgr = CheckpointManager(Path(root) / name, CheckpointConfig(every_steps=STEPS), engine, dist)
        for step in range(STEPS):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)
            part.set_lr(1e-2 * (1 + step % 3) / 3)
            mine = slice(dist.rank * 8, dist.rank * 8 + 8)
            chunks = [mine] if step < 6 else [slice(mine.start, mine.start + 4), slice(mine.start + 4, mine.stop)]
            for k, c in enumerate(chunks):
                part.backward(F.mse_loss(part.module(x[c]), y[c]) / len(chunks), sync=(k == len(chunks) - 1))
            part.step()
        mgr.save(STEPS, {"model": part}, {"step": STEPS})
    return True


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_runs")
    assert run_distributed(_train_worker, world_size=2, args=(str(root),)) == [True] * 2
    return root


def test_both_engines_export_the_same_state_dicts(checkpoints, tmp_path):
    from models.loading import export_state, load_into_model, save_export

    keys = list(ToyModel().state_dict().keys())
    exported = {name: export_state(checkpoints / name) for name in ENGINES}  # run dirs: newest checkpoint
    ref = exported["fsdp2"]
    worst = 0.0
    for name, state in exported.items():
        assert sorted(state) == ["ema", "model"], name
        for which in ("model", "ema"):
            sd = state[which]
            # DeepSpeed exports follow the model's state_dict order; DCP (FSDP2) returns its own order
            assert (sorted(sd) == sorted(keys)) if name == "fsdp2" else (list(sd) == keys), (name, which, list(sd))
            for k in keys:
                assert sd[k].dtype == torch.float32 and not sd[k].requires_grad, (name, which, k)
                torch.testing.assert_close(
                    sd[k], ref[which][k], atol=EXPORT_ATOL, rtol=0, msg=lambda m: f"{name} {which} {k}: {m}"
                )
                worst = max(worst, float((sd[k] - ref[which][k]).abs().max()))
        # the model and its EMA differ (the EMA lags), the frozen parameter is the same in both
        assert not torch.equal(state["model"]["out.weight"], state["ema"]["out.weight"])
        assert torch.equal(state["model"]["pos"], state["ema"]["pos"])
        out = save_export(state, tmp_path / f"{name}.pt")
        for which in ("ema", "model"):
            model = ToyModel()
            report = load_into_model(model, out, which=which)
            assert report.ok and report.which == which
            for k, v in model.state_dict().items():
                assert torch.equal(v, state[which][k]), (name, which, k)
    print(f"max |DeepSpeed export - FSDP2 export| = {worst:.3g}")


def test_export_main_and_errors(checkpoints, tmp_path, capsys):
    """The CLI entry point (in process; tests/integration/test_train_deepspeed.py runs the script itself)."""
    from models.loading import export_state
    from tools.export import main

    step_dir = checkpoints / "zero3" / "checkpoints" / f"step_{STEPS:07d}"
    out = tmp_path / "cli.pt"
    assert main([str(step_dir), str(out), "--part", "model"]) == 0
    assert "exported deepspeed checkpoint" in capsys.readouterr().out
    saved = torch.load(out, map_location="cpu", weights_only=True)
    expected = export_state(step_dir)
    for which in ("model", "ema"):
        assert saved[which].keys() == expected[which].keys()
        assert all(torch.equal(saved[which][k], expected[which][k]) for k in expected[which])
    assert main([str(checkpoints / "fsdp2" / "checkpoints" / f"step_{STEPS:07d}"), str(tmp_path / "f.pt")]) == 0
    # errors name the problem and exit 2
    assert main([str(step_dir), str(tmp_path / "x.pt"), "--part", "disc"]) == 2
    assert "no DeepSpeed checkpoint of part 'disc'" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()
