"""Issue #19 items 2 and 3, in process: the held-out split (data/holdout.py), the EMA names and the
train.ema_decays checks (core/ema.py, core/config.py), the leaderboard's row per EMA with its validation loss."""

from __future__ import annotations

import json

import pytest


def test_choose_heldout_is_a_function_of_the_ids_and_the_rule():
    from data.holdout import choose_heldout

    ids = list(range(1000))
    a = choose_heldout(ids, fraction=0.05, seed=1)
    assert len(a) == 50 and a == sorted(a)
    assert choose_heldout(list(reversed(ids)), fraction=0.05, seed=1) == a  # not the storage order
    assert choose_heldout(ids, fraction=0.05, seed=2) != a
    assert 5 <= sum(i < 100 for i in a) <= 15  # spread over the ids (classes stored in blocks stay balanced)
    assert choose_heldout(ids, ids=[7, 3, 7]) == [3, 7]
    with pytest.raises(ValueError, match="not in the dataset: \\[5000\\]"):
        choose_heldout(ids, ids=[5000])
    with pytest.raises(ValueError, match="exactly one"):
        choose_heldout(ids)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        choose_heldout(ids, fraction=1.0)
    with pytest.raises(ValueError, match="leaves none to train on"):
        choose_heldout([1, 2], ids=[1, 2])


def test_split_dataset_keeps_the_held_out_ids_out_of_training(tmp_path):
    import numpy as np

    from data.holdout import main, read_holdout, read_mds_samples
    from tools.check_host_sync import write_toy_latents

    src = write_toy_latents(tmp_path / "mds", 40, size_limit=4096)
    manifest = {"tokenizer": {"kind": "vavae"}, "latent_shape": [4, 4, 4], "num_samples": 40, "content_sha256": "x"}
    (src / "manifest.json").write_text(json.dumps(manifest))
    assert main([str(src), str(tmp_path / "out"), "--val-ids", "3,11,12"]) == 0
    train = list(read_mds_samples(tmp_path / "out" / "train"))
    val = list(read_mds_samples(tmp_path / "out" / "val"))
    assert [int(s["sample_id"]) for s in val] == [3, 11, 12]
    assert [int(s["sample_id"]) for s in train] == [i for i in range(40) if i not in (3, 11, 12)]
    original = {int(s["sample_id"]): s for s in read_mds_samples(src)}
    for s in train + val:  # every column copied as stored
        o = original[int(s["sample_id"])]
        assert int(s["label"]) == int(o["label"]) and np.array_equal(s["latent"], o["latent"])
        assert np.array_equal(s["latent_flip"], o["latent_flip"])
    assert read_holdout(tmp_path / "out")["val_ids"] == [3, 11, 12]
    assert (tmp_path / "out" / "val" / "latents_stats.pt").read_bytes() == (src / "latents_stats.pt").read_bytes()
    # The manifest (what decodes the latents) goes with each split, with its own size and no source checksums.
    for split, n in (("train", 37), ("val", 3)):
        got = json.loads((tmp_path / "out" / split / "manifest.json").read_text())
        assert got["tokenizer"] == {"kind": "vavae"} and got["latent_shape"] == [4, 4, 4] and got["num_samples"] == n
        assert "content_sha256" not in got and got["holdout"]["split"] == split
    assert main([str(src), str(tmp_path / "out"), "--val-fraction", "0.1"]) == 2  # not empty: refused


def test_ema_names_and_decays():
    from core.config import TrainConfig, train_ema_decays
    from core.ema import ema_decay_list, ema_index, ema_key

    assert [ema_key(i) for i in range(3)] == ["ema", "ema_1", "ema_2"]
    assert [ema_index(k, 3) for k in ("ema", "ema_1", "ema_2")] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"model: no EMA 'ema_3': it has EMAs \['ema', 'ema_1', 'ema_2'\]"):
        ema_index("ema_3", 3, "model")
    with pytest.raises(ValueError, match="no EMA \\(ema_decay is None\\)"):
        ema_index("ema", 0)
    assert ema_decay_list(None) == [] and ema_decay_list(0.9) == [0.9] and ema_decay_list((0.9, 0.5)) == [0.9, 0.5]
    assert train_ema_decays(TrainConfig(ema_decay=0.99)) == [0.99]  # the shorthand
    assert train_ema_decays(TrainConfig(ema_decay=0.99, ema_decays=[0.9999, 0.99995])) == [0.9999, 0.99995]


def test_ema_decays_and_validation_checks(tmp_path):
    from core.config import ConfigError
    from launchers.experiment import load_config, validate

    config = "configs/tiny_dit.yaml"
    base = [f"data.path={tmp_path}", "wandb.mode=disabled"]
    cfg = validate(load_config(config, base + ["train.ema_decays=[0.9,0.5]"]), world_size=1)
    assert cfg.train.ema_decays == [0.9, 0.5]
    cases = {
        "train.ema_decays=[0.9,0.9]": "train.ema_decays: has repeated decays",
        "train.ema_decays=[0.9,1.5]": "train.ema_decays[1]: must be in [0, 1)",
        "train.ema_decays=[]": "train.ema_decays: needs at least one decay",
        "eval.val_every_epochs=1": "data.val_path: eval.val_every_epochs needs the held-out samples",
        "eval.val_timesteps=1": "eval.val_timesteps: must be >= 2",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            validate(load_config(config, base + [override]), world_size=1)
        assert message in str(err.value), (override, str(err.value))


def test_leaderboard_row_per_ema_with_validation_loss():
    from core.runlog import RunData
    from models.evaluation.leaderboard import format_table, rank_rows, summarize_emas

    history = {
        10: {"epoch": 1.0, "eval/fid": 30.0, "eval/ema_1/fid": 20.0, "eval/val_loss": 0.5, "eval/ema_1/val_loss": 0.4},
        20: {"epoch": 2.0, "eval/fid": 25.0, "eval/ema_1/fid": 22.0, "eval/val_loss": 0.45, "eval/ema_1/val_loss": 0.3},
        30: {"epoch": 3.0, "eval/val_loss": 0.42},
    }
    run = RunData("r1", "run1", "test", config={"train": {"ema_decays": [0.9999, 0.99995]}}, history=history)
    primary, second = summarize_emas(run)
    assert (primary.ema, primary.fid, primary.steps, primary.val_loss) == ("0.9999", 25.0, 20, 0.45)
    assert (second.ema, second.fid, second.steps, second.val_loss) == ("0.99995", 20.0, 10, 0.4)
    assert [r.ema for r in rank_rows([primary, second])] == ["0.99995", "0.9999"]
    table = format_table(rank_rows([primary, second]))
    assert "val loss" in table and "0.4000" in table and "0.99995" in table
    only_val = RunData("r2", "run2", "test", config={"train": {"ema_decay": 0.99}}, history={5: {"eval/val_loss": 0.7}})
    [row] = summarize_emas(only_val)
    assert (row.ema, row.fid, row.val_loss) == ("", None, 0.7)  # no FID: the newest validation loss
