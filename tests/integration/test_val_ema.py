"""Several EMAs (train.ema_decays) and the validation loss (eval.val_every_epochs) in real FSDP2 runs (issue #19,
items 2 and 3).

Real gloo groups (tests/dist_utils.py), the tiny DiT config, real MDS shards: the 64-sample toy dataset split by
data/holdout.py into 56 training and 8 held-out samples (3 steps per epoch at global batch 16). One 2-rank run of 4
steps with two EMAs (0.99, 0.9), a checkpoint and a validation loss every 2 steps; then

* the same run resumed on 2 ranks from its step-2 checkpoint: the same step-4 validation losses, bit for bit, for
  both EMAs and the raw weights (EMAs saved and resumed exactly);
* its step-4 checkpoint loaded on 1 rank, with a third EMA added to train.ema_decays (a checkpoint without it: it
  starts as the primary EMA's copy): the validation losses computed there equal those the 2-rank run logged
  (the number does not depend on the world size); tools/export.py --ema ema_1 writes that EMA;
* the step-4 EMA as the initial weights of a fresh run on DeepSpeed and on FSDP2: the same validation losses
  (the number does not depend on the engine);
* the training data never contained a held-out id (the trainer's sample-id trace).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed, train_on_shared_ranks

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/tiny_dit.yaml")

pytestmark = pytest.mark.timeout(300)


def _overrides(split: Path, run_dir: Path, decays: str = "[0.99,0.9]") -> list[str]:
    return [
        f"data.path={split / 'train'}",
        f"data.val_path={split / 'val'}",
        f"run_dir={run_dir}",
        "wandb.mode=disabled",
        "train.max_steps=4",
        f"train.ema_decays={decays}",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=5",
        "eval.val_every_epochs=0.6667",  # round(0.6667 * 3) = every 2 steps
        "eval.val_timesteps=4",
        "eval.val_batch_size=3",  # 8 held-out samples: chunks of 3, 3, 2 (padded)
    ]


def _evaluate_checkpoint(dist, overrides):
    """Build the trainer (it resumes from the run's newest checkpoint), return its step, the validation losses of
    its weights and the full state of every EMA."""
    from core.trainer import Trainer
    from launchers.experiment import load_config, validate
    from models.tasks import build_task

    cfg = validate(load_config(CONFIG, overrides), world_size=dist.world_size)
    trainer = Trainer(cfg, dist, build_task(cfg, dist))
    try:
        part = trainer.parts["model"]
        results = trainer.task.evaluate(trainer.parts, trainer.step, frozenset({"val"}))
        emas = {k: part.full_state_dict(k) for k in part.ema_keys()}
        return trainer.step, results, emas
    finally:
        trainer.close()


def _eval_records(run_dir: Path) -> dict[int, dict]:
    out = {}
    for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "eval/val_loss" in rec:
            out[rec["step"]] = {k[len("eval/") :]: v for k, v in rec.items() if k.startswith("eval/")}
    return out


def test_several_emas_and_validation_loss(tmp_path):
    from core.sample_trace import read_global_batches
    from data.holdout import read_holdout, split_dataset
    from models.loading import export_state
    from tools.check_host_sync import write_toy_latents

    src = write_toy_latents(tmp_path / "mds", 64, size_limit=4096)
    split = tmp_path / "split"
    record = split_dataset(src, split, fraction=0.125, seed=3)
    val_ids = set(read_holdout(split)["val_ids"])
    assert record["counts"] == {"train": 56, "val": 8} and len(val_ids) == 8

    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    assert train_on_shared_ranks(CONFIG, _overrides(split, ref), env={"LLAT_DEBUG_SAMPLE_IDS": "1"}) == 0
    logged = _eval_records(ref)
    assert sorted(logged) == [2, 4]
    keys = {"val_loss", "ema_1/val_loss", "model/val_loss"} | {f"val_loss/t{t:.3f}" for t in (0, 1 / 3, 2 / 3, 1)}
    assert keys <= set(logged[4]), sorted(logged[4])
    four = logged[4]
    per_t = [four[f"val_loss/t{t:.3f}"] for t in (0, 1 / 3, 2 / 3, 1)]
    assert four["val_loss"] == pytest.approx(sum(per_t) / 4, rel=1e-12)
    assert len({four["val_loss"], four["ema_1/val_loss"], four["model/val_loss"]}) == 3  # three sets of weights
    assert logged[2]["model/val_loss"] != four["model/val_loss"]

    # Training never saw a held-out sample.
    seen = {i for ids in read_global_batches(ref).values() for i in ids}
    assert len(seen) >= 48 and not seen & val_ids  # epoch 0: 48 of the 56 training samples

    # Resumed on 2 ranks from step 2: the same step-4 numbers, bit for bit (both EMAs resumed exactly).
    shutil.copytree(ref, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    (resumed / "metrics.jsonl").unlink()
    assert train_on_shared_ranks(CONFIG, _overrides(split, resumed)) == 0
    again = _eval_records(resumed)
    assert again[4] == {k: v for k, v in four.items() if k in again[4]} and keys <= set(again[4])

    # The step-4 checkpoint on 1 rank, with a third EMA the checkpoint lacks.
    [(step, results, emas)] = run_distributed(
        _evaluate_checkpoint, world_size=1, args=(_overrides(split, ref, "[0.99,0.9,0.5]"),)
    )
    assert step == 4
    for key in ("val_loss", "ema_1/val_loss", "model/val_loss", "val_loss/t0.000", "val_loss/t1.000"):
        assert results[key] == four[key], key
    assert results["ema_2/val_loss"] == four["val_loss"]  # a copy of the primary EMA
    assert all(torch.equal(emas["ema_2"][k], emas["ema"][k]) for k in emas["ema"])
    assert any(not torch.equal(emas["ema_1"][k], emas["ema"][k]) for k in emas["ema"])

    # The same number on another engine: the step-4 primary EMA as the initial weights (model.init_from) of a fresh
    # run on DeepSpeed (ZeRO-2, 2 ranks) and on FSDP2: every set of weights there is that EMA, and each engine's
    # validation losses equal what the FSDP2 run logged for it.
    for engine in ("deepspeed", "fsdp2"):
        fresh = [
            *_overrides(split, tmp_path / f"init_{engine}"),
            f"model.init_from={ref / 'checkpoints' / 'step_0000004'}",
            f"engine.kind={engine}",
        ]
        fresh += ["engine.zero_stage=2"] if engine == "deepspeed" else []
        for step0, res0, _ in run_distributed(_evaluate_checkpoint, world_size=2, args=(fresh,)):
            assert step0 == 0
            for key in ("val_loss", "ema_1/val_loss", "model/val_loss"):
                assert res0[key] == four["val_loss"], (engine, key)
            assert res0["val_loss/t1.000"] == four["val_loss/t1.000"], engine

    # Export chooses the EMA.
    exported = export_state(ref, ema="ema_1")
    assert sorted(exported) == ["ema", "model"]
    assert all(torch.equal(exported["ema"][k], emas["ema_1"][k]) for k in emas["ema_1"])
    assert sorted(export_state(ref, ema="all")) == ["ema", "ema_1", "model"]
    with pytest.raises(ValueError, match="no EMA 'ema_5'"):
        export_state(ref, ema="ema_5")
