"""Submit a training, extraction or evaluation job to Slurm (through submitit): one task per GPU.

    python launchers/slurm.py CONFIG [--nodes N] [--gpus-per-node G] [--partition P] [--time MIN] [--account A]
                              [--qos Q] [--constraint C] [--dry-run] [--job train|extract|evaluate] [key=value ...]

Slurm settings come from the CLI, else from ``launcher.*`` overrides, else from a ``launcher:`` section of the
config (see ``LauncherConfig``), else from the defaults. The job's logs and submitit's files go to
``<run_dir>/slurm/`` (train: ``run_dir`` of the config, default ``runs/<name>``; extract: ``out_dir``).
Each task runs ``launchers.jobs.SlurmTask``: it exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR (the first
host of the job) / MASTER_PORT (derived from the job id) from ``submitit.JobEnvironment`` and calls ``train.main``
(or ``data.extract.main``). A training job that gets the pre-timeout signal (``--signal-delay`` seconds before its
time limit), a preemption SIGTERM or an ``scontrol requeue`` checkpoints at the next step boundary and is requeued
with the same run directory, where it resumes from the newest complete checkpoint (see launchers/jobs.py).

Exit codes: 0 submitted (or printed, with --dry-run), 2 bad arguments or configuration, 3 Slurm unavailable or
the submission failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python launchers/slurm.py` puts launchers/, not the repository, on sys.path
    sys.path.insert(0, str(REPO))

# States of a job that still runs or will run (again); anything else is over.
ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "SUSPENDED",
    "COMPLETING",
    "CONFIGURING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
}
SLURM_SUBDIR = "slurm"


class LaunchError(Exception):
    """A problem with the arguments, the config or the cluster; ``code`` is the launcher's exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


from launchers.config import LauncherConfig  # noqa: E402  (the `launcher:` section of the schema)

# CLI flag -> LauncherConfig field
CLI_FIELDS = {
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "tasks_per_node": "tasks_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "partition": "partition",
    "time": "time_min",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "exclude": "exclude",
    "exclusive": "exclusive",
    "signal_delay": "signal_delay_s",
    "max_requeues": "max_requeues",
    "job_name": "job_name",
}


# ================================================================================================ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launchers/slurm.py",
        description=__doc__.splitlines()[0],
        epilog="Config overrides (key=value) go after the config; launcher.KEY=VALUE sets a launcher field. "
        "--job evaluate: tools/evaluate.py's arguments follow `--` (the config is passed as its --config).",
    )
    p.add_argument("config", help="experiment YAML (train, evaluate) or extraction YAML (extract)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.global_batch_size=256")
    p.add_argument("--job", choices=("train", "extract", "evaluate"), default="train", help="what to run (train)")
    p.add_argument("--nodes", type=int, help="number of nodes (1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node = tasks per node (8); 0 for CPU nodes")
    p.add_argument("--tasks-per-node", type=int, help="tasks per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per task (partition default)")
    p.add_argument("--mem-gb", type=float, help="memory per node in GB (partition default)")
    p.add_argument("--partition", help="Slurm partition (cluster default)")
    p.add_argument("--time", type=int, metavar="MIN", help="time limit of each run of the job, minutes (1440)")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--qos", help="Slurm quality of service")
    p.add_argument("--constraint", help="Slurm node constraint (features), e.g. h100")
    p.add_argument("--exclude", help="nodes to avoid")
    p.add_argument("--exclusive", action="store_true", default=None, help="do not share the nodes with other jobs")
    p.add_argument(
        "--signal-delay",
        type=int,
        metavar="S",
        help="send the pre-timeout signal S seconds before the time limit (120)",
    )
    p.add_argument("--max-requeues", type=int, help="requeue at most this many times (50)")
    p.add_argument("--job-name", help="Slurm job name (default <job>-<config name>)")
    p.add_argument(
        "--setup",
        action="append",
        default=None,
        metavar="CMD",
        help="shell line to run before srun (repeatable; appended to launcher.setup)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script and the resolved config; submit nothing"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="submit even if another job of this run directory is still queued or running",
    )
    return p


def _typed_loader_error(err: Exception, tmp: Path, source: str) -> str:
    return str(err).replace(str(tmp), source)


def split_config(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the config without its ``launcher`` section, that section) as plain data, read with the config
    loader's YAML dialect."""
    from core.config import ConfigError, _parse_yaml

    p = Path(path)
    if not p.exists():
        raise LaunchError(f"config file not found: {path}")
    if not p.is_file():
        raise LaunchError(f"config is not a regular file: {path}")
    try:
        data = _parse_yaml(p.read_text(encoding="utf-8"), str(path))
    except ConfigError as err:
        raise LaunchError(str(err)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise LaunchError(f"{path}: cannot read: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LaunchError(f"{path}: the top level must be a mapping of sections")
    launcher = data.pop("launcher", None) or {}
    if not isinstance(launcher, dict):
        raise LaunchError(f"{path}: launcher: expected a mapping, got {launcher!r}")
    return data, launcher


def _load_typed(data: dict[str, Any], source: str, loader, *args, **kwargs):
    """Run a path-based config loader on ``data`` (written to a temporary YAML file), reporting ``source``."""
    import yaml

    from core.config import ConfigError

    with tempfile.TemporaryDirectory(prefix="llat-launch-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        try:
            return loader(str(path), *args, **kwargs)
        except ConfigError as err:
            raise LaunchError(_typed_loader_error(err, path, source)) from None


def _check_launcher(cfg: LauncherConfig) -> list[tuple[str, str]]:
    problems = []
    if cfg.nodes < 1:
        problems.append(("nodes", f"must be >= 1, got {cfg.nodes}"))
    if cfg.gpus_per_node < 0:
        problems.append(("gpus_per_node", f"must be >= 0, got {cfg.gpus_per_node}"))
    if cfg.tasks_per_node is not None and cfg.tasks_per_node < 1:
        problems.append(("tasks_per_node", f"must be >= 1, got {cfg.tasks_per_node}"))
    if cfg.cpus_per_task is not None and cfg.cpus_per_task < 1:
        problems.append(("cpus_per_task", f"must be >= 1, got {cfg.cpus_per_task}"))
    if cfg.mem_gb is not None and cfg.mem_gb <= 0:
        problems.append(("mem_gb", f"must be > 0, got {cfg.mem_gb}"))
    if cfg.time_min < 1:
        problems.append(("time_min", f"must be >= 1 minute, got {cfg.time_min}"))
    if cfg.signal_delay_s < 0:
        problems.append(("signal_delay_s", f"must be >= 0, got {cfg.signal_delay_s}"))
    elif cfg.time_min >= 1 and cfg.signal_delay_s >= cfg.time_min * 60:
        problems.append(
            (
                "signal_delay_s",
                f"{cfg.signal_delay_s} s is not shorter than the time limit "
                f"({cfg.time_min} min): the job would be signalled at once",
            )
        )
    if cfg.max_requeues < 0:
        problems.append(("max_requeues", f"must be >= 0, got {cfg.max_requeues}"))
    for name, value in (
        ("partition", cfg.partition),
        ("account", cfg.account),
        ("qos", cfg.qos),
        ("constraint", cfg.constraint),
        ("job_name", cfg.job_name),
    ):
        if value is not None and not str(value).strip():
            problems.append((name, "must not be empty (leave it out instead)"))
    return problems


def resolve_launcher(
    section: dict[str, Any], overrides: Sequence[str], args: argparse.Namespace, source: str
) -> LauncherConfig:
    """LauncherConfig from the YAML section, then ``launcher.*`` overrides, then CLI flags; validated."""
    from core.config import load_typed_config

    try:
        cfg: LauncherConfig = _load_typed(section, f"{source}: launcher", load_typed_config, overrides, LauncherConfig)
    except LaunchError as err:  # overrides were given as launcher.KEY=VALUE: name them so
        raise LaunchError(
            re.sub(r"^command line: (?!launcher\.)", "command line: launcher.", str(err), flags=re.M)
        ) from None
    from_cli: set[str] = set()
    for flag, name in CLI_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(cfg, name, value)
            from_cli.add(name)
    if args.setup:
        cfg.setup = [*cfg.setup, *args.setup]
    problems = _check_launcher(cfg)
    if problems:
        flags = {name: flag for flag, name in CLI_FIELDS.items()}
        lines = []
        for name, problem in problems:
            where = f"--{flags[name].replace('_', '-')}" if name in from_cli else f"launcher.{name}"
            lines.append(f"{where} {problem}")
        raise LaunchError("\n".join(lines))
    return cfg


# ================================================================================================ job config
@dataclass
class ResolvedJob:
    kind: str
    name: str  # for the default job name
    run_dir: Path  # absolute; <run_dir>/slurm holds the logs
    config_yaml: str  # what the job runs ("" for evaluate: the user's file is passed through)
    config_path: Optional[str] = None
    overrides: list[str] = dataclasses.field(default_factory=list)


def resolve_job(
    kind: str,
    data: dict[str, Any],
    overrides: Sequence[str],
    config_path: str,
    world_size: int,
    launcher: Optional[LauncherConfig] = None,
) -> ResolvedJob:
    from core.config import config_to_yaml

    if kind == "train":
        from core.config import resolve_run_dir
        from launchers.experiment import load_config

        cfg = _load_typed(data, config_path, load_config, list(overrides), world_size=world_size)
        run_dir = resolve_run_dir(cfg).expanduser().absolute()
        cfg.run_dir = str(run_dir)  # every run of the job, wherever it starts, writes here
        if launcher is not None:  # the resolved launch settings (CLI > overrides > YAML) are recorded
            cfg.launcher = launcher
        return ResolvedJob(kind, cfg.name, run_dir, config_to_yaml(cfg))
    if kind == "extract":
        from data.extract import load_extract_config

        cfg = _load_typed(data, config_path, load_extract_config, list(overrides))
        out = Path(cfg.out_dir).expanduser().absolute()
        cfg.out_dir = str(out)
        return ResolvedJob(kind, out.name, out, config_to_yaml(cfg))
    # evaluate: tools/evaluate.py SAMPLES --config CONFIG [its options], one task; logs in <run_dir>/eval/slurm
    from core.config import resolve_run_dir
    from launchers.experiment import load_config
    from launchers.jobs import EVALUATE_ENTRY

    if not EVALUATE_ENTRY.exists():
        raise LaunchError(
            f"--job evaluate: {EVALUATE_ENTRY.relative_to(REPO)} does not exist yet; the evaluation "
            f"job arrives with the evaluation issue"
        )
    if not overrides:
        raise LaunchError(
            "--job evaluate: give tools/evaluate.py's arguments after `--`, e.g. "
            "`launchers/slurm.py CONFIG --job evaluate -- samples/xl.npz --json samples/xl.json`"
        )
    cfg = _load_typed(data, config_path, load_config, [], check=False)
    run_dir = resolve_run_dir(cfg).expanduser().absolute()
    return ResolvedJob(
        kind, cfg.name, run_dir / "eval", "", config_path=str(Path(config_path).absolute()), overrides=list(overrides)
    )


# ================================================================================================ Slurm
def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def cluster_partitions() -> Optional[list[str]]:
    """Partition names from ``sinfo -h -o %P`` (default marked with '*' there, stripped here); None when sinfo
    is missing or fails."""
    if shutil.which("sinfo") is None:
        return None
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        return None  # sinfo would fall back to a DNS lookup and hang for a while
    try:
        res = _run(["sinfo", "-h", "-o", "%P"], timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return sorted({line.strip().rstrip("*") for line in res.stdout.splitlines() if line.strip()})


def check_partition(partition: Optional[str], dry_run: bool) -> Optional[str]:
    """Raise on an unknown partition; returns a warning when it cannot be checked (dry run only)."""
    parts = cluster_partitions()
    if parts is None:
        if dry_run:
            return "warning: cannot check the partition: sinfo is not available or cannot reach Slurm"
        detail = "sinfo not found" if shutil.which("sinfo") is None else "`sinfo -h -o %P` failed"
        raise LaunchError(f"cannot reach Slurm ({detail}); is this a Slurm login node (SLURM_CONF?)", code=3)
    if partition is not None and partition not in parts:
        raise LaunchError(
            f"--partition: unknown partition {partition!r}; this cluster has: {', '.join(parts) or '(none)'}"
        )
    return None


def sbatch_parameters(lc: LauncherConfig, job: ResolvedJob) -> dict[str, Any]:
    """Keyword arguments of submitit's ``_make_sbatch_string`` (sbatch names), also given to
    ``AutoExecutor.update_parameters`` with a ``slurm_`` prefix."""
    from submitit.slurm.slurm import _convert_mem

    setup = [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}", *lc.setup]
    params: dict[str, Any] = {
        "job_name": lc.job_name or f"{job.kind}-{job.name}",
        "time": lc.time_min,
        "nodes": lc.nodes,
        "ntasks_per_node": lc.num_tasks_per_node,
        "signal_delay_s": lc.signal_delay_s,
        "setup": setup,
        "stderr_to_stdout": True,  # one log per task: <run_dir>/slurm/<job id>_<task>_log.out
        "additional_parameters": {"requeue": True, **lc.additional_parameters},
    }
    if lc.gpus_per_node > 0:
        params["gpus_per_node"] = lc.gpus_per_node
    if lc.exclusive:
        params["exclusive"] = True
    if lc.kill_on_bad_exit:
        params["srun_args"] = ["--kill-on-bad-exit=1"]
    optional = {
        "cpus_per_task": lc.cpus_per_task,
        "partition": lc.partition,
        "account": lc.account,
        "qos": lc.qos,
        "constraint": lc.constraint,
        "exclude": lc.exclude,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if lc.mem_gb is not None:
        params["mem"] = _convert_mem(lc.mem_gb)
    return params


def submit_command(folder: Path) -> str:
    """The command submitit's SlurmExecutor puts after srun (``_submitit_command_str``)."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_text(params: dict[str, Any], folder: Path) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=submit_command(folder), folder=str(folder), **params)


def active_job(folder: Path) -> Optional[tuple[str, str]]:
    """(job id, state) of the last job submitted for this run directory if it is still queued or running."""
    from launchers.jobs import show_job

    record = folder / "last_job"
    if not record.is_file():
        return None
    job_id = record.read_text().strip()
    if not job_id:
        return None
    info = show_job(job_id)
    state = info.get("JobState", "")
    # The same job: its log goes to this folder (job ids can repeat when a cluster's state was wiped).
    if state in ACTIVE_STATES and info.get("StdOut", "").startswith(str(folder) + os.sep):
        return job_id, state
    return None


def submit(task: Any, params: dict[str, Any], folder: Path, max_requeues: int) -> str:
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=max_requeues)
    executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    job = executor.submit(task)
    return str(job.job_id)


# ================================================================================================ main
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        return _main(args, argv)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code


def _main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    data, section = split_config(args.config)
    launcher_ov = [o[len("launcher.") :] for o in args.overrides if o.startswith("launcher.")]
    config_ov = [o for o in args.overrides if not o.startswith("launcher.")]
    lc = resolve_launcher(section, launcher_ov, args, args.config)
    if args.job == "evaluate":
        if args.nodes not in (None, 1) or args.tasks_per_node not in (None, 1):
            raise LaunchError("--job evaluate runs as one task: leave out --nodes/--tasks-per-node")
        lc.nodes, lc.tasks_per_node, lc.gpus_per_node = 1, 1, min(lc.gpus_per_node, 1)
    job = resolve_job(args.job, data, config_ov, args.config, lc.world_size, launcher=lc)
    folder = job.run_dir / SLURM_SUBDIR
    warning = check_partition(lc.partition, args.dry_run)
    if warning:
        print(warning, file=sys.stderr)
    params = sbatch_parameters(lc, job)

    if args.dry_run:
        import yaml

        print("# ---- sbatch script (dry run: nothing submitted) ----")
        print(sbatch_text(params, folder).rstrip())
        print(
            f"# ---- launcher: {args.job} job, {lc.nodes} node(s) x {lc.num_tasks_per_node} task(s) = "
            f"world size {lc.world_size} ----"
        )
        print(yaml.safe_dump(dataclasses.asdict(lc), sort_keys=False).rstrip())
        print(f"# ---- resolved {args.job} config ----")
        if job.config_yaml:
            print(job.config_yaml.rstrip())
        else:
            print(
                f"# each task runs: tools/evaluate.py {' '.join(shlex.quote(a) for a in job.overrides)} "
                f"--config {shlex.quote(str(job.config_path))}"
            )
        print(f"# ---- run directory: {job.run_dir} (logs in {folder}) ----")
        return 0

    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise LaunchError("sbatch/srun not found: run this on a Slurm login node", code=3)
    if not args.force:
        running = active_job(folder)
        if running is not None:
            raise LaunchError(
                f"job {running[0]} ({running[1]}) of run directory {job.run_dir} is still queued or "
                f"running; a second job would write the same run directory. Cancel it first "
                f"(scancel {running[0]}) or pass --force"
            )
    from launchers.jobs import SlurmTask

    folder.mkdir(parents=True, exist_ok=True)
    if job.config_yaml:
        (folder / f"{args.job}_config.yaml").write_text(job.config_yaml, encoding="utf-8")
    task = SlurmTask(
        args.job,
        job.config_yaml,
        str(job.run_dir),
        lc.max_requeues,
        overrides=job.overrides,
        config_path=job.config_path,
    )
    try:
        job_id = submit(task, params, folder, lc.max_requeues)
    except Exception as err:  # submitit raises plain errors with sbatch's message
        raise LaunchError(f"submission failed: {err}", code=3) from None
    (folder / "last_job").write_text(job_id + "\n", encoding="utf-8")
    with open(folder / "submissions.log", "a", encoding="utf-8") as f:
        f.write(
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{job_id}\t{args.job}\t{lc.nodes}x{lc.num_tasks_per_node}\t"
            f"{' '.join(shlex.quote(a) for a in argv)}\n"
        )
    log = folder / f"{job_id}_0_log.out"
    print(
        f"submitted {args.job} job {job_id}: {lc.nodes} node(s) x {lc.num_tasks_per_node} task(s), "
        f"run dir {job.run_dir}"
    )
    print(f"  follow:  squeue -j {job_id}")
    print(f"           tail -f {log}")
    print(f"  cancel:  scancel {job_id}")
    print(f"job id: {job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
