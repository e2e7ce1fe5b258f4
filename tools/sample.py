"""Sample images from a trained run or a checkpoint: a class grid, or N images for FID (PNGs and/or an npz).

    # a class grid (one row per class)
    python tools/sample.py runs/tiny_dit --grid runs/tiny_dit/samples.png --per-class 8
    # 50,000 images for FID, official protocol (sampler from the run's config), on 8 GPUs, resumable
    torchrun --nproc_per_node 8 tools/sample.py runs/xl --num 50000 --out samples/xl --npz samples/xl.npz
    # an official checkpoint file: the architecture and sampler come from a config; the latents are decoded with
    # the released VA-VAE and de-normalised with the released statistics (no training data needed)
    python tools/sample.py lightningdit-xl-imagenet256-800ep.pt --config configs/lightningdit_xl.yaml \\
        --tokenizer vavae-imagenet256-f16d32-dinov2.pt --latent-stats latents_stats.pt \\
        --num 50000 --out samples/official
    # ... or with the extracted training data (its manifest.json names the tokenizer, latents_stats.pt beside it)
    python tools/sample.py lightningdit-xl-imagenet256-800ep.pt --config configs/lightningdit_xl.yaml \\
        data.path=/data/imagenet256_vavae --num 50000 --out samples/official
    # any sampler setting as a dotted override
    python tools/sample.py runs/xl sampling.cfg_scale=1.0 sampling.num_steps=100 --num 10000 --out samples/nocfg

Sources: a run directory (``config.yaml`` + ``checkpoints/``; the newest complete checkpoint unless ``--ckpt``),
a run's ``config.yaml``, one of its checkpoint directories (``checkpoints/step_0000100``; the config is found in
the run directory above it), or a checkpoint file (ours or official; needs ``--config``). EMA weights by default
(``--which model`` for the raw weights).

Decoding: ``--tokenizer`` (= ``sampling.tokenizer``: a VA-VAE checkpoint, or ``identity`` for pixel-space
latents) and ``--latent-stats`` (= ``sampling.latent_stats``: a ``latents_stats.pt``, e.g. the official one);
by default the tokenizer that ``data.path``'s ``manifest.json`` records and ``data.path``'s statistics. Without a
tokenizer the tool stops with an error naming these options (models/evaluation/generation.py has the details).

FID sampling (``--num N --out DIR``) is deterministic per image: image ``i`` depends on (checkpoint, sampler
settings, ``--seed``, ``i``) only, whatever the number of ranks and restarts; ``--labels uniform`` (official)
or ``balanced``. Files are ``{i:06d}.png`` (atomic); a restarted job skips the indices already written;
``sampling.json`` in the folder records the settings and a resume with other settings is refused. ``--npz PATH``
packs the PNGs, in index order, into ADM's ``arr_0`` layout. The protocol is described in
models/evaluation/generation.py.

Multi-process: torchrun (``torchrun --nproc_per_node 8 tools/sample.py ...``), Slurm ``srun``, or the local
launcher with the run's config.yaml as the source and this tool's options after ``--``:
``python launchers/local.py --nproc 2 --entry tools/sample.py runs/x/config.yaml [overrides] -- --num 1000 --out
samples/x``. Every rank loads the model; no collective runs during sampling.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from core.distributed import init_distributed, teardown
from launchers.experiment import load_config
from models.evaluation.generation import (
    LABEL_MODES,
    SamplingError,
    decoder_from_config,
    resolve_source,
    sample_class_grid,
    sample_to_folder,
    save_png,
)
from models.lightningdit import build_model
from models.loading import load_into_model


def load_model(
    source: Path,
    overrides: Sequence[str] = (),
    config: Optional[Path] = None,
    ckpt: Optional[Path] = None,
    which: str = "ema",
    device: str = "cpu",
):
    """(config, model in eval mode, checkpoint path) for a run dir / config / checkpoint dir / checkpoint file."""
    config_path, ckpt_path = resolve_source(Path(source), config, ckpt)
    cfg = load_config(config_path, overrides)
    model = build_model(cfg.model)
    load_into_model(model, ckpt_path, which=which, strict=True)
    return cfg, model.to(device).eval(), ckpt_path


def _setup_distributed():
    """Join the process group when started by torchrun / Slurm with more than one process."""
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if world > 1:
        return init_distributed()
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "source",
        type=Path,
        help="run directory, its config.yaml, a checkpoint directory or a checkpoint file (with --config)",
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sampling.cfg_scale=4")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="experiment YAML (model + sampler) for a checkpoint outside a run directory, e.g. an official .pt",
    )
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: newest complete one of the run)")
    p.add_argument("--which", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: this rank's CUDA device, else cpu")
    g = p.add_argument_group("class grid")
    g.add_argument("--grid", type=Path, default=None, help="output PNG: one row per class")
    g.add_argument("--per-class", type=int, default=8)
    g.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of small images")
    f = p.add_argument_group("FID samples")
    f.add_argument("--num", type=int, default=None, help="number of images (e.g. 50000)")
    f.add_argument("--out", type=Path, default=None, help="output folder of {idx:06d}.png files")
    f.add_argument("--npz", type=Path, default=None, help="also pack the images into this ADM-layout .npz")
    f.add_argument("--batch-size", type=int, default=64, help="images per sampler batch (per rank)")
    f.add_argument(
        "--labels",
        default="uniform",
        choices=LABEL_MODES,
        help="uniform random labels (official) or class-balanced (i mod num_classes)",
    )
    f.add_argument("--no-progress", action="store_true")
    d = p.add_argument_group("decoding (default: what data.path holds)")
    d.add_argument(
        "--tokenizer",
        default=None,
        help="sampling.tokenizer: the VA-VAE checkpoint that decodes the latents (released .pt/.ckpt or "
        "a run checkpoint directory), or 'identity' for pixel-space latents",
    )
    d.add_argument(
        "--latent-stats",
        default=None,
        help="sampling.latent_stats: latents_stats.pt ({'mean','std'}) to de-normalise with",
    )
    args = p.parse_intermixed_args(argv)
    if args.grid is None and args.num is None:
        p.error("nothing to do: give --grid PNG and/or --num N --out DIR")
    if args.num is not None and (args.out is None or args.num < 1 or args.batch_size < 1):
        p.error("--num needs --out DIR, N >= 1 and --batch-size >= 1")

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(args.overrides)
    if args.tokenizer is not None:
        overrides.append(f"sampling.tokenizer={args.tokenizer}")
    if args.latent_stats is not None:
        overrides.append(f"sampling.latent_stats={args.latent_stats}")
    dist = _setup_distributed()
    try:
        device = args.device or (
            str(dist.device) if dist is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        try:
            cfg, model, ckpt = load_model(args.source, overrides, args.config, args.ckpt, args.which, device)
            decode = decoder_from_config(cfg, device)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        rank = dist.rank if dist is not None else 0
        if args.grid is not None and rank == 0:
            grid = sample_class_grid(cfg, model, decode, args.per_class, args.seed, device)
            out = save_png(grid, args.grid, args.scale)
            print(f"sampled {cfg.model.num_classes} classes x {args.per_class} from {ckpt} ({args.which}) -> {out}")
        if args.num is not None:
            try:
                summary = sample_to_folder(
                    cfg,
                    model,
                    decode,
                    args.out,
                    args.num,
                    ckpt=ckpt,
                    which=args.which,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    labels=args.labels,
                    device=device,
                    npz=args.npz,
                    progress=not args.no_progress,
                )
            except SamplingError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            if rank == 0:
                print(json.dumps(summary))
        return 0
    finally:
        if dist is not None:
            teardown()


if __name__ == "__main__":
    raise SystemExit(main())
