"""Entry point of one training process: parse and validate the config, build the task and the trainer, train, clean up.

Run it through a launcher, e.g. `python launchers/local.py --nproc 2 configs/tiny_dit.yaml [key=value ...]`
(or torchrun / Slurm); a single process also works: `python train.py configs/tiny_dit.yaml`.
Exit codes: 0 finished, 75 stopped on SIGTERM/SIGUSR1 after writing a checkpoint (requeue me),
2 bad configuration or a run directory that another live job owns (core/joblock.py).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.global_batch_size=256")
    args = parser.parse_args(argv)

    # lazy: --help and argument errors answer in ~30 ms without torch, and a rank arms its launcher-death signal
    # before the seconds of importing torch below
    from core.joblock import RunDirBusy, RunDirLock, exit_with_launcher

    exit_with_launcher()  # a rank of launchers/local.py ends with its launcher

    # lazy: the config and training stack (torch), after exit_with_launcher
    from core.config import ConfigError, resolve_run_dir
    from core.distributed import broadcast_object, init_distributed, teardown
    from core.metrics import setup_console_logging
    from core.trainer import Trainer
    from launchers.experiment import load_config, validate
    from models.tasks import build_task

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    dist = init_distributed()
    setup_console_logging(dist.rank)
    trainer = None
    lock = None
    try:
        # One job per run directory: rank 0 holds its lock for the whole training (core/joblock.py).
        busy = None
        if dist.is_main:
            try:
                lock = RunDirLock(resolve_run_dir(cfg)).acquire()
            except RunDirBusy as err:
                busy = str(err)
        busy = broadcast_object(busy)
        if busy:
            print(f"error: {busy}", file=sys.stderr)
            return 2
        try:
            validate(cfg, world_size=dist.world_size)
            trainer = Trainer(cfg, dist, build_task(cfg, dist))
        except (ConfigError, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        result = trainer.train()
        return result.exit_code
    finally:
        if trainer is not None:
            trainer.close()
        if lock is not None:
            lock.release()
        teardown()


if __name__ == "__main__":
    sys.exit(main())
