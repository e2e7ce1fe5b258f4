"""Reconstruction quality of a tokenizer (VA-VAE) on an image folder: PSNR, SSIM, LPIPS (+ the rFID hook).

    python tools/eval_tokenizer.py --checkpoint weights/vavae-imagenet256-f16d32-dinov2.pt \\
        --images /data/imagenet/val --image-size 256 --batch-size 32 \\
        --lpips-vgg-weights weights/vgg16-397923af.pth --lpips-lin-weights weights/lpips_vgg_v0.1.pth \\
        --out-dir runs/eval_vavae --json runs/eval_vavae/metrics.json
    # our own run: the architecture is read from the run's saved config
    python tools/eval_tokenizer.py --checkpoint runs/vavae_f16d32_stage3/checkpoints/step_0075060 --images ...

Protocol (the official ``evaluate_tokenizer.py``, facts §5.5, with the differences noted):

* images: every image file under ``--images`` (recursive, sorted paths), ADM center crop to ``--image-size``
  (data/images.py; the official script uses Resize(256) + CenterCrop on tensors), scaled to [-1, 1];
* reconstruction: ``decode(encode(x))`` with a posterior **sample** (official; ``--mean`` for the mean), drawn from
  a generator seeded with ``--seed``;
* PSNR: per image on the uint8 images written as PNG by the official script (``clamp(127.5 x + 128)``),
  ``20 log10(255 / sqrt(MSE))``, averaged over images (an exact reconstruction counts as 100 dB);
* SSIM: gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 2 on [-1, 1] images clamped to that range,
  averaged over the valid window positions and channels, then over images (the torchmetrics definition the
  official script uses, implemented here: torchmetrics is not a dependency);
* LPIPS: VGG16 LPIPS (models/losses/lpips.py) on [-1, 1] images, per image, averaged; weights from local files;
* rFID: with ``--fid-weights`` (local Inception weights), the reference and reconstructed PNGs written to
  ``--out-dir`` are scored by the evaluation code (tools/fid.py ``evaluate_images``, the pytorch-fid-compatible
  Inception of torch-fidelity); ``--fid-extractor tiny-random`` scores them with the tiny random network of the
  CPU tests and the demo instead (a pipeline check, not a quality measure); with neither, rFID is not computed.

Single process; ``--device auto`` picks CUDA when available. Exit code 0; the metrics are printed as JSON
(and written to ``--json``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger("eval_tokenizer")

__all__ = ["gaussian_window", "list_images", "main", "psnr_uint8", "ssim", "to_uint8"]

PSNR_EXACT_DB = 100.0


# ------------------------------------------------------------------------------------------------ metrics
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8, as the official script writes PNGs: ``clamp(127.5 x + 128, 0, 255)``."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)


def psnr_uint8(ref: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of uint8 images (B, C, H, W); identical images give ``PSNR_EXACT_DB``."""
    mse = ((ref.double() - rec.double()) ** 2).mean(dim=[1, 2, 3])
    out = 20 * torch.log10(255.0 / torch.sqrt(mse.clamp_min(1e-300)))
    return torch.where(mse == 0, torch.full_like(out, PSNR_EXACT_DB), out).float()


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
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
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return value.mean(dim=[1, 2, 3]).float()


# ------------------------------------------------------------------------------------------------ data
def list_images(root: Path) -> list[Path]:
    from data.images import IMG_EXTENSIONS
    if not root.is_dir():
        raise FileNotFoundError(f"--images: {root} is not a directory")
    files = []
    for dirpath, _, names in sorted(os.walk(root, followlinks=True)):
        files += [Path(dirpath) / n for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"--images: no image files under {root}")
    return files


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], size: int):
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from data.images import center_crop_arr, load_rgb, to_tensor_normalized
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
def rfid(reference_dir: Path, recon_dir: Path, extractor: str, weights: Optional[str], device: str,
         batch_size: int) -> dict[str, Any]:
    """FID of the reconstructions against the references, both PNG folders, by the evaluation code (tools/fid.py:
    one FID implementation — feature extractor, weights, statistics — for samples and reconstructions)."""
    from tools.fid import evaluate_images
    result = evaluate_images(str(recon_dir), str(reference_dir), metrics=("fid",), feature_extractor=extractor,
                             weights=weights, device=device, batch_size=batch_size, use_cache=False,
                             weights_key="--fid-weights")
    return {"rfid": float(result["fid"]), "rfid_feature_extractor": result["feature_extractor"]}


# ------------------------------------------------------------------------------------------------ main
def _parse_arch(items: Sequence[str]) -> dict[str, Any]:
    import yaml
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--arch: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        value = yaml.safe_load(v)
        out[k.strip()] = tuple(value) if isinstance(value, list) else value
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tokenizer reconstruction metrics: PSNR, SSIM, LPIPS (+ rFID hook).")
    p.add_argument("--checkpoint", help="released VA-VAE file (.pt/.ckpt) or our run's checkpoint directory")
    p.add_argument("--tokenizer", default="vavae", help="data.tokenizers kind (default vavae)")
    p.add_argument("--arch", nargs="*", default=[], help="architecture overrides, e.g. ch=64 ch_mult=[1,2]")
    p.add_argument("--random-init", action="store_true", help="untrained tokenizer (tests only)")
    p.add_argument("--images", required=True, help="image folder (searched recursively)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--mean", action="store_true", help="decode the posterior mean (official: a sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior-sample generator")
    p.add_argument("--lpips-vgg-weights", help="local torchvision vgg16 state dict (or a full LPIPS state dict)")
    p.add_argument("--lpips-lin-weights", help="local LPIPS linear-head weights (lin{i}.model.1.weight)")
    p.add_argument("--lpips-random-init", action="store_true", help="random LPIPS network (tests only)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--out-dir", help="write ref/ and rec/ PNGs here (needed for rFID)")
    p.add_argument("--fid-weights", help="local Inception weights: computes rFID on the PNGs in --out-dir")
    p.add_argument("--fid-extractor", default=None,
                   help="FID feature extractor (tools/fid.py; default inception-v3-compat); 'tiny-random' needs no "
                        "weights (tests, demo: a pipeline check, not a quality measure)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", help="also write the metrics to this file")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.random_init:
        p.error("--checkpoint is required (or --random-init for an untrained test model)")
    if (args.fid_weights or args.fid_extractor) and not args.out_dir:
        p.error("rFID (--fid-weights / --fid-extractor) needs --out-dir (it compares the written PNG folders)")
    if not args.no_lpips and not args.lpips_random_init and not args.lpips_vgg_weights:
        p.error("LPIPS needs --lpips-vgg-weights (local file; and --lpips-lin-weights), or --no-lpips")
    return args


@torch.no_grad()
def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from data.tokenizers import build_tokenizer
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    kwargs = _parse_arch(args.arch)
    if args.checkpoint:
        kwargs["checkpoint"] = args.checkpoint
    if args.random_init:
        kwargs["random_init"] = True
    tok = build_tokenizer(args.tokenizer, **kwargs).to(device).eval()
    lpips = None
    if not args.no_lpips:
        from models.losses.lpips import build_lpips
        lpips = build_lpips(args.lpips_vgg_weights, args.lpips_lin_weights, random_init=args.lpips_random_init,
                            config_key="--lpips").to(device)
    files = list_images(Path(args.images))[: args.limit]
    loader = torch.utils.data.DataLoader(_Images(files, args.image_size), batch_size=args.batch_size,
                                         num_workers=args.num_workers, collate_fn=_collate)
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        (out_dir / "ref").mkdir(parents=True, exist_ok=True)
        (out_dir / "rec").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n, skipped = 0, []
    for images, ids, bad in loader:
        skipped += bad
        for msg in bad:
            log.warning("skipped unreadable image %s", msg)
        if images is None:
            continue
        x = images.to(device)
        rec = tok.decode(tok.encode(x, sample=not args.mean, generator=gen)).float()
        ref8, rec8 = to_uint8(x), to_uint8(rec)
        sums["psnr"] += float(psnr_uint8(ref8, rec8).sum())
        sums["ssim"] += float(ssim(x.clamp(-1, 1), rec.clamp(-1, 1)).sum())
        if lpips is not None:
            sums["lpips"] += float(lpips(x, rec).sum())
        n += x.shape[0]
        if out_dir:
            from PIL import Image
            for i, a, b in zip(ids, ref8.permute(0, 2, 3, 1).cpu().numpy(), rec8.permute(0, 2, 3, 1).cpu().numpy()):
                Image.fromarray(a).save(out_dir / "ref" / f"{i:06d}.png")
                Image.fromarray(b).save(out_dir / "rec" / f"{i:06d}.png")
    if n == 0:
        raise RuntimeError(f"--images: none of the {len(files)} images could be read")
    result: dict[str, Any] = {"num_images": n, "num_skipped": len(skipped), "image_size": args.image_size,
                              "posterior": "mean" if args.mean else "sample",
                              "psnr": sums["psnr"] / n, "ssim": sums["ssim"] / n}
    if lpips is not None:
        result["lpips"] = sums["lpips"] / n
    if args.fid_weights or args.fid_extractor:
        from tools.fid import INCEPTION
        result.update(rfid(out_dir / "ref", out_dir / "rec", args.fid_extractor or INCEPTION, args.fid_weights,
                           str(device), args.batch_size))
    return result


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    result = evaluate(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    REPO = Path(__file__).resolve().parents[1]
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    sys.exit(main())
