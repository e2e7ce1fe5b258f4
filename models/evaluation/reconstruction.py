"""Reconstruction quality of a tokenizer (VA-VAE) on an image folder: PSNR, SSIM, LPIPS and rFID.

The library behind ``tools/eval_tokenizer.py`` (its docstring has the protocol, after the official
``evaluate_tokenizer.py``). ``evaluate_reconstruction(tokenizer, files, ...)`` runs ``decode(encode(x))`` over the
images and averages the per-image metrics; ``rfid`` scores the written PNG folders with
``models/evaluation/metrics.py``. The tokenizer is always given explicitly: there is no default one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from PIL import Image

from data.images import IMG_EXTENSIONS, center_crop_arr, load_rgb, to_tensor_normalized
from models.evaluation.generation import to_uint8
from models.evaluation.metrics import evaluate_images

log = logging.getLogger("eval_tokenizer")

__all__ = [
    "PSNR_EXACT_DB",
    "evaluate_reconstruction",
    "gaussian_window",
    "list_images",
    "psnr_uint8",
    "rfid",
    "ssim",
    "to_uint8",
]

PSNR_EXACT_DB = 100.0


# ------------------------------------------------------------------------------------------------ metrics
def psnr_uint8(ref: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of uint8 images (B, C, H, W); identical images give ``PSNR_EXACT_DB``."""
    mse = ((ref.double() - rec.double()) ** 2).mean(dim=[1, 2, 3])
    out = 20 * torch.log10(255.0 / torch.sqrt(mse.clamp_min(1e-300)))
    return torch.where(mse == 0, torch.full_like(out, PSNR_EXACT_DB), out).float()


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images: gaussian-weighted local statistics over the valid window positions
    (no padding), averaged over positions and channels."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    g = gaussian_window(window, sigma).to(x.device)
    kh = g.reshape(1, 1, window, 1).repeat(c, 1, 1, 1)
    kw = g.reshape(1, 1, 1, window).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return value.mean(dim=[1, 2, 3]).float()


# ------------------------------------------------------------------------------------------------ data
def list_images(root: Path, key: str = "--images") -> list[Path]:
    """Every image file under ``root`` (recursive, following links, sorted)."""

    if not root.is_dir():
        raise FileNotFoundError(f"{key}: {root} is not a directory")
    files = []
    for dirpath, _, names in sorted(os.walk(root, followlinks=True)):
        files += [Path(dirpath) / n for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"{key}: no image files under {root}")
    return files


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], size: int):
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return to_tensor_normalized(center_crop_arr(load_rgb(self.files[i]), self.size)), i
        except Exception as err:  # noqa: BLE001 - report and skip
            return None, f"{self.files[i]}: {type(err).__name__}: {err}"


def _collate(items):
    good = [(t, i) for t, i in items if t is not None]
    bad = [msg for t, msg in items if t is None]
    images = torch.stack([t for t, _ in good]) if good else None
    return images, [i for _, i in good], bad


# ------------------------------------------------------------------------------------------------ rFID
def rfid(
    reference_dir: Path,
    recon_dir: Path,
    extractor: str,
    weights: Optional[str],
    device: str,
    batch_size: int,
    weights_key: str = "--fid-weights",
) -> dict[str, Any]:
    """FID of the reconstructions against the references, both PNG folders, by the evaluation code
    (models/evaluation/metrics.py: one FID implementation — feature extractor, weights, statistics — for samples
    and reconstructions)."""

    result = evaluate_images(
        str(recon_dir),
        str(reference_dir),
        metrics=("fid",),
        feature_extractor=extractor,
        weights=weights,
        device=device,
        batch_size=batch_size,
        use_cache=False,
        weights_key=weights_key,
    )
    return {"rfid": float(result["fid"]), "rfid_feature_extractor": result["feature_extractor"]}


# ------------------------------------------------------------------------------------------------ one call
@torch.no_grad()
def evaluate_reconstruction(
    tok,
    files: Sequence[Path],
    *,
    image_size: int,
    batch_size: int,
    num_workers: int = 0,
    mean: bool = False,
    seed: int = 0,
    lpips: Optional[torch.nn.Module] = None,
    out_dir: Optional[Path] = None,
    device: torch.device = torch.device("cpu"),
    fid_extractor: Optional[str] = None,
    fid_weights: Optional[str] = None,
) -> dict[str, Any]:
    """PSNR / SSIM (/ LPIPS with ``lpips``) of ``tok``'s reconstructions of ``files`` (posterior sample drawn
    from a generator seeded with ``seed``, or the ``mean``), averaged over images; the reference and reconstructed
    PNGs go to ``out_dir/ref`` and ``out_dir/rec`` when given, and with ``fid_extractor`` their rFID is added."""
    loader = torch.utils.data.DataLoader(
        _Images(files, image_size), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    out_dir = Path(out_dir) if out_dir else None
    if out_dir:
        (out_dir / "ref").mkdir(parents=True, exist_ok=True)
        (out_dir / "rec").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n, skipped = 0, []
    for images, ids, bad in loader:
        skipped += bad
        for msg in bad:
            log.warning("skipped unreadable image %s", msg)
        if images is None:
            continue
        x = images.to(device)
        rec = tok.decode(tok.encode(x, sample=not mean, generator=gen)).float()
        ref8, rec8 = to_uint8(x), to_uint8(rec)
        sums["psnr"] += float(psnr_uint8(ref8, rec8).sum())
        sums["ssim"] += float(ssim(x.clamp(-1, 1), rec.clamp(-1, 1)).sum())
        if lpips is not None:
            sums["lpips"] += float(lpips(x, rec).sum())
        n += x.shape[0]
        if out_dir:
            for i, a, b in zip(ids, ref8.permute(0, 2, 3, 1).cpu().numpy(), rec8.permute(0, 2, 3, 1).cpu().numpy()):
                Image.fromarray(a).save(out_dir / "ref" / f"{i:06d}.png")
                Image.fromarray(b).save(out_dir / "rec" / f"{i:06d}.png")
    if n == 0:
        raise RuntimeError(f"--images: none of the {len(files)} images could be read")
    result: dict[str, Any] = {
        "num_images": n,
        "num_skipped": len(skipped),
        "image_size": image_size,
        "posterior": "mean" if mean else "sample",
        "psnr": sums["psnr"] / n,
        "ssim": sums["ssim"] / n,
    }
    if lpips is not None:
        result["lpips"] = sums["lpips"] / n
    if fid_extractor:
        if out_dir is None:
            raise ValueError("rFID compares the written PNG folders: give out_dir")
        result.update(rfid(out_dir / "ref", out_dir / "rec", fid_extractor, fid_weights, str(device), batch_size))
    return result
