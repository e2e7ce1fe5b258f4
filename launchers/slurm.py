"""Submit a training, extraction, sampling or evaluation job to Slurm (through submitit), or a whole pipeline.

    python launchers/slurm.py [train|extract|sample|evaluate] CONFIG [--nodes N] [--gpus-per-node G]
                              [--partition P] [--time MIN] [--account A] [--qos Q] [--constraint C]
                              [--after JOBID] [--profile FILE] [--no-snapshot] [--dry-run] [key=value ...]
                              [-- tool arguments (sample: tools/sample.py, evaluate: tools/evaluate.py)]
    python launchers/slurm.py pipeline PIPELINE.yaml [--nodes N] [--dry-run] [same launcher flags]

(``--job KIND`` after the config works as well.) Slurm settings come from the CLI, else from ``launcher.*``
overrides, else from a ``launcher:`` section of the config (see ``LauncherConfig``), else from the cluster profile
(launchers/config.py: ``--profile``, ``$LLAT_SLURM_PROFILE``, ``~/.config/lightning_latent/slurm.yaml``), else
from the defaults. Before anything is submitted, every input the job reads is checked (launchers/preflight.py:
all problems at once, nothing submitted when there is one) and the code is copied (launchers/snapshot.py): the
job and all its requeues run that copy. The job's logs and submitit's files go to ``<run_dir>/slurm/``
(train: ``run_dir`` of the config, default ``runs/<name>``; extract: ``out_dir``; sample:
``<run_dir>/samples/slurm``; evaluate: ``<run_dir>/eval/slurm``). ``pipeline`` submits extract -> train ->
sample -> evaluate with ``afterok`` dependencies, skipping complete stages (launchers/pipeline.py).
Each task runs ``launchers.jobs.SlurmTask``: it exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR (the first
host of the job) / MASTER_PORT (derived from the job id) from ``submitit.JobEnvironment`` and calls ``train.main``
(or ``data.extract.main``, ``tools.sample.main``, ``tools.evaluate.main``). A training job that gets the
pre-timeout signal (``--signal-delay`` seconds before its time limit), a preemption SIGTERM or an ``scontrol
requeue`` checkpoints at the next step boundary and is requeued with the same run directory, where it resumes
from the newest complete checkpoint (see launchers/jobs.py); extraction and sampling resume from what they wrote.

Exit codes: 0 submitted (or printed, with --dry-run), 2 bad arguments, configuration or preflight problems, 3 Slurm
unavailable or the submission failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

import submitit  # noqa: E402
import yaml  # noqa: E402
from submitit.slurm.slurm import _convert_mem, _make_sbatch_string  # noqa: E402

from core.checkpoint import complete_checkpoints  # noqa: E402
from core.config import ConfigError, _parse_yaml, config_to_yaml, load_typed_config, resolve_run_dir  # noqa: E402
from launchers import preflight  # noqa: E402
from launchers.config import merge_launcher, profile_path, split_profile  # noqa: E402
from launchers.experiment import load_config  # noqa: E402
from launchers.jobs import EVALUATE_ENTRY, SAMPLE_ENTRY, SlurmTask, show_job  # noqa: E402
from launchers.pipeline import PipelineError, load_pipeline, sample_paths, train_total_steps  # noqa: E402
from launchers.preflight import (  # noqa: E402
    Preflight,
    absolute,
    absolutize_extract,
    absolutize_train,
    format_problems,
)
from launchers.snapshot import git_state, snapshot_dir_name, take_snapshot  # noqa: E402

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


from launchers.config import JOB_KINDS, LauncherConfig  # noqa: E402  (the `launcher:` section of the schema)

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
def _add_launcher_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, help="number of nodes (1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node = tasks per node (8); 0 for CPU nodes")
    p.add_argument("--tasks-per-node", type=int, help="tasks per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per task (data workers + 1; else partition default)")
    p.add_argument("--mem-gb", type=float, help="memory per node in GB (partition default)")
    p.add_argument("--partition", help="Slurm partition (cluster profile, else the cluster default)")
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
    p.add_argument(
        "--setup",
        action="append",
        default=None,
        metavar="CMD",
        help="shell line to run before srun (repeatable; appended to launcher.setup)",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="cluster profile YAML (default $LLAT_SLURM_PROFILE, else ~/.config/lightning_latent/slurm.yaml; "
        "'none': none)",
    )
    p.add_argument(
        "--after",
        action="append",
        default=None,
        metavar="JOBID",
        help="start only after this job completed successfully (sbatch --dependency=afterok; repeatable)",
    )
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run this checkout as it is when the job starts (default: a copy of the code taken at submission)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launchers/slurm.py",
        description=__doc__.splitlines()[0],
        epilog="Config overrides (key=value) go after the config; launcher.KEY=VALUE sets a launcher field. "
        "sample / evaluate: tools/sample.py's / tools/evaluate.py's arguments follow `--`.",
    )
    p.add_argument("config", help="experiment YAML (train, sample, evaluate) or extraction YAML (extract)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.global_batch_size=256")
    p.add_argument("--job", choices=JOB_KINDS, default="train", help="what to run (train); or name it first")
    _add_launcher_flags(p)
    p.add_argument("--job-name", help="Slurm job name (default <job>-<config name>)")
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


# Resource defaults per job kind (below the cluster profile and the config's launcher section): the evaluation
# is one process on one GPU.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {},
    "extract": {},
    "sample": {},
    "evaluate": {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 1, "time_min": 240},
}


@dataclass
class Profile:
    path: Optional[Path]
    common: dict[str, Any]
    kinds: dict[str, dict[str, Any]]

    def layers(self, kind: str) -> list[dict[str, Any]]:
        return [self.common, self.kinds.get(kind, {})]


def load_profile(explicit: Optional[str]) -> Profile:
    """The cluster profile (launchers/config.py: ``--profile`` > ``$LLAT_SLURM_PROFILE`` > the user file), checked
    against ``LauncherConfig`` (unknown keys are errors naming the file)."""

    path = profile_path(explicit)
    if path is None:
        return Profile(None, {}, {})
    if not path.is_file():
        raise LaunchError(f"cluster profile not found: {path} (--profile or ${'LLAT_SLURM_PROFILE'}; 'none' for none)")
    try:
        common, kinds = split_profile(_parse_yaml(path.read_text(encoding="utf-8"), str(path)), str(path))
    except (ConfigError, ValueError) as err:
        raise LaunchError(str(err)) from None
    for where, layer in [("", common), *((f"kinds.{k}.", v) for k, v in kinds.items())]:
        try:
            _load_typed(layer, f"{path}: {where}", load_typed_config, [], LauncherConfig)
        except LaunchError as err:
            raise LaunchError(f"cluster profile {path}: {err}") from None
    return Profile(path, common, kinds)


def resolve_launcher(
    section: dict[str, Any],
    overrides: Sequence[str],
    args: argparse.Namespace,
    source: str,
    kind: str = "train",
    profile: Optional[Profile] = None,
    derived_defaults: Optional[dict[str, Any]] = None,
) -> LauncherConfig:
    """LauncherConfig from (lowest first) the kind's defaults, defaults derived from the job's config (CPUs per task
    from the data workers), the cluster profile (common, then per kind), the config's ``launcher:`` section, then
    ``launcher.*`` overrides, then CLI flags; validated."""

    layers = [KIND_DEFAULTS.get(kind, {}), derived_defaults or {}, *(profile.layers(kind) if profile else []), section]
    merged = merge_launcher(*layers)
    try:
        cfg: LauncherConfig = _load_typed(merged, f"{source}: launcher", load_typed_config, overrides, LauncherConfig)
    except LaunchError as err:  # overrides were given as launcher.KEY=VALUE: name them so
        raise LaunchError(
            re.sub(r"^command line: (?!launcher\.)", "command line: launcher.", str(err), flags=re.M)
        ) from None
    from_cli: set[str] = set()
    for flag, name in CLI_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(cfg, name, value)
            from_cli.add(name)
    if getattr(args, "setup", None):
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
# Path options of the tools whose arguments a sample / evaluate job passes through: made absolute at submission.
SAMPLE_PATH_OPTIONS = ("--out", "--npz", "--grid", "--ckpt", "--config", "--tokenizer", "--latent-stats")
EVALUATE_PATH_OPTIONS = ("--reference", "--weights", "--json", "--cache-dir", "--save-stats")
EVALUATE_VALUE_OPTIONS = (
    *EVALUATE_PATH_OPTIONS,
    "--config",
    "--metrics",
    "--feature-extractor",
    "--device",
    "--batch-size",
    "--num-workers",
    "--center-crop",
    "--kid-subset-size",
)


@dataclass
class ResolvedJob:
    kind: str
    name: str  # for the default job name
    run_dir: Path  # absolute; <run_dir>/slurm holds the logs
    config_yaml: str  # what the job runs (train / extract; evaluate: written to <run_dir>/slurm at submission)
    config_path: Optional[str] = None
    overrides: list[str] = dataclasses.field(default_factory=list)  # sample / evaluate: the tool's arguments
    cfg: Any = None  # the typed config (paths absolute)
    writes: str = ""  # where the job's results go (for the messages)

    @property
    def folder(self) -> Path:
        return self.run_dir / SLURM_SUBDIR


def _absolute_args(args: Sequence[str], options: Sequence[str], positional: bool = False) -> list[str]:
    """Tool arguments with the values of path ``options`` (and, with ``positional``, the first positional
    argument that is not a key=value override) made absolute."""

    out, take, seen_positional = [], False, False
    for a in args:
        if take:
            out.append(absolute(a) or a)
            take = False
            continue
        opt, eq, value = a.partition("=")
        if a.startswith("--") and opt in options:
            if eq:
                out.append(f"{opt}={absolute(value) or value}")
            else:
                out.append(a)
                take = True
            continue
        if positional and not seen_positional and not a.startswith("-") and "=" not in a:
            seen_positional = True
            out.append(absolute(a) or a)
            continue
        out.append(a)
    return out


def _option(args: Sequence[str], name: str) -> Optional[str]:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _positional(args: Sequence[str], with_value: Sequence[str]) -> Optional[str]:
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a.startswith("-"):
            skip = "=" not in a and a in with_value
            continue
        if "=" not in a:
            return a
    return None


def _experiment(data: dict[str, Any], config_path: str, overrides: Sequence[str], **kwargs):

    cfg = _load_typed(data, config_path, load_config, list(overrides), **kwargs)
    absolutize_train(cfg)
    return cfg


def resolve_job(
    kind: str,
    data: dict[str, Any],
    overrides: Sequence[str],
    config_path: str,
    world_size: int,
    launcher: Optional[LauncherConfig] = None,
    tool_args: Sequence[str] = (),
    sample_overrides: Optional[Sequence[str]] = None,
) -> ResolvedJob:
    """The job's config with every path absolute (launchers/preflight.py); ``overrides`` are the config's dotted
    overrides, ``tool_args`` the arguments passed through to tools/sample.py / tools/evaluate.py; a sample job passes
    ``sample_overrides`` (default: ``overrides``) to tools/sample.py, which applies them to the run's config."""

    if kind == "train":
        cfg = _experiment(data, config_path, overrides, world_size=world_size)
        run_dir = resolve_run_dir(cfg).expanduser().absolute()
        cfg.run_dir = str(run_dir)  # every run of the job, wherever it starts, writes here
        if launcher is not None:  # the resolved launch settings (CLI > overrides > YAML) are recorded
            cfg.launcher = launcher
        return ResolvedJob(kind, cfg.name, run_dir, config_to_yaml(cfg), cfg=cfg, writes=f"run dir {run_dir}")
    if kind == "extract":
        # lazy: data.extract loads torch and mosaicml-streaming (seconds); only an extract job's config needs it
        from data.extract import load_extract_config

        cfg = _load_typed(data, config_path, load_extract_config, list(overrides))
        absolutize_extract(cfg)
        out = Path(cfg.out_dir)
        return ResolvedJob(kind, out.name, out, config_to_yaml(cfg), cfg=cfg, writes=f"data {out}")
    cfg = _experiment(data, config_path, overrides, check=False)
    run_dir = resolve_run_dir(cfg).expanduser().absolute()
    cfg.run_dir = str(run_dir)
    if kind == "sample":  # tools/sample.py RUN_DIR [overrides] [its options], one task per GPU
        args = list(tool_args)
        num = _option(args, "--num")
        if num is None:
            raise LaunchError(
                "sample: give tools/sample.py's --num (e.g. `launchers/slurm.py sample CONFIG -- --num 50000`); "
                "--out defaults to <run_dir>/samples/fid<num> with the .npz beside it"
            )
        if _option(args, "--out") is None:
            out = run_dir / "samples" / f"fid{num}"
            args += ["--out", str(out), "--npz", str(out.with_suffix(".npz"))]
        # (no --no-progress: off a terminal the sampler writes periodic progress lines, core/progress.py)
        args = _absolute_args(args, SAMPLE_PATH_OPTIONS)
        assert SAMPLE_ENTRY.exists(), SAMPLE_ENTRY
        return ResolvedJob(
            kind,
            cfg.name,
            run_dir / "samples",
            "",
            overrides=[str(run_dir), *(overrides if sample_overrides is None else sample_overrides), *args],
            cfg=cfg,
            writes=f"samples {_option(args, '--out')}" + (f" + {_option(args, '--npz')}" if "--npz" in args else ""),
        )
    # evaluate: tools/evaluate.py SAMPLES --config <resolved config> [its options], one task

    if not EVALUATE_ENTRY.exists():
        raise LaunchError(
            f"evaluate: {EVALUATE_ENTRY.relative_to(REPO)} does not exist yet; the evaluation "
            f"job arrives with the evaluation issue"
        )
    if not tool_args:
        raise LaunchError(
            "evaluate: give tools/evaluate.py's arguments after `--`, e.g. "
            "`launchers/slurm.py evaluate CONFIG -- samples/xl.npz --json samples/xl.json`"
        )
    args = _absolute_args(tool_args, EVALUATE_PATH_OPTIONS, positional=True)
    folder = run_dir / "eval" / SLURM_SUBDIR
    return ResolvedJob(
        kind,
        cfg.name,
        run_dir / "eval",
        config_to_yaml(cfg),
        config_path=str(folder / "evaluate_config.yaml"),
        overrides=args,
        cfg=cfg,
        writes=f"metrics {_option(args, '--json') or '(printed to the log)'}",
    )


def preflight_job(job: ResolvedJob, pf: Any, source: str) -> None:
    """Add the problems of ``job``'s inputs to ``pf`` (a launchers.preflight.Preflight)."""

    if job.kind == "train":
        preflight.check_train(pf, source, job.cfg, job.run_dir)
    elif job.kind == "extract":
        preflight.check_extract(pf, source, job.cfg)
    elif job.kind == "sample":
        src = Path(job.overrides[0])
        out = Path(_option(job.overrides, "--out") or src / "samples")
        preflight.check_sample(pf, source, job.cfg, src, out)
    else:
        ev = job.cfg.eval
        args = job.overrides
        json_out = _option(args, "--json")
        preflight.check_evaluate(
            pf,
            source,
            ev,
            _positional(args, EVALUATE_VALUE_OPTIONS),
            _option(args, "--reference") or ev.reference,
            _option(args, "--weights") or ev.feature_extractor_weights,
            Path(json_out).parent if json_out and json_out != "-" else None,
        )
    pf.writable(source, "run_dir (logs)", job.folder)


def derived_launcher_defaults(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """Defaults that follow from the job's config: a CPU core per data-loading worker plus one per task."""
    if kind == "train":
        workers = (data.get("data") or {}).get("num_workers", 2)
    elif kind == "extract":
        workers = data.get("num_workers", 4)
    else:
        return {}
    try:
        return {"cpus_per_task": int(workers) + 1}
    except (TypeError, ValueError):
        return {}


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


def sbatch_parameters(
    lc: LauncherConfig, job: ResolvedJob, code: Optional[Path] = None, after: Sequence[str] = ()
) -> dict[str, Any]:
    """Keyword arguments of submitit's ``_make_sbatch_string`` (sbatch names), also given to
    ``AutoExecutor.update_parameters`` with a ``slurm_`` prefix. ``code``: the code snapshot the job runs
    (launchers/snapshot.py; None: this checkout); ``after``: job ids that must have completed successfully first
    (a failed one cancels this job: ``--kill-on-invalid-dep=yes``)."""
    code = code or REPO
    setup = [
        f"export PYTHONPATH={shlex.quote(str(code))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export PYTHONSAFEPATH=1  # the submission directory (the job's working directory) is not on sys.path",
        *lc.setup,
    ]
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
    if after:
        params["additional_parameters"]["dependency"] = "afterok:" + ":".join(str(a) for a in after)
        params["additional_parameters"]["kill_on_invalid_dep"] = "yes"
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
    return _make_sbatch_string(command=submit_command(folder), folder=str(folder), **params)


def active_job(folder: Path) -> Optional[tuple[str, str]]:
    """(job id, state) of the last job submitted for this run directory if it is still queued or running."""

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

    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=max_requeues)
    executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    job = executor.submit(task)
    return str(job.job_id)


# ================================================================================================ submission
@dataclass
class Planned:
    """One job ready to submit: its settings, resolved config and sbatch parameters."""

    kind: str
    lc: LauncherConfig
    job: ResolvedJob
    source: str  # the config (or pipeline stage) the job comes from, for messages
    status: str = "submit"  # "submit", "complete" (pipeline: skipped), "queued" (a job of it is queued/running)
    job_id: Optional[str] = None  # the job it waits for / was submitted as

    def params(self, code: Optional[Path], after: Sequence[str]) -> dict[str, Any]:
        return sbatch_parameters(self.lc, self.job, code, after)


def preview_code_dir(folder: Path) -> Path:

    return folder / "code" / snapshot_dir_name(git_state(REPO))


def print_dry_run(plan: Planned, after: Sequence[str], code: Path) -> None:

    job, lc, folder = plan.job, plan.lc, plan.job.folder
    print(f"# ---- sbatch script of the {plan.kind} job (dry run: nothing submitted) ----")
    print(sbatch_text(plan.params(code, after), folder).rstrip())
    print(
        f"# ---- launcher: {plan.kind} job, {lc.nodes} node(s) x {lc.num_tasks_per_node} task(s) = "
        f"world size {lc.world_size} ----"
    )
    print(yaml.safe_dump(dataclasses.asdict(lc), sort_keys=False).rstrip())
    print(f"# ---- resolved {plan.kind} config ----")
    if job.config_yaml:
        print(job.config_yaml.rstrip())
    if job.kind in ("sample", "evaluate"):
        tool = "tools/sample.py" if job.kind == "sample" else "tools/evaluate.py"
        extra = f" --config {shlex.quote(str(job.config_path))}" if job.kind == "evaluate" else ""
        print(f"# each task runs: {tool} {' '.join(shlex.quote(a) for a in job.overrides)}{extra}")
    print(f"# ---- run directory: {job.run_dir} (logs in {folder}); writes {job.writes} ----")
    print(f"# ---- code: a snapshot of {REPO} at submission, in {code} ----")


def submit_planned(plan: Planned, code: Optional[Path], after: Sequence[str], argv_text: str, snapshot: dict) -> str:

    job, lc, folder = plan.job, plan.lc, plan.job.folder
    folder.mkdir(parents=True, exist_ok=True)
    if job.config_yaml:
        name = "evaluate_config.yaml" if job.kind == "evaluate" else f"{job.kind}_config.yaml"
        (folder / name).write_text(job.config_yaml, encoding="utf-8")
    task = SlurmTask(
        job.kind,
        job.config_yaml if job.kind in ("train", "extract") else "",
        str(job.run_dir),
        lc.max_requeues,
        overrides=job.overrides,
        config_path=job.config_path,
    )
    params = plan.params(code, after)
    try:
        job_id = submit(task, params, folder, lc.max_requeues)
    except Exception as err:  # submitit raises plain errors with sbatch's message
        raise LaunchError(f"submission failed: {err}", code=3) from None
    (folder / "last_job").write_text(job_id + "\n", encoding="utf-8")
    with open(folder / "submissions.log", "a", encoding="utf-8") as f:
        f.write(
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{job_id}\t{job.kind}\t{lc.nodes}x{lc.num_tasks_per_node}\t"
            f"code {snapshot.get('path', REPO)} (commit {snapshot.get('commit')}"
            f"{', uncommitted changes' if snapshot.get('dirty') else ''})\t{argv_text}\n"
        )
    plan.job_id = job_id
    return job_id


def _take_snapshot(parent: Path, enabled: bool) -> tuple[Optional[Path], dict[str, Any]]:
    if not enabled:
        return None, {**git_state(REPO), "path": str(REPO)}

    try:
        return take_snapshot(REPO, parent)
    except OSError as err:
        raise LaunchError(f"cannot copy the code snapshot to {parent}: {err} (or pass --no-snapshot)") from None


def _partition_problem(pf: Any, lc: LauncherConfig, dry_run: bool) -> None:
    try:
        warning = check_partition(lc.partition, dry_run)
    except LaunchError as err:
        if err.code != 2:  # Slurm cannot be reached: reported after the input problems (launch_refusal)
            pf.unreachable = err
            return
        pf.problem("launcher", "partition", str(err).removeprefix("--partition: "), "pick one of the partitions")
        return
    if warning:
        print(warning, file=sys.stderr)


def warn_dry_run_problems(pf: Any) -> None:
    """A dry run prints the preflight problems that a submission would refuse with (on stderr, after the scripts)."""
    if pf.problems:
        print(
            format_problems(pf.problems).replace("nothing was submitted", "a submission would refuse"), file=sys.stderr
        )


def launch_refusal(pf: Any) -> Optional[LaunchError]:
    """The error that stops a submission: every preflight problem (exit code 2), else Slurm out of reach (3)."""

    unreachable = getattr(pf, "unreachable", None)
    if pf.problems:
        note = f"\n(also: {unreachable})" if unreachable is not None else ""
        return LaunchError(format_problems(pf.problems) + note)
    return unreachable


def _require_slurm() -> None:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise LaunchError("sbatch/srun not found: run this on a Slurm login node", code=3)


# ================================================================================================ main
COMMANDS = ("train", "extract", "sample", "evaluate", "pipeline")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS and not Path(argv[0]).is_file() else None
    try:
        if command == "pipeline":
            args = build_pipeline_parser().parse_intermixed_args(argv)
            return pipeline_main(args, argv)
        dash = "--" in argv
        tool_args = argv[argv.index("--") + 1 :] if dash else []
        args = build_parser().parse_intermixed_args(argv[: argv.index("--")] if dash else argv)
        if command is not None:
            args.job = command
        return _main(args, argv, tool_args, dash)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code


def _main(args: argparse.Namespace, argv: Sequence[str], tool_args: list[str], dash: bool) -> int:

    data, section = split_config(args.config)
    launcher_ov = [o[len("launcher.") :] for o in args.overrides if o.startswith("launcher.")]
    config_ov = [o for o in args.overrides if not o.startswith("launcher.")]
    if args.job == "evaluate" and not dash:  # `--job evaluate CONFIG samples.npz ...`: all of it is the tool's
        tool_args, config_ov = config_ov, []
    profile = load_profile(args.profile)
    lc = resolve_launcher(
        section,
        launcher_ov,
        args,
        args.config,
        kind=args.job,
        profile=profile,
        derived_defaults=derived_launcher_defaults(args.job, data),
    )
    if args.job == "evaluate":
        if args.nodes not in (None, 1) or args.tasks_per_node not in (None, 1):
            raise LaunchError("--job evaluate runs as one task: leave out --nodes/--tasks-per-node")
        lc.nodes, lc.tasks_per_node, lc.gpus_per_node = 1, 1, min(lc.gpus_per_node, 1)
    job = resolve_job(args.job, data, config_ov, args.config, lc.world_size, launcher=lc, tool_args=tool_args)
    pf = Preflight()
    _partition_problem(pf, lc, args.dry_run)
    preflight_job(job, pf, args.config)
    plan = Planned(args.job, lc, job, args.config)
    after = list(args.after or [])
    folder = job.folder

    if args.dry_run:
        print_dry_run(plan, after, REPO if args.no_snapshot else preview_code_dir(folder))
        if profile.path:
            print(f"# ---- cluster profile: {profile.path} ----")
        warn_dry_run_problems(pf)
        return 0
    refusal = launch_refusal(pf)
    if refusal is not None:
        raise refusal
    _require_slurm()
    if not args.force:
        running = active_job(folder)
        if running is not None:
            raise LaunchError(
                f"job {running[0]} ({running[1]}) of run directory {job.run_dir} is still queued or "
                f"running; a second job would write the same run directory. Cancel it first "
                f"(scancel {running[0]}) or pass --force"
            )
    code, snap = _take_snapshot(folder / "code", not args.no_snapshot)
    job_id = submit_planned(plan, code, after, " ".join(shlex.quote(a) for a in argv), snap)
    log = folder / f"{job_id}_0_log.out"
    print(
        f"submitted {args.job} job {job_id}: {lc.nodes} node(s) x {lc.num_tasks_per_node} task(s), "
        f"run dir {job.run_dir}" + (f", after {', '.join(after)}" if after else "")
    )
    print(f"  writes:  {job.writes}")
    print(f"  code:    {snap.get('path')} (commit {snap.get('commit')})")
    print(f"  follow:  squeue -j {job_id}")
    print(f"           tail -f {log}")
    print(f"  cancel:  scancel {job_id}")
    print(f"job id: {job_id}")
    return 0


# ================================================================================================ pipeline
def build_pipeline_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launchers/slurm.py pipeline",
        description="Submit extract -> train -> sample -> evaluate as chained jobs (launchers/pipeline.py).",
    )
    p.add_argument("pipeline", help="pipeline YAML, e.g. configs/pipeline_imagenet_xl.yaml")
    _add_launcher_flags(p)
    p.set_defaults(job_name=None)
    p.add_argument("--dry-run", action="store_true", help="print every stage's sbatch script; submit nothing")
    return p


def plan_pipeline(args: argparse.Namespace, pf: Any) -> tuple[Any, list[Planned]]:
    """Resolve every stage; mark the complete ones and those with a job still queued/running; preflight the
    others (outputs of earlier stages count as present)."""

    try:
        pc = load_pipeline(args.pipeline)
    except PipelineError as err:
        raise LaunchError(str(err)) from None
    profile = load_profile(args.profile)
    plans: list[Planned] = []
    data_dir: Optional[Path] = None

    def launcher_for(kind: str, section: dict[str, Any], stage_lc: dict[str, Any], source: str, data):
        lc = resolve_launcher(
            merge_launcher(section, pc.launcher, stage_lc),
            [],
            args,
            source,
            kind=kind,
            profile=profile,
            derived_defaults=derived_launcher_defaults(kind, data),
        )
        if kind == "evaluate":
            lc.nodes, lc.tasks_per_node, lc.gpus_per_node = 1, 1, min(lc.gpus_per_node, 1)
        return lc

    if "extract" in pc.stages:
        st = pc.stages["extract"]
        data, section = split_config(st.config)
        lc = launcher_for("extract", section, st.launcher, st.config, data)
        job = resolve_job("extract", data, st.overrides, st.config, lc.world_size, lc)
        data_dir = job.run_dir
        done = (data_dir / "manifest.json").is_file() and (data_dir / "index.json").is_file()
        plans.append(Planned("extract", lc, job, f"stages.extract ({st.config})", "complete" if done else "submit"))
    st = pc.stages["train"]
    tdata, tsection = split_config(st.config)
    tov = list(st.overrides)
    if data_dir is not None and not any(o.startswith("data.path=") for o in tov):
        tov.insert(0, f"data.path={data_dir}")
    lc = launcher_for("train", tsection, st.launcher, st.config, tdata)
    job = resolve_job("train", tdata, tov, st.config, lc.world_size, lc)
    run_dir = job.run_dir
    total = train_total_steps(job.cfg, lc.world_size)
    ckpts = complete_checkpoints(run_dir / "checkpoints")
    done = total is not None and bool(ckpts) and ckpts[-1][0] >= total
    plans.append(Planned("train", lc, job, f"stages.train ({st.config})", "complete" if done else "submit"))
    if "sample" in pc.stages:
        ss = pc.stages["sample"]
        folder, npz, metrics = sample_paths(ss, run_dir)
        o = ss.options
        tool = ["--num", str(o.get("num", 50000)), "--out", str(folder), "--npz", str(npz)]
        tool += ["--batch-size", str(o.get("batch_size", 64)), "--seed", str(o.get("seed", 0))]
        tool += ["--labels", str(o.get("labels", "uniform")), "--which", str(o.get("which", "ema"))]
        lc = launcher_for("sample", tsection, ss.launcher, st.config, tdata)
        job = resolve_job(
            "sample", tdata, [*tov, *ss.overrides], st.config, lc.world_size, lc, tool, sample_overrides=ss.overrides
        )
        plans.append(Planned("sample", lc, job, "stages.sample", "complete" if npz.is_file() else "submit"))
        if "evaluate" in pc.stages:
            es = pc.stages["evaluate"]
            # --run-dir: the result is the run's final evaluation (eval/final.json, its W&B run, the leaderboard's
            # "FID final" beside the in-loop FID; models/evaluation/final.py)
            tool = [str(npz), "--json", str(metrics), "--run-dir", str(run_dir)]
            tool += [str(a) for a in es.options.get("args", [])]
            if "--quiet" not in tool:
                tool.append("--quiet")
            lc = launcher_for("evaluate", tsection, es.launcher, st.config, tdata)
            job = resolve_job("evaluate", tdata, [*tov, *ss.overrides], st.config, 1, lc, tool_args=tool)
            done = metrics.is_file()
            plans.append(Planned("evaluate", lc, job, "stages.evaluate", "complete" if done else "submit"))

    for plan in plans:
        if plan.status == "complete":
            continue
        running = active_job(plan.job.folder) if shutil.which("scontrol") else None
        if running is not None:
            plan.status, plan.job_id = "queued", running[0]
        else:
            preflight_job(plan.job, pf, plan.source)
        outputs = [plan.job.run_dir]
        if plan.kind == "sample":
            outputs = [
                Path(_option(plan.job.overrides, "--out") or ""),
                Path(_option(plan.job.overrides, "--npz") or ""),
            ]
        elif plan.kind == "evaluate":
            outputs = [Path(_option(plan.job.overrides, "--json") or "")]
        for out in outputs:
            pf.add_produced(out, f"the {plan.kind} stage")
    if plans:
        _partition_problem(pf, plans[0].lc, args.dry_run)
    return pc, plans


def pipeline_main(args: argparse.Namespace, argv: Sequence[str]) -> int:

    pf = Preflight()
    pc, plans = plan_pipeline(args, pf)
    train = next(p for p in plans if p.kind == "train")
    state_dir = train.job.run_dir / "pipeline"
    after = list(args.after or [])
    if args.dry_run:
        code = REPO if args.no_snapshot else preview_code_dir(state_dir)
        deps = after
        for plan in plans:
            print(f"# ======== stage {plan.kind}: {plan.status}{f' (job {plan.job_id})' if plan.job_id else ''}")
            if plan.status == "submit":
                print_dry_run(plan, deps, code)
                deps = [f"<{plan.kind} job>"]
            else:
                print(f"# writes {plan.job.writes}")
                if plan.status == "queued":
                    deps = [str(plan.job_id)]
        warn_dry_run_problems(pf)
        return 0
    refusal = launch_refusal(pf)
    if refusal is not None:
        raise refusal
    if any(p.status == "submit" for p in plans):
        _require_slurm()
        code, snap = _take_snapshot(state_dir / "code", not args.no_snapshot)
    else:
        code, snap = None, {}
    argv_text = "pipeline " + " ".join(shlex.quote(a) for a in argv)
    deps = after
    record: dict[str, Any] = {"pipeline": str(Path(args.pipeline).absolute()), "name": pc.name, "stages": {}}
    print(f"pipeline {pc.name}: {len(plans)} stage(s)")
    for plan in plans:
        if plan.status == "complete":
            print(f"  {plan.kind:<9} complete, skipped           writes {plan.job.writes}")
        elif plan.status == "queued":
            print(f"  {plan.kind:<9} job {plan.job_id} still queued/running, kept  writes {plan.job.writes}")
            deps = [plan.job_id]
        else:
            job_id = submit_planned(plan, code, deps, argv_text, snap)
            dep_text = f" after {':'.join(deps)}" if deps else ""
            print(
                f"  {plan.kind:<9} submitted job {job_id}{dep_text}  writes {plan.job.writes}; logs {plan.job.folder}"
            )
            deps = [job_id]
        record["stages"][plan.kind] = {"status": plan.status, "job_id": plan.job_id, "writes": plan.job.writes}
    if snap:
        record["code"] = snap
        print(f"  code: {snap.get('path')} (commit {snap.get('commit')})")
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "submissions.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")
    ids = " ".join(f"{p.kind}={p.job_id}" for p in plans if p.job_id)
    print(f"job ids: {ids}" if ids else "job ids: (none: every stage is complete)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
