"""Export a training checkpoint as one plain file in the official layout ``{"model": sd, "ema": sd}``.

    python tools/export.py CKPT_DIR OUT.pt [--part model] [--ema ema_1 | --ema all]

``CKPT_DIR`` is a checkpoint directory (``<run_dir>/checkpoints/step_0001000``) written by either engine; a
run directory or its ``checkpoints/`` directory also works (the newest complete checkpoint is exported). The
state dicts carry the model's own (official) key names, fp32 CPU tensors, so the file loads with
``models.loading.load_into_model(model, OUT.pt, which="ema")`` — or with the official code. No process group
and no GPU are needed.

Several EMAs (``train.ema_decays``: ``ema`` is the first decay, ``ema_1`` the second, ...): ``--ema ema_1`` writes
that one under ``"ema"`` (the official layout, what sampling and evaluation load); ``--ema all`` keeps every EMA
under its own name. The default is the primary EMA.

The export is ``models.loading.export_state`` / ``save_export`` (atomic write):

* FSDP2 checkpoints (``<step>/state/.metadata``, DCP): ``<part>.model`` and ``<part>.ema`` are read with
  ``models.loading._load_our_checkpoint_dir`` (DCP's local reader, full tensors, optimizer never read).
* DeepSpeed checkpoints (``<step>/deepspeed/<part>/``): weights from DeepSpeed's
  ``get_fp32_state_dict_from_zero_checkpoint`` (fp32 master weights from the ZeRO partitions), EMA from the
  engine's ``ema.pt``; see ``core.engines.deepspeed.consolidated_state_dicts``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core.checkpoint import resolve_checkpoint_dir  # noqa: E402 - after the path set-up
from models.loading import checkpoint_engine, export_state, save_export  # noqa: E402


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt_dir", help="checkpoint directory (step_XXXXXXX), or a run / checkpoints directory")
    p.add_argument("out", help="output file (.pt)")
    p.add_argument("--part", default="model", help="trained part to export (default: model)")
    p.add_argument(
        "--ema",
        default="ema",
        help="which EMA goes under 'ema': ema (the first of train.ema_decays), ema_1, ... or 'all' (each under its "
        "own name)",
    )
    args = p.parse_args(argv)
    try:
        ckpt_dir = resolve_checkpoint_dir(args.ckpt_dir)
        state = export_state(ckpt_dir, args.part, ema=args.ema)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    out = save_export(state, args.out)
    n = sum(v.numel() for v in state["model"].values())
    print(
        f"exported {checkpoint_engine(ckpt_dir)} checkpoint {ckpt_dir} (part {args.part!r}, EMA {args.ema!r}: "
        f"{len(state['model'])} tensors, {n:,} values; entries {sorted(state)}) to {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
