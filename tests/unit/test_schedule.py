"""core/schedule.py (epoch_of, LR schedules) and the DiT's epoch-based timestep phases and phase-change logger
(models/transport.py)."""

from __future__ import annotations

import math

import pytest

from core.config import LRScheduleConfig
from core.schedule import epoch_of, lr_at
from models.dit_config import TimestepPhase
from models.transport import PhaseTracker, describe_phase, describe_phases, phase_switch_steps, timestep_phase_at

TWO = [TimestepPhase("lognorm", 2.0), TimestepPhase("uniform")]
OFFICIAL = [TimestepPhase("lognorm", 480.0), TimestepPhase("uniform")]


def test_epoch_of():
    assert epoch_of(0, 10) == 0.0
    assert epoch_of(25, 10) == 2.5
    assert epoch_of(600_480, 1251) == 480.0
    with pytest.raises(ValueError):
        epoch_of(1, 0)


def test_phase_switch_exactly_at_boundary():
    assert timestep_phase_at(0, 10, TWO)[0] == 0
    idx, phase = timestep_phase_at(19, 10, TWO)
    assert (idx, phase.kind) == (0, "lognorm")
    idx, phase = timestep_phase_at(20, 10, TWO)
    assert (idx, phase.kind) == (1, "uniform")
    assert timestep_phase_at(10**9, 10, TWO)[0] == 1
    assert phase_switch_steps(10, TWO) == [20]


def test_official_switch_at_600480():
    assert phase_switch_steps(1251, OFFICIAL) == [600_480]
    assert timestep_phase_at(600_479, 1251, OFFICIAL)[1].kind == "lognorm"
    assert timestep_phase_at(600_480, 1251, OFFICIAL)[1].kind == "uniform"


def test_fractional_until_epoch_and_three_phases():
    phases = [TimestepPhase("lognorm", 0.5), TimestepPhase("lognorm", 1.25, mean=0.5), TimestepPhase("uniform")]
    # steps_per_epoch 10: phase 0 for steps 0-4, phase 1 for 5-12 (12.5 -> first step >= is 13), then phase 2
    assert [timestep_phase_at(s, 10, phases)[0] for s in (0, 4, 5, 12, 13, 100)] == [0, 0, 1, 1, 2, 2]
    assert phase_switch_steps(10, phases) == [5, 13]
    # 479.6 epochs at 1251 steps/epoch = 599979.6 -> first step at or past it is 599980
    assert phase_switch_steps(1251, [TimestepPhase("lognorm", 479.6), TimestepPhase("uniform")]) == [599_980]
    # 0.29 epochs x 100 steps = 29 exactly, despite 0.29 * 100 = 28.999999999999996 in floats
    assert timestep_phase_at(28, 100, [TimestepPhase("lognorm", 0.29), TimestepPhase("uniform")])[0] == 0
    assert timestep_phase_at(29, 100, [TimestepPhase("lognorm", 0.29), TimestepPhase("uniform")])[0] == 1


def test_single_phase_never_switches():
    phases = [TimestepPhase("lognorm")]
    assert timestep_phase_at(10**7, 1251, phases) == (0, phases[0])
    assert phase_switch_steps(1251, phases) == []


def test_descriptions():
    assert describe_phase(TimestepPhase("lognorm")) == "lognorm(0,1)"
    assert describe_phase(TimestepPhase("lognorm", mean=-0.5, std=1.5)) == "lognorm(-0.5,1.5)"
    assert describe_phase(TimestepPhase("uniform")) == "uniform"
    assert describe_phases(OFFICIAL, 1251) == "lognorm(0,1) until epoch 480 (step 600480), then uniform"


# ------------------------------------------------------------------------------------------------ LR


def test_lr_constant():
    cfg = LRScheduleConfig("constant", warmup_steps=100)  # warmup ignored: constant means constant (official)
    assert [lr_at(s, 2e-4, cfg, 1000) for s in (0, 50, 10**6)] == [2e-4] * 3


def test_lr_warmup_constant():
    cfg = LRScheduleConfig("warmup_constant", warmup_steps=100)
    assert lr_at(0, 1.0, cfg, 1000) == 0.0
    assert lr_at(25, 1.0, cfg, 1000) == 0.25
    assert lr_at(99, 2.0, cfg, 1000) == pytest.approx(1.98)
    assert lr_at(100, 1.0, cfg, 1000) == 1.0
    assert lr_at(5000, 1.0, cfg, 1000) == 1.0
    assert lr_at(7, 1.0, LRScheduleConfig("warmup_constant", warmup_steps=0), 10) == 1.0


def test_lr_cosine_hand_computed():
    cfg = LRScheduleConfig("cosine", warmup_steps=10, min_lr_ratio=0.1)
    lr = lambda s: lr_at(s, 1.0, cfg, 110)  # noqa: E731 - decay over steps 10..110
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(0.5)
    assert lr(10) == pytest.approx(1.0)
    assert lr(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))  # 0.868198
    assert lr(60) == pytest.approx(0.55)
    assert lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)
    plain = LRScheduleConfig("cosine")
    assert lr_at(0, 3e-4, plain, 100) == pytest.approx(3e-4)
    assert lr_at(50, 3e-4, plain, 100) == pytest.approx(1.5e-4)
    assert lr_at(100, 3e-4, plain, 100) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------- tracker


def test_phase_tracker_reports_once_at_the_switch():
    tracker = PhaseTracker(TWO, steps_per_epoch=10, start_step=0)
    messages = {s: m for s in range(30) if (m := tracker.update(s))}
    assert messages == {20: "step 20 (epoch 2.00): timestep sampling switches lognorm(0,1) -> uniform"}
    assert tracker.index == 1 and tracker.phase.kind == "uniform"


def test_phase_tracker_state_from_step_alone_on_resume():
    after = PhaseTracker(TWO, 10, start_step=25)  # resumed past the switch: nothing to report
    assert after.index == 1 and [after.update(s) for s in range(25, 40)] == [None] * 15
    before = PhaseTracker(TWO, 10, start_step=15)  # resumed before it: reports it at step 20
    assert [s for s in range(15, 30) if before.update(s)] == [20]


def test_phase_tracker_lazy_baseline():
    tracker = PhaseTracker(OFFICIAL)  # baseline from the first update, silently
    assert tracker.update(700_000, 1251) is None
    assert tracker.phase.kind == "uniform"
    tracker = PhaseTracker(OFFICIAL)
    assert tracker.update(600_479, 1251) is None
    assert tracker.update(600_480, 1251) == (
        "step 600480 (epoch 480.00): timestep sampling switches lognorm(0,1) -> uniform"
    )
    with pytest.raises(ValueError):
        PhaseTracker(OFFICIAL).update(0)


def test_dit_task_derives_its_phase_from_the_step_context():
    """The trainer only passes StepContext(step, epoch, steps_per_epoch); the DiT task picks the phase, reports the
    switch (Task.on_step) and logs its index (Task.step_metrics)."""
    from types import SimpleNamespace

    import torch

    from core.task import StepContext
    from models.dit_config import TransportConfig
    from models.tasks.dit import DiTTask

    cfg = SimpleNamespace(transport=TransportConfig(timestep_sampling=TWO), seed=0)
    task = DiTTask(cfg, SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1))
    seen = {}
    for s in range(15, 30):  # resumed at step 15: baseline, then the switch
        ctx = StepContext(step=s, epoch=s / 10, steps_per_epoch=10)
        seen[s] = (task.on_step(ctx), task.step_metrics(ctx)["timestep_phase"], task.timestep_phase(ctx)[1].kind)
    assert {s: m for s, (m, _, _) in seen.items() if m} == {
        20: ["step 20 (epoch 2.00): timestep sampling switches lognorm(0,1) -> uniform"]
    }
    assert [seen[s][1:] for s in (15, 19, 20, 29)] == [(0, "lognorm"), (0, "lognorm"), (1, "uniform"), (1, "uniform")]
    bench = StepContext(step=10**9, epoch=0.0)  # no steps_per_epoch (benchmarks): the first phase
    assert task.on_step(bench) == [] and task.timestep_phase(bench) == (0, TWO[0])
