"""``launchers/slurm.py pipeline`` on the real local Slurm cluster (``local_slurm``, tests/conftest.py): synthetic
images -> MDS latents -> tiny DiT -> 40 samples -> FID (tiny random extractor) -> a leaderboard row.

Three pipelines run side by side (one job per fake node, ``--exclusive``, as in test_slurm.py):

* ``A`` is submitted with the launcher's checkout pointed at a COPY of this one (``launchers.slurm.REPO``; a git
  repository, so the snapshot records its commit). Its train job is slowed down and, once it trained 2 steps, the
  copy is broken (train.py and launchers/jobs.py raise on import) and the job is requeued from outside
  (``scontrol requeue``: SIGTERM, as for a preemption). The requeued run must resume and finish from the code
  snapshot taken at submission, and the later stages (submitted at the same time, same snapshot) must run too,
  ending in a leaderboard row with the evaluate stage's FID. Its sample job is slowed down too and requeued from
  outside once it wrote its first images: the requeued job keeps them and writes the rest;
* ``B`` is the uninterrupted reference (extract + train + sample; its evaluation would only repeat A's on the same
  images): it shares A's extraction (A's extract job is still queued or running, or complete, so B submits none
  and waits for A's) and must end with bit-identical weights and the same 40 images, bit for bit;
* ``C`` has a train stage that fails at run time (a global batch larger than the data set, which only the job can
  see): its sample and evaluate jobs must be cancelled, not left pending forever.

Finally the same pipeline command again finds every stage complete and submits nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import yaml

try:
    from test_slurm import TERMINAL, losses, show_job
    from test_train_resume import final_state
except ImportError:  # run as a package module
    from tests.integration.test_slurm import TERMINAL, losses, show_job
    from tests.integration.test_train_resume import final_state

REPO = Path(__file__).resolve().parents[2]
STEPS = 8  # 64 samples / global batch 16 x 2 epochs

pytestmark = pytest.mark.timeout(420)


def pipeline_file(root: Path, name: str, data: Path, reference: Path, train: str = "", stages: int = 4) -> Path:
    """configs/pipeline_synthetic.yaml with this test's paths; the extraction on one task (cheaper); ``train``:
    more train overrides; ``stages``: keep the first N stages."""
    text = (REPO / "configs" / "pipeline_synthetic.yaml").read_text()
    text = text.replace("config: configs/", f"config: {REPO}/configs/")
    text = text.replace("out_dir=runs/pipeline_synthetic/data", f"out_dir={data}")
    text = text.replace("run_dir=runs/pipeline_synthetic/dit", f"run_dir={root / name}{train}")
    text = text.replace("eval.reference=runs/pipeline_synthetic/reference", f"eval.reference={reference}")
    data_yaml = yaml.safe_load(text)
    data_yaml["stages"]["extract"]["launcher"] = {"tasks_per_node": 1}
    for stage in ("extract", "train", "sample", "evaluate")[stages:]:
        data_yaml["stages"].pop(stage)
    path = root / f"pipeline_{name}.yaml"
    path.write_text(yaml.safe_dump(data_yaml, sort_keys=False))
    return path


CLI = ["--exclusive", "--time", "10"]


def run_inprocess(*argv: str, env: dict | None = None) -> tuple[int, str, str]:
    from launchers import slurm

    saved = dict(os.environ)
    os.environ.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", **(env or {}))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = slurm.main(list(argv))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def job_ids(out: str) -> dict[str, str]:
    match = re.search(r"^job ids: (.*)$", out, re.M)
    assert match, out
    return dict(item.split("=") for item in match.group(1).split() if "=" in item)


def wait_state(job_id: str, states: set[str], timeout: float = 300.0) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = show_job(job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(1.0)
    raise AssertionError(f"job {job_id} did not reach {states}: {show_job(job_id)}")


def stage_logs(folder: Path) -> str:
    return "\n".join(
        f"==== {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(folder.glob("slurm/*_log.out"))
    )


class Requeuer(threading.Thread):
    """Breaks the checkout A was submitted from and requeues A's train job once it trained 2 steps."""

    def __init__(self, job_id: str, run_dir: Path, checkout: Path):
        super().__init__(daemon=True)
        self.job_id, self.run_dir, self.checkout = job_id, run_dir, checkout
        self.error: str | None = None
        self.at_step: int | None = None

    def run(self):
        try:
            deadline = time.time() + 300
            while not (show_job(self.job_id).get("JobState") == "RUNNING" and len(losses(self.run_dir)) >= 2):
                assert time.time() < deadline, "A's train job did not train 2 steps"
                time.sleep(0.3)
            for rel in ("train.py", "launchers/jobs.py"):
                path = self.checkout / rel
                path.write_text('raise RuntimeError("the checkout changed after submission")\n' + path.read_text())
            self.at_step = max(losses(self.run_dir))
            subprocess.run(["scontrol", "requeue", self.job_id], check=True, timeout=30)
        except BaseException:  # reported by the test
            self.error = traceback.format_exc()


class SampleRequeuer(threading.Thread):
    """Requeues A's sample job (``scontrol requeue``, as a preemption) once it wrote its first images."""

    def __init__(self, job_id: str, folder: Path):
        super().__init__(daemon=True)
        self.job_id, self.folder = job_id, folder
        self.error: str | None = None
        self.before: dict[str, bytes] = {}

    def run(self):
        try:
            deadline = time.time() + 360
            while not (show_job(self.job_id).get("JobState") == "RUNNING" and len(list(self.folder.glob("*.png")))):
                assert time.time() < deadline, "A's sample job wrote no image"
                time.sleep(0.2)
            subprocess.run(["scontrol", "requeue", self.job_id], check=True, timeout=30)
            self.before = {p.name: p.read_bytes() for p in self.folder.glob("*.png")}
        except BaseException:  # reported by the test
            self.error = traceback.format_exc()


def test_pipeline_preempted_equals_uninterrupted_and_failures_stop_dependants(local_slurm, tmp_path):
    from data.synthetic import write_image_folder
    from launchers.snapshot import take_snapshot
    from models.evaluation.leaderboard import collect_runs, summarize

    t0 = time.time()
    root = tmp_path
    data, reference = root / "data", write_image_folder(root / "reference", 40, image_size=16, seed=1)
    pipes = {
        "A": pipeline_file(root, "A", data, reference),
        "B": pipeline_file(root, "B", data, reference, stages=3),
        "C": pipeline_file(root, "C", data, reference, train=", train.global_batch_size=128"),
    }
    # A preflight refusal submits nothing: the reference is missing.
    code, _, err = run_inprocess("pipeline", str(pipeline_file(root, "X", data, root / "nope")), *CLI)
    assert code == 2 and "eval.reference: reference batch not found" in err, err
    assert not (root / "X").exists()

    # A: from a copy of the checkout, a git repository of its own.
    checkout, _ = take_snapshot(REPO, root / "checkout")
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    tmps = {n: root / f"tmp-{n}" for n in pipes}
    for t in tmps.values():
        t.mkdir()
    from launchers import slurm

    restart = 'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then unset LLAT_DEBUG_STEP_SLEEP LLAT_DEBUG_SAMPLE_SLEEP; fi'
    env = {"LLAT_DEBUG_STEP_SLEEP": "1", "LLAT_DEBUG_SAMPLE_SLEEP": "1", "TMPDIR": str(tmps["A"])}
    repo, slurm.REPO = slurm.REPO, checkout  # the launcher snapshots the copy (the code the jobs then run)
    try:
        code, out_a, err = run_inprocess("pipeline", str(pipes["A"]), *CLI, "--setup", restart, env=env)
    finally:
        slurm.REPO = repo
    assert code == 0, out_a + err
    ids_a = job_ids(out_a)
    assert list(ids_a) == ["extract", "train", "sample", "evaluate"], out_a
    assert f"train     submitted job {ids_a['train']} after {ids_a['extract']}" in out_a
    requeuer = Requeuer(ids_a["train"], root / "A", checkout)
    requeuer.start()
    sample_requeuer = SampleRequeuer(ids_a["sample"], root / "A" / "samples" / "fid40")
    sample_requeuer.start()

    # B shares A's extraction; C's training fails at run time.
    code, out_b, err = run_inprocess("pipeline", str(pipes["B"]), *CLI, env={"TMPDIR": str(tmps["B"])})
    assert code == 0, out_b + err
    ids_b = job_ids(out_b)
    assert ids_b["extract"] == ids_a["extract"] or "extract   complete" in out_b, out_b
    code, out_c, err = run_inprocess(
        "pipeline", str(pipes["C"]), *CLI, "--tasks-per-node", "1", env={"TMPDIR": str(tmps["C"])}
    )
    assert code == 0, out_c + err
    ids_c = job_ids(out_c)

    # C: the failed training cancels its dependants.
    assert wait_state(ids_c["train"], TERMINAL)["JobState"] == "FAILED", stage_logs(root / "C")
    for stage in ("sample", "evaluate"):
        info = wait_state(ids_c[stage], TERMINAL, timeout=60)
        assert info["JobState"] == "CANCELLED", info
    assert not (root / "C" / "samples" / "fid40.npz").exists()

    # A and B: every stage completes.
    for ids, name, last in ((ids_a, "A", "evaluate"), (ids_b, "B", "sample")):
        info = wait_state(ids[last], TERMINAL, timeout=360)
        assert info["JobState"] == "COMPLETED", (
            f"{name}: {info}\n"
            + stage_logs(root / name)
            + stage_logs(root / name / "samples")
            + stage_logs(root / name / "eval")
        )
    requeuer.join(timeout=10)
    assert requeuer.error is None, requeuer.error
    sample_requeuer.join(timeout=10)
    assert sample_requeuer.error is None, sample_requeuer.error
    # The sample stage, preempted after its first images: requeued once, those images kept as they were, the
    # rest written by the requeued job; the same 40 images as B's uninterrupted sample stage, bit for bit.
    assert show_job(ids_a["sample"])["Restarts"] == "1"
    folder_a = root / "A" / "samples" / "fid40"
    assert sample_requeuer.before and all((folder_a / n).read_bytes() == b for n, b in sample_requeuer.before.items())
    with np.load(root / "A" / "samples" / "fid40.npz") as za, np.load(root / "B" / "samples" / "fid40.npz") as zb:
        assert za["arr_0"].shape[0] == 40 and np.array_equal(za["arr_0"], zb["arr_0"])
    train_a = show_job(ids_a["train"])
    assert train_a["Restarts"] == "1", train_a
    log_a = stage_logs(root / "A")
    assert "resumed from step" in log_a and "the checkout changed" not in log_a, log_a
    # The snapshot the jobs ran: recorded with the commit of the checkout it was taken from.
    snaps = list((root / "A" / "pipeline" / "code").glob("*/snapshot.json"))
    assert len(snaps) == 1 and json.loads(snaps[0].read_text())["commit"] == commit
    assert f"(commit {commit})" in (root / "A" / "slurm" / "submissions.log").read_text()

    # Identical to the uninterrupted run (bit for bit), and a leaderboard row with the evaluate stage's FID as the
    # run's final evaluation (eval/final.json).
    assert losses(root / "A") == losses(root / "B") and max(losses(root / "A")) == STEPS
    a, b = final_state(root / "A", STEPS), final_state(root / "B", STEPS)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    metrics = json.loads((root / "A" / "samples" / "fid40_metrics.json").read_text())
    assert metrics["num_samples"] == 40 and metrics["fid"] > 0
    (row,) = [summarize(r) for r in collect_runs([root / "A"])]
    assert row.final_fid == metrics["fid"] and row.steps == STEPS and row.final_num_samples == 40
    assert json.loads((root / "A" / "eval" / "final.json").read_text())["metrics"]["fid"] == metrics["fid"]

    all_ids = ",".join(sorted({*ids_a.values(), *ids_b.values(), *ids_c.values()}, key=int))
    timeline = subprocess.run(
        ["sacct", "-X", "-D", "-n", "-P", "-o", "JobID,JobName,Submit,Start,End,State", "-j", all_ids],
        capture_output=True,
        text=True,
        timeout=30,
    )
    print(f"job timeline (t0 {t0:.0f}):\n{timeline.stdout}")

    # Once complete, the same command submits nothing.
    code, out, err = run_inprocess("pipeline", str(pipes["A"]), *CLI)
    assert code == 0 and "job ids: (none: every stage is complete)" in out, out + err
    assert out.count("complete, skipped") == 4
