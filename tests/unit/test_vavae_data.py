"""VA-VAE training data from an image folder: random crops per epoch (in process; the training runs:
tests/integration/test_train_vavae.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def test_image_folder_training_data_random_crops_per_epoch(tmp_path):
    import numpy as np
    from PIL import Image

    from data.config import DataConfig
    from models.tasks.vavae import EpochMapSource, build_image_dataset

    rng = np.random.default_rng(0)
    for i in range(6):  # 16 x 40 landscape images: the short side is 16, crops slide along x
        (tmp_path / "imgs" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (16, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "imgs" / f"c{i % 3}" / f"{i}.png")
    cfg = DataConfig(kind="images", path=str(tmp_path / "imgs"), image_size=16, image_crop="random", random_flip=False)
    ds = build_image_dataset(cfg, seed=0)
    assert len(ds) == 6
    a = ds[2]["image"]
    assert a.shape == (3, 16, 16) and -1 <= a.min() and a.max() <= 1
    assert torch.equal(ds[2]["image"], a)  # deterministic per (seed, epoch, index)
    crops = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        crops.add(ds[2]["image"].sum().item())
    assert len(crops) > 1  # a new random crop per epoch
    center = build_image_dataset(
        DataConfig(kind="images", path=str(tmp_path / "imgs"), image_size=16, image_crop="center", random_flip=False),
        seed=0,
    )
    center.set_epoch(3)
    assert torch.equal(center[2]["image"], center[2]["image"]) and center[0]["label"] == 0
    source = EpochMapSource(
        ds, micro_batch_size=2, global_batch_size=2, seed=0, dist=SimpleNamespace(rank=0, world_size=1)
    )
    batch = next(source.iterator(epoch=4, step_in_epoch=1))
    assert ds.epoch == 4 and batch["image"].shape == (2, 3, 16, 16)
    with pytest.raises(FileNotFoundError, match="data.path"):
        build_image_dataset(DataConfig(kind="images", path=str(tmp_path / "nope"), image_size=16), seed=0)
