"""Score a sample set against a reference: FID, sFID, IS, KID, precision/recall (torch-fidelity), table + JSON.

    # the paper protocol: 50k samples (tools/sample.py) against ADM's ImageNet 256 reference batch
    python tools/evaluate.py samples/xl.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --weights weights-inception-2015-12-05-6726825d.pth --metrics all --json samples/xl_metrics.json
    # settings from an experiment config's eval section (reference, weights, extractor, metrics)
    python tools/evaluate.py samples/xl --config configs/lightningdit_xl.yaml
    # precompute ADM-layout statistics (mu, sigma, mu_s, sigma_s) of an image set, e.g. for eval.reference
    python tools/evaluate.py /data/imagenet256_val --reference /data/imagenet256_val --metrics fid,sfid \\
        --weights weights-inception-2015-12-05-6726825d.pth --save-stats imagenet256_val_stats.npz

Samples: a folder of images (e.g. tools/sample.py's ``{idx:06d}.png``), an ``.npz`` with ``arr_0`` (uint8
N x H x W x 3) or an ``.npy``. Reference: the same kinds, or an ``.npz`` of ADM statistics (``mu``/``sigma``
and ``mu_s``/``sigma_s``): FID/sFID then compare with the stored statistics; KID and precision/recall need
reference images (ADM's reference batches carry 10k of them in ``arr_0``); IS uses the samples alone.
Reference features are cached under ``--cache-dir`` (default ``eval.cache_dir``, else ``$LLAT_FID_CACHE`` or
``~/.cache/lightning_latent/fid``), keyed by the reference's path, size and mtime and the extractor's weights.
The Inception weights come from a local file only (``--weights`` or ``eval.feature_extractor_weights``).
See models/evaluation/metrics.py for the details (sFID layer, agreement with ADM's TensorFlow evaluator).

The final evaluation of a training run: ``--run-dir runs/xl`` also writes the result to ``runs/xl/eval/final.json``
and logs it (``final/fid``, ``final/is``, ``final/precision``, ``final/recall``, ...) to that training's own W&B run,
resumed by the id stored in the run directory (models/evaluation/final.py); the leaderboard shows it beside the
in-loop FID.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("samples", help="folder of images, .npz (arr_0) or .npy of uint8 images")
    p.add_argument(
        "--reference",
        default=None,
        help="image folder, .npz of images and/or ADM statistics, or .npy (default: eval.reference of --config)",
    )
    p.add_argument("--config", default=None, help="experiment YAML whose eval section gives the defaults")
    p.add_argument(
        "--metrics",
        default=None,
        help="comma list of fid,sfid,is,kid,pr or 'all' (default: eval.metrics of --config, else fid)",
    )
    p.add_argument(
        "--feature-extractor",
        default=None,
        help="torch-fidelity extractor (default: eval.feature_extractor, else inception-v3-compat)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="local weights file of the feature extractor (default: eval.feature_extractor_weights)",
    )
    p.add_argument("--cache-dir", default=None, help="reference-feature cache directory")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding workers")
    p.add_argument(
        "--center-crop",
        type=int,
        default=None,
        help="ADM centre crop of folder images to this size (for references of mixed sizes)",
    )
    p.add_argument("--kid-subset-size", type=int, default=None, help="default min(1000, N)")
    p.add_argument("--json", default=None, help="write the result as JSON to this file ('-': stdout only)")
    p.add_argument("--save-stats", default=None, help="also write the samples' ADM-layout statistics to this .npz")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--run-dir",
        default=None,
        help="the training run these samples come from: write eval/final.json there and log the result to its W&B run",
    )
    p.add_argument(
        "--wandb-mode",
        choices=("online", "offline", "disabled"),
        default=None,
        help="with --run-dir: W&B mode for logging the result (default: the run's wandb.mode)",
    )
    args = p.parse_args(argv)

    # lazy: --help and argument errors answer without torch and the evaluation stack (seconds)
    import torch

    from models.evaluation import metrics as fid

    reference, metrics, extractor, weights, cache_dir = None, ["fid"], fid.INCEPTION, None, None
    weights_key = "--weights"
    if args.config:
        # lazy: after the argument checks, like the imports above
        from core.config import ConfigError
        from launchers.experiment import load_config

        try:
            ec = load_config(args.config, check=False).eval
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        reference, metrics, extractor = ec.reference or None, list(ec.metrics), ec.feature_extractor
        weights, cache_dir = ec.feature_extractor_weights or None, ec.cache_dir or None
        if not args.weights:
            weights_key = f"{args.config}: eval.feature_extractor_weights (or --weights)"
    reference = args.reference or reference
    if not reference:
        p.error("no reference: give --reference (or --config with eval.reference)")
    if args.metrics:
        metrics = [m for m in args.metrics.split(",") if m.strip()]
    extractor = args.feature_extractor or extractor
    weights = args.weights or weights
    cache_dir = args.cache_dir or cache_dir
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    t0 = time.time()
    try:
        result = fid.evaluate_images(
            args.samples,
            reference,
            metrics=metrics,
            feature_extractor=extractor,
            weights=weights,
            cache_dir=cache_dir,
            device=device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            center_crop=args.center_crop,
            kid_subset_size=args.kid_subset_size,
            progress=not args.quiet,
            use_cache=not args.no_cache,
            weights_key=weights_key,
            return_features=bool(args.save_stats),
        )
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    feats, ex = result.pop("_features", None), result.pop("_extractor", None)
    result["samples"] = str(args.samples)
    result["time_s"] = round(time.time() - t0, 2)
    if args.save_stats:
        result["saved_statistics"] = str(fid.save_statistics(args.save_stats, feats, ex))
    if args.run_dir:
        from models.evaluation.final import record_final_evaluation  # lazy: after the argument checks

        try:
            record = record_final_evaluation(args.run_dir, result, wandb_mode=args.wandb_mode)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        where = f" and W&B run {record['wandb_run_id']}" if record.get("wandb_run_id") else ""
        print(f"recorded in {Path(args.run_dir) / 'eval' / 'final.json'}{where}", file=sys.stderr)
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return 0
    print(fid.format_result(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
