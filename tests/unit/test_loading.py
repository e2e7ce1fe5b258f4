"""Checkpoint loading: every accepted layout round-trips strictly; bad files and mismatches fail clearly."""

from __future__ import annotations

import warnings

import pytest
import torch

from models.lightningdit import LightningDiT
from models.loading import CheckpointReadError, load_checkpoint_state, load_into_model

TINY = dict(
    input_size=4,
    patch_size=1,
    in_channels=4,
    hidden_size=32,
    depth=2,
    num_heads=2,
    num_classes=10,
    use_swiglu=True,
    use_rope=True,
    use_rmsnorm=True,
)


class NotAllowlisted:
    """A pickled object that torch.load(weights_only=True) refuses (like an OmegaConf config)."""

    def __init__(self):
        self.lr = 2e-4


def make(seed: int) -> LightningDiT:
    torch.manual_seed(seed)
    model = LightningDiT(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


@pytest.fixture(scope="module")
def weights():
    return make(1).state_dict(), make(2).state_dict()  # (ema, raw)


def same(model: LightningDiT, sd: dict) -> bool:
    return all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_official_full_file(tmp_path, weights):
    ema, raw = weights
    path = tmp_path / "0080000.pt"
    torch.save(
        {
            "model": raw,
            "ema": ema,
            "opt": {"state": {}, "param_groups": []},
            "config": {"model": {"model_type": "LightningDiT-XL/1"}, "train": {"max_steps": 80000}},
        },
        path,
    )
    for which, expect in [("ema", ema), ("model", raw), ("auto", ema)]:
        model = LightningDiT(**TINY)
        report = load_into_model(model, path, which=which)
        assert report.ok and same(model, expect)


def test_pickled_config_falls_back_with_warning(tmp_path, weights):
    ema, raw = weights
    path = tmp_path / "official.pt"
    torch.save({"model": raw, "ema": ema, "config": NotAllowlisted()}, path)
    with pytest.warns(UserWarning, match="weights_only=False"):
        sd = load_checkpoint_state(path, "ema")
    assert all(torch.equal(sd[k], ema[k]) for k in ema)
    with pytest.raises(CheckpointReadError, match="allow_pickle=False"):
        load_checkpoint_state(path, "ema", allow_pickle=False)


def test_model_only_and_bare(tmp_path, weights):
    ema, raw = weights
    model_only, bare = tmp_path / "model_only.pt", tmp_path / "bare.pt"
    torch.save({"model": raw}, model_only)
    torch.save(ema, bare)
    m = LightningDiT(**TINY)
    load_into_model(m, model_only, which="auto")
    assert same(m, raw)
    with pytest.raises(ValueError, match=r"no 'ema' weights.*model_only\.pt|model_only\.pt.*no 'ema' weights"):
        load_checkpoint_state(model_only, "ema")
    for which in ("ema", "model", "auto"):
        m = LightningDiT(**TINY)
        assert load_into_model(m, bare, which=which).which == "bare"
        assert same(m, ema)


def test_prefixed_keys(tmp_path, weights):
    ema, raw = weights
    path = tmp_path / "prefixed.pt"
    prefixed = {f"module._orig_mod.module.{k}": v for k, v in raw.items()}
    # per-block compile / activation-checkpoint wrappers put components in the middle of the key
    prefixed = {
        k.replace("blocks.0.", "blocks.0._orig_mod._checkpoint_wrapped_module."): v for k, v in prefixed.items()
    }
    torch.save({"ema": {f"_orig_mod.{k}": v for k, v in ema.items()}, "model": prefixed}, path)
    for which, expect in [("ema", ema), ("model", raw)]:
        m = LightningDiT(**TINY)
        load_into_model(m, path, which=which)
        assert same(m, expect)
    compiled = torch.compile(LightningDiT(**TINY))  # loading into a compile wrapper (no compilation runs)
    load_into_model(compiled, path, which="ema")
    assert same(compiled._orig_mod, ema)


def test_dcp_directory(tmp_path, weights):
    import torch.distributed.checkpoint as dcp

    ema, raw = weights
    ckpt = tmp_path / "step_0000100"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving locally"
        dcp.save(
            {
                "model": {k: v.clone() for k, v in raw.items()},
                "ema": {k: v.clone() for k, v in ema.items()},
                "optim": {"step": torch.tensor(3.0)},
            },
            checkpoint_id=str(ckpt / "state"),
        )
    for path in (ckpt / "state", ckpt):  # the DCP dir itself, or a step dir holding exactly one
        for which, expect in [("ema", ema), ("model", raw), ("auto", ema)]:
            m = LightningDiT(**TINY)
            assert load_into_model(m, path, which=which).ok
            assert same(m, expect)
    only_model = tmp_path / "only_model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": dict(raw)}, checkpoint_id=str(only_model))
    assert set(load_checkpoint_state(only_model, "auto")) == set(raw)
    # the FSDP2 engine's layout: <step>/state with "<part>.model" / "<part>.ema" / "<part>.optim"
    engine = tmp_path / "engine_step" / "state"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"model.model": dict(raw), "model.ema": dict(ema), "model.optim": {"lr": torch.tensor(1.0)}},
            checkpoint_id=str(engine),
        )
    for which, expect in [("ema", ema), ("model", raw), ("auto", ema), ("model.model", raw)]:
        m = LightningDiT(**TINY)
        assert load_into_model(m, engine.parent, which=which).ok
        assert same(m, expect)
    with pytest.raises(ValueError, match="no 'ema' entry"):
        load_checkpoint_state(only_model, "ema")
    plain_dir = tmp_path / "not_a_checkpoint"
    plain_dir.mkdir()
    (plain_dir / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointReadError, match="not a DCP checkpoint"):
        load_checkpoint_state(plain_dir, "ema")


def test_corrupt_and_missing_files(tmp_path, weights):
    ema, _ = weights
    good = tmp_path / "good.pt"
    torch.save({"ema": ema}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointReadError, match=str(bad.name)):
            load_into_model(LightningDiT(**TINY), bad)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint_state(tmp_path / "nope.pt")


def test_mismatch_error_lists_everything(tmp_path, weights):
    ema, _ = weights
    sd = dict(ema)
    del sd["blocks.1.attn.proj.bias"]
    sd["blocks.9.extra.weight"] = torch.zeros(3)
    sd["final_layer.linear.weight"] = torch.zeros(8, 32)
    path = tmp_path / "broken.pt"
    torch.save({"ema": sd}, path)
    with pytest.raises(ValueError) as err:
        load_into_model(LightningDiT(**TINY), path, which="ema")
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys" in msg and "blocks.1.attn.proj.bias" in msg
    assert "unexpected keys" in msg and "blocks.9.extra.weight" in msg
    assert "final_layer.linear.weight: expected [4, 32] vs got [8, 32]" in msg
    # non-strict loads what matches and reports the rest
    m = LightningDiT(**TINY)
    with pytest.warns(UserWarning, match="does not match"):
        report = load_into_model(m, path, which="ema", strict=False)
    assert not report.ok and torch.equal(m.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])
