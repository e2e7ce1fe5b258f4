"""FSDP2 engine on a REAL 2-process gloo group vs a plain single-process reference model.

Each rank trains on its half of a fixed batch; the reference trains on the whole batch with the same
optimizer. Losses, grad norms, final weights and EMA must agree to fp32 rounding. Hybrid sharding (HSDP) must
train bit-identically to full sharding and its checkpoints load under full sharding (2 ranks and 1) and back;
precision "bf16-autocast" must equal the plain model under torch.autocast and resume bit-exactly.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_utils import ToyModel, run_distributed
from test_lightningdit import randomize, tiny

ATOL = 1e-5
DECAY = 0.9
# aot_eager exercises dynamo + AOT autograd without a C++ toolchain run; set to "inductor" for the full path.
COMPILE_BACKEND = os.environ.get("LLAT_TEST_COMPILE_BACKEND", "aot_eager")


def _data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)


def _full(module):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return {
        k: v.detach().clone()
        for k, v in get_model_state_dict(module, options=StateDictOptions(full_state_dict=True)).items()
    }


def _full_optim(part):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(part.module, part.optimizer, options=StateDictOptions(full_state_dict=True))
    return {f"{k}.{n}": v.detach().clone() for k, st in sd["state"].items() for n, v in st.items()}


def _assert_close_sd(got, ref, atol=ATOL, what=""):
    assert list(got.keys()) == list(ref.keys()), (what, list(got.keys()), list(ref.keys()))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=atol, rtol=0, msg=lambda m: f"{what} {k}: {m}")


def _assert_equal_sd(got, ref, what=""):
    assert got.keys() == ref.keys(), what
    for k in ref:
        assert torch.equal(got[k], ref[k]), f"{what} {k} changed"


@torch.no_grad()
def _hand_ema(ema, model, decay):
    for (name, e), (name2, p) in zip(ema.named_parameters(), model.named_parameters()):
        assert name == name2
        e.copy_(decay * e + (1 - decay) * p)


def _ref_step(ref, opt, x, y, clip=None):
    loss = F.mse_loss(ref(x), y)
    loss.backward()
    if clip is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters() if p.grad is not None])
    else:
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), norm


# ------------------------------------------------------------------------------------------------ workers
def _equivalence_worker(dist):
    from core.config import EngineConfig, OptimizerConfig
    from core.distributed import all_reduce_mean
    from core.engines import build_engine, build_optimizer

    torch.manual_seed(0)
    model = ToyModel()
    ref, ref_ema = copy.deepcopy(model), copy.deepcopy(model)
    ocfg = OptimizerConfig(lr=1e-2, weight_decay=0.01)
    engine = build_engine(EngineConfig(precision="fp32"), dist)
    part = engine.prepare("model", model, ocfg, DECAY, "blocks")
    ref_opt = build_optimizer([p for p in ref.parameters() if p.requires_grad], ocfg, torch.device("cpu"))
    assert part.ema is not None and not part.ema.training
    assert all(not p.requires_grad for p in part.ema.parameters())

    x, y = _data()
    mine = slice(dist.rank * 8, (dist.rank + 1) * 8)
    # 1) whole batch split across the 2 ranks, with an LR change every step
    for step in range(3):
        lr = 1e-2 * (step + 1) / 3
        part.set_lr(lr)
        for g in ref_opt.param_groups:
            g["lr"] = lr
        loss = F.mse_loss(part.module(x[mine]), y[mine])
        part.backward(loss)
        norm = part.step()
        ref_loss, ref_norm = _ref_step(ref, ref_opt, x, y)
        _hand_ema(ref_ema, ref, DECAY)
        assert not isinstance(norm, torch.distributed.tensor.DTensor) and norm.dim() == 0
        torch.testing.assert_close(all_reduce_mean(loss.detach().clone()), ref_loss, atol=ATOL, rtol=0)
        torch.testing.assert_close(norm, ref_norm, atol=ATOL, rtol=1e-5)
    # 2) gradient accumulation: 2 micro-batches (sync=False, then sync=True) == one batch
    for _step in range(2):
        for k in range(2):
            mb = slice(mine.start + 4 * k, mine.start + 4 * (k + 1))
            part.backward(F.mse_loss(part.module(x[mb]), y[mb]) / 2, sync=(k == 1))
            if k == 0:  # no reduce-scatter yet: FSDP2 keeps the unsharded gradient to itself
                assert all(p.grad is None for p in part.module.parameters())
        part.step()
        _ref_step(ref, ref_opt, x, y)
        _hand_ema(ref_ema, ref, DECAY)

    full, ema = _full(part.module), _full(part.ema)
    _assert_close_sd(full, ref.state_dict(), what="weights")
    _assert_close_sd(ema, ref_ema.state_dict(), atol=1e-6, what="EMA")
    # frozen parameter: unchanged, and averaged into the EMA like the official code (stays equal)
    assert torch.equal(full["pos"], ref.pos) and torch.equal(ema["pos"], ref.pos)
    assert torch.equal(full["scale"], ref.scale)
    # optimizer moments equal the reference's too
    ref_state = {n: ref_opt.state[p] for n, p in ref.named_parameters() if p.requires_grad}
    for key, value in _full_optim(part).items():
        name, field = key.rsplit(".", 1)
        torch.testing.assert_close(value, ref_state[name][field].to(value.dtype), atol=ATOL, rtol=1e-4)
    return True


def _clip_nonfinite_worker(dist):
    from core.config import EngineConfig, OptimizerConfig
    from core.engines import build_engine, build_optimizer

    torch.manual_seed(3)
    model = ToyModel()
    ref = copy.deepcopy(model)
    ocfg = OptimizerConfig(lr=1e-2)
    clip = 0.05
    part = build_engine(EngineConfig(precision="fp32"), dist).prepare("m", model, ocfg, DECAY, grad_clip=clip)
    ref_opt = build_optimizer([p for p in ref.parameters() if p.requires_grad], ocfg, torch.device("cpu"))
    x, y = _data(seed=5)
    mine = slice(dist.rank * 8, (dist.rank + 1) * 8)

    part.backward(F.mse_loss(part.module(x[mine]), y[mine]))
    norm = part.step()
    _, ref_norm = _ref_step(ref, ref_opt, x, y, clip=clip)
    assert float(ref_norm) > clip, "test needs active clipping"
    torch.testing.assert_close(norm, ref_norm, atol=ATOL, rtol=1e-5)  # pre-clip norm
    _assert_close_sd(_full(part.module), ref.state_dict(), what="clipped step")

    # non-finite gradient on one rank only: no update anywhere, non-finite norm returned on every rank
    before, ema_before, opt_before = _full(part.module), _full(part.ema), _full_optim(part)
    xb = x.clone()
    if dist.rank == 1:
        xb[mine.start, 0] = float("nan")
    part.backward(F.mse_loss(part.module(xb[mine]), y[mine]))
    bad = part.step()
    assert not torch.isfinite(bad), bad
    _assert_equal_sd(_full(part.module), before, "weights")
    _assert_equal_sd(_full(part.ema), ema_before, "EMA")
    _assert_equal_sd(_full_optim(part), opt_before, "optimizer")
    assert all(p.grad is None for p in part.module.parameters())

    # and training continues normally afterwards
    part.backward(F.mse_loss(part.module(x[mine]), y[mine]))
    norm = part.step()
    _, ref_norm = _ref_step(ref, ref_opt, x, y, clip=clip)
    torch.testing.assert_close(norm, ref_norm, atol=ATOL, rtol=1e-5)
    _assert_close_sd(_full(part.module), ref.state_dict(), what="after skipped step")
    return True


def _wrapping_worker(dist):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from core.config import EngineConfig, OptimizerConfig
    from core.engines import build_optimizer
    from core.engines.fsdp2 import FSDP2Engine

    plain_keys = list(ToyModel().state_dict().keys())
    x, y = _data(seed=7)
    mine = slice(dist.rank * 8, (dist.rank + 1) * 8)
    ocfg = OptimizerConfig(lr=1e-2)
    report = {}
    for ac, comp in [(True, False), (False, True), (True, True)]:
        torch.manual_seed(0)
        model = ToyModel()
        ref = copy.deepcopy(model)
        ref_opt = build_optimizer([p for p in ref.parameters() if p.requires_grad], ocfg, torch.device("cpu"))
        engine = FSDP2Engine(
            EngineConfig(precision="fp32", activation_checkpointing=ac, compile=comp),
            dist,
            compile_kwargs={"backend": COMPILE_BACKEND},
        )
        part = engine.prepare("model", model, ocfg, DECAY, "blocks")
        assert list(part.module.state_dict().keys()) == plain_keys, (ac, comp)
        assert list(get_model_state_dict(part.module).keys()) == plain_keys, (ac, comp)
        assert list(part.ema.state_dict().keys()) == plain_keys
        assert isinstance(part.module.blocks[0], CheckpointWrapper) == ac
        for _ in range(2):
            part.backward(F.mse_loss(part.module(x[mine]), y[mine]))
            part.step()
            _ref_step(ref, ref_opt, x, y)
        _assert_close_sd(_full(part.module), ref.state_dict(), what=f"ac={ac} compile={comp}")
        if comp:
            from torch._dynamo.utils import counters

            assert counters["stats"]["unique_graphs"] > 0, "compiled forward never ran"
        assert list(part.module.state_dict().keys()) == plain_keys
        report[(ac, comp)] = True

    # bf16 compute: bf16 all-gathered weights in forward, fp32 sharded master weights / grads / EMA
    torch.manual_seed(0)
    model = ToyModel()
    ref = copy.deepcopy(model)
    part = FSDP2Engine(EngineConfig(precision="bf16"), dist).prepare("model", model, ocfg, DECAY, "blocks")
    seen = []
    hook = part.module.blocks[0].fc.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, o.dtype)))
    loss = F.mse_loss(part.module(x[mine]), y[mine])
    hook.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16)], seen
    part.backward(loss.float())
    assert all(p.grad.dtype == torch.float32 for p in part.module.parameters() if p.requires_grad)
    norm = part.step()
    assert torch.isfinite(norm)
    assert all(p.dtype == torch.float32 for p in part.module.parameters())
    assert all(p.dtype == torch.float32 for p in part.ema.parameters())
    torch.testing.assert_close(loss.float(), F.mse_loss(ref(x[mine]), y[mine]), atol=3e-2, rtol=3e-2)
    return report


def _state(part):
    """Full (unsharded) weights, EMA and Adam moments of an FSDP2 part (collective)."""
    return {
        **{f"model.{k}": v for k, v in _full(part.module).items()},
        **{f"ema.{k}": v for k, v in _full(part.ema).items()},
        **{f"optim.{k}": v for k, v in _full_optim(part).items()},
    }


def _build_toy(dist, seed=0, **engine_kw):
    from core.config import EngineConfig, OptimizerConfig
    from core.engines.fsdp2 import FSDP2Engine

    torch.manual_seed(seed)
    engine = FSDP2Engine(EngineConfig(precision="fp32", **engine_kw), dist)
    return engine, engine.prepare("model", ToyModel(), OptimizerConfig(lr=1e-2, weight_decay=0.01), DECAY, "blocks")


def _train_toy(part, dist, steps=3):
    """``steps`` optimizer steps on this rank's share of a fixed batch, the last one as 2 accumulated micro-batches;
    returns the per-step (all-reduced loss, grad norm)."""
    from core.distributed import all_reduce_mean

    x, y = _data()
    n = 16 // dist.world_size
    log = []
    for step in range(steps):
        micro = 2 if step == steps - 1 else 1
        total = torch.zeros(())
        for k in range(micro):
            mb = slice(dist.rank * n + k * n // micro, dist.rank * n + (k + 1) * n // micro)
            loss = F.mse_loss(part.module(x[mb]), y[mb]) / micro
            part.backward(loss, sync=(k == micro - 1))
            total += loss.detach()
        log.append((all_reduce_mean(total), part.step()))
    return log


def _hybrid_worker(dist, ckpt_root):
    """HSDP (2 replicas x 1 shard; 1 x 2 = the default group of LOCAL_WORLD_SIZE ranks) against full sharding, and
    checkpoints written under one mesh loaded under the other."""
    from torch.distributed.tensor import Replicate, Shard

    from core.checkpoint import load_checkpoint, save_checkpoint
    from core.config import EngineConfig
    from core.engines.fsdp2 import FSDP2Engine

    ckpt_root = Path(ckpt_root)
    runs = {}
    for name, kw in (
        ("full", {}),
        ("hybrid_2x1", dict(sharding="hybrid", shard_group_size=1)),
        ("hybrid_1x2", dict(sharding="hybrid")),
    ):
        engine, part = _build_toy(dist, **kw)
        runs[name] = (engine, part, _train_toy(part, dist), _state(part))
    weight = runs["hybrid_2x1"][1].module.inp.weight
    assert weight.device_mesh.mesh_dim_names == ("replicate", "shard") and weight.device_mesh.shape == (2, 1)
    assert weight.placements == (Replicate(), Shard(0))
    assert runs["hybrid_2x1"][1].ema.inp.weight.device_mesh is weight.device_mesh  # EMA on the same mesh
    assert runs["hybrid_1x2"][0].mesh.shape == (1, 2)  # 2 ranks per "node" here
    # Bit-exact: on 2 ranks every gradient reduction is the single addition a + b, whichever group runs it.
    ref_log, ref_state = runs["full"][2], runs["full"][3]
    for name in ("hybrid_2x1", "hybrid_1x2"):
        log, state = runs[name][2], runs[name][3]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(log, ref_log)), (name, log)
        _assert_equal_sd(state, ref_state, f"{name} vs full sharding")
    # checkpoints: hybrid -> full and full -> hybrid, fresh parts with other initial weights
    for src, dst_kw in (("hybrid_2x1", {}), ("full", dict(sharding="hybrid", shard_group_size=1))):
        engine, part = runs[src][:2]
        save_checkpoint(engine, ckpt_root / src, {"model": part}, {"step": 3})
        engine2, part2 = _build_toy(dist, seed=7, **dst_kw)
        assert load_checkpoint(engine2, ckpt_root / src, {"model": part2}) == {"step": 3}
        _assert_equal_sd(_state(part2), runs[src][3], f"{src} checkpoint loaded under {dst_kw or 'full'}")
    with pytest.raises(ValueError, match="engine.shard_group_size: world size 2 is not divisible by shard_group_"):
        _ = FSDP2Engine(EngineConfig(sharding="hybrid", shard_group_size=3), dist).mesh
    return {name: runs[name][3] for name in ("full", "hybrid_2x1")}


def _hybrid_one_rank_worker(dist, ckpt_root, states):
    """The 2-rank checkpoints on 1 rank: the hybrid one under full sharding, the full one under hybrid (1 x 1)."""
    from core.checkpoint import load_checkpoint

    for src, dst_kw in (("hybrid_2x1", {}), ("full", dict(sharding="hybrid"))):
        engine, part = _build_toy(dist, seed=7, **dst_kw)
        extra = load_checkpoint(engine, Path(ckpt_root) / src, {"model": part})
        assert extra == {"step": 3, "world_size_changed": True}
        _assert_equal_sd(_state(part), states[src], f"{src} checkpoint on 1 rank")
    return True


def _autocast_worker(dist, ckpt_dir):
    """precision="bf16-autocast" on a tiny LightningDiT: forward and loss bit-identical to the plain model under
    torch.autocast(cpu, bf16) with the same weights (fp32 weights, fp32 residual stream), then 2 training steps, a
    checkpoint, 2 more; a fresh part resumes from the checkpoint and repeats the last 2 steps bit for bit."""
    from core.checkpoint import load_checkpoint, save_checkpoint
    from core.config import EngineConfig, OptimizerConfig
    from core.engines.fsdp2 import FSDP2Engine
    from models.transport import Transport

    transport = Transport()

    def build(seed):
        torch.manual_seed(seed)
        model = randomize(tiny())
        engine = FSDP2Engine(EngineConfig(precision="bf16-autocast"), dist)
        return model, engine, engine.prepare("model", copy.deepcopy(model), OptimizerConfig(lr=1e-3), DECAY)

    def loss_of(module, step):
        g = torch.Generator().manual_seed(100 * step + dist.rank)
        x1, y = torch.randn(2, 4, 4, 4, generator=g), torch.randint(0, 10, (2,), generator=g)
        t, noise = torch.rand(2, generator=g), torch.randn(2, 4, 4, 4, generator=g)
        torch.manual_seed(step)  # label dropout
        return transport.training_losses(module, x1, {"y": y}, t=t, noise=noise)["loss"].mean()

    def train(engine, part, steps):
        losses = []
        for step in steps:
            with engine.autocast():
                loss = loss_of(part.module, step)
            part.backward(loss)
            part.step()
            losses.append(loss.detach())
        return losses

    ref, engine, part = build(seed=0)
    seen = []
    hook = part.module.blocks[0].register_forward_pre_hook(
        lambda m, args: seen.append((args[0].dtype, next(m.parameters()).dtype))
    )
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 10])  # 10: the null class
    with engine.autocast():
        out, loss = part.module.eval()(x, t, y), loss_of(part.module.train(), 0)
    hook.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_loss = ref.eval()(x, t, y), loss_of(ref.train(), 0)
    assert seen[0] == (torch.float32, torch.float32), seen  # fp32 residual and weights
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out)
    assert torch.equal(loss, ref_loss)

    ckpt_dir = Path(ckpt_dir)
    train(engine, part, range(2))
    save_checkpoint(engine, ckpt_dir, {"model": part}, {"step": 2})
    saved = _state(part)
    live = train(engine, part, range(2, 4))
    _, engine2, part2 = build(seed=1)
    load_checkpoint(engine2, ckpt_dir, {"model": part2})
    _assert_equal_sd(_state(part2), saved, "resumed state")
    assert torch.equal(torch.stack(train(engine2, part2, range(2, 4))), torch.stack(live))
    _assert_equal_sd(_state(part2), _state(part), "state after the resumed steps")
    return True


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("world_size", [1, 2])
def test_bf16_autocast_is_plain_autocast_and_resumes_bit_exactly(tmp_path, world_size):
    assert run_distributed(_autocast_worker, world_size=world_size, args=(str(tmp_path),)) == [True] * world_size


def test_hybrid_sharding_matches_full_and_checkpoints_reshard(tmp_path):
    states = run_distributed(_hybrid_worker, world_size=2, args=(str(tmp_path),))[0]
    assert run_distributed(_hybrid_one_rank_worker, world_size=1, args=(str(tmp_path), states)) == [True]


def test_fsdp2_matches_single_process_training_accumulation_and_ema():
    assert run_distributed(_equivalence_worker, world_size=2) == [True, True]


def test_fsdp2_grad_clipping_and_nonfinite_skip():
    assert run_distributed(_clip_nonfinite_worker, world_size=2) == [True, True]


def test_fsdp2_activation_checkpointing_compile_keep_keys_and_bf16():
    print(f"compile backend for this test: {COMPILE_BACKEND}")
    results = run_distributed(_wrapping_worker, world_size=2, timeout_s=300)
    assert all(len(r) == 3 for r in results)
