"""The embedded synthetic dataset: determinism, sizes, folder layout and learnability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.synthetic import SHAPES, SyntheticImages, render_image, write_image_folder


def test_deterministic_by_seed_and_index():
    a, la = render_image(7, 32, 10, seed=3)
    b, lb = render_image(7, 32, 10, seed=3)
    np.testing.assert_array_equal(a, b)
    assert la == lb == 7
    assert not np.array_equal(a, render_image(7, 32, 10, seed=4)[0])
    assert not np.array_equal(a, render_image(17, 32, 10, seed=3)[0])  # same class, other sample
    ds = SyntheticImages(20, image_size=32, seed=3, output="uint8")
    np.testing.assert_array_equal(ds[7][0], a)
    np.testing.assert_array_equal(ds[-13][0], a)  # negative index
    with pytest.raises(IndexError):
        ds[20]


@pytest.mark.parametrize("size", [16, 32, 64, 256])
def test_sizes_and_output_formats(size):
    as_uint8 = SyntheticImages(12, image_size=size, output="uint8")
    as_tensor = SyntheticImages(12, image_size=size)
    for index in (0, 5, 11):
        image, label = as_uint8[index]
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        tensor, label_t = as_tensor[index]
        assert tensor.shape == (3, size, size) and tensor.dtype == torch.float32
        assert label == label_t == index % 10
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0
        expected = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(tensor, expected)
        assert image.std() > 10  # not a blank image


def test_labels_balanced_and_more_classes():
    ds = SyntheticImages(130, image_size=16, num_classes=13)
    labels = [ds[i][1] for i in range(len(ds))]
    assert np.bincount(labels).tolist() == [10] * 13
    assert len(SHAPES) == 10
    with pytest.raises(ValueError):
        SyntheticImages(4, output="float")
    with pytest.raises(ValueError):
        SyntheticImages(4, image_size=4)


def test_write_image_folder(tmp_path):
    out = write_image_folder(tmp_path / "imgs", num_samples=23, image_size=16, num_classes=10, seed=1)
    files = sorted(out.rglob("*.png"))
    assert len(files) == 23
    assert sorted(p.name for p in out.iterdir()) == [f"class_{c:02d}" for c in range(10)]
    path = out / "class_03" / "img_000013.png"
    assert path.is_file()
    loaded = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(loaded, render_image(13, 16, 10, seed=1)[0])
    for p in files:
        assert int(p.parent.name.split("_")[1]) == int(p.stem.split("_")[1]) % 10
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("size", [16, 32])
def test_learnable_by_nearest_class_mean(size):
    """Classes differ clearly: a nearest-class-mean classifier on raw pixels generalises."""

    def load(lo, hi):
        pairs = [render_image(i, size, 10, seed=0) for i in range(lo, hi)]
        x = np.stack([p[0].astype(np.float32).ravel() / 255.0 for p in pairs])
        return x, np.array([p[1] for p in pairs])

    x_train, y_train = load(0, 1000)  # 100 images per class
    x_test, y_test = load(5000, 5500)  # held out
    means = np.stack([x_train[y_train == c].mean(axis=0) for c in range(10)])
    dist = ((x_test[:, None, :] - means[None]) ** 2).sum(axis=-1)
    accuracy = (dist.argmin(axis=1) == y_test).mean()
    assert accuracy > 0.8, accuracy
    # Every pair of class-mean images differs visibly (RMS over pixels, in [0, 1] units).
    closest = min(np.sqrt(((means[i] - means[j]) ** 2).mean()) for i in range(10) for j in range(i + 1, 10))
    assert closest > 0.04, closest
