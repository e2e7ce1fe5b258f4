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
  ``--out-dir`` are scored by the evaluation code (models/evaluation/metrics.py ``evaluate_images``, the
  pytorch-fid-compatible Inception of torch-fidelity); ``--fid-extractor tiny-random`` scores them with the tiny
  random network of the CPU tests and the demo instead (a pipeline check, not a quality measure); with neither,
  rFID is not computed.

The tokenizer is always explicit: ``--checkpoint`` (its weights), ``--random-init`` (an untrained one, tests
only) or ``--tokenizer identity`` (pixel space, a pipeline check); without one the tool stops with an error
naming these options. The metrics are computed by models/evaluation/reconstruction.py.

Single process; ``--device auto`` picks CUDA when available. Exit code 0; the metrics are printed as JSON
(and written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from data.tokenizers import build_tokenizer  # noqa: E402
from models.evaluation.metrics import INCEPTION  # noqa: E402 - after the path set-up
from models.evaluation.reconstruction import evaluate_reconstruction, list_images  # noqa: E402
from models.losses.lpips import build_lpips  # noqa: E402

__all__ = ["evaluate", "main", "parse_args"]


# ------------------------------------------------------------------------------------------------ main
def _parse_arch(items: Sequence[str]) -> dict[str, Any]:
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
    p.add_argument(
        "--fid-extractor",
        default=None,
        help="FID feature extractor (models/evaluation/metrics.py; default inception-v3-compat); "
        "'tiny-random' needs no weights (tests, demo: a pipeline check, not a quality measure)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", help="also write the metrics to this file")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.random_init and args.tokenizer != "identity":
        p.error(
            "no tokenizer: --checkpoint is required (the tokenizer's weights: a released VA-VAE .pt/.ckpt or "
            "our run's checkpoint directory); or --random-init for an untrained test model, or "
            "--tokenizer identity for pixel space"
        )
    if (args.fid_weights or args.fid_extractor) and not args.out_dir:
        p.error("rFID (--fid-weights / --fid-extractor) needs --out-dir (it compares the written PNG folders)")
    if not args.no_lpips and not args.lpips_random_init and not args.lpips_vgg_weights:
        p.error("LPIPS needs --lpips-vgg-weights (local file; and --lpips-lin-weights), or --no-lpips")
    return args


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    kwargs = _parse_arch(args.arch)
    if args.checkpoint:
        kwargs["checkpoint"] = args.checkpoint
    if args.random_init:
        kwargs["random_init"] = True
    tok = build_tokenizer(args.tokenizer, **kwargs).to(device).eval()
    lpips = None
    if not args.no_lpips:
        lpips = build_lpips(
            args.lpips_vgg_weights, args.lpips_lin_weights, random_init=args.lpips_random_init, config_key="--lpips"
        ).to(device)
    files = list_images(Path(args.images))[: args.limit]
    fid_extractor = (args.fid_extractor or INCEPTION) if (args.fid_weights or args.fid_extractor) else None
    return evaluate_reconstruction(
        tok,
        files,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        mean=args.mean,
        seed=args.seed,
        lpips=lpips,
        out_dir=Path(args.out_dir) if args.out_dir else None,
        device=device,
        fid_extractor=fid_extractor,
        fid_weights=args.fid_weights,
    )


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
    sys.exit(main())
