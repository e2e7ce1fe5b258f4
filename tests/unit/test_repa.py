"""REPA (models/repa.py): the loss against a direct computation of the formula, the tokens after block ``depth``,
the DiT task's total loss, the config checks, and the flip pairing of stored DINOv2 features on a real extracted
MDS dataset (data/extract.py ``features.flip``; a tiny RANDOMLY INITIALISED timm ViT, never pretrained weights)."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.distributed import DistInfo
from core.engines import LocalPart
from core.task import StepContext
from models.lightningdit import ModelConfig, build_model
from models.repa import REPA_PREFIX, attach_repa, features_to_tokens, repa_loss_per_sample, strip_repa

REPO = Path(__file__).resolve().parents[2]
TINY = ModelConfig(
    type="custom", hidden_size=32, depth=3, num_heads=2, patch_size=2, in_channels=3, input_size=8, num_classes=10
)


def test_repa_loss_is_the_formula_on_fixed_tensors():
    # B=2 samples, T=3 tokens, Z=2: cosines written out by hand.
    proj = torch.tensor(
        [[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [-1.0, 0.0], [0.0, -5.0]]], dtype=torch.float32
    )
    target = torch.tensor(
        [[[2.0, 0.0], [1.0, 0.0], [4.0, 3.0]], [[1.0, -1.0], [-2.0, 0.0], [0.0, 1.0]]], dtype=torch.float32
    )
    # sample 0: cos = 1, 0, 24/25; sample 1: cos = 0, 1, -1
    want = torch.tensor([-(1 + 0 + 24 / 25) / 3, -(0 + 1 - 1) / 3])
    torch.testing.assert_close(repa_loss_per_sample(proj, target), want, rtol=0, atol=1e-7)
    # The same as REPA's loss.py loop (sum over samples of the token mean of -(z . z~), / batch) on random tensors.
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(4, 5, 6, generator=g), torch.randn(4, 5, 6, generator=g)
    ref = 0.0
    for zj, ztj in zip(p, t):
        zj = zj / zj.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ztj = ztj / ztj.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ref += float(-(zj * ztj).sum(dim=-1).mean())
    assert math.isclose(float(repa_loss_per_sample(p, t).mean()), ref / 4, rel_tol=0, abs_tol=1e-6)
    assert float(repa_loss_per_sample(t, t).mean()) == pytest.approx(-1.0, abs=1e-6)  # aligned: the minimum
    with pytest.raises(ValueError, match=r"repa\.z_dim"):
        repa_loss_per_sample(p, t[..., :5])
    # Stored features (B, Z, h, w) -> row-major tokens (B, h*w, Z), the order of the DiT's patch tokens.
    f = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(features_to_tokens(f)[1, 2], f[1, :, 1, 0])


def test_tokens_after_block_depth_and_the_plain_model_unchanged():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    plain_keys = list(model.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 7])
    before = model(x, t, y)
    with pytest.raises(ValueError, match="attach_repa"):
        model(x, t, y, return_repa=True)
    projector = attach_repa(model, depth=2, projector_dim=16, z_dim=5)
    out, projected = model(x, t, y, return_repa=True)
    assert torch.equal(out, before) and torch.equal(model(x, t, y), before)  # the prediction does not change
    # The tokens after block 2 (1-based), by hand, through the projector.
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for block in model.blocks[:2]:
        h = block(h, c, *model.rope())
    torch.testing.assert_close(projected, projector(h), rtol=0, atol=0)
    assert projected.shape == (2, model.num_patches, 5)
    # REPA's projector: Linear(D, P) SiLU Linear(P, P) SiLU Linear(P, Z), zero biases at init.
    assert [tuple(p.shape) for p in projector.parameters()] == [(16, 32), (16,), (16, 16), (16,), (5, 16), (5,)]
    assert all(not b.any() for n, b in projector.named_parameters() if n.endswith("bias"))
    sd = model.state_dict()
    assert [k for k in sd if not k.startswith(REPA_PREFIX)] == plain_keys and list(strip_repa(sd)) == plain_keys
    with pytest.raises(ValueError, match=r"repa\.depth must be in \[1, 3\]"):
        attach_repa(build_model(TINY), depth=4, projector_dim=16, z_dim=5)


def _cfg(overrides=()):
    from launchers.experiment import load_config

    return load_config(
        REPO / "configs" / "tiny_dit.yaml",
        ["repa.enabled=true", "repa.depth=1", "repa.z_dim=6", "repa.projector_dim=8", "data.use_features=true"]
        + list(overrides),
    )


def test_task_loss_is_diffusion_plus_weighted_repa_and_counted_in_flops():
    from models.tasks.dit import DiTTask

    cfg = _cfg()
    dist = DistInfo(0, 1, 0, 1, torch.device("cpu"), "none")
    task = DiTTask(cfg, dist)
    torch.manual_seed(0)
    model = task.build_models()["model"].module
    plain = build_model(cfg.model)
    projector_flops = 3 * 64 * 2 * (64 * 8 + 8 * 8 + 8 * 6)  # 64 tokens, D=64, P=8, Z=6; forward + backward
    assert task.flops_per_image() == plain.flops_per_image(training=True) + projector_flops
    batch = task.example_batch(4, torch.Generator().manual_seed(1))
    assert batch["features"].shape == (4, 6, 8, 8) and batch["features"].dtype == torch.float16
    state, global_state = task.generator.get_state(), torch.get_rng_state()  # timesteps/noise, label dropout
    loss, metrics = task.loss("model", batch, {"model": LocalPart("model", model, ema=None)}, StepContext(0, 0.0))
    assert float(loss.detach()) == pytest.approx(
        float(metrics["diffusion_loss"]) + 0.5 * float(metrics["repa_loss"]), abs=1e-6
    )
    assert float(metrics["loss"]) == float(loss.detach())
    # The same draws without REPA give the diffusion loss alone (the REPA term adds nothing to the draws).
    task.generator.set_state(state)
    torch.set_rng_state(global_state)
    cfg.repa.enabled = False
    plain_loss, _ = task.loss("model", batch, {"model": LocalPart("model", model, ema=None)}, StepContext(0, 0.0))
    assert float(plain_loss.detach()) == float(metrics["diffusion_loss"])
    loss.backward()
    assert all(p.grad is not None for p in model.repa_projector.parameters())


def test_repa_config_checks():
    from launchers.experiment import load_config

    cfg = load_config(REPO / "configs" / "tiny_dit.yaml")
    assert not cfg.repa.enabled and cfg.repa.depth == 8 and cfg.repa.weight == 0.5 and cfg.repa.projector_dim == 2048
    with pytest.raises(ConfigError, match=r"data\.use_features: repa\.enabled needs the stored DINOv2 features"):
        load_config(REPO / "configs" / "tiny_dit.yaml", ["repa.enabled=true", "repa.depth=1"])
    with pytest.raises(ConfigError, match=r"repa\.depth: must be at most the model's depth 2, got 8"):
        _cfg(["repa.depth=8"])
    with pytest.raises(ConfigError, match=r"repa\.encoder: unknown encoder 'dinov3'"):
        _cfg(["repa.encoder=dinov3"])
    xl = load_config(REPO / "configs" / "lightningdit_xl.yaml", ["repa.enabled=true", "data.use_features=true"])
    assert xl.repa.depth == 8  # REPA's default for the 28-block XL model


# ------------------------------------------------------------------------------------------- flip pairing
TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def test_a_flipped_sample_meets_the_features_of_the_flipped_image(tmp_path, clean_streaming_shm):
    from data.extract import build_features, build_source, extract, load_extract_config, read_manifest
    from data.streaming import LatentDataset, flip_decision

    n, size = 8, 16
    cfg = load_extract_config(
        REPO / "configs" / "extract_synthetic.yaml",
        [
            f"out_dir={tmp_path / 'mds'}",
            f"source.num_samples={n}",
            f"source.image_size={size}",
            "batch_size=4",
            "chunk_size=8",
            "num_workers=0",
            "latent_dtype=float32",
            "progress_bar=false",
            "features.enabled=true",
            "features.flip=true",
            "features.model=vit_small_patch14_dinov2",
            "features.random_init=true",
            f"features.model_kwargs={json.dumps(TINY_VIT)}",
            "features.imagenet_norm=true",
            "features.interpolation=bicubic",
            "features.grid=4",
        ],
    )
    extract(cfg)
    assert read_manifest(cfg.out_dir)["columns"]["features_flip"] == "ndarray:float16:32,4,4"
    # The stored flip features are DINOv2 of the flipped image, which is not the flipped feature map.
    fx = build_features(cfg.features, (4, 4))
    source = build_source(cfg.source)
    images = torch.stack([source[i]["image"] for i in range(n)])
    with torch.no_grad():
        direct, direct_flip = fx(images), fx(torch.flip(images, dims=[-1]))
    assert not torch.allclose(direct_flip, torch.flip(direct, dims=[-1]), atol=1e-2)

    ds = LatentDataset(
        local=cfg.out_dir, latent_norm=False, random_flip=True, pair_flip_features=True, flip_seed=3, batch_size=1
    )
    try:
        flips = set()
        for i in range(n):
            item = ds[i]
            sid, flipped = int(item["sample_id"]), bool(item["flipped"])
            assert flipped == flip_decision(3, 0, sid)
            flips.add(flipped)
            image = images[sid]
            want_latent = torch.flip(image, dims=[-1]) if flipped else image  # identity tokenizer: the pixels
            torch.testing.assert_close(item["latent"], want_latent, rtol=0, atol=0)
            want = (direct_flip if flipped else direct)[sid].half()
            torch.testing.assert_close(item["features"], want, rtol=2e-3, atol=2e-3)
        assert flips == {True, False}, "the seed should flip some samples and not others"
    finally:
        del ds
        gc.collect()

    with pytest.raises(ValueError, match=r"has shape \(32, 4, 4\) but the model needs \(16, 4, 4\)"):
        LatentDataset(local=cfg.out_dir, latent_norm=False, expected_features_shape=(16, 4, 4), batch_size=1)
    gc.collect()


def test_repa_refuses_a_dataset_without_flip_features(tmp_path, clean_streaming_shm):
    from data.streaming import LatentDataset, write_latent_dataset

    rng = np.random.default_rng(0)
    samples = [
        {
            "latent": rng.standard_normal((3, 8, 8)),
            "latent_flip": rng.standard_normal((3, 8, 8)),
            "label": i,
            "sample_id": i,
            "features": rng.standard_normal((6, 4, 4)),
        }
        for i in range(4)
    ]
    write_latent_dataset(tmp_path / "ds", samples, with_features=True)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['features_flip'\].*features\.flip=true"):
        LatentDataset(local=str(tmp_path / "ds"), pair_flip_features=True, batch_size=1)
    gc.collect()


def test_leaderboard_names_a_repa_run():
    from models.evaluation.leaderboard import _model_name

    plain = {"model": {"type": "LightningDiT-XL/1"}, "repa": {"enabled": False, "depth": 8}}
    assert _model_name(plain) == "LightningDiT-XL/1"
    repa = {
        "model": {"type": "LightningDiT-XL/1"},
        "repa": {"enabled": True, "encoder": "dinov2-b", "depth": 8, "weight": 0.5},
    }
    assert _model_name(repa) == "LightningDiT-XL/1 + REPA(dinov2-b, depth 8, weight 0.5)"
