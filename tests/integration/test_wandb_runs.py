"""W&B as teams use it, with real offline W&B runs (``mode=offline``; no W&B server is reachable here): the run
directory's W&B run (group, tags, entity, project from ``wandb:``; one id across restarts; ``define_metric``: epoch
x-axis, best FID in the summary), the final evaluation logged to that same run (tools/evaluate.py --run-dir) and
shown on the leaderboard beside the in-loop FID, the leaderboard's ``wandb.Table``, and the documented ``wandb sync``
command (run with ``--dry-run``: it must find the offline run files)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]
# An in-loop evaluation every 2 steps (epoch = step / 4); the best FID is at step 4, with IS 4.0.
FIDS = {2: 9.0, 4: 7.5, 6: 8.0}


def _next_second() -> None:
    """W&B names an offline start ``offline-run-<YYYYmmdd_HHMMSS>-<id>``: two starts of one run within the same
    second would share a folder (a real requeue takes far longer); start each one in a new second."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def _records(run_dir: Path, kind: str) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    from core.runlog import read_wandb_records

    out = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for payload in read_wandb_records(f):
            rec = pb.Record()
            rec.ParseFromString(payload)
            if rec.WhichOneof("record_type") == kind:
                out.append(getattr(rec, kind))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as a training leaves it: config.yaml + two starts of its W&B run (a requeue after step 4)."""
    from core.config import save_config
    from core.metrics import MetricLogger
    from launchers.experiment import load_config

    os.environ["WANDB_SILENT"] = "true"
    run_dir = tmp_path_factory.mktemp("wandb") / "runs" / "exp"
    run_dir.mkdir(parents=True)
    overrides = ["name=exp", "wandb.mode=offline", "wandb.entity=team", "wandb.project=proj", "wandb.group=abl"]
    cfg = load_config(REPO / "configs" / "tiny_dit.yaml", [*overrides, "wandb.tags=[a, b]"])
    save_config(cfg, run_dir / "config.yaml")
    for start, steps in ((0, range(1, 5)), (4, range(5, 7))):
        _next_second()
        logger = MetricLogger(run_dir, cfg.wandb, cfg.name, {"name": cfg.name}, True, resume_step=start)
        for step in steps:
            logger.log(step, {"loss": 1.0 / step, "epoch": step / 4}, console=False)
            if step in FIDS:
                logger.log(step, {"eval/fid": FIDS[step], "eval/is": float(step), "eval/num_samples": 32})
        logger.close()
    return run_dir


def test_one_wandb_run_per_training_with_team_settings(run_dir):
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    starts = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(starts) == 2 and all(p.name.endswith(f"-{run_id}") for p in starts)  # one W&B run, two starts
    runs = _records(run_dir, "run")
    assert {(r.run_id, r.entity, r.project, r.run_group, tuple(r.tags)) for r in runs} == {
        (run_id, "team", "proj", "abl", ("a", "b"))
    }
    metrics = {m.name or m.glob_name: m for m in _records(run_dir, "metric")}
    assert metrics["*"].step_metric == "epoch" and metrics["eval/fid"].step_metric == "epoch"
    assert metrics["eval/fid"].summary.min

    from core.runlog import read_run_dir

    run = read_run_dir(run_dir)
    assert run.run_id == run_id and run.summary["eval/fid"]["last"] == 8.0
    # The best evaluation (step 4) in the summary; the second start does not forget it (re-read from metrics.jsonl).
    assert run.summary["best/fid"] == 7.5 and run.summary["best/is"] == 4.0
    assert (run.summary["best/step"], run.summary["best/epoch"]) == (4, 1.0)
    assert [s for s in sorted(run.history) if "eval/fid" in run.history[s]] == [2, 4, 6]


def test_final_evaluation_goes_to_the_training_run_and_the_leaderboard(run_dir, tmp_path):
    from data.synthetic import write_image_folder
    from models.evaluation.leaderboard import collect_runs, format_table, rank_rows, summarize
    from tools import evaluate

    ref = write_image_folder(tmp_path / "ref", 24, image_size=16, num_classes=4, seed=0)
    samples = write_image_folder(tmp_path / "samples", 24, image_size=16, num_classes=4, seed=1)
    args = [str(samples), "--reference", str(ref), "--feature-extractor", "tiny-random", "--metrics", "fid,is,pr"]
    args += ["--no-cache", "--device", "cpu", "--quiet", "--num-workers", "0", "--json", str(tmp_path / "r.json")]
    _next_second()
    assert evaluate.main([*args, "--run-dir", str(run_dir)]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    record = json.loads((run_dir / "eval" / "final.json").read_text())
    assert record["metrics"]["fid"] == result["fid"] and record["metrics"]["num_samples"] == 24

    # Logged to the summary of the training's own W&B run (same id, a third start of it).
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert len(list(run_dir.glob(f"wandb/offline-run-*-{run_id}"))) == 3
    summary = {}
    for s in _records(run_dir, "summary"):
        summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in s.update})
    assert summary["final/fid"] == pytest.approx(result["fid"]) and summary["final/is"] == pytest.approx(result["is"])

    # The leaderboard: the in-loop best (7.5 on 32 samples) beside the final FID (on 24), each marked.
    (row,) = rank_rows([summarize(r) for r in collect_runs([run_dir.parent])])
    assert (row.fid, row.num_samples, row.final_fid, row.final_num_samples) == (7.5, 32, result["fid"], 24)
    assert row.final_precision == pytest.approx(result["precision"])
    header, rule, line = format_table([row]).splitlines()
    cells = dict(zip(re.split(r"\s{2,}", header), re.split(r"\s{2,}", line)))
    assert cells["FID in-loop"] == "7.500" and cells["FID final"] == f"{result['fid']:.3f}"
    assert (cells["N"], cells["N final"]) == ("32", "24")

    # A run directory that is no training run is refused with the reason.
    assert evaluate.main([*args, "--run-dir", str(tmp_path)]) == 2


def test_leaderboard_logs_a_wandb_table(run_dir, tmp_path):
    from models.evaluation.leaderboard import COLUMNS
    from tools import leaderboard

    out = tmp_path / "board"
    argv = [
        str(run_dir.parent),
        "--out",
        str(out),
        "--no-plot",
        "--log-project",
        "team/boards",
        "--log-mode",
        "offline",
    ]
    assert leaderboard.main(argv) == 0
    (table,) = out.glob("wandb/offline-run-*/files/media/table/leaderboard_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"] == [title for title, _ in COLUMNS]
    row = dict(zip(data["columns"], data["data"][0]))
    assert (row["#"], row["run"], row["FID in-loop"], row["N"]) == (1, "exp", 7.5, 32)


def test_the_documented_sync_command_finds_the_offline_runs(run_dir):
    """README's one-line sync command, run by a shell in the run's parent (as `runs/<name>`) with --dry-run."""
    readme = (REPO / "README.md").read_text()
    (command,) = re.findall(r"`(wandb sync runs/<name>/wandb/offline-run-\*)`", readme)
    command = command.replace("runs/<name>", run_dir.name)
    res = subprocess.run(
        ["bash", "-c", command.replace("wandb sync", "wandb sync --dry-run", 1)],
        cwd=run_dir.parent,
        env=dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    files = sorted(p.relative_to(run_dir.parent) for p in run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) >= 2
    assert f"Would sync {len(files)} run(s)" in res.stderr + res.stdout
    for f in files:
        assert str(f) in res.stderr + res.stdout
