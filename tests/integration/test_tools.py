"""Command-line tools: the training benchmark prints its table; the local launcher rejects bad arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_bench_train_prints_a_table_with_flops():
    res = _run(
        "tools/bench_train.py", "--batch", "4", "--steps", "2", "--warmup", "1", "--precision", "fp32", "bf16-autocast"
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    header = [h.strip() for h in lines[1].split("|")]
    assert header == ["engine", "batch", "mode", "precision", "img/s", "step ms", "GFLOP/img", "MFU", "peak mem GiB"]
    rows = [[c.strip() for c in line.split("|")] for line in lines[3:]]
    assert [row[:4] for row in rows] == [["fsdp2", "4", "eager", "fp32"], ["fsdp2", "4", "eager", "bf16-autocast"]]
    assert all(float(row[4]) > 0 and float(row[6]) > 0 for row in rows)


def test_bench_train_dit_from_a_config_file(capsys):
    """--config selects the task and model of an experiment YAML (with overrides); the DiT keeps its analytic FLOPs;
    --model with --config is a usage error (main() in process: argparse refuses it before anything runs)."""
    res = _run(
        "tools/bench_train.py",
        "--config",
        "configs/tiny_dit.yaml",
        "model.depth=1",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("task dit (tiny_dit: model ") and "FLOPs analytic" in res.stdout
    row = [c.strip() for c in res.stdout.strip().splitlines()[-1].split("|")]
    assert row[:4] == ["fsdp2", "2", "eager", "fp32"] and float(row[4]) > 0 and float(row[6]) > 0
    from tools import bench_train

    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--config", "configs/tiny_dit.yaml", "--model", "tiny"])
    assert exit_info.value.code == 2 and "override model.type=" in capsys.readouterr().err


def test_local_launcher_rejects_bad_arguments(tmp_path):
    res = _run("launchers/local.py", "--nproc", "0", "configs/tiny_dit.yaml")
    assert res.returncode == 2 and "--nproc must be >= 1" in res.stderr
    res = _run("launchers/local.py", "--nproc", "1", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "config file not found" in res.stderr
