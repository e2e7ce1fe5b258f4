"""The pipeline file of ``launchers/slurm.py pipeline``: extract -> train -> sample -> evaluate as chained jobs.

Format (every key optional except ``stages.train.config``; see configs/pipeline_imagenet_xl.yaml)::

    name: lightningdit_xl_imagenet256          # default: the file's name
    launcher: {nodes: 8, time_min: 1440}       # LauncherConfig settings for every stage (CLI flags win)
    stages:
      extract:                                  # left out: the training data exists already
        config: configs/extract_imagenet256_vavae_f16d32.yaml
        overrides: [out_dir=/data/imagenet256_vavae_f16d32]
        launcher: {time_min: 720}               # this stage only
      train:
        config: configs/lightningdit_xl.yaml
        overrides: [run_dir=runs/lightningdit_xl]   # data.path is set to extract's out_dir
      sample:
        num: 50000                              # FID-50K
        batch_size: 125                         # per rank
        seed: 0
        labels: uniform
        overrides: [sampling.cfg_scale=6.7]     # sampler settings (tools/sample.py's dotted overrides)
        out: null                               # default <run_dir>/samples/fid<num> (+ .npz beside it)
      evaluate:
        args: [--metrics, all]                  # tools/evaluate.py options; reference/weights: the train config's eval
        launcher: {gpus_per_node: 1}

Relative paths are relative to the directory the command is started in (as for every launcher command). Where
each stage writes: extract ``out_dir``; train ``run_dir``; sample ``<run_dir>/samples/fid<num>/`` + ``.npz``;
evaluate ``<run_dir>/samples/fid<num>_metrics.json`` and, as the run's final evaluation, ``<run_dir>/eval/final.json``
(+ its W&B run; ``tools/evaluate.py --run-dir``), which ``tools/leaderboard.py`` shows as ``FID final``. A stage is complete (``stage_complete``) when its outputs are: extract
``manifest.json`` (written last), train a complete checkpoint at the last step, sample the ``.npz`` (written last),
evaluate the metrics JSON; complete stages are skipped, so running the same command again after a failure submits
only what is left.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from core.config import ConfigError, derived

__all__ = [
    "STAGES",
    "PipelineConfig",
    "StageConfig",
    "load_pipeline",
    "sample_paths",
    "train_total_steps",
]

STAGES = ("extract", "train", "sample", "evaluate")
STAGE_KEYS = {
    "extract": {"config", "overrides", "launcher"},
    "train": {"config", "overrides", "launcher"},
    "sample": {"num", "batch_size", "seed", "labels", "which", "overrides", "out", "launcher"},
    "evaluate": {"args", "launcher"},
}


class PipelineError(ValueError):
    pass


@dataclass
class StageConfig:
    name: str
    config: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    launcher: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # sample: num/batch_size/...; evaluate: args


@dataclass
class PipelineConfig:
    name: str
    path: Path
    launcher: dict[str, Any]
    stages: dict[str, StageConfig]  # in STAGES order, only the ones present


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and check a pipeline file; every problem at once, each with its key."""
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"pipeline file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from None
    problems: list[str] = []
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping with name/launcher/stages")
    for key in sorted(set(data) - {"name", "launcher", "stages"}):
        problems.append(f"{key}: unknown key (expected name, launcher, stages)")
    launcher = data.get("launcher") or {}
    if not isinstance(launcher, dict):
        problems.append("launcher: expected a mapping of launcher settings")
        launcher = {}
    raw = data.get("stages") or {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: stages: expected a mapping of {', '.join(STAGES)}")
    stages: dict[str, StageConfig] = {}
    for name in sorted(set(raw) - set(STAGES)):
        problems.append(f"stages.{name}: unknown stage (expected {', '.join(STAGES)})")
    for name in STAGES:
        if name not in raw:
            continue
        body = raw[name] or {}
        if not isinstance(body, dict):
            problems.append(f"stages.{name}: expected a mapping")
            continue
        for key in sorted(set(body) - STAGE_KEYS[name]):
            problems.append(f"stages.{name}.{key}: unknown key (expected {', '.join(sorted(STAGE_KEYS[name]))})")
        st = StageConfig(name, config=body.get("config"))
        ov = body.get("overrides") or []
        if not isinstance(ov, list) or not all(isinstance(o, str) and "=" in o for o in ov):
            problems.append(f"stages.{name}.overrides: expected a list of key=value strings")
        else:
            st.overrides = list(ov)
        lc = body.get("launcher") or {}
        if not isinstance(lc, dict):
            problems.append(f"stages.{name}.launcher: expected a mapping")
        else:
            st.launcher = dict(lc)
        if name in ("extract", "train") and not st.config:
            problems.append(f"stages.{name}.config: the stage's config file is required")
        elif st.config and not Path(st.config).is_file():
            problems.append(f"stages.{name}.config: file not found: {st.config}")
        st.options = {k: v for k, v in body.items() if k not in ("config", "overrides", "launcher")}
        if name == "sample":
            num = st.options.get("num", 50000)
            if not isinstance(num, int) or num < 1:
                problems.append(f"stages.sample.num: expected a positive integer, got {num!r}")
        if name == "evaluate":
            args = st.options.get("args", [])
            if not isinstance(args, list):
                problems.append("stages.evaluate.args: expected a list of tools/evaluate.py arguments")
        stages[name] = st
    if "train" not in stages and not problems:
        problems.append("stages.train: required (the run that is sampled and evaluated)")
    present = [s for s in STAGES if s in stages]
    if present and not problems:
        first, last = STAGES.index(present[0]), STAGES.index(present[-1])
        gaps = [s for s in STAGES[first : last + 1] if s not in stages and s != "extract"]
        if gaps:
            problems.append(f"stages: {', '.join(gaps)} missing between {present[0]} and {present[-1]}")
    if problems:
        raise PipelineError(f"{path}:\n" + "\n".join(f"  {x}" for x in problems))
    return PipelineConfig(str(data.get("name") or p.stem), p, dict(launcher), stages)


# ------------------------------------------------------------------------------------------ outputs
def sample_paths(stage: StageConfig, run_dir: Path) -> tuple[Path, Path, Path]:
    """(PNG folder, .npz, metrics JSON) of the sample and evaluate stages."""
    num = int(stage.options.get("num", 50000))
    out = stage.options.get("out")
    folder = Path(os.path.abspath(os.path.expanduser(out))) if out else run_dir / "samples" / f"fid{num}"
    return folder, folder.with_suffix(".npz"), folder.parent / f"{folder.name}_metrics.json"


def dataset_size(data_dir: Path) -> Optional[int]:
    """Samples in an MDS dataset (its index.json), None when there is none yet."""
    index = Path(data_dir) / "index.json"
    if not index.is_file():
        return None
    try:
        return sum(int(s["samples"]) for s in json.loads(index.read_text())["shards"])
    except (ValueError, KeyError, TypeError, OSError):
        return None


def train_total_steps(cfg: Any, world_size: int) -> Optional[int]:
    """The last step of a training run (None while its data does not exist)."""
    if cfg.train.epochs is None and cfg.train.max_steps is not None:
        return int(cfg.train.max_steps)
    size = dataset_size(Path(cfg.data.path)) if cfg.data.path else None
    if size is None:
        return None
    try:
        return derived(cfg, world_size, size).total_steps
    except ConfigError:
        return None
