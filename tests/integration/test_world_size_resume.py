"""Resume on another world size (issue #14, item 1): fresh random streams, the same data.

Real gloo groups (tests/dist_utils.py), the tiny DiT config, real MDS shards (64 samples, global batch 16: 4 steps
per epoch), ``data.num_workers: 2``, 6 steps, checkpoints at steps 3 (mid-epoch) and 6. The sample ids of every
global batch come from the trainer's debug trace (``LLAT_DEBUG_SAMPLE_IDS``, core/sample_trace.py).

* 2 -> 1 and 1 -> 2 ranks: the random streams that cannot be carried over (the task's timestep/noise generator,
  torch / numpy / python global state) differ from the draws of step 0 on any rank and are identical in a second,
  identical resume (same losses too); every global batch holds the uninterrupted run's sample ids.
* 2 "nodes" x 1 rank: each rank is local rank 0 of a node of its own (LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, what
  torchrun sets on each of two machines), so streaming partitions the data over 2 physical nodes. Both ranks run
  on this machine and share /dev/shm, which two machines would not: each node gets its own range of streaming's
  shared-memory prefixes (otherwise both "local leaders" would create the same segment).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from test_train_resume import write_toy_latents

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/tiny_dit.yaml")
CKPT_STEP = 3  # mid-epoch (4 steps per epoch)
TOTAL = 6

pytestmark = pytest.mark.timeout(300)


def _overrides(data: Path, run_dir: Path, max_steps: int = TOTAL) -> list[str]:
    return [
        f"data.path={data}",
        f"run_dir={run_dir}",
        "wandb.mode=disabled",
        "data.num_workers=2",
        f"train.max_steps={max_steps}",
        f"checkpoint.every_steps={CKPT_STEP}",
        "checkpoint.keep_last=5",
    ]


def _emulate_own_node(dist):
    """This rank alone on a node of its own (see the module docstring)."""
    from streaming.base.shared import prefix

    os.environ.update({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    first = 100_000 * (1 + dist.rank)

    def each_prefix_int():
        i = first
        while True:
            yield i
            i += 1

    prefix._each_prefix_int = each_prefix_int
    return dataclasses.replace(dist, local_rank=0, local_world_size=1)


def _draws(task) -> dict[str, list]:
    """What each random stream would draw next, without consuming it."""
    g = torch.Generator(device=task.generator.device)
    g.set_state(task.generator.get_state())
    cpu = torch.Generator()
    cpu.set_state(torch.get_rng_state())
    np_rng = np.random.RandomState()
    np_rng.set_state(np.random.get_state())
    py_rng = random.Random()
    py_rng.setstate(random.getstate())
    return {
        "task": torch.rand(8, generator=g).tolist(),
        "torch": torch.rand(8, generator=cpu).tolist(),
        "numpy": np_rng.random_sample(8).tolist(),
        "python": [py_rng.random() for _ in range(8)],
    }


def _train_runs(dist, jobs, own_node):
    """Worker: for each (run_dir, overrides), build the trainer (resuming when run_dir has a checkpoint), note the
    random streams' next draws, train. Returns [(start step, draws)] of this rank."""
    import multiprocessing

    from core.trainer import Trainer
    from launchers.experiment import load_config, validate
    from models.tasks import build_task

    # DataLoader workers as a torchrun-started rank makes them on Linux (fork); a process started by
    # multiprocessing's spawn, as here, would spawn them (a fresh interpreter per worker and epoch: slow).
    multiprocessing.set_start_method("fork", force=True)
    if own_node:
        dist = _emulate_own_node(dist)
    out = []
    for overrides in jobs:
        cfg = validate(load_config(CONFIG, overrides), world_size=dist.world_size)
        trainer = Trainer(cfg, dist, build_task(cfg, dist))
        try:
            out.append((trainer.step, _draws(trainer.task)))
            trainer.train()
        finally:
            trainer.close()
    return out


def _run(jobs, world_size, own_node=False):
    return run_distributed(
        _train_runs, world_size=world_size, args=(jobs, own_node), env={"LLAT_DEBUG_SAMPLE_IDS": "1"}, timeout_s=240
    )


def _resume_dir(src: Path, dst: Path) -> Path:
    """A copy of run ``src`` whose newest checkpoint is the one of step CKPT_STEP."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > CKPT_STEP:
            shutil.rmtree(ckpt)
    for name in ("metrics.jsonl", "sample_ids.jsonl"):
        (dst / name).unlink(missing_ok=True)
    return dst


def _losses(run_dir: Path) -> dict[int, float]:
    return {rec["step"]: rec["loss"] for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_resume_on_another_world_size(tmp_path):
    from core.sample_trace import read_global_batches

    data = write_toy_latents(tmp_path / "mds")
    ref, single = tmp_path / "ref", tmp_path / "single"

    # The uninterrupted run on 2 ranks (one node); its step-3 checkpoint is resumed below.
    [(r0_step, r0_fresh)], [(_, r1_fresh)] = _run([_overrides(data, ref)], world_size=2)
    assert r0_step == 0
    batches = read_global_batches(ref)
    assert sorted(batches) == list(range(TOTAL)) and all(len(b) == 16 for b in batches.values())
    assert sorted(i for s in range(4) for i in batches[s]) == list(range(64))  # epoch 0: every sample once

    # 2 -> 1, twice; and a 1-rank run up to its step-3 checkpoint (for 1 -> 2).
    a, b = _resume_dir(ref, tmp_path / "a"), _resume_dir(ref, tmp_path / "b")
    [runs] = _run(
        [_overrides(data, a), _overrides(data, b), _overrides(data, single, max_steps=CKPT_STEP)], world_size=1
    )
    (a_step, a_draws), (b_step, b_draws), (s_step, s_fresh) = runs
    assert (a_step, b_step, s_step) == (CKPT_STEP, CKPT_STEP, 0)

    # 1 -> 2 (twice), and the 2-rank checkpoint resumed on 2 nodes x 1 rank, all on 2 emulated nodes.
    c, d = _resume_dir(single, tmp_path / "c"), _resume_dir(single, tmp_path / "d")
    e = _resume_dir(ref, tmp_path / "e")
    cde = _run([_overrides(data, c), _overrides(data, d), _overrides(data, e)], world_size=2, own_node=True)
    assert [[step for step, _ in rank] for rank in cde] == [[CKPT_STEP] * 3] * 2

    step0 = [r0_fresh, r1_fresh, s_fresh]
    assert s_fresh == r0_fresh  # step-0 streams depend on (seed, rank) only
    resumed = {"2->1": [a_draws], "1->2": [cde[0][0][1], cde[1][0][1]]}
    again = {"2->1": [b_draws], "1->2": [cde[0][1][1], cde[1][1][1]]}
    for case, draws in resumed.items():
        assert draws == again[case], f"{case}: a second identical resume drew other values"
        for rank, per_rank in enumerate(draws):
            for stream, values in per_rank.items():
                assert all(values != fresh[stream] for fresh in step0), (
                    f"{case}: rank {rank}'s {stream} stream replays the draws of step 0"
                )
    c0, c1 = resumed["1->2"]
    assert all(c0[s] != c1[s] for s in c0), "the two ranks drew the same values"

    # Identical resumes are identical runs; the same-world-size resume (2 nodes) is the uninterrupted run.
    after = range(CKPT_STEP + 1, TOTAL + 1)
    assert [_losses(a)[s] for s in after] == [_losses(b)[s] for s in after]
    assert [_losses(c)[s] for s in after] == [_losses(d)[s] for s in after]
    assert {s: _losses(e)[s] for s in after} == {s: _losses(ref)[s] for s in after}

    # Every global batch holds the uninterrupted run's samples, whatever the ranks and nodes.
    for run_dir in (a, c, e):
        got = read_global_batches(run_dir)
        assert sorted(got) == list(range(CKPT_STEP, TOTAL)), run_dir.name
        assert {s: got[s] for s in got} == {s: batches[s] for s in got}, run_dir.name
    assert read_global_batches(single) == {s: batches[s] for s in range(CKPT_STEP)}


def test_seed_for_and_the_task_contract():
    from core.rng import seed_for
    from core.task import Task

    seeds = {
        seed_for(seed, step, rank, stream)
        for seed in (0, 1)
        for step in (0, 1, 600_000)
        for rank in range(4)
        for stream in ("torch", "numpy")
    }
    assert len(seeds) == 48 and all(0 <= s < 2**63 for s in seeds)
    assert seed_for(0, 600_000, 3, "torch") == seed_for(0, 600_000, 3, "torch")

    class Stateless(Task):
        pass

    class Stateful(Task):
        def state_dict(self):
            return {"generator": torch.Generator().get_state()}

    # The tasks' generators: from (seed, step, rank), one stream name per task.
    from types import SimpleNamespace

    from models.tasks.dit import DiTTask
    from models.tasks.vavae import VAVAETask

    for cls, stream in ((DiTTask, "dit/timesteps+noise"), (VAVAETask, "vavae/posterior")):
        task = SimpleNamespace(cfg=SimpleNamespace(seed=7), generator=torch.Generator().manual_seed(0))
        cls.reseed(task, 5, 1)
        expected = torch.Generator().manual_seed(seed_for(7, 5, 1, stream))
        assert torch.equal(torch.rand(4, generator=task.generator), torch.rand(4, generator=expected)), cls

    Stateless().reseed(5, 1)  # nothing to re-seed
    with pytest.raises(NotImplementedError, match="Task.reseed"):
        Stateful().reseed(5, 1)  # random state that a resume on another world size would replay
