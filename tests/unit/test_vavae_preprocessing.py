"""VA-VAE training images (models/tasks/vavae.py ``TrainImages``, data/images.py ``smallest_max_size``) against the
official transform: taming-transformers ``ImagePaths.preprocess_image`` as hustvl/LightningDiT's VA-VAE training uses
it (PIL -> RGB uint8, albumentations ``SmallestMaxSize(S)`` + ``RandomCrop(S)`` for training / ``CenterCrop(S)`` for
validation, no flip, ``u / 127.5 - 1``), reimplemented here with albumentations itself (a test-only dependency)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

try:
    import albumentations as A
except ImportError as err:  # the `test` extra installs it (setup.py, constraints.txt)
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(
        f"albumentations is not installed (pip install -c constraints.txt -e '.[test]'): {err}", allow_module_level=True
    )

from data.images import (
    ImageRecord,
    normalized_to_uint8,
    smallest_max_size,
    uint8_to_normalized,
)
from models.tasks.vavae import TrainImages

S = 16
# (height, width): landscape/portrait, down- and upscaling, already at S, odd sizes, long sides that round
# half to even (32x33 -> 16x16.5 -> 16; 32x35 -> 16x17.5 -> 18), short sides where int() would truncate to S-1.
SHAPES = [
    (16, 40),
    (40, 16),
    (23, 17),
    (17, 23),
    (49, 61),
    (9, 30),
    (16, 16),
    (103, 77),
    (61, 49),
    (32, 33),
    (32, 35),
    (98, 161),
    (5, 7),
]


def official_preprocess(path, size: int, random_crop: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HWC crop, float32 HWC in [-1, 1]) as taming's ImagePaths.preprocess_image computes them."""
    image = Image.open(path)
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = np.array(image).astype(np.uint8)
    rescaler = A.SmallestMaxSize(max_size=size)
    cropper = A.RandomCrop(height=size, width=size) if random_crop else A.CenterCrop(height=size, width=size)
    image = A.Compose([rescaler, cropper])(image=image)["image"]
    return image, (image / 127.5 - 1.0).astype(np.float32)


def write_images(root, shapes, seed: int = 0) -> list[ImageRecord]:
    """Random-pixel PNGs (one grayscale, one JPEG: PIL decodes and converts them the same on both sides)."""
    rng = np.random.default_rng(seed)
    records = []
    for i, (h, w) in enumerate(shapes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if i == 2:
            path, image = root / f"{i}.png", Image.fromarray(pixels[..., 0], mode="L")
        elif i == 4:
            path, image = root / f"{i}.jpg", Image.fromarray(pixels)
        else:
            path, image = root / f"{i}.png", Image.fromarray(pixels)
        image.save(path)
        records.append(ImageRecord(str(path), i % 3))
    return records


def test_smallest_max_size_is_albumentations():
    rng = np.random.default_rng(1)
    for h, w in SHAPES + [(375, 500), (500, 333)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        size = 256 if max(h, w) >= 256 else S
        expected = A.SmallestMaxSize(max_size=size)(image=pixels)["image"]
        ours = smallest_max_size(pixels, size)
        assert ours.dtype == np.uint8 and min(ours.shape[:2]) == size, (h, w)
        np.testing.assert_array_equal(ours, expected, err_msg=f"{h}x{w} -> {size}")
    assert smallest_max_size(np.zeros((16, 20, 3), np.uint8), 16).shape == (16, 20, 3)
    assert smallest_max_size(np.zeros((32, 35, 3), np.uint8), 16).shape == (16, 18, 3)  # 17.5 -> 18
    assert smallest_max_size(np.zeros((32, 33, 3), np.uint8), 16).shape == (16, 16, 3)  # 16.5 -> 16
    with pytest.raises(ValueError, match="size must be >= 1"):
        smallest_max_size(np.zeros((4, 4, 3), np.uint8), 0)


def test_center_crop_matches_official_validation_transform(tmp_path):
    records = write_images(tmp_path, SHAPES)
    dataset = TrainImages(records=records, image_size=S, crop="center", seed=3)
    for index, record in enumerate(records):
        pixels, official = official_preprocess(record.path, S, random_crop=False)
        item = dataset[index]
        image = item["image"]
        assert image.shape == (3, S, S) and image.dtype == torch.float32 and item["label"] == record.label
        # The same 8-bit crop, bit for bit ...
        assert torch.equal(normalized_to_uint8(image), torch.from_numpy(pixels).permute(2, 0, 1)), record.path
        assert torch.equal(image, uint8_to_normalized(torch.from_numpy(pixels).permute(2, 0, 1)))
        # ... scaled to [-1, 1] in float32 ((u / 255 - 0.5) / 0.5), at most one float32 ulp from u / 127.5 - 1.
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), official, rtol=0, atol=6e-8)


def test_random_crop_is_an_official_random_crop_seeded_per_epoch(tmp_path):
    records = write_images(tmp_path, SHAPES)
    dataset = TrainImages(records=records, image_size=S, crop="random", seed=7)
    for index, record in enumerate(records):
        resized = smallest_max_size(np.array(Image.open(record.path).convert("RGB")), S)
        height, width = resized.shape[:2]
        windows = {
            (top, left): torch.from_numpy(np.ascontiguousarray(resized[top : top + S, left : left + S]))
            for top in range(height - S + 1)
            for left in range(width - S + 1)
        }
        # albumentations' RandomCrop draws from the same set of windows (after the same resize).
        official, _ = official_preprocess(record.path, S, random_crop=True)
        assert any(torch.equal(torch.from_numpy(official), w) for w in windows.values()), record.path
        epochs = range(200) if index == 0 else range(3)
        seen = set()
        for epoch in epochs:
            dataset.set_epoch(epoch)
            crop = normalized_to_uint8(dataset[index]["image"]).permute(1, 2, 0)
            found = [pos for pos, w in windows.items() if torch.equal(crop, w)]
            assert found, (record.path, epoch)
            seen.add(found[0])
            assert torch.equal(dataset[index]["image"], dataset[index]["image"])  # (seed, epoch, index) fixed
        if index == 0:  # 16x40: 25 positions along x, every one reachable (ends included)
            lefts = {left for _, left in seen}
            assert len(lefts) == width - S + 1 and 0 in lefts and width - S in lefts, sorted(lefts)
    other_seed = TrainImages(records=records, image_size=S, crop="random", seed=8)
    dataset.set_epoch(0)
    assert any(not torch.equal(dataset[i]["image"], other_seed[i]["image"]) for i in range(len(records)))
