"""The extraction job (data/extract.py) on real MDS shards, in this process (single process, no process group).

The 2-rank runs (torchrun, SIGKILL and restart): tests/integration/test_extract_distributed.py.
The DINOv2 tests use a tiny, RANDOMLY INITIALISED timm ViT (``features.random_init: true``), never
pretrained weights.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from streaming import StreamingDataset

from core.config import ConfigError
from data.extract import (
    ExtractConfig,
    ExtractError,
    FeaturesConfig,
    build_features,
    extract,
    load_extract_config,
    main,
    read_manifest,
)
from data.synthetic import SyntheticImages, write_image_folder

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "extract_synthetic.yaml"
N, SIZE, CLASSES = 96, 16, 10
# 2 ranks x 48 images, chunks of 10 (5 per rank, the last one short), batches of 4 (chunk = 4 + 4 + 2).
COMMON = [
    f"source.num_samples={N}",
    f"source.image_size={SIZE}",
    f"source.num_classes={CLASSES}",
    "chunk_size=10",
    "batch_size=4",
    "num_workers=0",
    "latent_dtype=float32",
    "progress_bar=false",
]
TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("clean_streaming_shm")  # tests/conftest.py


def read_raw(out: Path) -> list[dict]:
    ds = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    try:
        return [ds[i] for i in range(len(ds))]
    finally:
        del ds
        gc.collect()


# --------------------------------------------------------------------------------------- bad files
def test_corrupt_jpeg_and_non_image_are_reported_and_skipped(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", num_samples=6, image_size=SIZE, num_classes=2)
    from PIL import Image

    jpeg = root / "class_00" / "img_broken.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 77).save(jpeg, format="JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated: header only
    fake = root / "class_01" / "img_fake.png"
    fake.write_text("this is not a png")  # image extension, not an image
    notes = root / "class_01" / "notes.txt"
    notes.write_text("readme")  # not an image extension

    cfg = load_extract_config(
        CONFIG,
        [
            f"out_dir={tmp_path / 'out'}",
            "source.kind=folder",
            f"source.path={root}",
            f"source.image_size={SIZE}",
            "chunk_size=3",
            "batch_size=2",
            "num_workers=1",
            "progress_bar=false",
        ],
    )
    result = extract(cfg)  # single process, no process group
    assert sorted(s["path"] for s in result.skipped) == sorted([str(jpeg), str(fake)])
    assert [i["path"] for i in result.ignored] == [str(notes)]
    assert result.num_items == 8 and result.num_samples == 6
    printed = capsys.readouterr().out
    assert str(jpeg) in printed and str(fake) in printed and str(notes) in printed
    manifest = read_manifest(cfg.out_dir)
    assert manifest["num_skipped"] == 2 and manifest["ignored"][0]["path"] == str(notes)
    bad_ids = {s["sample_id"] for s in manifest["skipped"]}
    ids = sorted(int(s["sample_id"]) for s in read_raw(Path(cfg.out_dir)))
    assert ids == sorted(set(range(8)) - bad_ids)
    # Sample ids follow ImageFolder's order (class_00: 3 images + broken = 0..3, class_01: 3 + fake = 4..7).
    assert bad_ids == {3, 7}
    raw = {int(s["sample_id"]): int(s["label"]) for s in read_raw(Path(cfg.out_dir))}
    assert raw == {0: 0, 1: 0, 2: 0, 4: 1, 5: 1, 6: 1}


# ------------------------------------------------------------------------------------------ DINOv2
def test_dinov2_features_tiny_random_vit(tmp_path):
    # features.random_init: a tiny RANDOMLY INITIALISED vit_small_patch14_dinov2 (32-d, 1 block), test only.
    overrides = [
        f"out_dir={tmp_path / 'out'}",
        "source.num_samples=6",
        f"source.image_size={SIZE}",
        "features.enabled=true",
        "features.model=vit_small_patch14_dinov2",
        "features.random_init=true",
        f"features.model_kwargs={json.dumps(TINY_VIT)}",
        "batch_size=4",
        "num_workers=0",
        "progress_bar=false",
    ]
    cfg = load_extract_config(CONFIG, overrides)
    extract(cfg)
    samples = sorted(read_raw(Path(cfg.out_dir)), key=lambda s: int(s["sample_id"]))
    features = samples[0]["features"]
    assert features.shape == (32, SIZE, SIZE) and features.dtype == np.float16  # [D, h, w] on the latent grid
    assert read_manifest(cfg.out_dir)["features_shape"] == [32, SIZE, SIZE]

    # Same weights (random_init draws them from a fixed seed, whatever the global RNG): token (r, c) of
    # forward_features on the 224 px input, after the CLS token, is features[:, r, c].
    torch.manual_seed(1234)
    extractor = build_features(cfg.features, (SIZE, SIZE))
    assert extractor.input_hw == (14 * SIZE, 14 * SIZE) and extractor.num_prefix_tokens == 1
    image = SyntheticImages(6, image_size=SIZE, num_classes=CLASSES)[0][0][None]
    with torch.no_grad():
        tokens = extractor.model.forward_features(
            F.interpolate(image, size=(224, 224), mode="bilinear", align_corners=False)
        )[0, 1:]
    for r, c in [(0, 0), (0, 5), (7, 3), (15, 15)]:
        np.testing.assert_allclose(
            features[:, r, c].astype(np.float32), tokens[r * SIZE + c].numpy(), rtol=2e-3, atol=2e-3
        )


def test_images_and_features_on_another_grid_without_latents(tmp_path):
    """tokenizer.kind none + images + features on an 8x8 grid (what VA-VAE f2 training at 16 px needs): the
    columns, the exact stored images, the plan (a resume with another grid is refused) and the config checks."""
    out = tmp_path / "out"
    overrides = [
        f"out_dir={out}",
        "source.num_samples=6",
        f"source.image_size={SIZE}",
        "tokenizer.kind=none",
        "images=true",
        "features.enabled=true",
        "features.model=vit_small_patch14_dinov2",
        "features.random_init=true",
        f"features.model_kwargs={json.dumps(TINY_VIT)}",
        "features.grid=8",
        "batch_size=4",
        "num_workers=0",
        "progress_bar=false",
    ]
    result = extract(load_extract_config(CONFIG, overrides))
    assert result.num_samples == 6 and result.mean is None
    manifest = read_manifest(out)
    assert manifest["columns"] == {
        "label": "int64",
        "sample_id": "int64",
        "features": "ndarray:float16:32,8,8",
        "image": f"ndarray:uint8:3,{SIZE},{SIZE}",
    }
    assert manifest["features_shape"] == [32, 8, 8] and manifest["image_shape"] == [3, SIZE, SIZE]
    assert manifest["latent_shape"] is None and manifest["stats"] is None
    assert not (out / "latents_stats.pt").exists()
    pixels = SyntheticImages(6, image_size=SIZE, num_classes=CLASSES, output="uint8")
    for s in read_raw(out):
        assert s["image"].dtype == np.uint8 and s["features"].shape == (32, 8, 8)
        np.testing.assert_array_equal(s["image"], pixels[int(s["sample_id"])][0].transpose(2, 0, 1))
    # Resuming is a no-op; another grid is another dataset.
    assert extract(load_extract_config(CONFIG, overrides)).written_this_run == 0
    with pytest.raises(ExtractError, match=r"features: .*\[32, 8, 8\].*\[32, 4, 4\]"):
        extract(load_extract_config(CONFIG, overrides + ["features.grid=4"]))

    with pytest.raises(ConfigError, match=r"tokenizer\.kind: is 'none' \(no latents\): store the images"):
        load_extract_config(CONFIG, ["tokenizer.kind=none"])
    with pytest.raises(ConfigError, match=r"features\.grid: must be set when tokenizer\.kind is 'none'"):
        load_extract_config(CONFIG, ["tokenizer.kind=none", "features.enabled=true", "features.random_init=true"])
    example = load_extract_config(REPO / "configs" / "extract_vavae_features.yaml")
    assert example.images and example.tokenizer.kind == "none" and example.features.grid == 16
    assert example.features.model == "vit_large_patch14_dinov2.lvd142m" and example.source.image_size == 256


def test_dinov2_registers_imagenet_norm_and_local_weights(tmp_path):
    # Tiny RANDOMLY INITIALISED ViT with 4 register tokens: all 5 prefix tokens are dropped.
    cfg = FeaturesConfig(
        enabled=True, model="vit_small_patch14_reg4_dinov2", random_init=True, model_kwargs=TINY_VIT, imagenet_norm=True
    )
    extractor = build_features(cfg, (4, 6))
    assert extractor.num_prefix_tokens == 5 and extractor.input_hw == (56, 84)
    assert extractor(torch.rand(2, 3, 32, 48) * 2 - 1).shape == (2, 32, 4, 6)
    # Weights come from a local file only: a saved state dict loads back exactly ...
    weights = tmp_path / "vit.pth"
    torch.save(extractor.model.state_dict(), weights)
    loaded = build_features(
        FeaturesConfig(
            enabled=True, model="vit_small_patch14_reg4_dinov2", weights=str(weights), model_kwargs=TINY_VIT
        ),
        (4, 6),
    )
    for key, value in extractor.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_missing_dinov2_weights_name_the_config_key(tmp_path):
    missing = tmp_path / "nope" / "dinov2.safetensors"
    cfg = ExtractConfig(out_dir=str(tmp_path / "out"))
    cfg.source.num_samples, cfg.source.image_size = 4, SIZE
    cfg.features = FeaturesConfig(
        enabled=True, model="vit_small_patch14_dinov2", weights=str(missing), model_kwargs=TINY_VIT
    )
    with pytest.raises(FileNotFoundError, match=r"features\.weights: .*dinov2\.safetensors does not exist"):
        extract(cfg)
    assert not (tmp_path / "out").exists()  # failed before any work
    with pytest.raises(ConfigError, match=r"features\.weights: not set"):
        load_extract_config(CONFIG, ["features.enabled=true"])


def test_config_errors_name_file_or_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: chunk_size: must be > 0"):
        load_extract_config(CONFIG, ["chunk_size=0"])
    with pytest.raises(ConfigError, match=r"source\.nums_samples: unknown key; did you mean 'num_samples'"):
        load_extract_config(CONFIG, ["source.nums_samples=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokenizer:\n  kind: vqgan\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))}: tokenizer\.kind: unknown tokenizer 'vqgan'"):
        load_extract_config(bad)
    assert main([str(bad)]) == 2
