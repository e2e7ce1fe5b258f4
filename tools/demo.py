"""`make demo`: the whole pipeline on the embedded synthetic dataset, on CPU, with the real machinery.

  1. tokenizer: a small VA-VAE (L1 + LPIPS + KL + VF loss to a DINOv2 + PatchGAN from epoch 4) trained on the
     synthetic 16 px images with 2 ranks through the local launcher (FSDP2, checkpoints, W&B offline);
     its LPIPS and DINOv2 are tiny RANDOMLY INITIALISED networks (no downloads), see configs/demo_vavae.yaml
  2. reconstruction: PSNR / SSIM / rFID of the VA-VAE on held-out synthetic images (tools/eval_tokenizer.py;
     rFID with the tiny random feature extractor, see 4.)
  3. extract: the synthetic images -> VA-VAE latents (posterior samples, both flips) + exact per-channel
     stats -> zstd MDS shards, with 2 ranks (resumable: a second run skips finished chunks); 5% of them are
     held out (data/holdout.py) for the validation loss
  4. train:   a small LightningDiT on those latents with 2 ranks: FSDP2, checkpoints, W&B offline, the
     lognorm -> uniform switch in the middle (resumable: a second run continues or finds it finished) and
     in-loop evaluation: FID of EMA samples (decoded by the VA-VAE) against held-out synthetic images, measured
     with a tiny randomly initialised feature extractor (`tiny-random`: it exercises the evaluation pipeline on
     a CPU; its numbers say nothing about image quality — real runs use Inception weights, see README
     "Evaluating"), and the validation loss of the held-out latents at 8 fixed timesteps, EMA and raw weights
  5. sample:  one row per class from the EMA weights of the last checkpoint, decoded by the VA-VAE -> PNG grid
  6. leaderboard: the DiT run ranked by FID (validation loss beside it), a Markdown table and a plot of FID
     against epochs

``--repa``: the same with REPA (README "REPA"): the extraction also stores DINOv2 features of each image and of its
flip (a tiny RANDOMLY INITIALISED DINOv2: a pipeline check), and the DiT trains with configs/demo_dit_repa.yaml into
``dit_repa`` (data in ``data_repa``); the leaderboard shows it beside the plain run when that exists.

Everything lands under --out (default runs/demo); the last lines say where.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


REPA_CONFIG = "configs/demo_dit_repa.yaml"
# The extraction's features for --repa: DINOv2 of each image and of its flip on the latent grid, ImageNet-normalised
# and bicubic-resized as REPA; a tiny RANDOMLY INITIALISED ViT (32-d, the config's repa.z_dim), no download.
REPA_FEATURES = [
    "features.enabled=true",
    "features.flip=true",
    "features.model=vit_small_patch14_dinov2",
    "features.random_init=true",
    "features.model_kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
    "features.imagenet_norm=true",
    "features.interpolation=bicubic",
]


def run_stage(title: str, cmd: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        WANDB_SILENT="true",
    )
    res = subprocess.run(cmd, cwd=REPO, env=env)
    if res.returncode != 0:
        sys.exit(f"demo: stage '{title}' failed with exit code {res.returncode}")
    print(f"=== {title}: done in {time.time() - t0:.0f} s", flush=True)


def latent_shape(data_dir: Path) -> list[int]:
    """(C, H, W) of the latents the extraction wrote (its manifest)."""
    return list(json.loads((data_dir / "manifest.json").read_text())["latent_shape"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where data, runs and samples go")
    p.add_argument("--nproc", type=int, default=2, help="ranks for training and extraction")
    p.add_argument("--num-samples", type=int, default=2048, help="synthetic images to generate")
    p.add_argument("--vavae-config", default="configs/demo_vavae.yaml", help="tokenizer training config")
    p.add_argument("--vavae-epochs", type=float, default=None, help="override the VA-VAE config's epochs")
    p.add_argument(
        "--config",
        default="configs/demo_dit.yaml",
        help="DiT training config (model.in_channels / input_size are set from the latents)",
    )
    p.add_argument("--epochs", type=float, default=None, help="override the DiT config's epochs")
    p.add_argument("--per-class", type=int, default=10, help="samples per class in the grid")
    p.add_argument("--eval-every", type=float, default=6.0, help="in-loop evaluation every this many epochs")
    p.add_argument("--repa", action="store_true", help="train with REPA on stored DINOv2 features (see above)")
    args = p.parse_args(argv)
    if args.repa and args.config == "configs/demo_dit.yaml":
        args.config = REPA_CONFIG
    out = args.out if args.out.is_absolute() else REPO / args.out
    vavae_dir, data_dir, run_dir, grid = out / "vavae", out / "data", out / "dit", out / "samples.png"
    if args.repa:
        data_dir, run_dir, grid = out / "data_repa", out / "dit_repa", out / "samples_repa.png"
    reference, board = out / "reference", out / "leaderboard"
    py = sys.executable
    t0 = time.time()

    if not (reference / "class_09").exists():
        from data.synthetic import write_image_folder  # lazy: --help without torch; the stages are subprocesses

        # Held-out images (another seed): the tokenizer's reconstruction test set and the FID reference.
        write_image_folder(reference, 500, image_size=16, num_classes=10, seed=1)

    vavae_overrides = [f"run_dir={vavae_dir}", f"data.synthetic_num_samples={args.num_samples}"]
    if args.vavae_epochs is not None:
        vavae_overrides.append(f"train.epochs={args.vavae_epochs}")
    run_stage(
        "1/6 train the VA-VAE tokenizer (FSDP2, 2 ranks)",
        [py, "launchers/local.py", "--nproc", str(args.nproc), args.vavae_config, *vavae_overrides],
    )
    from core.checkpoint import resolve_checkpoint_dir  # lazy: --help without torch

    tokenizer_ckpt = resolve_checkpoint_dir(vavae_dir)  # this exact checkpoint encodes and decodes

    run_stage(
        "2/6 VA-VAE reconstruction of held-out images (PSNR, SSIM, rFID)",
        [
            py,
            "tools/eval_tokenizer.py",
            "--checkpoint",
            str(tokenizer_ckpt),
            "--images",
            str(reference),
            "--image-size",
            "16",
            "--no-lpips",
            "--num-workers",
            "0",
            "--device",
            "cpu",
            "--out-dir",
            str(out / "vavae_reconstruction"),
            "--fid-extractor",
            "tiny-random",
            "--json",
            str(out / "vavae_reconstruction.json"),
        ],
    )

    run_stage(
        "3/6 extract synthetic images -> VA-VAE latents (MDS shards, 2 ranks)",
        [
            py,
            "launchers/local.py",
            "--nproc",
            str(args.nproc),
            "--entry",
            "data/extract.py",
            "configs/extract_synthetic.yaml",
            f"out_dir={data_dir}",
            f"source.num_samples={args.num_samples}",
            "tokenizer.kind=vavae",
            f"tokenizer.kwargs={{checkpoint: '{tokenizer_ckpt}'}}",
            *(REPA_FEATURES if args.repa else []),
        ],
    )
    channels, size, _ = latent_shape(data_dir)
    # A held-out split for the validation loss (data/holdout.py): 5% of the latents never trained on.
    split = data_dir.with_name(data_dir.name + "_split")
    if not (split / "holdout.json").is_file():
        run_stage(
            "3b/6 hold out 5% of the latents (validation loss)",
            [py, "-m", "data.holdout", str(data_dir), str(split), "--val-fraction", "0.05"],
        )
    train_overrides = [
        f"data.path={split / 'train'}",
        f"data.val_path={split / 'val'}",
        f"eval.val_every_epochs={args.eval_every}",
        f"run_dir={run_dir}",
        f"model.in_channels={channels}",
        f"model.input_size={size}",
        f"eval.every_epochs={args.eval_every}",
        f"eval.reference={reference}",
        "eval.feature_extractor=tiny-random",
        "eval.num_samples=100",
        "eval.batch_size=50",
        "eval.sampling_overrides=[num_steps=25]",
        "eval.grid_size=20",
    ]
    if args.epochs is not None:
        train_overrides.append(f"train.epochs={args.epochs}")
    run_stage(
        "4/6 train LightningDiT on the latents (FSDP2, 2 ranks" + (", REPA)" if args.repa else ")"),
        [py, "launchers/local.py", "--nproc", str(args.nproc), args.config, *train_overrides],
    )
    run_stage(
        "5/6 sample a grid (one row per class, EMA weights, decoded by the VA-VAE)",
        [py, "tools/sample.py", str(run_dir), "--grid", str(grid), "--per-class", str(args.per_class)],
    )

    run_stage(
        "6/6 leaderboard (FID and validation loss of the in-loop evaluations)",
        [
            py,
            "tools/leaderboard.py",
            *[str(d) for d in (out / "dit", out / "dit_repa") if d == run_dir or (d / "metrics.jsonl").exists()],
            "--out",
            str(board),
        ],
    )

    recon = json.loads((out / "vavae_reconstruction.json").read_text())
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(f"  VA-VAE run (config, checkpoints, metrics.jsonl): {vavae_dir}; tokenizer checkpoint {tokenizer_ckpt}")
    print(
        f"  VA-VAE reconstruction of {recon.get('num_images', '?')} held-out images: PSNR {recon['psnr']:.2f} dB, "
        f"SSIM {recon['ssim']:.3f}, rFID {recon['rfid']:.3f} (tiny random extractor) "
        f"({out / 'vavae_reconstruction.json'}; reference and reconstructed PNGs under {out / 'vavae_reconstruction'})"
    )
    print(
        f"  data (VA-VAE latents {channels}x{size}x{size}, MDS shards, stats, manifest): {data_dir} "
        f"(split for the validation loss: {split})"
    )
    print(f"  DiT run directory (config, checkpoints, metrics.jsonl): {run_dir}")
    print(f"  sample grid (rows = classes 0..9): {grid}")
    print(
        f"  leaderboard: {board / 'leaderboard.md'} and {board / 'fid_vs_epochs.png'} "
        f"(FID from a tiny random feature extractor: a pipeline check, not a quality measure)"
    )
    if wandb_runs:
        print(f"  W&B offline run: {wandb_runs[-1]}  (upload later with `wandb sync {wandb_runs[-1]}`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
