"""`make demo`'s pipeline at a smaller size: train a VA-VAE (2 ranks) -> its reconstruction metrics -> extract its
latents (2 ranks), 5% held out -> train the tiny DiT on the rest (2 ranks, in-loop FID, validation loss) -> a grid
decoded by the VA-VAE -> leaderboard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_demo_pipeline_small(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run(
        [
            sys.executable,
            "tools/demo.py",
            "--out",
            str(out),
            "--num-samples",
            "168",
            "--config",
            "configs/tiny_dit.yaml",
            "--epochs",
            "6",
            "--per-class",
            "2",
            "--eval-every",
            "3",
            "--vavae-epochs",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # The tokenizer: 168 images / global batch 32 = 5 steps per epoch, 2 epochs, then its reconstruction metrics.
    vavae_steps = [json.loads(line)["step"] for line in (out / "vavae" / "metrics.jsonl").read_text().splitlines()]
    assert vavae_steps[-1] == 10
    recon = json.loads((out / "vavae_reconstruction.json").read_text())
    assert recon["num_images"] == 500 and 5 < recon["psnr"] < 100 and -1 <= recon["ssim"] <= 1
    assert np.isfinite(recon["rfid"]) and recon["rfid"] >= 0
    # Its latents (f2, 4 channels), encoded with the checkpoint it ended with.
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["num_samples"] == 168 and manifest["latent_shape"] == [4, 8, 8]
    tokenizer = manifest["plan"]["tokenizer"]
    assert tokenizer["kind"] == "vavae"
    assert Path(tokenizer["kwargs"]["checkpoint"]) == out / "vavae" / "checkpoints" / "step_0000010"
    # 5% held out (8 latents: the validation loss), 160 training samples / global batch 16 = 10 steps per epoch,
    # 6 epochs.
    holdout = json.loads((out / "data_split" / "holdout.json").read_text())
    assert holdout["counts"] == {"train": 160, "val": 8} and len(holdout["val_ids"]) == 8
    records = [json.loads(line) for line in (out / "dit" / "metrics.jsonl").read_text().splitlines()]
    log = [r for r in records if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, 61))
    # In-loop evaluation every 3 epochs (steps 30 and 60), then the leaderboard over the run.
    fids = {r["step"]: r["eval/fid"] for r in records if "eval/fid" in r}
    assert sorted(fids) == [30, 60] and all(np.isfinite(v) and v >= 0 for v in fids.values())
    vals = {r["step"]: r["eval/val_loss"] for r in records if "eval/val_loss" in r}
    assert sorted(vals) == [30, 60] and all(np.isfinite(v) and v > 0 for v in vals.values())
    board = (out / "leaderboard" / "leaderboard.md").read_text()
    assert "tiny_dit" in board and f"{min(fids.values()):.3f}" in board and "val loss" in board
    assert (out / "leaderboard" / "fid_vs_epochs.png").stat().st_size > 0
    first = np.mean([r["loss"] for r in log[:10]])
    last = np.mean([r["loss"] for r in log[-10:]])
    assert last < first - 0.2, (first, last)  # the tiny model learns
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (10 * 16 * 4, 2 * 16 * 4, 3)  # 10 classes x 2 samples decoded to 16 px, x4 upscaling
    assert "sample grid" in res.stdout and "W&B offline run" in res.stdout
