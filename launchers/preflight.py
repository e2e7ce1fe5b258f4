"""Preflight: check on the login node every input a Slurm job will read, before anything is queued.

A job that waits a day in the queue and then stops on its first line because ``data.path`` was relative or a weights
file was never copied costs a day. So ``launchers/slurm.py`` (a single job or a pipeline) first

* resolves every relative path of the job's config against the submission directory (``absolutize_*``: the job
  then reads exactly the files that were checked, wherever its tasks start), and
* checks every input (``check_*``): the training data (``index.json``, ``latents_stats.pt``, ``manifest.json``),
  the tokenizer checkpoint, DINOv2 / LPIPS / Inception weights, the reference batch, ``model.init_from``, the
  checkpoint to sample from, the samples to evaluate, and that the output directory is writable.

Every problem is collected (``Preflight.problems``), each naming its config key, what is wrong and what to do;
the launcher prints them all at once and submits nothing. In a pipeline, a path that an earlier stage will
produce (``produced``: its output directory, everything under it) counts as present.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from core.checkpoint import complete_checkpoints

__all__ = [
    "Preflight",
    "Problem",
    "absolute",
    "absolutize_extract",
    "absolutize_train",
    "check_evaluate",
    "check_extract",
    "check_sample",
    "check_train",
    "format_problems",
]

EXTRACT_HINT = "python launchers/slurm.py extract configs/extract_<dataset>.yaml out_dir={path}"


@dataclass(frozen=True)
class Problem:
    source: str  # the config (or pipeline stage) the key belongs to
    key: str  # config key, e.g. data.path
    message: str  # what is wrong
    fix: str  # what to do

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}\n    -> {self.fix}"


def format_problems(problems: Sequence[Problem]) -> str:
    n = len(problems)
    head = f"preflight found {n} problem{'s' if n != 1 else ''}; nothing was submitted:"
    return "\n".join([head, *(f"  {p}" for p in problems)])


def _is_url(value: str) -> bool:
    return "://" in value


def absolute(value: Optional[str], base: Optional[Path] = None) -> Optional[str]:
    """``value`` as an absolute path (``~`` expanded, relative to ``base`` or the working directory); empty,
    None, ``identity`` and URLs are returned unchanged."""
    if value is None or not str(value).strip() or _is_url(str(value)) or str(value) == "identity":
        return value
    p = Path(str(value)).expanduser()
    if not p.is_absolute():
        p = (base or Path.cwd()) / p
    return os.path.normpath(str(p))


def absolutize_train(cfg: Any, base: Optional[Path] = None) -> None:
    """Make every input/output path of an experiment config absolute (in place)."""
    cfg.data.path = absolute(cfg.data.path, base) or ""
    cfg.model.init_from = absolute(cfg.model.init_from, base)
    for section, keys in (
        ("sampling", ("tokenizer", "latent_stats")),
        ("eval", ("reference", "feature_extractor_weights", "cache_dir")),
    ):
        sec = getattr(cfg, section, None)
        for key in keys if sec is not None else ():
            setattr(sec, key, absolute(getattr(sec, key), base) or "")
    v = getattr(cfg, "vavae", None)
    if v is not None:
        v.init_from = absolute(v.init_from, base)
        v.vf.dinov2.weights = absolute(v.vf.dinov2.weights, base)
        v.lpips.vgg_weights = absolute(v.lpips.vgg_weights, base)
        v.lpips.lin_weights = absolute(v.lpips.lin_weights, base)


def absolutize_extract(cfg: Any, base: Optional[Path] = None) -> None:
    cfg.out_dir = absolute(cfg.out_dir, base)
    cfg.source.path = absolute(cfg.source.path, base) or ""
    cfg.source.root = absolute(cfg.source.root, base) or ""
    if isinstance(cfg.tokenizer.kwargs.get("checkpoint"), str):
        cfg.tokenizer.kwargs["checkpoint"] = absolute(cfg.tokenizer.kwargs["checkpoint"], base)
    cfg.features.weights = absolute(cfg.features.weights, base)


class Preflight:
    """Collects the problems of one submission (several jobs for a pipeline)."""

    def __init__(self, produced: Iterable[Path] = ()):
        self.problems: list[Problem] = []
        self.produced: list[tuple[Path, str]] = []
        self._reported: set[str] = set()  # paths already reported missing / not writable: reported once
        for p in produced:
            self.add_produced(p, "an earlier stage")

    def add_produced(self, path: Path | str, by: str) -> None:
        self.produced.append((Path(os.path.normpath(str(path))), by))

    def produced_by(self, path: Path | str) -> Optional[str]:
        p = Path(os.path.normpath(str(path)))
        for root, by in self.produced:
            if p == root or root in p.parents:
                return by
        return None

    def problem(self, source: str, key: str, message: str, fix: str) -> None:
        self.problems.append(Problem(source, key, message, fix))

    def need(
        self, source: str, key: str, value: Optional[str], what: str, fix: str, kind: str = "file"
    ) -> Optional[Path]:
        """``value`` must name an existing ``kind`` ("file", "dir", "any") or something an earlier stage makes."""
        if value is None or not str(value).strip():
            self.problem(source, key, f"not set: the job needs {what}", fix)
            return None
        if _is_url(str(value)):
            return None  # remote (s3://...): checked by the job
        path = Path(str(value))
        if self.produced_by(path):
            return path
        if not path.exists():
            if str(path) not in self._reported:
                self._reported.add(str(path))
                self.problem(source, key, f"{what} not found: {path}", fix)
            return None
        if kind == "file" and not path.is_file():
            self.problem(source, key, f"{what} is not a file: {path}", fix)
        elif kind == "dir" and not path.is_dir():
            self.problem(source, key, f"{what} is not a directory: {path}", fix)
        return path

    def writable(self, source: str, key: str, path: Path) -> None:
        """``path`` (an output directory) exists and is writable, or can be created."""
        p = Path(path)
        probe = p
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if f"w:{probe}" in self._reported:
            return
        self._reported.add(f"w:{probe}")
        if probe.exists() and not probe.is_dir():
            self.problem(source, key, f"{probe} is not a directory, so {p} cannot be created", "choose another path")
        elif os.access(probe, os.W_OK | os.X_OK):
            self._reported.discard(f"w:{probe}")
        else:
            self.problem(
                source,
                key,
                f"not writable: {probe} (needed for {p})",
                "choose a directory you can write to, on a file system the compute nodes share",
            )


# ------------------------------------------------------------------------------------------ per job kind
def _check_decoding(pf: Preflight, source: str, cfg: Any) -> None:
    """What decoding the DiT's samples reads: the tokenizer (sampling.tokenizer, else data.path's manifest.json)
    and the latent statistics (sampling.latent_stats, else data.path's latents_stats.pt)."""
    data = cfg.data.path
    tok = cfg.sampling.tokenizer
    if tok and tok != "identity":
        pf.need(
            source,
            "sampling.tokenizer",
            tok,
            "tokenizer checkpoint",
            "give the VA-VAE checkpoint that decodes the latents (released .pt or a run checkpoint directory)",
            kind="any",
        )
    elif not tok:
        if not data:
            pf.problem(
                source,
                "sampling.tokenizer",
                "not set and data.path is empty: nothing names the tokenizer that decodes the samples",
                "set sampling.tokenizer (a VA-VAE checkpoint, or identity) or data.path",
            )
        else:
            pf.need(
                source,
                "data.path",
                str(Path(data) / "manifest.json"),
                "manifest.json (names the tokenizer that decodes the samples)",
                "extract the data with data/extract.py (" + EXTRACT_HINT.format(path=data) + ") or set "
                "sampling.tokenizer",
            )
    if cfg.data.latent_norm:
        if cfg.sampling.latent_stats:
            pf.need(
                source,
                "sampling.latent_stats",
                cfg.sampling.latent_stats,
                "latent statistics",
                "give a latents_stats.pt ({'mean','std'})",
            )
        elif data:
            pf.need(
                source,
                "data.path",
                str(Path(data) / "latents_stats.pt"),
                "latent statistics latents_stats.pt",
                "extract the data with data/extract.py (writes them): " + EXTRACT_HINT.format(path=data),
            )


def _check_fid(pf: Preflight, source: str, ev: Any, reference: Optional[str], weights: Optional[str]) -> None:
    pf.need(
        source,
        "eval.reference",
        reference,
        "reference batch",
        "give ADM's reference batch (VIRTUAL_imagenet256_labeled.npz) or an image folder / statistics .npz",
        kind="any",
    )
    if ev.feature_extractor != "tiny-random":
        pf.need(
            source,
            "eval.feature_extractor_weights",
            weights,
            f"weights of the {ev.feature_extractor} feature extractor",
            "download weights-inception-2015-12-05-6726825d.pth (README 'Evaluating') and give its path",
        )


def check_train(pf: Preflight, source: str, cfg: Any, run_dir: Path) -> None:
    """Inputs of a training job (DiT or VA-VAE), paths already absolute."""
    d = cfg.data
    if cfg.task == "dit":
        if d.kind == "streaming" and not d.remote:
            data = pf.need(
                source,
                "data.path",
                d.path,
                "training data directory",
                "extract the latents first: " + EXTRACT_HINT.format(path=d.path or "<dir>"),
                kind="dir",
            )
            if data is not None and not pf.produced_by(data):
                pf.need(
                    source,
                    "data.path",
                    str(data / "index.json"),
                    "MDS index index.json",
                    "the extraction did not finish (or wrote elsewhere); run it (again): "
                    + EXTRACT_HINT.format(path=data),
                )
                if d.latent_norm:
                    pf.need(
                        source,
                        "data.latent_norm",
                        str(data / "latents_stats.pt"),
                        "latent statistics latents_stats.pt",
                        "re-run the extraction (it writes them) or set data.latent_norm=false",
                    )
        if cfg.eval.every_epochs is not None:
            _check_decoding(pf, source, cfg)
            _check_fid(pf, source, cfg.eval, cfg.eval.reference, cfg.eval.feature_extractor_weights)
    else:
        v = cfg.vavae
        if d.kind in ("images", "streaming") and not d.remote:
            pf.need(source, "data.path", d.path, "training images", "give the image folder or dataset", kind="any")
        if v.vf.enabled and v.vf.features == "online" and not v.vf.dinov2.random_init:
            pf.need(
                source,
                "vavae.vf.dinov2.weights",
                v.vf.dinov2.weights,
                "DINOv2 weights",
                "give a local DINOv2 checkpoint (README 'Training VA-VAE')",
            )
        if not v.lpips.random_init:
            for key in ("vgg_weights", "lin_weights"):
                value = getattr(v.lpips, key)
                if key == "lin_weights" and value is None:
                    continue
                pf.need(source, f"vavae.lpips.{key}", value, "LPIPS weights", "give the local LPIPS weight files")
        if v.init_from:
            pf.need(source, "vavae.init_from", v.init_from, "checkpoint to start from", "fix the path", kind="any")
    if getattr(getattr(cfg, "model", None), "init_from", None):
        pf.need(
            source,
            "model.init_from",
            cfg.model.init_from,
            "checkpoint to initialise from",
            "fix the path (a checkpoint file or a run checkpoint directory)",
            kind="any",
        )
    pf.writable(source, "run_dir", run_dir)


def check_extract(pf: Preflight, source: str, cfg: Any) -> None:
    s = cfg.source
    if s.kind in ("folder", "filelist"):
        pf.need(
            source,
            "source.path",
            s.path,
            "image folder" if s.kind == "folder" else "file list",
            "give the ImageNet train folder (root/<class>/<image>)"
            if s.kind == "folder"
            else "give a '<path> <label>' list file",
            kind="dir" if s.kind == "folder" else "file",
        )
    if cfg.tokenizer.kind not in ("identity", "none"):
        ckpt = cfg.tokenizer.kwargs.get("checkpoint")
        pf.need(
            source,
            "tokenizer.kwargs.checkpoint",
            ckpt,
            "tokenizer checkpoint",
            "give the VA-VAE checkpoint (e.g. the released vavae-imagenet256-f16d32-dinov2.pt)",
            kind="any",
        )
    f = cfg.features
    if f.enabled and not f.random_init:
        pf.need(source, "features.weights", f.weights, "DINOv2 weights", "give a local DINOv2 checkpoint file")
    pf.writable(source, "out_dir", Path(cfg.out_dir))


def check_sample(pf: Preflight, source: str, cfg: Any, run_dir: Path, out: Path) -> None:
    """Sampling from the newest complete checkpoint of ``run_dir`` (or one a training stage will write)."""
    if not pf.produced_by(run_dir):
        if not complete_checkpoints(run_dir / "checkpoints"):
            pf.problem(
                source,
                "run_dir",
                f"no complete checkpoint in {run_dir / 'checkpoints'} to sample from",
                f"train first: python launchers/slurm.py train {source} (or give run_dir=<a trained run>)",
            )
    _check_decoding(pf, source, cfg)
    pf.writable(source, "sample --out", out)


def check_evaluate(
    pf: Preflight,
    source: str,
    ev: Any,
    samples: Optional[str],
    reference: Optional[str],
    weights: Optional[str],
    out: Optional[Path] = None,
) -> None:
    pf.need(
        source,
        "samples",
        samples,
        "samples to evaluate",
        "sample first: python launchers/slurm.py sample CONFIG -- --num 50000 --out DIR --npz FILE",
        kind="any",
    )
    _check_fid(pf, source, ev, reference, weights)
    if out is not None:
        pf.writable(source, "evaluate --json", out)
