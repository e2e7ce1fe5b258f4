"""The callables that the Slurm launcher (launchers/slurm.py) submits through submitit, one per task.

They are pickled by reference (``launchers.jobs.SlurmTask``), so this module must stay importable in the tasks
(the sbatch script puts the repository on ``PYTHONPATH``) and must not import torch at module level: the
launcher imports it on the login node.

Inside a task, ``SlurmTask.__call__``:

1. exports the process-group environment from ``submitit.JobEnvironment`` (RANK, WORLD_SIZE, LOCAL_RANK,
   LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR = the job's first host name, MASTER_PORT derived from the job id
   and the restart count), which ``core.distributed.init_distributed`` then reads as a torchrun environment;
2. writes the resolved config (carried inside the pickle, so that a requeued job runs exactly what was
   submitted even if the YAML file changed since) to a private temporary file and runs the job's ``main``:
   ``train.main`` / ``data.extract.main`` / ``tools.evaluate.main``;
3. returns a small summary on success, raises on failure (submitit records the traceback), and on the
   trainer's requeue exit code (75) requeues the job itself, see below.

Requeue design (pre-timeout signal, preemption, ``scontrol requeue``)
-------------------------------------------------------------------
Two signal handlers take turns in a task process:

* submitit installs its own in ``submitit.core._submit`` before calling us: SIGUSR2 (the ``--signal=USR2@delay``
  pre-timeout warning, ``JobEnvironment.USR_SIG``) -> on rank 0 call ``checkpoint()`` (the default of
  ``Checkpointable``: the same callable again), dump it, ``scontrol requeue`` and ``sys.exit(-1)``; other ranks only
  log. SIGTERM and SIGCONT are logged and otherwise ignored.
* ``Trainer.train()`` replaces the handlers of SIGTERM, SIGUSR1 and SIGUSR2 with its own for the duration of the
  training loop and puts submitit's back afterwards. Its handler only sets a flag; at the next step boundary
  every rank agrees on it (all-reduce), they write a checkpoint together and ``train.main`` returns 75.

So while the training loop runs, submitit's handler is not called at all and nothing can kill a rank halfway
through a collective checkpoint. When ``train.main`` returns 75 (checkpoint committed on every rank), this module
requeues the job:

* every rank ignores SIGTERM/SIGUSR1/SIGUSR2 from then on (the work is saved; a second signal must not start a
  second requeue, and the ignore disposition is inherited by the ``scontrol`` child, which therefore cannot be
  killed by the SIGTERM that Slurm sends to the whole step once it accepts the requeue - a race that was seen
  with submitit's own ``_requeue``);
* rank 0 checks ``SLURM_RESTART_COUNT`` against ``max_requeues`` and runs ``scontrol requeue $SLURM_JOB_ID``.
  If that fails, it asks ``scontrol show job`` whether Slurm requeued the job already (preemption with
  ``PreemptMode=REQUEUE`` or an ``scontrol requeue`` from outside: Slurm sends SIGTERM, the trainer checkpoints
  within ``KillWait``, and our own requeue then finds the job requeued); only when it was not is this an error;
* every rank then leaves at once with exit code 0 (``os._exit``, see ``_leave``): submitit writes no result file
  (the client keeps waiting for the requeued run), and a zero exit code does not trip srun's
  ``--kill-on-bad-exit`` for the other ranks while rank 0 is still requeuing.

Duplicates cannot pile up: a requeue keeps the job id (there is never a second job), it is requested by rank 0
only and at most once per run of the job (signals are ignored afterwards), and Slurm starts the requeued job only
after every process of the previous run has ended. No step is lost: the requeue happens only after the trainer
committed the checkpoint of the step it stopped at, and a requeued run resumes from the newest complete
checkpoint in the same run directory. A signal that arrives outside the training loop (model building, data
set-up) is handled by submitit as described above; nothing has been trained since the last checkpoint then.
The extraction and sampling jobs have no handler of their own: submitit's requeues them and they resume from what
they wrote (complete chunks; the PNGs already written).

Slurm signals every process of the job step, not only the tasks: ``shield_helper_processes`` keeps helper
processes (W&B service, multiprocessing's resource tracker, spawned data-loader workers) from dying of
USR1/USR2/TERM while the task process itself still gets them. When an error nevertheless happens while Slurm is
requeuing the job (e.g. a helper that handles SIGTERM itself went away), the task leaves without a result
instead of reporting a failure, since the next run continues from the checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import submitit

REPO = Path(__file__).resolve().parents[1]
REQUEUE_EXIT_CODE = 75  # core.trainer.REQUEUE_EXIT_CODE (not imported: that would import torch)
JOB_KINDS = ("train", "extract", "sample", "evaluate")
EVALUATE_ENTRY = REPO / "tools" / "evaluate.py"
SAMPLE_ENTRY = REPO / "tools" / "sample.py"
# Job states in which Slurm has taken the job back (or is about to start it again).
_REQUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


# The signals Slurm uses to stop a job early (pre-timeout warning, preemption, requeue) and the trainer handles.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class JobFailed(RuntimeError):
    """The job's entry point returned a failure exit code (its own message is in the task's log)."""


def master_port(job_id: str, restart_count: int | str = 0) -> int:
    """A TCP port in [20000, 30000) that every task of one run of a job computes alike.

    Derived from the job id and the restart count, so that a requeued run does not meet the previous run's
    socket (possibly still in TIME_WAIT on the same node) and two jobs on one node rarely collide. Below the
    Linux ephemeral range (32768+).
    """
    return 20000 + zlib.crc32(f"{job_id}.{int(restart_count or 0)}".encode()) % 10000


def process_group_env(env: Any) -> dict[str, str]:
    """torchrun-style variables for this task, from a ``submitit.JobEnvironment``."""
    hostnames = list(env.hostnames)
    nodes = max(1, int(env.num_nodes))
    return {
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(max(1, env.num_tasks // nodes)),  # the launcher uses the same count on every node
        "NODE_RANK": str(env.node),
        "MASTER_ADDR": hostnames[0],
        "MASTER_PORT": str(master_port(env.raw_job_id, os.environ.get("SLURM_RESTART_COUNT", "0"))),
    }


def shield_helper_processes() -> None:
    """Make Slurm's step-wide signals reach this process but not the helper processes it starts later.

    Slurm delivers ``--signal`` (USR2), ``scancel --signal`` and the SIGTERM of a preemption or requeue to every
    process of the step, helpers included: multiprocessing's resource tracker, the W&B service, spawned data
    loader workers. By default USR1/USR2/TERM kill them, so a checkpoint that should follow the signal could
    fail (dead W&B service, dead loader worker). Helpers inherit the signal mask of the thread that starts them
    (across exec, too), while a process-directed signal is delivered to any thread that does not block it. So:
    start one idle thread that keeps the signals unblocked (it receives them; CPython then runs the Python
    handler - submitit's or the trainer's - in the main thread as usual), then block them in the main thread,
    from which every later thread and child inherits the block.
    """
    receiver = threading.Thread(target=threading.Event().wait, name="slurm-signal-receiver", daemon=True)
    receiver.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def show_job(job_id: str) -> dict[str, str]:
    """``scontrol show job -o ID`` as a dict (empty when unknown or scontrol fails)."""
    try:
        res = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if res.returncode != 0:
        return {}
    out: dict[str, str] = {}
    for item in res.stdout.split():
        key, sep, value = item.partition("=")
        if sep and key not in out:
            out[key] = value
    return out


def requeue_job(job_id: str, restart_count: int) -> tuple[bool, str]:
    """Ask Slurm to requeue ``job_id`` (the running job); (done, explanation).

    Succeeds also when Slurm has requeued the job already (preemption / an outside ``scontrol requeue``).
    """
    try:
        res = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True, timeout=60)
        rc, err = res.returncode, (res.stderr or res.stdout).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        rc, err = -1, str(exc)
    if rc == 0:
        return True, f"requeued job {job_id}"
    info = show_job(job_id)
    state = info.get("JobState", "")
    try:
        restarts = int(info.get("Restarts", "0"))
    except ValueError:
        restarts = 0
    if restarts > restart_count or state in _REQUEUED_STATES:
        return True, f"job {job_id} was already requeued by Slurm (state {state}, restarts {restarts})"
    return False, f"`scontrol requeue {job_id}` failed (exit {rc}: {err}); job state {state or 'unknown'}"


def _leave() -> None:
    """End this task at once, without a result file: the job has been requeued (or is being requeued) and its
    processes are about to be signalled and killed. Everything that matters is on disk (the checkpoint was
    committed; the trainer closed its loggers). Skipping the interpreter's finalisation (atexit hooks, library
    destructors) keeps the task from still running - and being SIGKILLed - when Slurm's KillWait ends; the
    shared-memory segments this leaves behind are removed by the next run's ``clean_stale_shared_memory()``."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def requeued_by_slurm(job_id: str, restarts: int) -> bool:
    """Whether Slurm has already requeued this run of the job (its restart count went up)."""
    info = show_job(job_id)
    try:
        return int(info.get("Restarts", "0")) > restarts
    except ValueError:
        return False


class SlurmTask(submitit.helpers.Checkpointable):
    """One task of a launcher job. All state lives in the run directory, so ``checkpoint()`` (inherited:
    resubmit this same callable) needs nothing more."""

    def __init__(
        self,
        kind: str,
        config_yaml: str,
        run_dir: str,
        max_requeues: int,
        overrides: Sequence[str] = (),
        config_path: Optional[str] = None,
    ):
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
        self.kind = kind
        self.config_yaml = config_yaml  # resolved config (train / extract); "" -> use config_path
        self.config_path = config_path  # evaluate: the user's file, passed through with the overrides
        self.overrides = list(overrides)
        self.run_dir = run_dir
        self.max_requeues = int(max_requeues)

    # ------------------------------------------------------------------ in the task
    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        os.environ.update(process_group_env(env))
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        shield_helper_processes()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        print(
            f"[launcher] {self.kind} job {env.job_id} (restart {restarts}), rank {env.global_rank}/"
            f"{env.num_tasks} on {env.hostnames[env.node] if env.node < len(env.hostnames) else env.hostname}, "
            f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, run dir {self.run_dir}",
            flush=True,
        )
        try:
            code = self._run_entry()
        except Exception:
            # A preemption or an outside `scontrol requeue` sends SIGTERM to every process of the job, helper
            # services included; the trainer still checkpoints, but e.g. closing the W&B run can then fail. When
            # Slurm is requeuing the job anyway, such an error must not become the job's result.
            if requeued_by_slurm(env.job_id, restarts):
                traceback.print_exc()
                print(
                    f"[launcher] rank {env.global_rank}: the error above happened while Slurm requeues job "
                    f"{env.job_id}; the next run resumes from the newest complete checkpoint",
                    flush=True,
                )
                _leave()
            raise
        if code == 0:
            return {
                "kind": self.kind,
                "run_dir": self.run_dir,
                "job_id": env.job_id,
                "restarts": restarts,
                "rank": env.global_rank,
            }
        if code == REQUEUE_EXIT_CODE and self.kind == "train":
            self._requeue_and_exit(env, restarts)
        raise JobFailed(
            f"{self.kind} job {env.job_id}: rank {env.global_rank} exited with code {code}"
            + (" (bad configuration)" if code == 2 else "")
            + "; see the messages above in this log"
        )

    def _run_entry(self) -> int:
        if self.kind == "evaluate":
            if not EVALUATE_ENTRY.exists():
                raise JobFailed(
                    f"{EVALUATE_ENTRY} does not exist: the evaluation job arrives with the evaluation issue"
                )
            # lazy: the job's entry point, imported on the compute node (this object is pickled by submitit and
            # unpickled there); at module level it would load torch into the login-node launcher
            from tools.evaluate import main  # type: ignore[import-not-found]

            return int(main([*self.overrides, "--config", str(self.config_path)]) or 0)
        if self.kind == "sample":  # tools/sample.py SOURCE [its arguments]: sharded over the ranks, resumable
            from tools.sample import main as sample_main  # lazy: the job's entry point, on the compute node

            return int(sample_main(list(self.overrides)) or 0)
        with tempfile.TemporaryDirectory(prefix="llat-job-") as tmp:
            path = Path(tmp) / f"{self.kind}_config.yaml"
            path.write_text(self.config_yaml, encoding="utf-8")
            if self.kind == "train":
                from train import main  # lazy: the job's entry point, on the compute node
            else:
                from data.extract import main  # lazy: the job's entry point, on the compute node
            return int(main([str(path), *self.overrides]) or 0)

    def _requeue_and_exit(self, env: Any, restarts: int) -> None:
        # From here on nothing needs a signal: the checkpoint is committed. Ignoring (not handling) them also
        # protects the scontrol child, which inherits the ignore disposition across exec.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if env.global_rank != 0:
            print(f"[launcher] rank {env.global_rank}: checkpoint written, rank 0 requeues the job", flush=True)
            _leave()
        if restarts >= self.max_requeues:
            raise JobFailed(
                f"job {env.job_id} stopped after a checkpoint but is not requeued: it was restarted "
                f"{restarts} times already (launcher.max_requeues={self.max_requeues}). Submit the same "
                f"command again to continue from the newest checkpoint in {self.run_dir}"
            )
        ok, detail = requeue_job(env.job_id, restarts)
        if not ok:
            raise JobFailed(
                f"checkpoint written in {self.run_dir}, but the job could not be requeued: {detail}. "
                f"Submit the same command again to continue from it"
            )
        print(f"[launcher] {detail} (restart {restarts + 1} of at most {self.max_requeues})", flush=True)
        _leave()
