"""tools/leaderboard.py (models/evaluation/leaderboard.py, core/runlog.py) over three real offline W&B runs written
by the trainer.

Three tiny DiT trainings (train.py, 1 rank, 8 steps = 2 epochs, ``wandb.mode=offline``) with different configs run
in parallel, each with in-loop evaluation every epoch (FID-32 against the training images, 4-point sampler). The
feature extractor is the TINY RANDOMLY INITIALISED ``tiny-random`` one that models/evaluation/metrics.py registers with
torch-fidelity (no Inception weights on a CPU test machine); the numbers only have to be real and comparable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(400)
REPO = Path(__file__).resolve().parents[2]

RUNS = {  # name -> overrides that make the runs differ (model, optimiser, sampler)
    "base": [],
    "deep_lr": ["model.depth=3", "optimizer.lr=3.0e-3"],
    "nocfg": ["sampling.cfg_scale=1.0", "train.ema_decay=0.9"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from data.streaming import write_latent_dataset
    from data.synthetic import SyntheticImages, write_image_folder

    root = tmp_path_factory.mktemp("leaderboard")
    ds = SyntheticImages(64, image_size=16, num_classes=10, seed=0)

    def samples():
        for i in range(len(ds)):
            x = ds[i][0].numpy()
            yield {"latent": x, "latent_flip": x[:, :, ::-1].copy(), "label": ds.label(i), "sample_id": i}

    write_latent_dataset(root / "mds", samples(), latent_dtype="float32", size_limit=1 << 20)
    write_image_folder(root / "ref", 64, image_size=16, num_classes=10, seed=0)

    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        WANDB_SILENT="true",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    procs = {}
    for name, extra in RUNS.items():
        # One copy of the shards per run: concurrent jobs on one local directory collide in MosaicML streaming's
        # shared memory.
        data = shutil.copytree(root / "mds", root / f"mds_{name}")
        cmd = [
            sys.executable,
            "train.py",
            "configs/tiny_dit.yaml",
            f"name={name}",
            f"data.path={data}",
            f"run_dir={root / 'runs' / name}",
            "train.epochs=2",
            "checkpoint.every_steps=100",
            "wandb.mode=offline",
            "eval.every_epochs=1",
            "eval.num_samples=32",
            "eval.batch_size=16",
            f"eval.reference={root / 'ref'}",
            "eval.feature_extractor=tiny-random",
            f"eval.cache_dir={root / 'fid_cache'}",
            "eval.metrics=[fid,is,pr]",
            "eval.sampling_overrides=[num_steps=4]",
            "sampling.tokenizer=identity",
            *extra,
        ]
        procs[name] = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        # Start the next run once this one has built its data loader (metrics.jsonl is opened right after):
        # MosaicML streaming picks its shared-memory prefix with a non-atomic check-then-create, so jobs that
        # start in the same instant on one machine can collide (README, "Data").
        deadline = time.time() + 120
        while (
            not (root / "runs" / name / "metrics.jsonl").exists()
            and procs[name].poll() is None
            and time.time() < deadline
        ):
            time.sleep(0.1)
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}:\n{out[-4000:]}"
    return root


def _jsonl_evals(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval/fid" in rec:
            out[rec["step"]] = rec
    return out


def test_offline_wandb_files_hold_what_the_trainer_logged(runs):
    from core.runlog import read_run_dir

    for name in RUNS:
        run_dir = runs / "runs" / name
        assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb")), "no offline W&B run"
        run = read_run_dir(run_dir)
        assert run.source.endswith("wandb"), run.source  # read from the .wandb file, not the fallback
        assert run.name == name and run.run_id == (run_dir / "wandb_run_id").read_text().strip()
        assert run.config["model"]["depth"] == (3 if name == "deep_lr" else 2)
        evals = _jsonl_evals(run_dir)
        assert sorted(evals) == [4, 8]  # every epoch
        for step, rec in evals.items():
            for key in ("eval/fid", "eval/is", "eval/precision", "eval/recall", "eval/num_samples"):
                assert run.history[step][key] == pytest.approx(rec[key]), (name, step, key)
        assert run.history[8]["epoch"] == 2.0
        assert run.summary["eval/samples"]["_type"] == "image-file"  # the sample grid went to W&B
        assert run.summary["eval/tokenizer"] == "identity"


def test_leaderboard_ranks_runs_and_writes_table_markdown_and_plot(runs, capsys):
    from tools import leaderboard

    out = runs / "board"
    assert leaderboard.main([str(runs / "runs"), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads((out / "leaderboard.json").read_text())
    assert sorted(r["run"] for r in rows) == sorted(RUNS)
    best = {name: min(r["eval/fid"] for r in _jsonl_evals(runs / "runs" / name).values()) for name in RUNS}
    assert [r["run"] for r in rows] == sorted(RUNS, key=best.get)  # ranked by best FID
    for r in rows:
        assert r["fid"] == pytest.approx(best[r["run"]])
        assert r["steps"] in (4, 8) and r["epochs"] == pytest.approx(r["steps"] / 4)
        assert r["num_samples"] == 32 and r["tokenizer"] == "identity"
        assert r["is"] is not None and r["precision"] is not None and r["recall"] is not None
        assert len(r["curve"]) == 2 and [x for x, _ in r["curve"]] == [1.0, 2.0]
    by_name = {r["run"]: r for r in rows}
    assert by_name["deep_lr"]["model"] == "custom d3 h64 p2" and by_name["base"]["model"] == "custom d2 h64 p2"
    assert by_name["nocfg"]["cfg"] == 1.0 and "no cfg" in by_name["nocfg"]["sampler"]
    assert by_name["base"]["cfg"] == 4.0 and by_name["base"]["sampler"].startswith("euler 4pt")
    for name in RUNS:
        assert name in table
    md = (out / "leaderboard.md").read_text().splitlines()
    assert md[0].startswith(
        "| # | run | model | tokenizer | epochs | steps | FID in-loop | N | FID final | N final | IS"
    )
    assert len(md) == 2 + len(RUNS)
    from PIL import Image

    assert Image.open(out / "fid_vs_epochs.png").size[0] > 100


def test_plot_without_matplotlib_falls_back_to_pil(runs, tmp_path, monkeypatch):
    from PIL import Image

    from core.runlog import discover_runs
    from models.evaluation.leaderboard import plot_fid, rank_rows, summarize

    rows = rank_rows([summarize(r) for r in discover_runs([runs / "runs"])])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    path = plot_fid(rows, tmp_path / "plot.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (500, 800, 3) and (img != 255).any()


def test_fallbacks_metrics_jsonl_and_a_truncated_wandb_file(runs, tmp_path):
    from core.runlog import read_offline_run, read_run_dir
    from models.evaluation.leaderboard import summarize

    src = runs / "runs" / "base"
    reference = summarize(read_run_dir(src))
    # No W&B files at all (wandb.mode=disabled): metrics.jsonl + config.yaml.
    plain = tmp_path / "plain"
    shutil.copytree(src, plain, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    row = summarize(read_run_dir(plain))
    assert read_run_dir(plain).source.endswith("metrics.jsonl")
    assert (row.run, row.fid, row.steps, row.epochs, row.cfg) == (
        reference.run,
        reference.fid,
        reference.steps,
        reference.epochs,
        reference.cfg,
    )
    # A .wandb file cut in the middle (a job killed while writing) reads up to the cut without an error.
    f = next(src.glob("wandb/offline-run-*/run-*.wandb"))
    full = read_offline_run(f)
    cut = tmp_path / f.name
    data = f.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    part = read_offline_run(cut)
    assert part.name == "base" and 0 < len(part.history) < len(full.history)
    for step, rec in part.history.items():
        assert rec.items() <= full.history[step].items()
    with pytest.raises(ValueError, match="not a W&B run file"):
        bad = tmp_path / "bad.wandb"
        bad.write_bytes(b"hello world")
        read_offline_run(bad)
