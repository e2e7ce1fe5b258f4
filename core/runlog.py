"""Reading a run's logs back: W&B run files (offline or the local copy of an online run), the W&B API, and the
trainer's own ``metrics.jsonl`` / ``config.yaml`` / ``eval/step_*.json``. Model-agnostic: a run is its config,
its history (step -> logged values) and its summary; ``models/evaluation/leaderboard.py`` ranks them.

Sources, for a run directory (``read_run_dir``):

1. W&B run files: ``<run_dir>/wandb/offline-run-*/run-<id>.wandb`` (offline mode) and
   ``<run_dir>/wandb/run-*/run-<id>.wandb`` (the local copy an online run keeps). These binary files are the only
   place an offline run keeps its data (W&B writes no ``wandb-summary.json`` / ``config.yaml`` for offline runs),
   so they are read directly: a LevelDB-log container (7-byte header ``:W&B`` + magic 0xBEE1 + version 0; 32 KiB
   blocks of records ``crc32 (zlib, seeded with the type byte) | length u16 | type u8 | data``, types
   FULL/FIRST/MIDDLE/LAST) of ``wandb.proto.wandb_internal_pb2.Record`` messages. The run, config, history and
   summary records are used; a truncated tail (a killed process) ends the scan quietly. The files of a
   resumed run (one per start, same run id) are merged in time order; a later value for a step wins.
2. Fallback when a run has no readable W&B file (``wandb.mode=disabled``, or a format this reader does not
   know): ``<run_dir>/metrics.jsonl`` and ``<run_dir>/config.yaml``, written by the trainer next to ``wandb/``.
3. Always, when present: ``<run_dir>/eval/step_*.json``, the records of the in-loop evaluation (``RunData.evals``),
   and ``<run_dir>/eval/final.json``, the final evaluation (``tools/evaluate.py --run-dir``; ``RunData.final``).

An online project (``read_online_project``) is read with ONE query (``wandb.Api().runs``): config and summary of
every run, de-duplicated by run id. The trainer's summary holds what the leaderboard needs without a history query
(core/metrics.py): ``best/*`` (every ``eval/*`` value of the best in-loop evaluation, its step and epoch), ``epoch``
and ``_step`` (the last logged), ``final/*`` (the final evaluation).
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

__all__ = ["RunData", "discover_runs", "read_offline_run", "read_online_project", "read_run_dir", "read_wandb_records"]

LEVELDB_HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
BLOCK = 32768
W_AND_B_IDENT, W_AND_B_MAGIC = b":W&B", 0xBEE1
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


# ------------------------------------------------------------------------------------------ .wandb files
def read_wandb_records(path: Path) -> Iterator[bytes]:
    """Payloads of a ``.wandb`` file (LevelDB log format, see the module doc); stops at a truncated or corrupt
    tail. Raises ValueError when the file header is not W&B's."""
    data = Path(path).read_bytes()
    if len(data) < LEVELDB_HEADER.size:
        raise ValueError(f"{path}: too short for a W&B run file")
    ident, magic, version = LEVELDB_HEADER.unpack_from(data, 0)
    if ident != W_AND_B_IDENT or magic != W_AND_B_MAGIC or version != 0:
        raise ValueError(f"{path}: not a W&B run file (header {ident!r} {magic:#x} v{version})")
    pos = LEVELDB_HEADER.size
    pending: Optional[bytearray] = None
    while True:
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER.size:  # block trailer: zero padding
            pos += left
        if pos + RECORD_HEADER.size > len(data):
            return
        checksum, length, kind = RECORD_HEADER.unpack_from(data, pos)
        start, end = pos + RECORD_HEADER.size, pos + RECORD_HEADER.size + length
        if end > len(data) or kind not in (FULL, FIRST, MIDDLE, LAST):
            return
        payload = data[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            return
        pos = end
        if kind == FULL:
            pending = None
            yield payload
        elif kind == FIRST:
            pending = bytearray(payload)
        elif pending is not None:
            pending += payload
            if kind == LAST:
                yield bytes(pending)
                pending = None


def _item_path(item: Any) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _set_path(d: dict, path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        nxt = d.get(part)
        if not isinstance(nxt, dict):
            nxt = d[part] = {}
        d = nxt
    d[path[-1]] = value


def _json(value_json: str) -> Any:
    try:
        return json.loads(value_json)
    except (TypeError, ValueError):
        return value_json


@dataclass
class RunData:
    """Everything the leaderboard needs of one run."""

    run_id: str
    name: str
    source: str  # where it was read from
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> metrics logged at that step
    summary: dict[str, Any] = field(default_factory=dict)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> eval/step_*.json record
    final: dict[str, Any] = field(default_factory=dict)  # the final evaluation: metric -> value (eval/final.json)
    run_dir: Optional[str] = None


def read_offline_run(wandb_file: Path, into: Optional[RunData] = None) -> RunData:
    """Config, history and summary of one ``.wandb`` file (merged into ``into`` when given)."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = into or RunData(run_id="", name="", source=str(wandb_file))
    for payload in read_wandb_records(wandb_file):
        rec = pb.Record()
        try:
            rec.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - an unknown record is skipped
            continue
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.run_id = rec.run.run_id or run.run_id
            run.name = rec.run.display_name or run.name or rec.run.run_id
            for item in rec.run.config.update:
                _set_path(run.config, _item_path(item), _json(item.value_json))
            run.summary.setdefault("_tags", list(rec.run.tags))
        elif kind == "config":
            for item in rec.config.update:
                _set_path(run.config, _item_path(item), _json(item.value_json))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                path = _item_path(item)
                if len(path) == 1:
                    row[path[0]] = _json(item.value_json)
            step = row.get("_step", rec.history.step.num if rec.history.HasField("step") else None)
            if step is None:
                continue
            run.history.setdefault(int(step), {}).update({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "summary":
            for item in rec.summary.update:
                _set_path(run.summary, _item_path(item), _json(item.value_json))
    return run


def _start_stamp(f: Path) -> str:
    """``20250101_120000`` of ``.../offline-run-20250101_120000-<id>/run-<id>.wandb`` (sorts in time order)."""
    parts = f.parent.name.split("-")
    return parts[-2] if len(parts) >= 3 else ""


def read_run_dir(run_dir: Path) -> Optional[RunData]:
    """A run directory: its W&B files (merged per run id; the newest id when several), else metrics.jsonl +
    config.yaml; plus eval/step_*.json. None when nothing readable is there."""
    run_dir = Path(run_dir)
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb")) + list(run_dir.glob("wandb/run-*/run-*.wandb"))
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(f.stem[len("run-") :], []).append(f)
    id_file = run_dir / "wandb_run_id"
    wanted = id_file.read_text().strip() if id_file.is_file() else None
    if wanted not in groups:  # no id file: the run id whose newest start is the most recent
        wanted = max(groups, key=lambda k: max(_start_stamp(f) for f in groups[k]), default=None)
    run: Optional[RunData] = None
    for f in sorted(groups.get(wanted, []), key=_start_stamp):
        try:
            run = read_offline_run(f, into=run)
        except (ValueError, OSError) as err:
            print(f"warning: {f}: {err}", file=sys.stderr)
    if run is not None:
        run.source = str(run_dir / "wandb")
        run.run_id = run.run_id or wanted
    if run is not None and not run.history:
        run = None  # nothing logged: fall back to the trainer's own files
    if run is None:
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            return None
        run = RunData(
            run_id=(run_dir / "wandb_run_id").read_text().strip()
            if (run_dir / "wandb_run_id").exists()
            else run_dir.name,
            name=run_dir.name,
            source=str(metrics),
        )
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            step = rec.pop("step", None)
            if step is not None:
                run.history.setdefault(int(step), {}).update(rec)
        cfg_file = run_dir / "config.yaml"
        if cfg_file.is_file():
            run.config = yaml.safe_load(cfg_file.read_text()) or {}
            run.name = run.config.get("name") or run.name
    run.run_dir = str(run_dir)
    for f in sorted(run_dir.glob("eval/step_*.json")):
        try:
            rec = json.loads(f.read_text())
            run.evals[int(rec["step"])] = rec
        except (ValueError, KeyError, OSError):
            continue
    run.final = final_metrics(run.summary)
    final_file = run_dir / "eval" / "final.json"
    if final_file.is_file():
        try:
            run.final.update(json.loads(final_file.read_text()).get("metrics") or {})
        except (ValueError, OSError, AttributeError) as err:
            print(f"warning: {final_file}: {err}", file=sys.stderr)
    return run


def final_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """``final/<metric>`` values of a W&B summary, as metric -> value."""
    return {k[len("final/") :]: v for k, v in summary.items() if k.startswith("final/")}


def discover_runs(roots: Sequence[Path]) -> list[RunData]:
    """Every run directory under ``roots`` (a directory holding ``wandb/`` run files or ``metrics.jsonl``)."""
    dirs: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            print(f"warning: {root} does not exist", file=sys.stderr)
            continue
        for f in root.rglob("*.wandb"):
            if f.parent.parent.name == "wandb":
                dirs.add(f.parent.parent.parent.resolve())
        for f in root.rglob("metrics.jsonl"):
            dirs.add(f.parent.resolve())
    runs = []
    for d in sorted(dirs):
        run = read_run_dir(d)
        if run is not None:
            runs.append(run)
    return runs


def read_online_project(path: str, max_runs: int = 500) -> list[RunData]:
    """Runs of a W&B project ``entity/project`` through the public API (needs network access and an API key), with
    one query for the whole project: config and summary of each run (de-duplicated by run id); the history is
    rebuilt from the summary: the best in-loop evaluation (``best/*`` at ``best/step``) and the last step."""
    import wandb

    api = wandb.Api()
    out: dict[str, RunData] = {}
    for r in api.runs(path, per_page=min(max_runs, 1000)):
        if len(out) >= max_runs:
            break
        if r.id in out:  # a run listed twice (pages shifted while reading)
            continue
        summary = dict(r.summary)
        run = RunData(run_id=r.id, name=r.name, source=f"wandb:{path}/{r.id}", config=dict(r.config), summary=summary)
        best_step = summary.get("best/step")
        if isinstance(best_step, (int, float)):
            row = {f"eval/{k[len('best/') :]}": v for k, v in summary.items() if k.startswith("best/")}
            row["epoch"] = summary.get("best/epoch")
            run.history[int(best_step)] = {k: v for k, v in row.items() if k not in ("eval/step", "eval/epoch")}
        last = summary.get("_step")
        if isinstance(last, (int, float)):
            run.history.setdefault(int(last), {}).setdefault("epoch", summary.get("epoch"))
        run.final = final_metrics(summary)
        out[r.id] = run
    return list(out.values())
