"""Image sources for latent extraction: ImageNet-style class folders or a file list, with the ADM center crop.

Preprocessing is the official extraction pipeline's (ADM ``center_crop_arr``, then ToTensor and
Normalize(0.5, 0.5)): while the short side is at least twice the target size, halve the image with a BOX
filter; resize so that the short side equals the target size with BICUBIC (sizes rounded with Python's
``round``); take the center crop; scale to [-1, 1] as float32 CHW.

VA-VAE training images are made differently, as the official VA-VAE training does (hustvl/LightningDiT
``vavae/``, taming-transformers ``ImagePaths``): albumentations ``SmallestMaxSize(256)`` (cv2 ``INTER_LINEAR``, no
BOX pre-halving) then ``RandomCrop(256)`` (``CenterCrop`` for validation), no flip. ``smallest_max_size`` is that
resize, calling cv2 as albumentations does (opencv-python-headless is a runtime dependency for it); the crop and
its seeded randomness live with the training dataset (models/tasks/vavae.py ``TrainImages``).

Sources:

* ``scan_image_folder(root)``: ``root/<class>/**/<file>`` as torchvision's ImageFolder sees it: class
  folders in sorted order give labels 0..K-1, files are visited with a sorted ``os.walk`` inside each class
  folder, and only files with an image extension count. Files without one (and files directly under
  ``root``) are not samples; they are returned as ``ignored`` so that the job can report them.
* ``read_file_list(path)``: a text file of ``<path> <label>`` lines (blank lines and ``#`` comments skipped;
  the label is the last whitespace-separated field, so paths may contain spaces). Relative paths are
  resolved against ``root`` (default: the list file's directory). The order of the file is kept.

``ImageFileDataset`` decodes one file per item. Its items carry the global ``sample_id`` (the position in
the list above). A file that cannot be decoded (corrupt or truncated JPEG, a non-image file with an image
extension, ...) does not raise: the item is a ``BadItem`` with the path and the error, and
``collate_items`` drops it from the batch and hands it on in ``batch["bad"]``, so a long job reports the
file and keeps going.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

__all__ = [
    "IMG_EXTENSIONS",
    "BadItem",
    "IgnoredFile",
    "ImageFileDataset",
    "ImageRecord",
    "center_crop_arr",
    "collate_items",
    "load_rgb",
    "normalized_to_uint8",
    "read_file_list",
    "scan_image_folder",
    "smallest_max_size",
    "to_tensor_normalized",
    "uint8_to_normalized",
]


# ------------------------------------------------------------------------------------------ preprocessing
def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM center crop: BOX-halve while the short side >= 2*size, BICUBIC-resize the short side to ``size``
    (rounded), then crop the central ``size`` x ``size`` square (offsets rounded down)."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def smallest_max_size(pixels: np.ndarray, size: int) -> np.ndarray:
    """albumentations ``SmallestMaxSize(max_size=size)`` with its default interpolation (the official VA-VAE
    training resize): HWC uint8 -> HWC uint8 whose short side is ``size``.

    ``scale = size / min(h, w)``, new sides ``max(1, round(side * scale))`` (round half to even: albumentations
    2.x's ``round``, 0.4 / 1.x's ``py3round``), ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)``; an image
    already at that size is returned as is. cv2 is imported here (opencv-python-headless), not at module level."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    height, width = pixels.shape[:2]
    scale = size / min(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_height, new_width) == (height, width):
        return pixels
    import cv2

    return cv2.resize(pixels, (new_width, new_height), interpolation=cv2.INTER_LINEAR)


def to_tensor_normalized(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 CHW in [-1, 1]: ``x / 255`` then ``(x - 0.5) / 0.5`` (the same float operations
    as torchvision's ToTensor + Normalize(0.5, 0.5), so the values are bitwise identical)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.array(image, dtype=np.uint8, copy=True)  # H, W, 3
    return uint8_to_normalized(torch.from_numpy(array).permute(2, 0, 1))


def uint8_to_normalized(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any layout) -> float32 in [-1, 1], the float operations of ``to_tensor_normalized``."""
    return images.to(torch.float32, copy=True).div_(255).sub_(0.5).div_(0.5)


def normalized_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Inverse of ``uint8_to_normalized``: ``round((x + 1) * 127.5)`` as uint8 (exact for images that came from
    8-bit pixels, as every image source here does)."""
    return torch.round((images.to(torch.float32) + 1) * 127.5).clamp_(0, 255).to(torch.uint8)


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """Fully decoded RGB image (raises on truncated or undecodable files, like torchvision's loader)."""
    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")


# ------------------------------------------------------------------------------------------- listings
@dataclass(frozen=True)
class ImageRecord:
    path: str
    label: int


@dataclass(frozen=True)
class IgnoredFile:
    """A file found under the image root that is not a sample (reported, never decoded)."""

    path: str
    reason: str


def _has_extension(name: str, extensions: Sequence[str]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in extensions))


def scan_image_folder(
    root: Union[str, Path], extensions: Sequence[str] = IMG_EXTENSIONS
) -> tuple[list[ImageRecord], list[str], list[IgnoredFile]]:
    """(records, class names, ignored files) of an ImageNet-style folder, in ImageFolder's order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"image folder {root} has no class subfolders (expected root/<class>/<image>)")
    ignored = [
        IgnoredFile(str(root / entry.name), "not inside a class folder")
        for entry in sorted(os.scandir(root), key=lambda e: e.name)
        if not entry.is_dir()
    ]
    records: list[ImageRecord] = []
    for label, name in enumerate(classes):
        before = len(records)
        for dirpath, _, filenames in sorted(os.walk(root / name, followlinks=True)):
            for filename in sorted(filenames):
                path = os.path.join(dirpath, filename)
                if _has_extension(filename, extensions):
                    records.append(ImageRecord(path, label))
                else:
                    ignored.append(IgnoredFile(path, f"not an image file extension ({', '.join(extensions)})"))
        if len(records) == before:
            log.warning("class folder %s (label %d) holds no image files", root / name, label)
    return records, classes, ignored


def read_file_list(list_file: Union[str, Path], root: Optional[Union[str, Path]] = None) -> list[ImageRecord]:
    """Records of a ``<path> <label>`` text file (order kept; relative paths against ``root`` or the file's dir)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"file list {list_file} does not exist")
    base = Path(root) if root else list_file.parent
    records = []
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.rsplit(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{list_file}:{lineno}: expected '<path> <label>', got {text!r}")
            path, label = parts
            try:
                value = int(label)
            except ValueError:
                raise ValueError(f"{list_file}:{lineno}: label {label!r} is not an integer") from None
            if value < 0:
                raise ValueError(f"{list_file}:{lineno}: label must be >= 0, got {value}")
            full = Path(path) if os.path.isabs(path) else base / path
            records.append(ImageRecord(str(full), value))
    if not records:
        raise ValueError(f"file list {list_file} lists no images")
    return records


# -------------------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class BadItem:
    """An item whose file could not be read or decoded."""

    sample_id: int
    path: str
    error: str


class ImageFileDataset(Dataset):
    """Decoded, center-cropped images of ``records``; item ``i`` is
    ``{"image": float32 [3,S,S] in [-1,1], "label": int, "sample_id": i}`` or a ``BadItem``."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int,
        ignored: Iterable[IgnoredFile] = (),
        classes: Optional[Sequence[str]] = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.records = list(records)
        self.image_size = int(image_size)
        self.ignored = list(ignored)
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Union[dict[str, Any], BadItem]:
        record = self.records[index]
        try:
            image = center_crop_arr(load_rgb(record.path), self.image_size)
            tensor = to_tensor_normalized(image)
        except Exception as err:  # noqa: BLE001 - any decode problem: report the file, keep the job going
            return BadItem(int(index), record.path, f"{type(err).__name__}: {err}")
        return {"image": tensor, "label": int(record.label), "sample_id": int(index)}

    def fingerprint(self) -> str:
        """sha256 over (path, label) of every record, in order: the identity of the sample numbering."""
        h = hashlib.sha256()
        for record in self.records:
            h.update(record.path.encode("utf-8", "surrogateescape"))
            h.update(b"\0")
            h.update(str(record.label).encode())
            h.update(b"\n")
        return h.hexdigest()


def collate_items(items: Sequence[Union[dict[str, Any], BadItem]]) -> dict[str, Any]:
    """Stack good items, drop ``BadItem``s into ``batch["bad"]``.

    Returns ``{"image": [B,3,S,S] or None, "label": int64 [B], "sample_id": int64 [B], "bad": [BadItem]}``
    (``image`` is None when every item of the batch was bad)."""
    good = [item for item in items if not isinstance(item, BadItem)]
    bad = [item for item in items if isinstance(item, BadItem)]
    return {
        "image": torch.stack([item["image"] for item in good]) if good else None,
        "label": torch.tensor([int(item["label"]) for item in good], dtype=torch.int64),
        "sample_id": torch.tensor([int(item["sample_id"]) for item in good], dtype=torch.int64),
        "bad": bad,
    }
