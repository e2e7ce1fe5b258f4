"""``launchers/slurm.py pipeline`` on the real local Slurm cluster (``local_slurm``, tests/conftest.py): synthetic
images -> MDS latents -> tiny DiT -> 40 samples -> FID (tiny random extractor) -> a leaderboard row.

Three pipelines run side by side (one job per fake node, ``--exclusive``, as in test_slurm.py):

* ``A`` is preempted in the middle of every stage (``scontrol requeue`` from outside: SIGTERM, as for a preemption;
  each stage is slowed down so that the requeue lands mid-way, and the requeued job runs at full speed):

  - extract: once its first chunk is committed; the requeued job keeps the committed chunks and extracts the rest;
  - train: once it trained 2 steps. A is submitted with the launcher's checkout pointed at a COPY of this one
    (``launchers.slurm.REPO``; a git repository, so the snapshot records its commit), and just before this requeue
    the copy is broken (train.py and launchers/jobs.py raise on import): the requeued run must resume and finish
    from the code snapshot taken at submission, and the later stages (same snapshot) must run too;
  - sample: once it wrote its first images; the requeued job keeps them and writes the rest;
  - evaluate: once it cached the reference statistics (``LLAT_FID_CACHE``), while it extracts the samples'
    features; the requeued job reads them from that cache.

  It ends in a leaderboard row with the evaluate stage's FID;
* ``B`` is the uninterrupted reference, every stage with outputs of its own. A must equal it: the same shards
  (bytes), bit-identical weights, the same 40 images bit for bit, the same FID;
* ``C`` shares A's data (A's extract job is still queued, running or complete, so C submits none and waits for it)
  and has a train stage that fails at run time (a global batch larger than the data set, which only the job can
  see): its sample and evaluate jobs must be cancelled, not left pending forever.

Finally the same pipeline command again finds every stage complete and submits nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from test_slurm import TERMINAL, launch_here, losses, show_job
from test_train_resume import final_state

REPO = Path(__file__).resolve().parents[2]
STEPS = 8  # 64 samples / global batch 16 x 2 epochs

pytestmark = pytest.mark.timeout(420)


def pipeline_file(
    root: Path, name: str, data: Path, reference: Path, train: str = "", extract: tuple[str, ...] = ()
) -> Path:
    """configs/pipeline_synthetic.yaml with this test's paths; the extraction on one task (cheaper); ``train``:
    more train overrides; ``extract``: more extract overrides."""
    text = (REPO / "configs" / "pipeline_synthetic.yaml").read_text()
    text = text.replace("config: configs/", f"config: {REPO}/configs/")
    text = text.replace("out_dir=runs/pipeline_synthetic/data", f"out_dir={data}")
    text = text.replace("run_dir=runs/pipeline_synthetic/dit", f"run_dir={root / name}{train}")
    text = text.replace("eval.reference=runs/pipeline_synthetic/reference", f"eval.reference={reference}")
    data_yaml = yaml.safe_load(text)
    data_yaml["stages"]["extract"]["launcher"] = {"tasks_per_node": 1}
    data_yaml["stages"]["extract"]["overrides"] += list(extract)
    path = root / f"pipeline_{name}.yaml"
    path.write_text(yaml.safe_dump(data_yaml, sort_keys=False))
    return path


CLI = ["--exclusive", "--time", "10"]


def pipeline(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``launchers/slurm.py pipeline ARGV`` in this process (test_slurm.launch_here); ``env`` goes to the jobs."""
    return launch_here("pipeline", *argv, env=env, check=False)


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


def squeue() -> set[str]:
    """The ids of the jobs in the queue (pending or running)."""
    res = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30, check=True)
    return set(res.stdout.split())


def stage_logs(folder: Path) -> str:
    return "\n".join(
        f"==== {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(folder.glob("slurm/*_log.out"))
    )


class Preempter(threading.Thread):
    """Requeues a job from outside (``scontrol requeue``: SIGTERM, as a preemption) once it is running and
    ``ready()`` holds. ``before()`` runs just before the requeue, ``after()`` just after it; what they return is
    kept (``.before``, ``.after``)."""

    def __init__(
        self,
        job_id: str,
        what: str,
        ready: Callable[[], Any],
        before: Callable[[], Any] = lambda: None,
        after: Callable[[], Any] = lambda: None,
    ):
        super().__init__(daemon=True)
        self.job_id, self.what, self.ready, self.before_fn, self.after_fn = job_id, what, ready, before, after
        self.error: str | None = None
        self.before: Any = None
        self.after: Any = None

    def run(self):
        try:
            deadline = time.time() + 360
            while not (show_job(self.job_id).get("JobState") == "RUNNING" and self.ready()):
                assert time.time() < deadline, f"job {self.job_id} never got to {self.what}"
                time.sleep(0.2)
            self.before = self.before_fn()
            subprocess.run(["scontrol", "requeue", self.job_id], check=True, timeout=30)
            self.after = self.after_fn()
        except BaseException:  # reported by the test
            self.error = traceback.format_exc()

    def check(self) -> None:
        """Joined, no error, and the job requeued exactly once."""
        self.join(timeout=10)
        assert not self.is_alive() and self.error is None, self.error
        info = show_job(self.job_id)
        assert info["Restarts"] == "1", (self.what, info)


def shard_bytes(data: Path) -> dict[str, bytes]:
    """What an extraction wrote that fixes the training data: every chunk's shards and index, the merged index
    and the latent statistics (not the manifest and chunk.json, which record times and hosts)."""
    files = [
        p
        for p in data.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", "chunk.json") and p.relative_to(data).parts[0] != "slurm"
    ]
    return {str(p.relative_to(data)): p.read_bytes() for p in files}


def test_pipeline_preempted_in_every_stage_equals_uninterrupted_and_failures_stop_dependants(local_slurm, tmp_path):
    from data.synthetic import write_image_folder
    from launchers import slurm
    from launchers.snapshot import take_snapshot
    from models.evaluation.leaderboard import collect_runs, summarize

    t0 = time.time()
    root = tmp_path
    data_a, data_b, reference = root / "data-A", root / "data-B", write_image_folder(root / "reference", 40, 16, seed=1)
    pipes = {
        "A": pipeline_file(root, "A", data_a, reference, extract=("throttle_s=1.0",)),
        "B": pipeline_file(root, "B", data_b, reference),
        "C": pipeline_file(root, "C", data_a, reference, train=", train.global_batch_size=128"),
    }
    # A preflight refusal submits nothing (the queue is as it was): every missing input is reported at once.
    queued = squeue()
    res = pipeline(str(pipeline_file(root, "X", data_a, root / "nope", train=", model.init_from=nope.pt")), *CLI)
    assert res.returncode == 2 and "preflight found 2 problems; nothing was submitted" in res.stderr, res.stderr
    assert f"eval.reference: reference batch not found: {root / 'nope'}" in res.stderr
    assert "model.init_from: checkpoint to initialise from not found" in res.stderr
    assert squeue() == queued and not (root / "X").exists() and not data_a.exists()

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
    caches = {n: root / f"fid-cache-{n}" for n in ("A", "B")}  # C's evaluate never runs

    # Every stage of A slowed down (core/debug.py; the extraction by its throttle_s), the requeued jobs not.
    slowed = ("LLAT_DEBUG_STEP_SLEEP", "LLAT_DEBUG_SAMPLE_SLEEP", "LLAT_DEBUG_EVAL_SLEEP")
    restart = f'if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ]; then unset {" ".join(slowed)}; fi'
    env = dict.fromkeys(slowed, "1")
    env.update(LLAT_DEBUG_EVAL_SLEEP="1.5", TMPDIR=str(tmps["A"]), LLAT_FID_CACHE=str(caches["A"]))
    repo, slurm.REPO = slurm.REPO, checkout  # the launcher snapshots the copy (the code the jobs then run)
    try:
        res = pipeline(str(pipes["A"]), *CLI, "--setup", restart, env=env)
    finally:
        slurm.REPO = repo
    assert res.returncode == 0, res.stdout + res.stderr
    ids_a = job_ids(res.stdout)
    assert list(ids_a) == ["extract", "train", "sample", "evaluate"], res.stdout
    assert f"train     submitted job {ids_a['train']} after {ids_a['extract']}" in res.stdout

    def break_checkout() -> int:
        for rel in ("train.py", "launchers/jobs.py"):
            path = checkout / rel
            path.write_text('raise RuntimeError("the checkout changed after submission")\n' + path.read_text())
        return max(losses(root / "A"))

    samples_a = root / "A" / "samples" / "fid40"
    preempters = {
        "extract": Preempter(ids_a["extract"], "its first committed chunk", lambda: list(data_a.glob("chunk*"))),
        "train": Preempter(ids_a["train"], "step 2", lambda: len(losses(root / "A")) >= 2, before=break_checkout),
        "sample": Preempter(
            ids_a["sample"],
            "its first images",
            lambda: list(samples_a.glob("*.png")),
            after=lambda: {p.name: p.read_bytes() for p in samples_a.glob("*.png")},
        ),
        "evaluate": Preempter(ids_a["evaluate"], "a cached reference", lambda: list(caches["A"].glob("ref-*.pt"))),
    }
    for p in preempters.values():
        p.start()

    # B: the uninterrupted reference; C shares A's extraction and fails in its training.
    res = pipeline(str(pipes["B"]), *CLI, env={"TMPDIR": str(tmps["B"]), "LLAT_FID_CACHE": str(caches["B"])})
    assert res.returncode == 0, res.stdout + res.stderr
    ids_b = job_ids(res.stdout)
    assert list(ids_b) == ["extract", "train", "sample", "evaluate"], res.stdout
    res = pipeline(str(pipes["C"]), *CLI, "--tasks-per-node", "1", env={"TMPDIR": str(tmps["C"])})
    assert res.returncode == 0, res.stdout + res.stderr
    ids_c = job_ids(res.stdout)
    assert ids_c["extract"] == ids_a["extract"] or "extract   complete" in res.stdout, res.stdout

    # C: the failed training cancels its dependants.
    assert wait_state(ids_c["train"], TERMINAL)["JobState"] == "FAILED", stage_logs(root / "C")
    for stage in ("sample", "evaluate"):
        info = wait_state(ids_c[stage], TERMINAL, timeout=60)
        assert info["JobState"] == "CANCELLED", info
    assert not (root / "C" / "samples" / "fid40.npz").exists()

    # A and B: every stage completes.
    for ids, name in ((ids_a, "A"), (ids_b, "B")):
        info = wait_state(ids["evaluate"], TERMINAL, timeout=360)
        assert info["JobState"] == "COMPLETED", (
            f"{name}: {info}\n"
            + stage_logs(data_a if name == "A" else data_b)
            + stage_logs(root / name)
            + stage_logs(root / name / "samples")
            + stage_logs(root / name / "eval")
        )
    for p in preempters.values():
        p.check()

    # extract: the requeued job found the committed chunks and extracted only the rest; the same shards as B's.
    log = stage_logs(data_a)
    done = [int(n) for n in re.findall(r"(\d+) chunk\(s\) done, \d+ to do", log)]
    assert done[0] == 0 and done[-1] >= 1, log
    shards_a = shard_bytes(data_a)
    assert shards_a == shard_bytes(data_b) and any(k.endswith(".mds.zstd") for k in shards_a)
    # train: resumed from the code snapshot (the checkout was broken), with the same losses and weights as B.
    log_a = stage_logs(root / "A")
    assert "resumed from step" in log_a and "the checkout changed" not in log_a, log_a
    assert losses(root / "A") == losses(root / "B") and max(losses(root / "A")) == STEPS
    a, b = final_state(root / "A", STEPS), final_state(root / "B", STEPS)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    snaps = list((root / "A" / "pipeline" / "code").glob("*/snapshot.json"))
    assert len(snaps) == 1 and json.loads(snaps[0].read_text())["commit"] == commit
    assert f"(commit {commit})" in (root / "A" / "slurm" / "submissions.log").read_text()
    # sample: the images written before the preemption kept as they were; the same 40 images as B's.
    before = preempters["sample"].after
    assert before and all((samples_a / n).read_bytes() == b for n, b in before.items())
    with np.load(root / "A" / "samples" / "fid40.npz") as za, np.load(root / "B" / "samples" / "fid40.npz") as zb:
        assert za["arr_0"].shape[0] == 40 and np.array_equal(za["arr_0"], zb["arr_0"])
    # evaluate: the requeued job used the reference statistics the preempted one cached; B's computed them; the
    # same FID. A leaderboard row with it as the run's final evaluation (eval/final.json).
    metrics = json.loads((root / "A" / "samples" / "fid40_metrics.json").read_text())
    metrics_b = json.loads((root / "B" / "samples" / "fid40_metrics.json").read_text())
    assert metrics["reference_cached"] and not metrics_b["reference_cached"]
    assert metrics["num_samples"] == 40 and metrics["fid"] > 0 and metrics["fid"] == metrics_b["fid"]
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
    res = pipeline(str(pipes["A"]), *CLI)
    assert res.returncode == 0 and "job ids: (none: every stage is complete)" in res.stdout, res.stdout + res.stderr
    assert res.stdout.count("complete, skipped") == 4
