"""Image sources and the ADM center crop (data/images.py), the tokenizer interface (data/tokenizers.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.images import (
    BadItem,
    ImageFileDataset,
    ImageRecord,
    center_crop_arr,
    collate_items,
    load_rgb,
    read_file_list,
    scan_image_folder,
    to_tensor_normalized,
)
from data.tokenizers import IdentityTokenizer, Tokenizer, available_tokenizers, build_tokenizer, register_tokenizer


def ramp_image(width: int = 64, height: int = 32) -> Image.Image:
    """R = 2x, G = 4y, B = 100: BOX halving gives exact integer means (hand-checkable)."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([2 * x, 4 * y, np.full_like(x, 100)], axis=-1).astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


# -------------------------------------------------------------------------------------------- center crop
def test_center_crop_box_halving_and_hand_checked_pixel():
    # 64x32 -> size 16: short side 32 >= 2*16, so one BOX halving to 32x16; the BICUBIC resize to short side 16
    # keeps 32x16; the center crop starts at x = (32 - 16) // 2 = 8.
    # After halving: R(x') = mean(2*2x', 2*(2x'+1)) = 4x' + 1, G(y') = mean(4*2y', 4*(2y'+1)) = 8y' + 2.
    out = center_crop_arr(ramp_image(), 16)
    assert out.size == (16, 16)
    array = np.asarray(out)
    assert tuple(array[3, 5]) == (4 * (5 + 8) + 1, 8 * 3 + 2, 100)  # (53, 26, 100)
    assert tuple(array[0, 0]) == (33, 2, 100) and tuple(array[15, 15]) == (4 * 23 + 1, 8 * 15 + 2, 100)
    tensor = to_tensor_normalized(out)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 16, 16)
    assert tensor[0, 3, 5].item() == pytest.approx((53 / 255 - 0.5) / 0.5, abs=1e-7)
    assert tensor.min() >= -1 and tensor.max() <= 1


def test_center_crop_bicubic_rounding_and_sizes():
    # 50x37 -> 16: 37 >= 32 -> halve to 25x18; scale 16/18: round(25 * 16/18) = round(22.22) = 22 -> 22x16;
    # crop offset (22 - 16) // 2 = 3. A constant image stays constant through BOX and BICUBIC.
    flat = Image.new("RGB", (50, 37), (10, 200, 30))
    out = center_crop_arr(flat, 16)
    assert out.size == (16, 16)
    assert (np.asarray(out) == np.array([10, 200, 30], dtype=np.uint8)).all()
    # The same steps by hand on a non-constant image give the same pixels.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8))
    step = image.resize((25, 18), resample=Image.Resampling.BOX).resize((22, 16), resample=Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(center_crop_arr(image, 16)), np.asarray(step)[:, 3:19])
    # Tall images crop vertically; images smaller than the target are upscaled.
    assert center_crop_arr(Image.new("RGB", (20, 70)), 16).size == (16, 16)
    assert center_crop_arr(Image.new("RGB", (5, 9)), 16).size == (16, 16)
    with pytest.raises(ValueError):
        center_crop_arr(flat, 0)


def test_to_tensor_matches_torchvision_bitwise():
    from torchvision import transforms

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    reference = transforms.Normalize([0.5] * 3, [0.5] * 3)(transforms.ToTensor()(image))
    assert torch.equal(to_tensor_normalized(image), reference)


# --------------------------------------------------------------------------------------------- listings
def _save(path, size=(20, 12), color=(0, 128, 255), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def test_scan_image_folder_order_labels_and_ignored(tmp_path):
    _save(tmp_path / "zebra" / "b.png")
    _save(tmp_path / "zebra" / "a.JPG", fmt="JPEG")
    _save(tmp_path / "apple" / "sub" / "c.png")
    _save(tmp_path / "apple" / "d.jpeg", fmt="JPEG")
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / "stray.png").write_bytes(b"")
    records, classes, ignored = scan_image_folder(tmp_path)
    assert classes == ["apple", "zebra"]
    # ImageFolder order: classes sorted, then a sorted os.walk inside each class folder.
    assert [(r.path[len(str(tmp_path)) + 1 :], r.label) for r in records] == [
        ("apple/d.jpeg", 0),
        ("apple/sub/c.png", 0),
        ("zebra/a.JPG", 1),
        ("zebra/b.png", 1),
    ]
    assert sorted(i.path for i in ignored) == sorted(
        [str(tmp_path / "apple" / "notes.txt"), str(tmp_path / "stray.png")]
    )
    with pytest.raises(FileNotFoundError):
        scan_image_folder(tmp_path / "missing")


def test_read_file_list(tmp_path):
    _save(tmp_path / "imgs" / "x y.png")
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\n\nimgs/x y.png 3\n/abs/path.jpg 0\n")
    records = read_file_list(listing)
    assert records == [ImageRecord(str(tmp_path / "imgs" / "x y.png"), 3), ImageRecord("/abs/path.jpg", 0)]
    assert read_file_list(listing, root="/base")[0].path == "/base/imgs/x y.png"
    listing.write_text("imgs/a.png cat\n")
    with pytest.raises(ValueError, match=r"list.txt:1: label 'cat'"):
        read_file_list(listing)


def test_dataset_items_bad_files_and_collate(tmp_path):
    good = _save(tmp_path / "good.png", size=(40, 24))
    jpeg = _save(tmp_path / "full.jpg", size=(64, 64), fmt="JPEG")
    truncated = tmp_path / "broken.jpg"
    truncated.write_bytes(jpeg.read_bytes()[:300])
    text = tmp_path / "fake.png"
    text.write_text("hello")
    ds = ImageFileDataset(
        [ImageRecord(str(good), 4), ImageRecord(str(truncated), 1), ImageRecord(str(text), 2)], image_size=16
    )
    item = ds[0]
    assert item["sample_id"] == 0 and item["label"] == 4 and item["image"].shape == (3, 16, 16)
    assert torch.equal(item["image"], to_tensor_normalized(center_crop_arr(load_rgb(good), 16)))
    bad1, bad2 = ds[1], ds[2]
    assert isinstance(bad1, BadItem) and bad1.path == str(truncated) and bad1.sample_id == 1
    assert isinstance(bad2, BadItem) and bad2.path == str(text) and "UnidentifiedImageError" in bad2.error
    batch = collate_items([ds[0], bad1, ds[0], bad2])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["sample_id"].tolist() == [0, 0]
    assert [b.path for b in batch["bad"]] == [str(truncated), str(text)]
    empty = collate_items([bad1])
    assert empty["image"] is None and empty["sample_id"].numel() == 0
    assert len(ds.fingerprint()) == 64


# -------------------------------------------------------------------------------------------- tokenizers
def test_identity_tokenizer_and_registry():
    tok = build_tokenizer("identity")
    assert isinstance(tok, IdentityTokenizer) and isinstance(tok, Tokenizer)
    assert tok.downsample == 1 and tok.channels == 3 and tok.latent_shape(16) == (3, 16, 16)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    z = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, x) and z.data_ptr() != x.data_ptr()
    assert torch.equal(tok.decode(z), x)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'nope'"):
        build_tokenizer("nope")
    with pytest.raises(ValueError):
        tok.encode(torch.zeros(2, 4, 8, 8))

    @register_tokenizer("test-half")
    class Half(IdentityTokenizer):
        downsample = 2

    try:
        assert "test-half" in available_tokenizers()
        assert build_tokenizer("test-half").latent_shape(16) == (3, 8, 8)
        with pytest.raises(ValueError, match="not divisible"):
            build_tokenizer("test-half").latent_shape(15)
    finally:
        from data import tokenizers

        tokenizers.TOKENIZERS._entries.pop("test-half")
