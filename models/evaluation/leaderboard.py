"""Leaderboard of training runs by their best in-loop FID: rows, a plain / Markdown table, FID against epochs.

The library behind ``tools/leaderboard.py``. Runs are read by ``core.runlog`` (W&B run files, else
``metrics.jsonl``; plus the in-loop evaluation's ``eval/step_*.json``). Per run: every in-loop evaluation
(``eval/fid`` ...) with its step; epochs come from the trainer's ``epoch`` metric (epoch = step /
steps_per_epoch). The run's row shows its best (lowest) FID and the IS, precision and recall of that same
evaluation. Runs without an FID are listed last. Beside the in-loop FID (``FID in-loop``, on ``N`` samples, e.g.
FID-10K) the row shows the run's final evaluation when it has one (``FID final`` on ``N final`` samples, e.g. the
FID-50K of ``tools/evaluate.py --run-dir``, with its IS and precision/recall). Runs read from several places (a run
directory and its synced online copy) are one row: de-duplicated by W&B run id. ``log_wandb_table`` logs the table
to W&B as a ``wandb.Table``.

evaluation. Runs without an FID are listed last.

Several EMAs (``train.ema_decays``): ``summarize_emas`` gives one row per EMA (its decay in the ``EMA`` column), from
the primary EMA's ``eval/fid`` and the others' ``eval/ema_<i>/fid``. The validation loss (``eval/val_loss``,
``eval/ema_<i>/val_loss``; models/evaluation/validation.py) of the same evaluation step is shown beside the FID (the
newest one when the row has no FID).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from PIL import Image, ImageDraw

from core.runlog import RunData, discover_runs, read_online_project
from models.sampling import describe_sampling

__all__ = [
    "COLUMNS",
    "METRIC_KEYS",
    "Row",
    "collect_runs",
    "dedupe_runs",
    "format_table",
    "log_wandb_table",
    "markdown_table",
    "plot_fid",
    "rank_rows",
    "summarize",
    "summarize_emas",
    "write_leaderboard",
]

METRIC_KEYS = ("fid", "sfid", "is", "kid", "precision", "recall")


def _apply_sampling_overrides(sampling: dict, overrides: Sequence[str]) -> dict:
    out = dict(sampling)
    for item in overrides or ():
        key, sep, value = str(item).partition("=")
        if not sep:
            continue
        try:
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
    final_fid: Optional[float] = None  # the final evaluation (eval/final.json / summary final/*), e.g. FID-50K
    final_is: Optional[float] = None
    final_precision: Optional[float] = None
    final_recall: Optional[float] = None
    final_num_samples: Optional[int] = None
    curve: list[tuple[float, float]] = field(default_factory=list)  # (epoch or step, FID)
    curve_in_epochs: bool = True
    ema: str = ""  # the EMA's decay (several EMAs: train.ema_decays); "" for the run's only EMA
    val_loss: Optional[float] = None  # validation loss at the row's step (else the newest)

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


def _ema_prefixes(run: RunData) -> list[tuple[str, str]]:
    """(metric prefix, decay label) of every EMA of the run: ``("", ...)`` for the primary one, ``("ema_1/", ...)``
    for the others (``train.ema_decays``)."""
    train = run.config.get("train") or {}
    decays = train.get("ema_decays") or [train.get("ema_decay")]
    if len(decays) < 2:
        return [("", "")]
    return [
        ("" if i == 0 else f"ema_{i}/", f"{d:g}" if isinstance(d, (int, float)) else str(d))
        for i, d in enumerate(decays)
    ]


def summarize_emas(run: RunData) -> list[Row]:
    """One leaderboard row per EMA of the run (``summarize`` of each)."""
    return [summarize(run, prefix, label) for prefix, label in _ema_prefixes(run)]


def summarize(run: RunData, prefix: str = "", ema: str = "") -> Row:
    """The leaderboard row of a run (its best FID evaluation); ``prefix``: another EMA's metrics (``"ema_1/"``)."""
    hist = run.history
    ratio = None  # epochs per step, from the trainer's `epoch` metric
    for step in sorted(hist, reverse=True):
        e = _num(hist[step].get("epoch"))
        if step > 0 and e is not None and e > 0:
            ratio = e / step
            break
    fid_key = f"eval/{prefix}fid"
    evals = sorted((s, r) for s, r in hist.items() if _num(r.get(fid_key)) is not None)
    curve = [((s * ratio) if ratio else s, float(r[fid_key])) for s, r in evals]
    best_step, best = min(evals, key=lambda sr: float(sr[1][fid_key])) if evals else (None, {})
    val_key = f"eval/{prefix}val_loss"
    vals = sorted((s, _num(r.get(val_key))) for s, r in hist.items() if _num(r.get(val_key)) is not None)
    val_loss = dict(vals).get(best_step) if best_step is not None else (vals[-1][1] if vals else None)
    best = {k.replace(f"eval/{prefix}", "eval/", 1): v for k, v in best.items()} if prefix else best
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
    final = run.final or {}
    final_n = _num(final.get("num_samples"))
    # The step (and epoch) the row's FID belongs to: the best in-loop evaluation's; with only a final evaluation,
    # the run's last step (the final evaluation scores the trained run).
    step = best_step if best_step is not None else (max(hist) if hist and final else None)
    return Row(
        ema=ema,
        val_loss=val_loss,
        run=run.name or run.run_id,
        run_id=run.run_id,
        model=_model_name(cfg),
        tokenizer=str(tokenizer),
        epochs=(step * ratio) if (step is not None and ratio) else None,
        steps=step,
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
        final_fid=_num(final.get("fid")),
        final_is=_num(final.get("is")),
        final_precision=_num(final.get("precision")),
        final_recall=_num(final.get("recall")),
        final_num_samples=int(final_n) if final_n is not None else None,
    )


def rank_rows(rows: Sequence[Row]) -> list[Row]:
    """By FID (rows without one last, by validation loss), then run name."""
    return sorted(
        rows,
        key=lambda r: (
            r.fid is None,
            r.fid if r.fid is not None else 0.0,
            r.val_loss is None,
            r.val_loss if r.val_loss is not None else 0.0,
            r.run,
        ),
    )


# ------------------------------------------------------------------------------------------ output
COLUMNS = [
    ("#", None),
    ("run", "run"),
    ("model", "model"),
    ("tokenizer", "tokenizer"),
    ("epochs", "epochs"),
    ("steps", "steps"),
    ("FID in-loop", "fid"),
    ("N", "num_samples"),
    ("FID final", "final_fid"),
    ("N final", "final_num_samples"),
    ("IS", "is_"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("IS final", "final_is"),
    ("precision final", "final_precision"),
    ("recall final", "final_recall"),
    ("val loss", "val_loss"),
    ("EMA", "ema"),
    ("sampler", "sampler"),
    ("CFG", "cfg"),
]


def _cell(row: Row, attr: Optional[str], rank: int) -> str:
    if attr is None:
        return str(rank)
    v = getattr(row, attr)
    if v is None:
        return "-"
    if attr in ("fid", "final_fid"):
        return f"{v:.3f}"
    if attr in ("is_", "final_is"):
        return f"{v:.2f}"
    if attr == "val_loss":
        return f"{v:.4f}"
    if attr == "ema" and not v:
        return "-"
    if attr in ("precision", "recall", "final_precision", "final_recall"):
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
        ax.plot(xs, ys, marker="o", label=f"{r.run} ({r.model}{', EMA ' + r.ema if r.ema else ''})")
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
    """Every run under ``roots`` and, through the W&B API (one query per project), of ``projects``, de-duplicated by
    run id (``dedupe_runs``); a project that cannot be read is a warning: offline use must not need the network."""
    runs = discover_runs(roots)
    for project in projects:
        try:
            runs += read_online_project(project)
        except Exception as err:  # noqa: BLE001 - offline use must not need the network
            print(f"warning: cannot read W&B project {project}: {type(err).__name__}: {err}", file=sys.stderr)
    return dedupe_runs(runs)


def dedupe_runs(runs: Sequence[RunData]) -> list[RunData]:
    """One run per W&B run id: a run directory (full history, eval records) wins over the online copy of the same
    run, which only adds final-evaluation values the directory lacks; of two run directories the first wins."""
    out: dict[str, RunData] = {}
    for run in runs:
        key = run.run_id or run.source
        kept = out.setdefault(key, run)
        if kept is run:
            continue
        if kept.run_dir is None and run.run_dir is not None:
            out[key], run = run, kept
        for k, v in run.final.items():
            out[key].final.setdefault(k, v)
    return list(out.values())


def log_wandb_table(
    rows: Sequence[Row],
    project: str,
    entity: Optional[str] = None,
    mode: str = "online",
    out_dir: Optional[Path] = None,
    name: str = "leaderboard",
) -> Path:
    """Log the leaderboard as a ``wandb.Table`` (key ``leaderboard``; the columns of the Markdown table, raw values,
    None where missing) in a W&B run of its own (``job_type="leaderboard"``, files under ``out_dir``); returns the
    run's local directory."""
    import wandb

    columns = [title for title, _ in COLUMNS]
    data = [[i + 1] + [getattr(r, attr) for _, attr in COLUMNS[1:]] for i, r in enumerate(rows)]
    run = wandb.init(
        project=project,
        entity=entity,
        job_type="leaderboard",
        name=name,
        mode=mode,
        dir=str(out_dir) if out_dir else None,
    )
    try:
        run.log({"leaderboard": wandb.Table(columns=columns, data=data)})
        return Path(run.dir).parent
    finally:
        run.finish()


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
