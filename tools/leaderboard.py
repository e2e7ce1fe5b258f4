"""Leaderboard of training runs by their best in-loop FID: a table, a Markdown file and a plot of FID vs epochs.

    python tools/leaderboard.py                         # every run under runs/
    python tools/leaderboard.py runs /scratch/runs --out leaderboard/      # several roots
    python tools/leaderboard.py --project my-team/lightning-latent         # a W&B project (online, needs the API)
    python tools/leaderboard.py runs --log-project my-team/leaderboards    # also log the table as a wandb.Table

Offline sources, for every run directory found under the roots: its W&B run files (``wandb/*/run-*.wandb``, read
directly, also for offline runs), else the trainer's ``metrics.jsonl`` + ``config.yaml``; always, when present,
the in-loop evaluation's ``eval/step_*.json`` (core/runlog.py). The run's row shows its best (lowest) FID and the
IS, precision and recall of that same evaluation; runs without an FID are listed last
(models/evaluation/leaderboard.py). Beside the in-loop FID: the final evaluation (``tools/evaluate.py --run-dir``),
``FID final``. A project is read with one API query (summaries); a run found both in a run directory and online is
one row. Writes ``leaderboard.md``, ``leaderboard.json`` and ``fid_vs_epochs.png``; ``--log-project`` also logs the
table to W&B as a ``wandb.Table`` (``--log-mode offline``: files only, ``wandb sync`` them later).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.evaluation.leaderboard import (
    collect_runs,
    format_table,
    log_wandb_table,
    rank_rows,
    summarize_emas,
    write_leaderboard,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("roots", nargs="*", type=Path, help="directories searched for runs (default: runs)")
    p.add_argument(
        "--project", action="append", default=[], help="also read a W&B project entity/project through the API (online)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for leaderboard.md, leaderboard.json and fid_vs_epochs.png (default: first root)",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--log-project", default=None, help="log the table as a wandb.Table to this [entity/]project")
    p.add_argument("--log-mode", choices=("online", "offline"), default="online", help="W&B mode of --log-project")
    args = p.parse_args(argv)
    roots = args.roots or ([] if args.project else [Path("runs")])
    runs = collect_runs(roots, args.project)
    if not runs:
        print("no runs found under " + ", ".join(map(str, roots)) if roots else "no runs found", file=sys.stderr)
        return 1
    rows = rank_rows([row for r in runs for row in summarize_emas(r)])
    print(format_table(rows))
    out = args.out or (roots[0] if roots else Path("."))
    written = write_leaderboard(rows, out, plot=not args.no_plot)
    print("\nwrote " + ", ".join(map(str, written)))
    if args.log_project:
        entity, _, project = args.log_project.rpartition("/")
        run_dir = log_wandb_table(rows, project, entity or None, mode=args.log_mode, out_dir=out)
        print(f"logged the table to W&B ({args.log_mode}): {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
