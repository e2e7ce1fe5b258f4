"""A training step with no device->host reads (issue #18, item 2; core/hostsync.py).

* The FSDP2 step with a fused optimizer skips a non-finite update on the device: weights, Adam moments and step
  count, EMA untouched; finite steps give the same bits as the unconditional update of before; no host read.
* The trainer (tiny DiT, real gloo ranks, fused AdamW on the CPU) makes no host read in its step and stop agreement
  (HostSyncCounter: every op a host read goes through); skipped steps are counted on the device and logged; the
  consecutive non-finite limit raises the same error for the step that reached it, at most ``log_every - 1`` steps
  late and never after a checkpoint past it; a signal checkpoints and exits 75 on every rank at the same step, at
  most one step after the step in which it arrived.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_utils import ToyModel, run_distributed
from test_engine_fsdp2 import _data, _full_optim, _state
from test_train_resume import write_toy_latents

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/tiny_dit.yaml")
DECAY = 0.9

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------------------------- units
def test_host_sync_counter_sees_host_reads():
    from core.hostsync import HostSyncCounter

    t = torch.ones(3)
    with HostSyncCounter() as syncs:
        u = t * 2 + 1
        torch.isfinite(u).all()
    assert syncs.calls == []
    with HostSyncCounter() as syncs:
        u.sum().item()
        bool(u[0] > 0)
        float(u[1])
        torch.nonzero(u)
    assert [name for name, _ in syncs.calls] == ["_local_scalar_dense"] * 3 + ["nonzero"], syncs.calls
    with HostSyncCounter(device_only=True) as syncs:
        u.sum().item()
    assert syncs.calls == []


def test_nonfinite_counter():
    from core.hostsync import HostSyncCounter, NonFiniteCounter

    counter = NonFiniteCounter(torch.device("cpu"), limit=3, streak=1, skipped=4)
    pattern = [True, False, False, True, False, False, False, False, True]
    with HostSyncCounter() as syncs:
        for step, ok in enumerate(pattern, start=11):
            counter.update(torch.tensor(ok), step)
    assert syncs.calls == []
    state = counter.read()
    # the streak reached 3 at step 17 (steps 15, 16, 17 non-finite) and is still remembered after the reset
    assert (state.streak, state.skipped, state.tripped_step) == (0, 4 + 6, 17)
    assert NonFiniteCounter(torch.device("cpu"), 2, streak=1).read().tripped_step is None


def test_ema_update_gated_on_device_same_bits():
    from core.ema import ema_update_

    torch.manual_seed(0)
    ema = [torch.randn(100), torch.randn(3, 7)]
    src = [torch.randn_like(t) for t in ema]
    a, b, c = ([t.clone() for t in ema] for _ in range(3))
    ema_update_(a, src, 0.9999)
    ema_update_(b, src, 0.9999, apply=torch.tensor(True))
    ema_update_(c, src, 0.9999, apply=torch.tensor(False))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(c, ema))


# ---------------------------------------------------------------------------------------------------- FSDP2 step
def _assert_equal(got, ref, what):
    assert got.keys() == ref.keys(), what
    for k in ref:
        assert torch.equal(got[k], ref[k]), f"{what}: {k} differs"


@torch.no_grad()
def _step_before(part):
    """FSDP2Part.step as it was before the device-side skip (host read of the norm, unconditional update)."""
    from core.ema import ema_update_
    from core.engines.fsdp2 import _local

    norm = part.grad_norm()
    if not bool(torch.isfinite(norm)):
        part.optimizer.zero_grad(set_to_none=True)
        return norm
    if part.grad_clip is not None:
        coef = torch.clamp(part.grad_clip / (norm + 1e-6), max=1.0)
        torch._foreach_mul_([_local(p.grad) for p in part.trainable if p.grad is not None], coef)
    part.optimizer.step()
    part.optimizer.zero_grad(set_to_none=True)
    ema_update_(part._ema_dsts[0], part._ema_src, part.ema_decay)
    return norm


def _fsdp2_device_skip_worker(dist):
    from core.config import EngineConfig, OptimizerConfig
    from core.engines import build_engine
    from core.hostsync import HostSyncCounter

    torch.manual_seed(3)
    model = ToyModel()
    twin = copy.deepcopy(model)
    ocfg = OptimizerConfig(lr=1e-2, weight_decay=0.01, fused=True)  # fused AdamW on the CPU too
    engine = build_engine(EngineConfig(precision="fp32"), dist)
    part = engine.prepare("m", model, ocfg, DECAY, grad_clip=0.05)
    ref = engine.prepare("r", twin, ocfg, DECAY, grad_clip=0.05)
    assert part.skips_on_device and ref.skips_on_device
    x, y = _data(seed=5)
    mine = slice(dist.rank * 8, (dist.rank + 1) * 8)
    syncs = HostSyncCounter()
    for step in range(6):
        xb = x.clone()
        nan_step = step in (2, 3)
        if nan_step and dist.rank == 1:  # non-finite gradients on one rank only
            xb[mine.start, 0] = float("nan")
        # (only once the optimizer has state: get_optimizer_state_dict initialises missing state with a zero-lr step)
        before = _state(part) if nan_step else None
        for p in (part, ref):
            p.backward(F.mse_loss(p.module(xb[mine]), y[mine]))
        with syncs:
            norm = part.step()
        ref_norm = _step_before(ref)
        assert torch.equal(norm, ref_norm) or not (torch.isfinite(norm) or torch.isfinite(ref_norm))
        if nan_step:
            assert not torch.isfinite(norm), norm
            _assert_equal(_state(part), before, f"step {step}: skipped update changed the state")
            assert all(p.grad is None for p in part.module.parameters())
        else:
            assert torch.isfinite(norm) and float(norm) > 0.05, "test needs active clipping"
        _assert_equal(_state(part), _state(ref), f"step {step}: device skip vs before")
    assert syncs.calls == [], syncs.calls
    steps = {k: int(v) for k, v in _full_optim(part).items() if k.endswith(".step")}
    assert steps and set(steps.values()) == {4}, steps  # the skipped steps did not count
    return True


def test_fsdp2_fused_step_skips_nonfinite_on_device_same_bits_no_host_read():
    assert run_distributed(_fsdp2_device_skip_worker, world_size=2) == [True, True]


# ---------------------------------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_toy_latents(tmp_path_factory.mktemp("data") / "mds")


def _trainer_worker(dist, data, run_dir, overrides, nan_steps, signal_step):
    """Train the tiny DiT with a fused AdamW, counting host reads in the guarded parts of every step; the loss is
    NaN at the (0-based) steps ``nan_steps``; rank 0 sends itself SIGUSR1 during step ``signal_step``."""
    from core.hostsync import HostSyncCounter
    from core.trainer import Trainer
    from launchers.experiment import load_config, validate
    from models.tasks import build_task

    cfg = validate(
        load_config(
            CONFIG,
            [f"data.path={data}", f"run_dir={run_dir}", "wandb.mode=disabled", "optimizer.fused=true", *overrides],
        ),
        world_size=dist.world_size,
    )
    trainer = Trainer(cfg, dist, build_task(cfg, dist))
    syncs = HostSyncCounter()
    trainer.step_guard = lambda: syncs
    loss = trainer.task.loss

    def patched(phase, batch, parts, ctx):
        value, metrics = loss(phase, batch, parts, ctx)
        if ctx.step == signal_step and dist.rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        if ctx.step in nan_steps:
            value = value * float("nan")
        return value, metrics

    trainer.task.loss = patched
    try:
        try:
            result = trainer.train()
            outcome = (result.step, result.exit_code)
        except Exception as e:  # NonFiniteLossError: same step, same message on every rank
            outcome = (trainer.step, f"{type(e).__name__}: {e}")
    finally:
        trainer.close()
    return outcome, syncs.calls, trainer.skipped_steps


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    from core.checkpoint import complete_checkpoints

    return [step for step, _ in complete_checkpoints(run_dir / "checkpoints")]


def test_trainer_signal_and_skips_without_host_reads(dataset, tmp_path):
    """2 ranks: NaN at steps 2 and 3 (0-based) is skipped and counted (limit 3 not reached); SIGUSR1 on rank 0
    during step 5 (0-based; the 6th step) stops both ranks after the 7th step: checkpoint, exit 75."""
    run_dir = tmp_path / "run"
    over = [
        "train.max_steps=12",
        "train.log_every=4",
        "checkpoint.every_steps=100",
        "train.grad_clip=1.0",
        "train.max_consecutive_nonfinite=3",
    ]
    results = run_distributed(_trainer_worker, world_size=2, args=(dataset, run_dir, over, (2, 3), 5))
    for outcome, calls, skipped in results:
        assert calls == [], calls
        assert outcome == (7, 75), outcome
        assert skipped == 2
    assert _checkpoint_steps(run_dir) == [7]
    records = {r["step"]: r for r in _records(run_dir) if "skipped_steps" in r}
    assert records[4]["skipped_steps"] == 2
    from core.checkpoint import complete_checkpoints, extra_path

    [(_, ckpt)] = complete_checkpoints(run_dir / "checkpoints")
    extra = torch.load(extra_path(ckpt, 0), weights_only=False)
    assert (extra["skipped_steps"], extra["nonfinite_streak"]) == (2, 0)


def test_trainer_consecutive_nonfinite_limit(dataset, tmp_path):
    """1 rank: 3 NaN steps in a row (0-based 2..4: the streak reaches the limit at step 5), finite again afterwards;
    the limit is enforced at the next read (the checkpoint of step 6, before it is written), same message."""
    run_dir = tmp_path / "run"
    over = ["train.max_steps=12", "train.log_every=8", "checkpoint.every_steps=6", "train.max_consecutive_nonfinite=3"]
    [(outcome, calls, skipped)] = run_distributed(
        _trainer_worker, world_size=1, args=(dataset, run_dir, over, (2, 3, 4), -1)
    )
    assert calls == [], calls
    step, message = outcome
    assert step == 6
    assert message.startswith(
        "NonFiniteLossError: 3 consecutive steps with a non-finite loss/gradient at step 5 "
        "(train.max_consecutive_nonfinite=3)"
    ), message
    assert skipped == 3
    assert _checkpoint_steps(run_dir) == []


def test_trainer_signal_one_rank_stops_at_once(dataset, tmp_path):
    run_dir = tmp_path / "run"
    over = ["train.max_steps=8", "train.log_every=8", "checkpoint.every_steps=100"]
    [(outcome, calls, skipped)] = run_distributed(_trainer_worker, world_size=1, args=(dataset, run_dir, over, (), 2))
    assert calls == [] and skipped == 0
    assert outcome == (3, 75)
    assert _checkpoint_steps(run_dir) == [3]


def _tool_main(dist, argv):
    """tools/check_host_sync.py's main() on a shared rank (the tool tears down only a process group it made)."""
    import contextlib
    import io

    from tools import check_host_sync

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = check_host_sync.main(argv)
    return code, out.getvalue()


def test_check_host_sync_tool(tmp_path):
    """tools/check_host_sync.py (what the GPU report runs under CUDA's sync-debug mode "error"): clean with the fused
    optimizer (the script); it does catch the host reads of the foreach optimizer's path (norm check, host-side step
    count; its main() on a shared rank)."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "tools/check_host_sync.py"), "--out", str(tmp_path), "--steps", "3"]
    ok = subprocess.run(cmd + ["train.grad_clip=1.0"], env=env, capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    result = json.loads(ok.stdout[ok.stdout.index("{") :])
    assert result["ok"] and result["trained_steps"] == 3 and result["host_reads"] == []
    argv = ["--out", str(tmp_path), "--steps", "3", "optimizer.fused=false"]
    [(code, out)] = run_distributed(_tool_main, world_size=1, args=(argv,))
    assert code == 1, out
    assert ["_local_scalar_dense", "cpu"] in json.loads(out[out.index("{") :])["host_reads"]
