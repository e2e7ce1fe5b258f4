"""Leaderboard of training runs by their best in-loop FID: a table, a Markdown file and a plot of FID vs epochs.

    python tools/leaderboard.py                         # every run under runs/
    python tools/leaderboard.py runs /scratch/runs --out leaderboard/      # several roots
    python tools/leaderboard.py --project my-team/lightning-latent         # a W&B project (online, needs the API)

Offline sources, for every run directory found under the roots:

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
3. Always, when present: ``<run_dir>/eval/step_*.json``, written by the in-loop evaluation (tokenizer, sampler
   description, reference).

Per run: every in-loop evaluation (``eval/fid`` ...) with its step; epochs come from the trainer's ``epoch``
metric (epoch = step / steps_per_epoch). The run's row shows its best (lowest) FID and the IS, precision and
recall of that same evaluation. Runs without an FID are listed last.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

__all__ = ["RunData", "Row", "describe_sampling", "read_wandb_records", "read_offline_run", "read_run_dir",
           "discover_runs", "read_online_project", "summarize", "rank_rows", "format_table", "markdown_table",
           "plot_fid", "main"]

LEVELDB_HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
BLOCK = 32768
W_AND_B_IDENT, W_AND_B_MAGIC = b":W&B", 0xBEE1
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
METRIC_KEYS = ("fid", "sfid", "is", "kid", "precision", "recall")


# ------------------------------------------------------------------------------------------ sampler text
def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def describe_sampling(s: Any) -> str:
    """One line for a sampling config (dataclass or dict): e.g. ``euler 250pt shift 0.3 cfg 6.7 (t>=0.125, 3ch)``."""
    method = _get(s, "method", "euler")
    text = f"{method}"
    if method == "dopri5":
        text += f" atol {_get(s, 'atol', 1e-6):g} rtol {_get(s, 'rtol', 1e-3):g}"
    else:
        text += f" {_get(s, 'num_steps', 250)}pt"
    shift = float(_get(s, "timestep_shift", 1.0))
    if shift != 1.0 and method != "dopri5":
        text += f" shift {shift:g}"
    scale = float(_get(s, "cfg_scale", 1.0))
    if scale > 1.0:
        start = float(_get(s, "cfg_interval_start", 0.0))
        details = ([f"t>={start:g}"] if start > 0 else []) + (
            ["3ch"] if _get(s, "guidance_mode", "official") == "official" else ["all ch"])
        text += f" cfg {scale:g} ({', '.join(details)})"
    else:
        text += " no cfg"
    return text


def _apply_sampling_overrides(sampling: dict, overrides: Sequence[str]) -> dict:
    out = dict(sampling)
    for item in overrides or ():
        key, sep, value = str(item).partition("=")
        if not sep:
            continue
        try:
            import yaml
            out[key.strip()] = yaml.safe_load(value)
        except Exception:  # noqa: BLE001
            out[key.strip()] = value
    return out


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
        if left < RECORD_HEADER.size:           # block trailer: zero padding
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
    source: str                                                   # where it was read from
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[int, dict[str, Any]] = field(default_factory=dict)   # step -> metrics logged at that step
    summary: dict[str, Any] = field(default_factory=dict)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)      # step -> eval/step_*.json record
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
            run.history.setdefault(int(step), {}).update(
                {k: v for k, v in row.items() if not k.startswith("_")})
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
        groups.setdefault(f.stem[len("run-"):], []).append(f)
    id_file = run_dir / "wandb_run_id"
    wanted = id_file.read_text().strip() if id_file.is_file() else None
    if wanted not in groups:          # no id file: the run id whose newest start is the most recent
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
        run = None                                    # nothing logged: fall back to the trainer's own files
    if run is None:
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            return None
        run = RunData(run_id=(run_dir / "wandb_run_id").read_text().strip() if (run_dir / "wandb_run_id").exists()
                      else run_dir.name, name=run_dir.name, source=str(metrics))
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
            import yaml
            run.config = yaml.safe_load(cfg_file.read_text()) or {}
            run.name = run.config.get("name") or run.name
    run.run_dir = str(run_dir)
    for f in sorted(run_dir.glob("eval/step_*.json")):
        try:
            rec = json.loads(f.read_text())
            run.evals[int(rec["step"])] = rec
        except (ValueError, KeyError, OSError):
            continue
    return run


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
    """Runs of a W&B project ``entity/project`` through the public API (needs network access and an API key)."""
    import wandb

    api = wandb.Api()
    out = []
    for i, r in enumerate(api.runs(path)):
        if i >= max_runs:
            break
        run = RunData(run_id=r.id, name=r.name, source=f"wandb:{path}/{r.id}",
                      config=dict(r.config), summary=dict(r.summary))
        for key in ["epoch"] + [f"eval/{k}" for k in METRIC_KEYS + ("num_samples", "cfg_scale")]:
            for row in r.scan_history(keys=["_step", key]):
                run.history.setdefault(int(row["_step"]), {})[key] = row[key]
        out.append(run)
    return out


# ------------------------------------------------------------------------------------------ summary
@dataclass
class Row:
    run: str
    run_id: str
    model: str
    tokenizer: str
    epochs: Optional[float]
    steps: Optional[int]
    fid: Optional[float]
    is_: Optional[float]
    precision: Optional[float]
    recall: Optional[float]
    sampler: str
    cfg: Optional[float]
    num_samples: Optional[int]
    last_step: Optional[int]
    source: str
    curve: list[tuple[float, float]] = field(default_factory=list)   # (epoch or step, FID)
    curve_in_epochs: bool = True

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("is_",)}
        d["is"] = self.is_
        return d


def _model_name(config: Mapping[str, Any]) -> str:
    m = config.get("model") or {}
    kind = m.get("type", "?")
    if kind == "custom":
        return f"custom d{m.get('depth', '?')} h{m.get('hidden_size', '?')} p{m.get('patch_size', '?')}"
    return str(kind)


def _num(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def summarize(run: RunData) -> Row:
    """The leaderboard row of a run (its best FID evaluation)."""
    hist = run.history
    ratio = None                                  # epochs per step, from the trainer's `epoch` metric
    for step in sorted(hist, reverse=True):
        e = _num(hist[step].get("epoch"))
        if step > 0 and e is not None and e > 0:
            ratio = e / step
            break
    evals = sorted((s, r) for s, r in hist.items() if _num(r.get("eval/fid")) is not None)
    curve = [((s * ratio) if ratio else s, float(r["eval/fid"])) for s, r in evals]
    best_step, best = (min(evals, key=lambda sr: float(sr[1]["eval/fid"])) if evals else (None, {}))
    cfg = run.config
    sampling = dict(cfg.get("sampling") or {})
    sampling = _apply_sampling_overrides(sampling, (cfg.get("eval") or {}).get("sampling_overrides") or [])
    ev = run.evals.get(best_step) if best_step is not None else None
    ev = ev or (run.evals[max(run.evals)] if run.evals else {})
    sampler = (ev.get("sampler") or run.summary.get("eval/sampler")
               or (describe_sampling(sampling) if sampling else "?"))
    tokenizer = ev.get("tokenizer") or run.summary.get("eval/tokenizer") or "?"
    cfg_scale = _num(best.get("eval/cfg_scale")) if best else None
    if cfg_scale is None and sampling:
        cfg_scale = _num(sampling.get("cfg_scale"))
    n = best.get("eval/num_samples") if best else None
    return Row(run=run.name or run.run_id, run_id=run.run_id, model=_model_name(cfg), tokenizer=str(tokenizer),
               epochs=(best_step * ratio) if (best_step is not None and ratio) else None, steps=best_step,
               fid=_num(best.get("eval/fid")) if best else None, is_=_num(best.get("eval/is")) if best else None,
               precision=_num(best.get("eval/precision")) if best else None,
               recall=_num(best.get("eval/recall")) if best else None,
               sampler=str(sampler), cfg=cfg_scale, num_samples=int(n) if _num(n) is not None else None,
               last_step=max(hist) if hist else None, source=run.source, curve=curve,
               curve_in_epochs=ratio is not None)


def rank_rows(rows: Sequence[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (r.fid is None, r.fid if r.fid is not None else 0.0, r.run))


# ------------------------------------------------------------------------------------------ output
COLUMNS = [("#", None), ("run", "run"), ("model", "model"), ("tokenizer", "tokenizer"), ("epochs", "epochs"),
           ("steps", "steps"), ("FID", "fid"), ("IS", "is_"), ("precision", "precision"), ("recall", "recall"),
           ("N", "num_samples"), ("sampler", "sampler"), ("CFG", "cfg")]


def _cell(row: Row, attr: Optional[str], rank: int) -> str:
    if attr is None:
        return str(rank)
    v = getattr(row, attr)
    if v is None:
        return "-"
    if attr == "fid":
        return f"{v:.3f}"
    if attr in ("is_",):
        return f"{v:.2f}"
    if attr in ("precision", "recall"):
        return f"{v:.3f}"
    if attr == "epochs":
        return f"{v:.2f}"
    if attr == "cfg":
        return f"{v:g}"
    return str(v)


def _cells(rows: Sequence[Row]) -> list[list[str]]:
    return [[_cell(r, attr, i + 1) for _, attr in COLUMNS] for i, r in enumerate(rows)]


def format_table(rows: Sequence[Row]) -> str:
    header = [name for name, _ in COLUMNS]
    body = _cells(rows)
    widths = [max(len(x) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    header = [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in _cells(rows):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines) + "\n"


def plot_fid(rows: Sequence[Row], path: Path) -> Path:
    """FID against epochs (steps where a run logged no epoch), one line per run: matplotlib when installed,
    else a plain PIL drawing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    series = [r for r in rows if r.curve]
    in_epochs = all(r.curve_in_epochs for r in series) if series else True
    xlabel = "epochs" if in_epochs else "epochs (steps where unknown)"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(series, path, xlabel)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for r in series:
        xs, ys = zip(*r.curve)
        ax.plot(xs, ys, marker="o", label=f"{r.run} ({r.model})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID (in-loop)")
    ax.set_title("FID vs training epochs")
    ys = [y for r in series for _, y in r.curve]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 10:      # long runs: FID falls by orders of magnitude
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_pil(series: Sequence[Row], path: Path, xlabel: str) -> Path:
    from PIL import Image, ImageDraw

    w, h, m = 800, 500, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m // 2, w - m // 2, h - m], outline="black")
    points = [p for r in series for p in r.curve]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

        def xy(p):
            return (m + (p[0] - x0) / (x1 - x0) * (w - 1.5 * m), h - m - (p[1] - y0) / (y1 - y0) * (h - 1.5 * m))
        colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
        for i, r in enumerate(series):
            c = colors[i % len(colors)]
            pts = [xy(p) for p in r.curve]
            if len(pts) > 1:
                d.line(pts, fill=c, width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
            d.text((m + 10, m // 2 + 5 + 14 * i), r.run, fill=c)
        d.text((m, h - m + 5), f"{x0:g}", fill="black")
        d.text((w - m, h - m + 5), f"{x1:g}", fill="black")
        d.text((5, h - m - 10), f"{y0:.3g}", fill="black")
        d.text((5, m // 2), f"{y1:.3g}", fill="black")
    d.text((w // 2 - 40, h - m + 25), xlabel, fill="black")
    d.text((5, h // 2), "FID", fill="black")
    img.save(path)
    return path


# ------------------------------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="*", type=Path, help="directories searched for runs (default: runs)")
    p.add_argument("--project", action="append", default=[],
                   help="also read a W&B project entity/project through the API (online)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for leaderboard.md, leaderboard.json and fid_vs_epochs.png (default: first root)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    roots = args.roots or ([] if args.project else [Path("runs")])
    runs = discover_runs(roots)
    for project in args.project:
        try:
            runs += read_online_project(project)
        except Exception as err:  # noqa: BLE001 - offline use must not need the network
            print(f"warning: cannot read W&B project {project}: {type(err).__name__}: {err}", file=sys.stderr)
    if not runs:
        print("no runs found under " + ", ".join(map(str, roots)) if roots else "no runs found", file=sys.stderr)
        return 1
    rows = rank_rows([summarize(r) for r in runs])
    print(format_table(rows))
    out = args.out or (roots[0] if roots else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.md").write_text(markdown_table(rows))
    (out / "leaderboard.json").write_text(json.dumps([r.as_dict() for r in rows], indent=2))
    written = [out / "leaderboard.md", out / "leaderboard.json"]
    if not args.no_plot:
        written.append(plot_fid(rows, out / "fid_vs_epochs.png"))
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
