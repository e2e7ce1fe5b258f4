"""Sample images from a trained run or a checkpoint file.

    python tools/sample.py runs/tiny_dit --grid runs/tiny_dit/samples.png --per-class 8
    python tools/sample.py runs/tiny_dit --grid grid.png sampling.cfg_scale=2.0 sampling.num_steps=100

The run directory gives the model and sampler config (`config.yaml`, overridable with dotted keys) and the
newest complete checkpoint (EMA weights by default); `--ckpt` picks another checkpoint (ours or an
official file). Latents are de-normalised with the statistics stored with the training data and decoded
with the tokenizer recorded by the extraction job (`manifest.json` next to the shards; identity when
absent).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def _latest_checkpoint(run_dir: Path) -> Path:
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
    if not ckpts:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    return ckpts[-1]


def load_run(run_dir: Path, overrides=(), ckpt: Optional[Path] = None, which: str = "ema",
             device: str = "cpu"):
    """(config, model in eval mode, checkpoint path) for a run directory."""
    from core.config import load_config
    from models.lightningdit import build_model
    from models.loading import load_into_model

    cfg = load_config(run_dir / "config.yaml", overrides)
    model = build_model(cfg.model)
    path = ckpt or _latest_checkpoint(run_dir)
    load_into_model(model, path, which=which, strict=True)
    return cfg, model.to(device).eval(), path


def latent_decoder(data_dir: Path, latent_norm: bool, multiplier: float, device: str = "cpu"):
    """latents (normalised, as the model sees them) -> images in [-1, 1]."""
    from data.streaming import denormalize_latents, load_latent_stats
    from data.tokenizers import build_tokenizer

    mean = std = None
    if latent_norm:
        mean, std = (s.to(device) for s in load_latent_stats(data_dir))
    manifest = data_dir / "manifest.json"
    info = json.loads(manifest.read_text())["plan"]["tokenizer"] if manifest.exists() else {"kind": "identity"}
    tokenizer = build_tokenizer(info["kind"], **info.get("kwargs", {})).to(device).eval()

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return tokenizer.decode(denormalize_latents(z, mean, std, multiplier)).clamp(-1, 1)
    return decode


@torch.no_grad()
def sample_class_grid(cfg, model, decode, per_class: int, seed: int = 0, device: str = "cpu") -> np.ndarray:
    """A uint8 image grid (H, W, 3): one row per class, `per_class` samples per row."""
    from models.sampling import Sampler

    n_cls = cfg.model.num_classes
    sampler = Sampler.from_config(cfg.sampling, null_class=n_cls)
    g = torch.Generator(device=device).manual_seed(seed)
    c, s = cfg.model.in_channels, cfg.model.input_size
    y = torch.arange(n_cls, device=device).repeat_interleave(per_class)
    z = torch.randn(len(y), c, s, s, generator=g, device=device)
    latents = sampler.sample(model, z, y, generator=g)
    images = decode(latents)                                     # (N, 3, H, W) in [-1, 1]
    # Same conversion as the official FID sampling: clamp(127.5 x + 128), uint8.
    images = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).cpu()
    n, ch, h, w = images.shape
    grid = images.view(n_cls, per_class, ch, h, w).permute(0, 3, 1, 4, 2).reshape(n_cls * h, per_class * w, ch)
    return grid.numpy()


def save_png(array: np.ndarray, path: Path, scale: int = 1) -> Path:
    from PIL import Image

    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="training run directory (holds config.yaml and checkpoints/)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sampling.cfg_scale=4")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: newest complete one of the run)")
    p.add_argument("--which", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    p.add_argument("--grid", type=Path, required=True, help="output PNG: one row per class")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of small images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_intermixed_args(argv)

    cfg, model, ckpt = load_run(args.run_dir, args.overrides, args.ckpt, args.which, args.device)
    decode = latent_decoder(Path(cfg.data.path), cfg.data.latent_norm, cfg.data.latent_multiplier, args.device)
    grid = sample_class_grid(cfg, model, decode, args.per_class, args.seed, args.device)
    out = save_png(grid, args.grid, args.scale)
    print(f"sampled {cfg.model.num_classes} classes x {args.per_class} from {ckpt} ({args.which}) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
