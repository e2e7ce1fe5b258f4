"""Embedded default dataset: procedurally generated, class-conditional RGB images.

Every image is a pure function of (seed, index, image_size, num_classes): no files, no downloads.
The label is ``index % num_classes`` (balanced classes). The class fixes

* the shape (cycling through ``SHAPES``: disk, square, triangle, plus, ring, horizontal stripes,
  vertical stripes, checkerboard, diamond, X), and
* the colour: one of 10 well separated colours (``PALETTE``; golden-ratio spaced hues past 10
  classes) with a small per-sample jitter, and the tint of the background (its complement),

while position, size, rotation jitter, the second stripe colour and the dark textured background
(a gradient plus smooth noise) vary per sample. Shapes are drawn from signed distances with
one-pixel anti-aliasing, so they stay recognisable at 16 px and scale up to 256 px and beyond.

``SyntheticImages`` is a torch Dataset returning ``(image, label)``: by default a float32 CHW
tensor in [-1, 1] (the VAE input convention), or with ``output="uint8"`` an HWC uint8 numpy array.
``write_image_folder`` writes the same images as an ImageNet-style folder
``out_dir/class_XX/img_XXXXXX.png`` (XX = label, XXXXXX = index).
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Literal, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from core.fileio import atomic_save_with

SHAPES = ("disk", "square", "triangle", "plus", "ring", "hstripes", "vstripes", "checker", "diamond", "x")

__all__ = ["PALETTE", "SHAPES", "SyntheticImages", "class_color", "render_image", "write_image_folder"]


# Foreground colour (hue, saturation, value) of the first 10 classes: chosen to be far apart in RGB.
PALETTE = (
    (0.00, 0.85, 0.95),  # red        disk
    (0.08, 0.95, 1.00),  # orange     square
    (0.16, 0.90, 0.95),  # yellow     triangle
    (0.33, 0.85, 0.75),  # green      plus
    (0.50, 0.90, 0.90),  # cyan       ring
    (0.62, 0.85, 1.00),  # blue       horizontal stripes
    (0.86, 0.80, 0.95),  # magenta    vertical stripes
    (0.00, 0.00, 0.97),  # white      checkerboard
    (0.74, 0.80, 0.80),  # violet     diamond
    (0.07, 0.75, 0.55),  # brown      X
)


def class_color(label: int, num_classes: int) -> tuple[float, float, float]:
    """(hue, saturation, value) of a class: ``PALETTE`` for <= 10 classes, golden-ratio hues beyond."""
    if num_classes <= len(PALETTE):
        return PALETTE[label]
    return ((label * 0.6180339887498949) % 1.0, 0.85, 0.95)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random (cells+1)^2 grid, bilinearly upsampled to size x size."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size, endpoint=False) + cells / (2 * size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    f = f * f * (3 - 2 * f)  # smoothstep
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # (size, cells+1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _shape_sdf(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (in units of the shape radius, negative inside) in local coordinates."""
    if kind == "disk":
        return np.sqrt(u * u + v * v) - 1.0
    if kind in ("square", "hstripes", "vstripes", "checker"):
        return np.maximum(np.abs(u), np.abs(v)) - 0.85
    if kind == "diamond":
        return (np.abs(u) + np.abs(v)) / math.sqrt(2.0) - 0.8
    if kind == "triangle":  # equilateral, pointing up (v grows downwards)
        k = math.sqrt(3.0)
        # distance to the three edges of a triangle with circumradius 1
        e1 = v - 0.5
        e2 = (-k * u - v) / 2.0 - 0.5
        e3 = (k * u - v) / 2.0 - 0.5
        return np.maximum(np.maximum(e1, e2), e3)
    if kind == "plus":
        arm = 0.32
        a = np.maximum(np.abs(u) - 1.0, np.abs(v) - arm)
        b = np.maximum(np.abs(u) - arm, np.abs(v) - 1.0)
        return np.minimum(a, b)
    if kind == "x":
        arm = 0.3
        p, q = (u + v) / math.sqrt(2.0), (u - v) / math.sqrt(2.0)
        a = np.maximum(np.abs(p) - 1.05, np.abs(q) - arm)
        b = np.maximum(np.abs(p) - arm, np.abs(q) - 1.05)
        return np.minimum(a, b)
    if kind == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.72) - 0.28
    raise ValueError(f"unknown shape {kind!r}")


def render_image(index: int, image_size: int = 32, num_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, int]:
    """The image ``index`` of the synthetic dataset as uint8 HWC RGB, and its label."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if index < 0:
        raise IndexError(f"negative index {index}")
    label = index % num_classes
    kind = SHAPES[label % len(SHAPES)]
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), int(image_size), int(num_classes), 0x5EED])
    s = image_size

    # Background: a dark gradient plus smooth noise, tinted with the complement of the class hue.
    hue, sat, val = class_color(label, num_classes)
    bg_hue = hue + 0.5 + 0.08 * rng.standard_normal()
    c0 = _hsv(bg_hue, 0.25 + 0.2 * rng.random(), 0.10 + 0.15 * rng.random())
    c1 = _hsv(bg_hue + 0.15 * rng.standard_normal(), 0.25 + 0.2 * rng.random(), 0.15 + 0.2 * rng.random())
    angle = rng.random() * 2 * math.pi
    y, x = np.mgrid[0:s, 0:s].astype(np.float64)
    xn, yn = (x + 0.5) / s * 2 - 1, (y + 0.5) / s * 2 - 1  # [-1, 1]
    ramp = np.clip((xn * math.cos(angle) + yn * math.sin(angle)) * 0.5 + 0.5, 0, 1)
    noise = _smooth_noise(rng, s, cells=int(rng.integers(3, 7)))
    image = c0 * (1 - ramp)[..., None] + c1 * ramp[..., None]
    image = image + (noise[..., None] - 0.5) * 0.12

    # Foreground: class shape with the class colour, random placement.
    radius = 0.42 + 0.2 * rng.random()  # fraction of the half-size
    margin = 1.0 - radius
    cx, cy = (rng.random(2) * 2 - 1) * margin * 0.6
    rot = (rng.random() - 0.5) * 0.5  # +-14 degrees
    cr, sr = math.cos(rot), math.sin(rot)
    du, dv = xn - cx, yn - cy
    u = (du * cr + dv * sr) / radius
    v = (-du * sr + dv * cr) / radius
    sdf = _shape_sdf(kind, u, v)
    pixel = 2.0 / s / radius  # one pixel in local units
    alpha = np.clip(0.5 - sdf / pixel, 0.0, 1.0)

    hue = hue + 0.015 * rng.standard_normal()
    fg = _hsv(hue, sat * (0.85 + 0.15 * rng.random()), val * (0.85 + 0.15 * rng.random()))
    fill = np.broadcast_to(fg, image.shape).copy()
    if kind in ("hstripes", "vstripes", "checker"):
        # Stripe period of >= 4 pixels so the pattern survives at 16 px.
        period = max(4.0 * pixel, 0.55)
        # second colour: pale tint for coloured classes, mid grey for the white one
        second = _hsv(hue + 0.5, 0.3 * rng.random(), 0.95) if sat > 0.2 else _hsv(0.0, 0.0, 0.35 + 0.1 * rng.random())
        coord_h, coord_v = np.floor(v / period), np.floor(u / period)
        if kind == "hstripes":
            band = coord_h % 2 == 1
        elif kind == "vstripes":
            band = coord_v % 2 == 1
        else:
            band = (coord_h + coord_v) % 2 == 1
        fill[band] = second
    image = image * (1 - alpha[..., None]) + fill * alpha[..., None]

    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return image, label


class SyntheticImages(Dataset):
    """``num_samples`` synthetic images, generated on the fly and deterministic per (seed, index).

    ``output="tensor"`` (default): float32 CHW in [-1, 1]; ``output="uint8"``: HWC uint8 numpy.
    Items are ``(image, label)`` with an int label.
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        output: Literal["tensor", "uint8"] = "tensor",
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if output not in ("tensor", "uint8"):
            raise ValueError(f"output must be 'tensor' or 'uint8', got {output!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.output = output

    def __len__(self) -> int:
        return self.num_samples

    def label(self, index: int) -> int:
        return index % self.num_classes

    def __getitem__(self, index: int) -> tuple[Union[torch.Tensor, np.ndarray], int]:
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        image, label = render_image(index, self.image_size, self.num_classes, self.seed)
        if self.output == "uint8":
            return image, label
        tensor = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)
        return tensor, label


def write_image_folder(
    out_dir: Union[str, Path], num_samples: int, image_size: int = 32, num_classes: int = 10, seed: int = 0
) -> Path:
    """Write the dataset as ``out_dir/class_XX/img_XXXXXX.png`` (ImageNet-style folder); returns out_dir."""
    out_dir = Path(out_dir)
    width = max(2, len(str(num_classes - 1)))
    for label in range(min(num_classes, max(num_samples, 0))):
        (out_dir / f"class_{label:0{width}d}").mkdir(parents=True, exist_ok=True)
    for index in range(num_samples):
        image, label = render_image(index, image_size, num_classes, seed)
        path = out_dir / f"class_{label:0{width}d}" / f"img_{index:06d}.png"
        atomic_save_with(path, lambda tmp: Image.fromarray(image, mode="RGB").save(tmp, format="PNG"))
    return out_dir
