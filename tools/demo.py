"""`make demo`: the whole pipeline on the embedded synthetic dataset, on CPU, with the real machinery.

  1. extract: synthetic class-conditional images -> latents (identity tokenizer, both flips) + exact
     per-channel stats -> zstd MDS shards, with 2 ranks (resumable: a second run skips finished chunks)
  2. train:   a small LightningDiT with 2 ranks through the local launcher: FSDP2, checkpoints, W&B offline,
     the lognorm -> uniform switch in the middle (resumable: a second run continues or finds it finished)
     and in-loop evaluation: FID of EMA samples against held-out synthetic images, measured with a tiny
     randomly initialised feature extractor (`tiny-random`: it exercises the evaluation pipeline on a CPU;
     its numbers say nothing about image quality — real runs use Inception weights, see README "Evaluating")
  3. sample:  one row per class from the EMA weights of the last checkpoint -> PNG grid
  4. leaderboard: the run ranked by FID, a Markdown table and a plot of FID against epochs

Everything lands under --out (default runs/demo); the last lines say where.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_stage(title: str, cmd: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               WANDB_SILENT="true")
    res = subprocess.run(cmd, cwd=REPO, env=env)
    if res.returncode != 0:
        sys.exit(f"demo: stage '{title}' failed with exit code {res.returncode}")
    print(f"=== {title}: done in {time.time() - t0:.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where data, run and samples go")
    p.add_argument("--nproc", type=int, default=2, help="ranks for extraction and training")
    p.add_argument("--num-samples", type=int, default=2048, help="synthetic images to generate")
    p.add_argument("--epochs", type=float, default=None, help="override the training config's epochs")
    p.add_argument("--config", default="configs/demo_dit.yaml", help="training config")
    p.add_argument("--per-class", type=int, default=10, help="samples per class in the grid")
    p.add_argument("--eval-every", type=float, default=6.0,
                   help="in-loop evaluation every this many epochs")
    args = p.parse_args(argv)
    out = args.out if args.out.is_absolute() else REPO / args.out
    data_dir, run_dir, grid = out / "data", out / "dit", out / "samples.png"
    reference, board = out / "reference", out / "leaderboard"
    py = sys.executable
    t0 = time.time()

    run_stage("1/4 extract synthetic images -> MDS latents",
              [py, "launchers/local.py", "--nproc", str(args.nproc), "--entry", "data/extract.py",
               "configs/extract_synthetic.yaml", f"out_dir={data_dir}", f"source.num_samples={args.num_samples}"])
    if not (reference / "class_09").exists():
        from data.synthetic import write_image_folder
        # Held-out images (another seed) as the FID reference of the in-loop evaluation.
        write_image_folder(reference, 500, image_size=16, num_classes=10, seed=1)
    train_overrides = [f"data.path={data_dir}", f"run_dir={run_dir}",
                       f"eval.every_epochs={args.eval_every}",
                       f"eval.reference={reference}", "eval.feature_extractor=tiny-random",
                       "eval.num_samples=100", "eval.batch_size=50", "eval.sampling_overrides=[num_steps=25]",
                       "eval.grid_size=20"]
    if args.epochs is not None:
        train_overrides.append(f"train.epochs={args.epochs}")
    run_stage("2/4 train LightningDiT (FSDP2, 2 ranks)",
              [py, "launchers/local.py", "--nproc", str(args.nproc), args.config, *train_overrides])
    run_stage("3/4 sample a grid (one row per class, EMA weights)",
              [py, "tools/sample.py", str(run_dir), "--grid", str(grid), "--per-class", str(args.per_class)])

    run_stage("4/4 leaderboard (FID of the in-loop evaluations)",
              [py, "tools/leaderboard.py", str(out), "--out", str(board)])

    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(f"  data (MDS shards, stats, manifest): {data_dir}")
    print(f"  run directory (config, checkpoints, metrics.jsonl): {run_dir}")
    print(f"  sample grid (rows = classes 0..9): {grid}")
    print(f"  leaderboard: {board / 'leaderboard.md'} and {board / 'fid_vs_epochs.png'} "
          f"(FID from a tiny random feature extractor: a pipeline check, not a quality measure)")
    if wandb_runs:
        print(f"  W&B offline run: {wandb_runs[-1]}  (upload later with `wandb sync {wandb_runs[-1]}`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
