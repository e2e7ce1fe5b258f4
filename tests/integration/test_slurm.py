"""The Slurm launcher (launchers/slurm.py + launchers/jobs.py) against a real local Slurm cluster.

The cluster (fake nodes n1..n4 with 4 CPUs and a private /dev/shm each, accounting on) is started once per
session by the ``local_slurm`` fixture (tests/conftest.py). To keep the wall time low, the jobs are submitted
together at the start (``jobs`` fixture) and run side by side, one per node (``--exclusive``); each test then waits
for its own job, while a thread interrupts the ``preempt`` job:

* ``ref``       tiny DiT, 1 node x 2 tasks, uninterrupted, W&B offline: the reference run;
* ``two_nodes`` tiny DiT, 2 nodes x 1 task;
* ``preempt``   like ``ref`` but slowed down; it gets the pre-timeout signal (``scancel --signal=USR2``), is
  requeued, then is requeued from outside (``scontrol requeue``: SIGTERM, as for a preemption) and must end
  bit-identical to ``ref``;
* ``timeout``   like ``ref`` with a real 2-minute time limit and the warning signal 60 s before it: it must
  checkpoint, requeue itself before the limit and end identical to ``ref`` (the requeued run is not slowed down
  and raises its own limit, so that exactly one requeue happens whatever the machine's speed);
* ``extract``   the synthetic latent extraction on 1 node x 2 tasks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import yaml

from test_train_resume import complete_steps, final_state, write_toy_latents

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = [sys.executable, str(REPO / "launchers" / "slurm.py")]
CONFIG = "configs/tiny_dit.yaml"
TOTAL_STEPS = 16
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

pytestmark = pytest.mark.timeout(420)


# ================================================================================================ helpers
def launch(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    full.pop("LLAT_DEBUG_STEP_SLEEP", None)
    full.update(env or {})
    res = subprocess.run([*LAUNCHER, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=120)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


@contextlib.contextmanager
def _as_the_launcher(env: dict | None):
    """The environment of ``launch`` (plus ``env``) and the repository as working directory for an in-process
    ``launchers/slurm.py`` call; yields its (stdout, stderr) buffers. Everything is put back afterwards."""
    saved = dict(os.environ)
    os.environ.update(OMP_NUM_THREADS="1", WANDB_SILENT="true")
    os.environ.pop("LLAT_DEBUG_STEP_SLEEP", None)
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)


def launch_here(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``launch`` without a new interpreter: ``launchers/slurm.py``'s ``main(ARGS)`` in this process (an interpreter
    start with its imports costs seconds on a busy machine), with what the interpreter would do around it: the
    environment of ``launch``, the repository as working directory, ``SystemExit`` (argparse) as the exit code, an
    uncaught exception as a traceback on stderr and exit code 1."""
    from launchers import slurm as launcher

    with _as_the_launcher(env) as (out, err):
        try:
            code = launcher.main(list(args))
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except Exception:  # noqa: BLE001 - what the interpreter prints for an uncaught exception
            traceback.print_exc()
            code = 1
    res = subprocess.CompletedProcess([*LAUNCHER, *args], code, out.getvalue(), err.getvalue())
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def submit(*args: str, env: dict | None = None) -> str:
    """``launchers/slurm.py ARGS`` in this process (saves an interpreter start per job on a busy machine);
    ``env`` is exported to the job (sbatch passes the submitting environment on). Returns the job id."""
    from launchers import slurm as launcher

    with _as_the_launcher(env) as (out, err):
        code = launcher.main(list(args))
    assert code == 0, out.getvalue() + err.getvalue()
    return job_id_of(subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue()))


def job_id_of(res: subprocess.CompletedProcess) -> str:
    match = re.search(r"^job id: (\d+)$", res.stdout, re.M)
    assert match, res.stdout + res.stderr
    return match.group(1)


def show_job(job_id: str) -> dict[str, str]:
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return dict(item.split("=", 1) for item in res.stdout.split() if "=" in item)


def logs(run_dir: Path, tail: int = 4000) -> str:
    parts = []
    for path in sorted((run_dir / "slurm").glob("*_log.out")):
        parts.append(f"==== {path.name}\n{path.read_text(errors='replace')[-tail:]}")
    return "\n".join(parts)


def wait_until(predicate, what: str, run_dir: Path, timeout: float = 240.0, poll: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}\n{logs(run_dir)}")


def wait_done(job_id: str, run_dir: Path, timeout: float = 300.0) -> dict[str, str]:
    info = wait_until(
        lambda: (lambda i: i if i.get("JobState") in TERMINAL else None)(show_job(job_id)),
        f"job {job_id} to end",
        run_dir,
        timeout,
        poll=1.0,
    )
    assert info["JobState"] == "COMPLETED", f"job {job_id}: {info['JobState']}\n{logs(run_dir)}"
    return info


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def result(run_dir: Path, job_id: str, task: int = 0):
    with open(run_dir / "slurm" / f"{job_id}_{task}_result.pkl", "rb") as f:
        return pickle.load(f)


def sacct_states(job_id: str, timeout: float = 60.0) -> list[str]:
    """Accounting states of every start of the job (``-D``: requeued starts too), once the last start's end has
    reached the accounting database: slurmctld sends it to slurmdbd asynchronously, so right after the job ended
    (``scontrol show job``) sacct may still report the last start as RUNNING."""
    deadline = time.monotonic() + timeout
    while True:
        res = subprocess.run(
            ["sacct", "-X", "-D", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True, timeout=30
        )
        assert res.returncode == 0, res.stderr
        states = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
        if (states and states[-1] not in ("PENDING", "RUNNING")) or time.monotonic() > deadline:
            return states
        time.sleep(1.0)


class PreemptDriver(threading.Thread):
    """Interrupts the ``preempt`` job while the other tests wait for theirs: the pre-timeout signal as Slurm
    sends it (USR2 to every process of the step) after 2 steps, then - once the requeued run trained 2 more
    steps - an outside ``scontrol requeue`` (SIGTERM, as for a preemption)."""

    def __init__(self, job_id: str, run_dir: Path, dataset: Path):
        super().__init__(daemon=True)
        self.job_id, self.run_dir, self.dataset = job_id, run_dir, dataset
        self.error: str | None = None
        self.duplicate: subprocess.CompletedProcess | None = None
        self.first_stop: int | None = None

    def run(self):
        try:
            self._drive()
        except BaseException:  # reported by the test
            self.error = traceback.format_exc()

    def _drive(self):
        job_id, run_dir = self.job_id, self.run_dir
        wait_until(
            lambda: show_job(job_id)["JobState"] == "RUNNING" and len(losses(run_dir)) >= 2,
            "the preempt job to train 2 steps",
            run_dir,
        )
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        # While the job is queued or running, a second job for the same run directory is refused.
        self.duplicate = launch(
            CONFIG,
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "2",
            f"data.path={self.dataset}",
            f"run_dir={run_dir}",
            check=False,
        )
        log0 = run_dir / "slurm" / f"{job_id}_0_log.out"
        match = wait_until(
            lambda: (
                show_job(job_id).get("Restarts") == "1"
                and re.search(r"stopped on a signal at step (\d+)", log0.read_text())
            ),
            "the first requeue",
            run_dir,
        )
        self.first_stop = int(match.group(1))
        wait_until(
            lambda: (
                show_job(job_id)["JobState"] == "RUNNING" and max(losses(run_dir), default=0) >= self.first_stop + 2
            ),
            "the requeued run to train 2 more steps",
            run_dir,
        )
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)


# ================================================================================================ fixtures
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_toy_latents(tmp_path_factory.mktemp("slurm_data") / "mds")


@pytest.fixture(scope="module")
def jobs(local_slurm, dataset, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """Submit every job of this module at once; name -> (job id, run dir)."""
    root = tmp_path_factory.mktemp("slurm_runs")
    # MosaicML streaming assumes one job per node: it names its shared memory per machine (/dev/shm; private per
    # fake node here), the data source's clean_stale_shared_memory() removes every job's, and the ranks of a node
    # agree on a name by scanning $TMPDIR for lock files, which other jobs' (and other test sessions') lock files
    # can make them disagree on. Hence one training job per node (--exclusive) and one TMPDIR per job.
    cpu = ["--gpus-per-node", "0", "--time", "10", "--exclusive"]
    common = [f"data.path={dataset}"]
    restart_setup = (
        'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then unset LLAT_DEBUG_STEP_SLEEP; '
        "scontrol update JobId=$SLURM_JOB_ID TimeLimit=10; fi"
    )
    specs = {  # in submission order: the long ones first, the 2-node job before the nodes fill up
        "preempt": ([*cpu, "--tasks-per-node", "2", "wandb.mode=offline"], {"LLAT_DEBUG_STEP_SLEEP": "0.5"}),
        # Real time limit: the warning (USR2) 60 s before the 2-minute limit comes 30-60 s after the start (Slurm
        # checks on a 30 s tick); the first run is slowed down so that the warning finds it training.
        "timeout": (
            [
                "--gpus-per-node",
                "0",
                "--tasks-per-node",
                "2",
                "--time",
                "2",
                "--signal-delay",
                "60",
                "--exclusive",
                "--setup",
                restart_setup,
                "wandb.mode=disabled",
            ],
            {"LLAT_DEBUG_STEP_SLEEP": "4"},
        ),
        "two_nodes": ([*cpu, "--nodes", "2", "--tasks-per-node", "1", "wandb.mode=offline"], {}),
        "ref": ([*cpu, "--tasks-per-node", "2", "wandb.mode=offline"], {}),
    }
    out = {}
    for name, (args, env) in specs.items():
        run_dir = root / name
        tmp = root / f"tmp-{name}"
        tmp.mkdir()
        out[name] = (submit(CONFIG, *args, *common, f"run_dir={run_dir}", env={**env, "TMPDIR": str(tmp)}), run_dir)
        if name == "preempt":
            driver = PreemptDriver(*out[name], dataset)
            driver.start()
            out["preempt_driver"] = driver
    ext_dir = root / "extract"
    out["extract"] = (
        submit(
            "configs/extract_synthetic.yaml",
            "--job",
            "extract",
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "2",
            "--time",
            "10",
            f"out_dir={ext_dir}",
            "source.num_samples=40",
            "chunk_size=8",
            "batch_size=4",
            "progress_bar=false",
        ),
        ext_dir,
    )
    return out


# ================================================================================================ no cluster needed
def test_dry_run_prints_sbatch_script_and_resolved_config(tmp_path):
    """CLI flags win over launcher.* overrides, which win over the config's launcher section; nothing is
    written or submitted."""
    text = (REPO / CONFIG).read_text() + (
        "\nlauncher:\n  nodes: 2\n  gpus_per_node: 4\n  partition: gpu\n  time_min: 30\n  account: proj\n"
        "  qos: high\n  constraint: h100\n  signal_delay_s: 90\n  setup: [module load cuda]\n"
    )
    config = tmp_path / "exp.yaml"
    config.write_text(text)
    run_dir = tmp_path / "run"
    res = launch(
        str(config),
        "--dry-run",
        "--nodes",
        "3",
        "launcher.qos=low",
        "train.global_batch_size=24",
        f"run_dir={run_dir}",
        "data.path=/data/latents",
        env={"SLURM_CONF": str(tmp_path / "none.conf")},
    )
    out = res.stdout
    for line in (
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=30",
        "#SBATCH --account=proj",
        "#SBATCH --qos=low",
        "#SBATCH --constraint=h100",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --requeue",
        f"#SBATCH --output={run_dir}/slurm/%j_0_log.out",
        "module load cuda",
        f"export PYTHONPATH={run_dir}/slurm/code/",  # the code snapshot taken at submission (launchers/snapshot.py)
        "export PYTHONSAFEPATH=1",
    ):
        assert line in out, f"{line!r} not in:\n{out}"
    assert re.search(
        rf"^srun .*--output {re.escape(str(run_dir))}/slurm/%j_%t_log.out --kill-on-bad-exit=1 "
        rf".*-m submitit.core._submit {re.escape(str(run_dir))}/slurm$",
        out,
        re.M,
    ), out
    assert "world size 12" in out
    assert "global_batch_size: 24" in out and f"run_dir: {run_dir}" in out and "path: /data/latents" in out
    # The resolved config records the resolved launch settings (CLI > launcher.* override > YAML section).
    resolved = yaml.safe_load(out.split("# ---- resolved train config ----")[1])
    assert resolved["launcher"]["nodes"] == 3 and resolved["launcher"]["qos"] == "low"
    assert resolved["launcher"]["partition"] == "gpu" and resolved["launcher"]["gpus_per_node"] == 4
    # sinfo cannot reach a cluster with that SLURM_CONF: the partition is not checked, with a warning.
    assert "cannot check the partition" in res.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "0"], "--nodes must be >= 1, got 0"),
        (["launcher.nodes=-1"], "launcher.nodes must be >= 1, got -1"),
        (["launcher.nodez=2"], "launcher.nodez: unknown key; did you mean 'nodes'?"),
        (["--gpus-per-node", "0", "--tasks-per-node", "3"], "not divisible by world size 3"),
        (["--time", "1", "--signal-delay", "60"], "--signal-delay 60 s is not shorter than the time limit"),
        (["train.global_batchsize=8"], "did you mean 'global_batch_size'"),
    ],
)
def test_bad_arguments_are_clear_errors(args, message):
    res = launch_here(CONFIG, "--dry-run", *args, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_evaluate_job_passes_its_arguments_through():
    if not (REPO / "tools" / "evaluate.py").exists():
        res = launch_here(CONFIG, "--job", "evaluate", "--dry-run", "--", "samples.npz", check=False)
        assert res.returncode == 2 and "arrives with the evaluation issue" in res.stderr
        return
    res = launch_here(
        CONFIG,
        "--job",
        "evaluate",
        "--dry-run",
        "--gpus-per-node",
        "8",
        "--",
        "samples.npz",
        "--json",
        "m.json",
        env={"SLURM_CONF": "/nonexistent"},
    )
    assert "#SBATCH --ntasks-per-node=1" in res.stdout and "#SBATCH --gpus-per-node=1" in res.stdout
    # relative paths are made absolute (the job reads what the preflight checked); the config is the resolved one
    assert re.search(
        rf"tools/evaluate.py {REPO}/samples.npz --json {REPO}/m.json --config \S+/eval/slurm/evaluate_config.yaml",
        res.stdout,
    ), res.stdout
    res = launch_here(CONFIG, "--job", "evaluate", "--dry-run", check=False)
    assert res.returncode == 2 and "give tools/evaluate.py's arguments after `--`" in res.stderr, res.stderr


def test_missing_config_is_a_clear_error():
    res = launch_here("configs/does_not_exist.yaml", "--dry-run", check=False)
    assert res.returncode == 2
    assert "config file not found: configs/does_not_exist.yaml" in res.stderr


# ================================================================================================ real cluster
def test_unknown_partition_is_refused(local_slurm, tmp_path):
    res = launch_here(
        CONFIG,
        "--partition",
        "nope",
        "--gpus-per-node",
        "0",
        f"run_dir={tmp_path / 'run'}",
        "data.path=/x",
        check=False,
    )
    assert res.returncode == 2
    assert "unknown partition 'nope'; this cluster has: debug" in res.stderr
    assert not (tmp_path / "run").exists()
    res = launch_here(CONFIG, "--dry-run", "--partition", "debug", "--gpus-per-node", "0", "data.path=/x")
    assert "#SBATCH --partition=debug" in res.stdout and "warning" not in res.stderr


def test_requeue_job_recognises_a_requeue_by_slurm(local_slurm, tmp_path):
    """After a trainer stopped on the SIGTERM of an outside requeue / preemption, the task's own requeue request
    fails (the job is no longer running) and must be recognised as done, not reported as an error."""
    from launchers.jobs import requeue_job

    res = subprocess.run(
        ["sbatch", "--parsable", "--requeue", "-o", str(tmp_path / "out"), "--wrap", "sleep 300"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    job_id = res.stdout.strip().split(";")[0]
    try:
        wait_until(lambda: show_job(job_id)["JobState"] == "RUNNING", "the sleep job to run", tmp_path, 60)
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)  # Slurm requeues it
        ok, detail = requeue_job(job_id, restart_count=0)  # then the task asks again
        assert ok and "already requeued by Slurm" in detail, detail
        assert show_job(job_id)["Restarts"] == "1"  # once, not twice
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    ok, detail = requeue_job("999999", restart_count=0)
    assert not ok and "scontrol requeue 999999" in detail


def test_two_tasks_on_one_node_train_and_log_into_the_run_dir(jobs):
    job_id, run_dir = jobs["ref"]
    wait_done(job_id, run_dir)
    assert sorted(losses(run_dir)) == list(range(1, TOTAL_STEPS + 1))
    assert complete_steps(run_dir)[-1] == TOTAL_STEPS
    slurm = run_dir / "slurm"
    assert {p.name for p in slurm.glob("*_log.out")} == {f"{job_id}_0_log.out", f"{job_id}_1_log.out"}
    log0 = (slurm / f"{job_id}_0_log.out").read_text()
    assert "rank 0/2 on n" in log0 and "master n" in log0
    assert (slurm / f"{job_id}_submission.sh").exists() and (slurm / "train_config.yaml").exists()
    assert result(run_dir, job_id)[0] == "success" and result(run_dir, job_id, 1)[0] == "success"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert any(run_id in p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert sacct_states(job_id) == ["COMPLETED"]


def test_two_nodes(jobs):
    job_id, run_dir = jobs["two_nodes"]
    info = wait_done(job_id, run_dir)
    assert info["NumNodes"] == "2" and re.fullmatch(r"n\[\d-\d\]|n\d,n\d", info["NodeList"]), info
    assert complete_steps(run_dir)[-1] == TOTAL_STEPS
    slurm = run_dir / "slurm"
    log0 = (slurm / f"{job_id}_0_log.out").read_text()
    log1 = (slurm / f"{job_id}_1_log.out").read_text()
    master = re.search(r"rank 0/2 on (n\d), master (n\d):(\d+)", log0)
    assert master and master.group(1) == master.group(2), log0[-2000:]
    other = re.search(rf"rank 1/2 on (n\d), master {master.group(2)}:{master.group(3)}", log1)
    assert other and other.group(1) != master.group(1), log1[-2000:]  # ranks on two nodes, one master
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert any(run_id in p.name for p in (run_dir / "wandb").glob("offline-run-*"))


def test_preemption_requeues_and_ends_identical_to_uninterrupted_run(jobs):
    """USR2 (pre-timeout signal) -> checkpoint -> our requeue; then `scontrol requeue` from outside -> SIGTERM
    -> checkpoint -> Slurm's requeue (ours finds it done); the job ends bit-identical to the reference run."""
    job_id, run_dir = jobs["preempt"]
    ref_id, ref_dir = jobs["ref"]
    driver = jobs["preempt_driver"]
    driver.join(timeout=300)
    assert not driver.is_alive(), "the preemption driver did not finish"
    assert driver.error is None, driver.error
    dup = driver.duplicate
    assert dup.returncode == 2 and f"job {job_id} (" in dup.stderr and "still queued or running" in dup.stderr
    first_stop = driver.first_stop
    assert 2 <= first_stop < TOTAL_STEPS

    info = wait_done(job_id, run_dir)
    assert info["Restarts"] == "2", info
    assert sacct_states(job_id) == ["REQUEUED", "REQUEUED", "COMPLETED"]
    text = logs(run_dir, tail=10**7)
    assert f"stopped on a signal at step {first_stop}" in text
    assert f"resumed from step {first_stop}" in text
    assert "requeued job" in text  # our own requeue after the USR2 checkpoint
    assert result(run_dir, job_id)[0] == "success"
    # No step lost, none done twice differently: identical to the uninterrupted run, bit for bit.
    wait_done(ref_id, ref_dir)
    assert losses(run_dir) == losses(ref_dir)
    a, b = final_state(run_dir, TOTAL_STEPS), final_state(ref_dir, TOTAL_STEPS)
    assert a.keys() == b.keys() and {"model", "ema", "optim"} <= {k.split(".")[1] for k in a}
    for key in a:
        assert a[key].equal(b[key]), f"{key} differs"
    assert len((run_dir / "slurm" / "submissions.log").read_text().splitlines()) == 1


def test_time_limit_warning_checkpoints_and_requeues(jobs):
    job_id, run_dir = jobs["timeout"]
    ref_id, ref_dir = jobs["ref"]
    info = wait_done(job_id, run_dir, timeout=360)
    assert info["Restarts"] == "1", info
    assert sacct_states(job_id) == ["REQUEUED", "COMPLETED"]  # requeued before the limit, no TIMEOUT
    text = logs(run_dir, tail=10**7)
    # USR2 from --signal=USR2@60: normally it finds the trainer in its loop (checkpoint, our requeue); if the
    # machine is so slow that it comes during start-up, submitit's own handler requeues the job.
    assert ("received signal 12" in text and "[launcher] requeued job" in text) or (
        "Caught signal SIGUSR2" in text and "Requeued job" in text
    ), text[-5000:]
    wait_done(ref_id, ref_dir)
    assert losses(run_dir) == losses(ref_dir)


def test_extraction_job(jobs):
    from data.extract import read_manifest

    job_id, out = jobs["extract"]
    wait_done(job_id, out)
    manifest = read_manifest(out)
    assert manifest["num_samples"] == 40 and manifest["num_skipped"] == 0 and manifest["world_size"] == 2
    assert (out / "index.json").exists() and (out / "slurm" / f"{job_id}_1_log.out").exists()
    assert result(out, job_id)[0] == "success"
