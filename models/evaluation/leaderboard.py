"""Leaderboard of training runs by their best in-loop FID: rows, a plain / Markdown table, FID against epochs.

The library behind ``tools/leaderboard.py``. Runs are read by ``core.runlog`` (W&B run files, else
``metrics.jsonl``; plus the in-loop evaluation's ``eval/step_*.json``). Per run: every in-loop evaluation
(``eval/fid`` ...) with its step; epochs come from the trainer's ``epoch`` metric (epoch = step /
steps_per_epoch). The run's row shows its best (lowest) FID and the IS, precision and recall of that same
evaluation. Runs without an FID are listed last.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.runlog import RunData, discover_runs, read_online_project
from models.sampling import describe_sampling

__all__ = [
    "METRIC_KEYS",
    "ONLINE_KEYS",
    "Row",
    "collect_runs",
    "format_table",
    "markdown_table",
    "plot_fid",
    "rank_rows",
    "summarize",
    "write_leaderboard",
]

METRIC_KEYS = ("fid", "sfid", "is", "kid", "precision", "recall")
ONLINE_KEYS = tuple(["epoch"] + [f"eval/{k}" for k in METRIC_KEYS + ("num_samples", "cfg_scale")])


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
    curve: list[tuple[float, float]] = field(default_factory=list)  # (epoch or step, FID)
    curve_in_epochs: bool = True

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("is_",)}
        d["is"] = self.is_
        return d


def _model_name(config: Mapping[str, Any]) -> str:
    m = config.get("model") or {}
    kind = m.get("type", "?")
    if kind == "custom":
        name = f"custom d{m.get('depth', '?')} h{m.get('hidden_size', '?')} p{m.get('patch_size', '?')}"
    else:
        name = str(kind)
    repa = config.get("repa") or {}
    if repa.get("enabled"):  # a REPA run is its own row, and says so
        name += f" + REPA({repa.get('encoder', '?')}, depth {repa.get('depth', '?')}, weight {repa.get('weight', '?')})"
    return name


def _num(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def summarize(run: RunData) -> Row:
    """The leaderboard row of a run (its best FID evaluation)."""
    hist = run.history
    ratio = None  # epochs per step, from the trainer's `epoch` metric
    for step in sorted(hist, reverse=True):
        e = _num(hist[step].get("epoch"))
        if step > 0 and e is not None and e > 0:
            ratio = e / step
            break
    evals = sorted((s, r) for s, r in hist.items() if _num(r.get("eval/fid")) is not None)
    curve = [((s * ratio) if ratio else s, float(r["eval/fid"])) for s, r in evals]
    best_step, best = min(evals, key=lambda sr: float(sr[1]["eval/fid"])) if evals else (None, {})
    cfg = run.config
    sampling = dict(cfg.get("sampling") or {})
    sampling = _apply_sampling_overrides(sampling, (cfg.get("eval") or {}).get("sampling_overrides") or [])
    ev = run.evals.get(best_step) if best_step is not None else None
    ev = ev or (run.evals[max(run.evals)] if run.evals else {})
    sampler = ev.get("sampler") or run.summary.get("eval/sampler") or (describe_sampling(sampling) if sampling else "?")
    tokenizer = ev.get("tokenizer") or run.summary.get("eval/tokenizer") or "?"
    cfg_scale = _num(best.get("eval/cfg_scale")) if best else None
    if cfg_scale is None and sampling:
        cfg_scale = _num(sampling.get("cfg_scale"))
    n = best.get("eval/num_samples") if best else None
    return Row(
        run=run.name or run.run_id,
        run_id=run.run_id,
        model=_model_name(cfg),
        tokenizer=str(tokenizer),
        epochs=(best_step * ratio) if (best_step is not None and ratio) else None,
        steps=best_step,
        fid=_num(best.get("eval/fid")) if best else None,
        is_=_num(best.get("eval/is")) if best else None,
        precision=_num(best.get("eval/precision")) if best else None,
        recall=_num(best.get("eval/recall")) if best else None,
        sampler=str(sampler),
        cfg=cfg_scale,
        num_samples=int(n) if _num(n) is not None else None,
        last_step=max(hist) if hist else None,
        source=run.source,
        curve=curve,
        curve_in_epochs=ratio is not None,
    )


def rank_rows(rows: Sequence[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (r.fid is None, r.fid if r.fid is not None else 0.0, r.run))


# ------------------------------------------------------------------------------------------ output
COLUMNS = [
    ("#", None),
    ("run", "run"),
    ("model", "model"),
    ("tokenizer", "tokenizer"),
    ("epochs", "epochs"),
    ("steps", "steps"),
    ("FID", "fid"),
    ("IS", "is_"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("N", "num_samples"),
    ("sampler", "sampler"),
    ("CFG", "cfg"),
]


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
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
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
    if ys and min(ys) > 0 and max(ys) / min(ys) > 10:  # long runs: FID falls by orders of magnitude
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


# ------------------------------------------------------------------------------------------ one call
def collect_runs(roots: Sequence[Path], projects: Sequence[str] = ()) -> list[RunData]:
    """Every run under ``roots`` and, through the W&B API, of ``projects`` (a project that cannot be read is a
    warning: offline use must not need the network)."""
    runs = discover_runs(roots)
    for project in projects:
        try:
            runs += read_online_project(project, ONLINE_KEYS)
        except Exception as err:  # noqa: BLE001 - offline use must not need the network
            print(f"warning: cannot read W&B project {project}: {type(err).__name__}: {err}", file=sys.stderr)
    return runs


def write_leaderboard(rows: Sequence[Row], out: Path, plot: bool = True) -> list[Path]:
    """``leaderboard.md``, ``leaderboard.json`` and (``plot``) ``fid_vs_epochs.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.md").write_text(markdown_table(rows))
    (out / "leaderboard.json").write_text(json.dumps([r.as_dict() for r in rows], indent=2))
    written = [out / "leaderboard.md", out / "leaderboard.json"]
    if plot:
        written.append(plot_fid(rows, out / "fid_vs_epochs.png"))
    return written
