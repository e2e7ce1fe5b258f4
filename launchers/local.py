"""Start the ranks of a training job on this machine through torch's elastic launcher.

    python launchers/local.py --nproc 2 configs/tiny_dit.yaml [key=value ...]

Each rank runs `train.py CONFIG [overrides]` with the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT, ...). The launcher's exit code is 0 when every rank finished, 75 when the job
stopped on a signal after checkpointing (requeue), 2 when another live job owns the run directory, otherwise the
first failing rank's code.

One job per run directory (core/joblock.py): the launcher refuses to start when a live job holds the run
directory's lock (rank 0 of a training holds it), naming that job; its ranks get ``LLAT_LAUNCHER_PID`` and ask the
kernel to kill them when the launcher dies (even by SIGKILL, which torch's elastic agent cannot pass on).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository's packages
    sys.path.insert(0, str(REPO))

from core.joblock import LAUNCHER_PID_ENV, lock_owner  # noqa: E402

REQUEUE_EXIT_CODE = 75


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run a training job with N local processes.")
    p.add_argument("--nproc", type=int, default=1, help="processes (ranks) to start on this machine")
    p.add_argument("--entry", default=str(REPO / "train.py"), help="script each rank runs")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    if not Path(args.config).is_file():
        p.error(f"config file not found: {args.config}")
    return args


def _run_dir_owner(config: str, overrides: list[str]) -> str | None:
    """The refusal message when a live job owns the run directory of this experiment, else None (also when the
    config does not load: the ranks report that)."""
    # lazy: --help and argument errors answer without the config machinery and torch (experiment -> models)
    from core.config import ConfigError, resolve_run_dir
    from launchers.experiment import load_config

    try:
        cfg = load_config(config, overrides, check=False)
    except (ConfigError, OSError):
        return None
    return lock_owner(resolve_run_dir(cfg))


def main(argv=None) -> int:
    args = parse_args(argv)
    owner = _run_dir_owner(args.config, args.overrides)
    if owner:
        print(f"error: {owner}", file=sys.stderr)
        return 2
    # lazy: torch only once the arguments are good and the run directory is free (--help answers in ~40 ms)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=args.nproc,
        run_id=f"llat-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the ranks exit when this process dies (core/joblock.py)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # SIGUSR1/SIGUSR2 to the launcher are forwarded to the ranks, which checkpoint and exit 75.
    from torch.distributed.elastic.multiprocessing.api import SignalException  # lazy: torch after argument checks

    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda s, f: _forward(s, args.entry))
    try:
        elastic_launch(config, entrypoint=sys.executable)(args.entry, args.config, *args.overrides)
    except SignalException as err:
        # SIGTERM/SIGINT to the launcher: torchelastic passes SIGTERM on to the ranks and gives them time
        # to checkpoint at their next step boundary before it stops them.
        print(f"launcher stopped by {err.sigval!r}; the ranks checkpointed if they could", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        # A requeue: some rank exited 75 and the others exited 75 too or were stopped by the agent.
        if REQUEUE_EXIT_CODE in codes and all(c == REQUEUE_EXIT_CODE or c < 0 for c in codes):
            return REQUEUE_EXIT_CODE
        for rank, failure in sorted(err.failures.items()):
            print(f"rank {rank} failed with exit code {failure.exitcode}", file=sys.stderr)
        return next((c for c in codes if c not in (0, REQUEUE_EXIT_CODE)), codes[0] if codes else 1)
    return 0


def _forward(sig, entry: str) -> None:
    """Send `sig` to the rank processes only (not to data-loader workers or helpers)."""
    import psutil

    for child in psutil.Process().children(recursive=False):
        try:
            if any(entry in part for part in child.cmdline()):
                child.send_signal(sig)
        except psutil.Error:
            pass


if __name__ == "__main__":
    sys.exit(main())
