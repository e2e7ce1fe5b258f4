"""Latent extraction: images -> tokenizer latents (+ horizontal flips, optional DINOv2 features and the images) as
MDS shards.

    python -m data.extract configs/extract_synthetic.yaml [key=value ...]                 # one process
    python -m torch.distributed.run --nproc_per_node 8 data/extract.py CONFIG [key=value ...]
    python launchers/local.py --nproc 8 --entry data/extract.py CONFIG [key=value ...]
    python data/extract.py CONFIG --array slurm [key=value ...]            # one task of a Slurm job array

For every image: ``latent`` = encode(x), ``latent_flip`` = encode(hflip(x)) (the official pipeline's two
passes), ``label``, ``sample_id`` (the image's global index); with ``features.enabled``, ``features`` = DINOv2
patch tokens of x as float16 [D, h, w] on the latent grid (or the ``features.grid`` x ``features.grid`` grid),
and with ``features.flip`` also ``features_flip`` = those of hflip(x) (REPA's targets for ``latent_flip``);
with ``images``, ``image`` = x itself as uint8 [3, S, S] (the exact crop the tokenizer and DINOv2 saw, not
flipped). data/streaming.py has the schema. ``tokenizer.kind: none`` stores no latents (and no statistics): a
dataset of images + DINOv2 features for VA-VAE training with precomputed features (``vavae.vf.features:
precomputed``; configs/extract_vavae_features.yaml), where pixel-space latents would only waste disk.
Sources: an ImageNet-style folder or a file list (data/images.py: ADM center crop, [-1, 1]) or the embedded
synthetic images (data/synthetic.py).

Chunks and output layout. The images are cut into chunks of ``chunk_size`` consecutive indices (chunk c: images
c*chunk_size ...), the same whatever the number of ranks. A job (or one task of a job array) lists the chunks it
has to do (all; an array task i of n: those with c % n == i) that are not complete yet, and rank r of W takes every
W-th of them. Each chunk is one MDS directory, written as ``out/.tmp-chunk{c:06d}/`` and renamed to
``chunk{c:06d}/`` once complete (shards, ``index.json`` and ``chunk.json``: sample ids, per-sample digests,
skipped files and the chunk's ``RunningMoments`` state, all fsynced first). When every chunk is complete, rank 0
of the job (or of the array task) that finished last merges the chunk indexes into ``out/index.json``, so
``out`` is a plain MDS dataset for ``data.streaming.LatentDataset`` (or ``ImageDataset``), and writes
``latents_stats.pt`` when there are latents (exact per-channel mean/std over every stored non-flipped latent,
merged from the per-chunk moments in chunk order) and ``manifest.json`` (counts, skipped and ignored files,
checksums, stats, config).

Resume. ``out/extract_plan.json`` records what fixes the chunk contents (source fingerprint, chunk size,
tokenizer, features and their grid, images, dtype, seed); a restarted job must match it, with any number of ranks
and as one job or an array. It deletes its ``.tmp-*`` (partial) chunks, skips complete ones and redoes the rest,
so no image is lost or written twice: the manifest's ``sample_ids_sha256`` (sorted ids) and ``content_sha256``
(per-sample digests in id order) and the shards' contents are the same as for an uninterrupted run. Posterior
samples (``tokenizer.sample``) are drawn from a generator seeded per chunk, so a redone chunk draws the same noise
on any rank.

Job array (``--array I/N`` or ``--array slurm``: the Slurm array task's index and count; or the config keys
``array_index``/``array_count``): task I extracts its chunks; the task that completes the last chunk of the job
writes the merged files; re-running any task when all chunks are complete only writes them.

Object store (``remote: s3://bucket/prefix``, streaming's uploaders; credentials and endpoint from the standard
environment variables AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, S3_ENDPOINT_URL / AWS_ENDPOINT_URL): each chunk is
uploaded as soon as it is committed, its ``chunk.json`` last (a chunk is complete on the remote when that file is
there), and ``index.json`` is uploaded after the statistics and the manifest. A kill mid-upload leaves a chunk
complete locally and incomplete remotely: the next run uploads it again. With ``keep_local: false`` the shard
files are deleted locally after their upload (``out_dir`` keeps only the metadata); chunks complete only on the
remote count as done.

Bad files (corrupt images, non-images with an image extension) are skipped and reported with their paths;
files without an image extension are listed as ignored. Neither stops the job.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # `python data/extract.py ...`: put the repository root (not data/, whose streaming.py would shadow the
    # `streaming` package) on sys.path and run this file as the module data.extract.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))
    from data.extract import main as _main

    sys.exit(_main())

import argparse
import hashlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from streaming.base.storage.download import CloudDownloader
from streaming.base.storage.upload import CloudUploader
from torch.utils.data import DataLoader

from core.config import Checks, ConfigError, config_to_dict, load_typed_config
from core.distributed import all_gather_object, barrier, broadcast_object, init_distributed, rank_and_world, teardown
from core.fileio import atomic_write_json, fsync_dir
from core.progress import Progress
from data.features import FeatureExtractor, build_feature_extractor
from data.images import (
    IMG_EXTENSIONS,
    BadItem,
    IgnoredFile,
    ImageFileDataset,
    collate_items,
    normalized_to_uint8,
    read_file_list,
    scan_image_folder,
    uint8_to_normalized,
)
from data.streaming import STATS_FILENAME, RunningMoments, latent_columns, open_writer, save_latent_stats
from data.synthetic import SyntheticImages
from data.tokenizers import Tokenizer, available_tokenizers, build_tokenizer

log = logging.getLogger(__name__)

NO_TOKENIZER = "none"  # tokenizer.kind that stores no latents
FEATURES_KIND = "dinov2"  # the data.features extractor the `features` section configures
PLAN_FILENAME = "extract_plan.json"
MANIFEST_FILENAME = "manifest.json"
CHUNK_META = "chunk.json"
INDEX_FILENAME = "index.json"  # MDS index (streaming's name)
DEFAULT_SIZE_LIMIT = 1 << 26  # bytes of uncompressed samples per shard (streaming's default)
FORMAT_VERSION = 2  # 2: chunks of consecutive images, independent of the number of ranks
_CHUNK_RE = re.compile(r"^chunk(\d{6})$")
_REMOTE_CHUNK_RE = re.compile(r"(?:^|/)chunk(\d{6})/chunk\.json$")

__all__ = [
    "ExtractConfig",
    "ExtractError",
    "ExtractResult",
    "FeaturesConfig",
    "SourceConfig",
    "TokenizerConfig",
    "build_features",
    "build_source",
    "check_extract_config",
    "extract",
    "load_extract_config",
    "main",
    "parse_array",
    "read_manifest",
]


# ================================================================================================== config
@dataclass
class SourceConfig:
    kind: Literal["synthetic", "folder", "filelist"] = "synthetic"
    image_size: int = 256  # output image size (ADM center crop for files)
    # synthetic (data/synthetic.py)
    num_samples: int = 1000
    num_classes: int = 10
    seed: int = 0
    # folder: path = root of class folders; filelist: path = text file of "<path> <label>" lines
    path: str = ""
    root: str = ""  # filelist: base of relative paths ("" = the list file's directory)
    extensions: list[str] = field(default_factory=lambda: list(IMG_EXTENSIONS))
    limit: Optional[int] = None  # only the first N images (quick trials)


@dataclass
class TokenizerConfig:
    kind: str = "identity"  # data.tokenizers registry ("identity", "vavae"), or "none": no latents
    sample: bool = True  # posterior sample (official) rather than the mean
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to build_tokenizer (e.g. checkpoint path)


@dataclass
class FeaturesConfig:
    enabled: bool = False
    model: str = "vit_large_patch14_dinov2.lvd142m"  # timm name (official VA-VAE foundation model)
    weights: Optional[str] = None  # LOCAL checkpoint file (timm or original DINOv2 keys); no downloads
    random_init: bool = False  # random weights instead of `weights` (tests / demos only)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (tiny test ViTs)
    imagenet_norm: bool = False  # official: [-1, 1] input without ImageNet mean/std
    grid: Optional[int] = None  # token grid side (input resized to patch * grid); None = latent grid.
    #                                          VA-VAE features: the trained autoencoder's grid (256 px / 16 = 16)
    flip: bool = False  # also `features_flip`: the features of the horizontally flipped image (REPA targets)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # resize to patch * grid (REPA: bicubic)


@dataclass
class ExtractConfig:
    out_dir: str = "runs/data/extract"
    source: SourceConfig = field(default_factory=SourceConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    images: bool = False  # also store each image (column `image`, uint8 [3, S, S])
    latent_dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = 32  # images per forward (each also encoded flipped)
    num_workers: int = 4  # DataLoader decode workers per rank
    chunk_size: int = 1000  # images per resumable chunk per rank
    shard_size_limit: int = DEFAULT_SIZE_LIMIT
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 42  # global RNG seed + rank (official) and base of the per-chunk seeds
    tf32: bool = True  # official extraction runs with TF32 on
    progress_bar: bool = True
    throttle_s: float = 0.0  # sleep after each batch (testing kill/resume); 0 = off
    # Object store: every committed chunk and, at the end, the merged index/statistics/manifest are uploaded to
    # `remote` (s3://bucket/prefix; credentials and endpoint from AWS_* / S3_ENDPOINT_URL, never from a config).
    remote: Optional[str] = None
    keep_local: bool = True  # with remote: keep the shard files in out_dir after their upload (False: metadata only)
    # Job array: this task extracts the chunks c with c % array_count == array_index (CLI: --array I/N | slurm)
    array_index: Optional[int] = None
    array_count: int = 1


def check_extract_config(cfg: ExtractConfig) -> list[tuple[str, str]]:
    """(dotted key, problem) for every invalid value."""
    checks = Checks()
    need = checks.need
    need(bool(cfg.out_dir.strip()), "out_dir", "must not be empty")
    s = cfg.source
    need(s.image_size > 0, "source.image_size", f"must be > 0, got {s.image_size}")
    if s.kind == "synthetic":
        need(s.num_samples > 0, "source.num_samples", f"must be > 0, got {s.num_samples}")
        need(s.num_classes > 0, "source.num_classes", f"must be > 0, got {s.num_classes}")
        need(s.image_size >= 8, "source.image_size", f"synthetic images need image_size >= 8, got {s.image_size}")
        need(s.seed >= 0, "source.seed", f"must be >= 0, got {s.seed}")
    else:
        need(
            bool(s.path.strip()),
            "source.path",
            "must name the image folder" if s.kind == "folder" else "must name the file list",
        )
        need(bool(s.extensions), "source.extensions", "must list at least one extension")
    need(s.limit is None or s.limit > 0, "source.limit", f"must be > 0 or null, got {s.limit}")
    need(
        cfg.tokenizer.kind in available_tokenizers() + [NO_TOKENIZER],
        "tokenizer.kind",
        f"unknown tokenizer {cfg.tokenizer.kind!r}; available: {', '.join(available_tokenizers())}, or "
        f"{NO_TOKENIZER!r} (no latents)",
    )
    f = cfg.features
    if cfg.tokenizer.kind == NO_TOKENIZER:
        need(
            cfg.images or f.enabled,
            "tokenizer.kind",
            "is 'none' (no latents): store the images (images: true) and/or DINOv2 features (features.enabled: "
            "true), or choose a tokenizer",
        )
        need(
            not f.enabled or f.grid is not None,
            "features.grid",
            "must be set when tokenizer.kind is 'none' (there is no latent grid to default to)",
        )
    need(f.grid is None or f.grid > 0, "features.grid", f"must be > 0 or null, got {f.grid}")
    if f.enabled:
        need(
            not (f.random_init and f.weights),
            "features.random_init",
            "set either features.weights (a local checkpoint) or features.random_init=true, not both",
        )
        need(
            f.random_init or bool(f.weights),
            "features.weights",
            "not set: give the path of a local DINOv2 checkpoint file (no downloads), or set "
            "features.random_init=true for a randomly initialised model (tests only)",
        )
    need(cfg.batch_size > 0, "batch_size", f"must be > 0, got {cfg.batch_size}")
    need(cfg.num_workers >= 0, "num_workers", f"must be >= 0, got {cfg.num_workers}")
    need(cfg.chunk_size > 0, "chunk_size", f"must be > 0, got {cfg.chunk_size}")
    need(cfg.shard_size_limit > 0, "shard_size_limit", f"must be > 0, got {cfg.shard_size_limit}")
    need(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    need(cfg.throttle_s >= 0, "throttle_s", f"must be >= 0, got {cfg.throttle_s}")
    need(cfg.array_count >= 1, "array_count", f"must be >= 1, got {cfg.array_count}")
    need(
        cfg.array_index is None or 0 <= cfg.array_index < cfg.array_count,
        "array_index",
        f"must be null or in 0..{cfg.array_count - 1} (array_count), got {cfg.array_index}",
    )
    if cfg.remote is not None:
        need(
            "://" in cfg.remote and not cfg.remote.startswith("file://"),
            "remote",
            f"must be an object-store URL such as s3://bucket/prefix, got {cfg.remote!r}",
        )
    need(cfg.remote is not None or cfg.keep_local, "keep_local", "false needs a remote (the shards would be lost)")
    return checks.pairs()


def load_extract_config(path: Optional[str | Path], overrides: Sequence[str] = ()) -> ExtractConfig:
    """YAML + dotted overrides -> validated ExtractConfig (ConfigError naming file/command line and key)."""
    return load_typed_config(path, overrides, ExtractConfig, check=check_extract_config)


class ExtractError(RuntimeError):
    """A job-level problem the user must fix (output directory from another job, ranks disagree, ...)."""


# ================================================================================================== sources
class SyntheticSource(torch.utils.data.Dataset):
    """data/synthetic.py images as extraction items ``{"image", "label", "sample_id"}``."""

    def __init__(self, num_samples: int, image_size: int, num_classes: int, seed: int) -> None:
        self.images = SyntheticImages(num_samples, image_size=image_size, num_classes=num_classes, seed=seed)
        self.ignored: list[IgnoredFile] = []
        self._fingerprint = f"synthetic:n={num_samples}:size={image_size}:classes={num_classes}:seed={seed}"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.images[index]
        return {"image": image, "label": int(label), "sample_id": int(index)}

    def fingerprint(self) -> str:
        return self._fingerprint


def build_source(cfg: SourceConfig) -> torch.utils.data.Dataset:
    """Dataset of extraction items (``fingerprint()`` identifies the numbering, ``ignored`` lists non-images)."""
    if cfg.kind == "synthetic":
        n = cfg.num_samples if cfg.limit is None else min(cfg.num_samples, cfg.limit)
        return SyntheticSource(n, cfg.image_size, cfg.num_classes, cfg.seed)
    if cfg.kind == "folder":
        try:
            records, classes, ignored = scan_image_folder(cfg.path, cfg.extensions)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"source.path: {err}") from None
    elif cfg.kind == "filelist":
        try:
            records = read_file_list(cfg.path, cfg.root or None)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"source.path: {err}") from None
        classes, ignored = None, []
    else:  # pragma: no cover - the config loader only admits the kinds above
        raise ValueError(f"source.kind: unknown source {cfg.kind!r}")
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if not records:
        raise FileNotFoundError(f"source.path: no images found under {cfg.path}")
    dataset = ImageFileDataset(records, cfg.image_size, ignored=ignored, classes=classes)
    dataset._fingerprint_prefix = f"{cfg.kind}:size={cfg.image_size}:"  # type: ignore[attr-defined]
    return dataset


def _source_fingerprint(source: Any) -> str:
    return getattr(source, "_fingerprint_prefix", "") + source.fingerprint()


# ================================================================================================= features
def build_features(cfg: FeaturesConfig, grid: tuple[int, int]) -> FeatureExtractor:
    """DINOv2 patch tokens on the latent grid: [-1, 1] images (B,3,H,W) -> (B, D, h, w).

    The frozen timm DINOv2 wrapper registered as ``"dinov2"`` in data/features.py (``models/dinov2.py``, shared
    with VA-VAE training; built by name, so data/ does not import models/), configured from the ``features``
    section: ``timm.create_model(model, pretrained=False, dynamic_img_size=True, num_classes=0)`` with weights
    from the local file ``features.weights`` (or random with ``features.random_init``); input resized (bilinear,
    align_corners=False) to ``patch * grid`` so the token grid equals the latent grid (224 px for patch 14 and a
    16x16 latent), optionally ImageNet-normalised, then ``forward_features`` minus the prefix tokens (CLS,
    registers) reshaped to [D, h, w]."""
    return build_feature_extractor(
        FEATURES_KIND,
        model=cfg.model,
        weights=cfg.weights,
        random_init=cfg.random_init,
        grid=grid,
        imagenet_norm=cfg.imagenet_norm,
        model_kwargs=cfg.model_kwargs,
        interpolation=cfg.interpolation,
        config_key="features",
    )


# ============================================================================================ distributed
def _resolve_device(kind: str, dist: Any) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    if dist is not None and getattr(dist, "device", None) is not None and dist.device.type == "cuda":
        return dist.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if kind == "cuda":
        raise ExtractError("device: cuda requested but CUDA is not available")
    return torch.device("cpu")


# ================================================================================================ writing
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _moments_to_json(moments: RunningMoments) -> dict[str, Any]:
    return {
        "count": moments.count,
        "mean": None if moments.mean is None else moments.mean.tolist(),  # float64 -> exact JSON floats
        "m2": None if moments.m2 is None else moments.m2.tolist(),
    }


def _moments_from_json(state: dict[str, Any]) -> RunningMoments:
    moments = RunningMoments()
    moments.load_state_dict(state)
    return moments


def _chunk_name(chunk: int) -> str:
    return f"chunk{chunk:06d}"


def _chunk_items(chunk: int, chunk_size: int, num_items: int) -> range:
    """The source indices of a chunk: consecutive, the same whatever the number of ranks or array tasks."""
    return range(chunk * chunk_size, min((chunk + 1) * chunk_size, num_items))


def _sample_digest(sample_id: int, label: int, arrays: Sequence[np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.array([sample_id, label], dtype="<i8").tobytes())
    for array in arrays:
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


class _ChunkWriter:
    """One chunk: MDS shards in ``out/.tmp-chunkNNNNNN`` and its metadata; ``commit`` renames it into place."""

    def __init__(self, out: Path, chunk: int, items: range, columns: dict[str, str], size_limit: int) -> None:
        self.chunk = chunk
        self.final = out / _chunk_name(chunk)
        self.tmp = out / f".tmp-{_chunk_name(chunk)}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.writer = open_writer(self.tmp, columns, size_limit)
        self.items = items
        self.expected = set(items)
        self.moments = RunningMoments()
        self.ids: list[int] = []
        self.digests: list[str] = []
        self.skipped: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        arrays = [record[k] for k in ("latent", "latent_flip", "features", "features_flip", "image") if k in record]
        self.ids.append(int(record["sample_id"]))
        self.digests.append(_sample_digest(int(record["sample_id"]), int(record["label"]), arrays))

    def skip(self, bad: BadItem) -> None:
        self.skipped.append({"sample_id": int(bad.sample_id), "path": bad.path, "error": bad.error})

    def commit(self) -> dict[str, Any]:
        self.writer.finish()
        seen = set(self.ids) | {s["sample_id"] for s in self.skipped}
        if seen != self.expected or len(self.ids) + len(self.skipped) != len(self.expected):
            raise RuntimeError(
                f"chunk {self.final}: wrote {len(self.ids)} + skipped {len(self.skipped)} items, "
                f"expected exactly the {len(self.expected)} assigned sample ids"
            )
        meta = {
            "format": FORMAT_VERSION,
            "chunk": self.chunk,
            "items": [self.items.start, self.items.stop],
            "num_items": len(self.expected),
            "count": len(self.ids),
            "sample_ids": self.ids,
            "digests": self.digests,
            "skipped": self.skipped,
            "moments": _moments_to_json(self.moments),
            "time": time.time(),
        }
        with open(self.tmp / CHUNK_META, "w", encoding="utf-8") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        for path in self.tmp.iterdir():
            if path.is_file():
                _fsync_file(path)
        fsync_dir(self.tmp)
        os.rename(self.tmp, self.final)  # the commit point: the chunk is complete from here on
        fsync_dir(self.final.parent)
        return meta


def _read_chunk_meta(chunk_dir: Path) -> Optional[dict[str, Any]]:
    try:
        with open(chunk_dir / CHUNK_META, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _shard_files(chunk_dir: Path) -> list[str]:
    """The shard file names the chunk's MDS index lists (the compressed file when there is one)."""
    try:
        index = json.loads((chunk_dir / INDEX_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [(s.get("zip_data") or s["raw_data"])["basename"] for s in index.get("shards", [])]


def _merge_index(out: Path, chunks: list[str]) -> None:
    """``out/index.json`` over the chunk directories (as streaming's merge_index: basenames prefixed with the
    chunk's directory), written atomically, so array tasks that finish together cannot tear it."""
    shards: list[dict[str, Any]] = []
    for name in chunks:
        index = json.loads((out / name / INDEX_FILENAME).read_text(encoding="utf-8"))
        for shard in index["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = f"{name}/{shard[key]['basename']}"
            shards.append(shard)
    atomic_write_json(out / INDEX_FILENAME, {"version": 2, "shards": shards})


# ================================================================================================== remote
class _Remote:
    """Uploads of committed chunks and of the merged files to ``remote`` (streaming's uploaders: s3://, gs://,
    ...; endpoint and credentials from the standard environment variables, e.g. AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, S3_ENDPOINT_URL). A chunk's ``chunk.json`` is uploaded after its shards: on the
    remote, a chunk is complete when its ``chunk.json`` is there, so a kill mid-upload leaves it incomplete and
    the next run uploads it again."""

    def __init__(self, out: Path, remote: str) -> None:
        self.out, self.url = out, remote.rstrip("/")
        upload_log = logging.getLogger("streaming.base.storage.upload")
        old = upload_log.level
        upload_log.setLevel(logging.ERROR)  # "directory exists and not empty": it does, by design
        try:
            self.uploader = CloudUploader.get((str(out), self.url), keep_local=True, exist_ok=True, retry=3)
        except Exception as err:  # noqa: BLE001 - name the key
            raise ExtractError(f"remote: cannot use {remote}: {type(err).__name__}: {err}") from err
        finally:
            upload_log.setLevel(old)

    def complete_chunks(self) -> set[int]:
        keys = self.uploader.list_objects() or []
        found = set()
        for key in keys:
            match = _REMOTE_CHUNK_RE.search(key)
            if match:
                found.add(int(match.group(1)))
        return found

    def upload(self, relative: str) -> None:
        self.uploader.upload_file(relative)

    def upload_chunk(self, chunk: int, keep_local: bool) -> None:
        name = _chunk_name(chunk)
        directory = self.out / name
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.name != CHUNK_META:
                self.upload(f"{name}/{path.name}")
        self.upload(f"{name}/{CHUNK_META}")  # last: the chunk's commit point on the remote
        if not keep_local:
            for shard in _shard_files(directory):
                (directory / shard).unlink(missing_ok=True)

    def read_json(self, relative: str) -> Optional[dict[str, Any]]:
        """A JSON file of the remote, or None when it has none."""
        if not any(
            key.endswith(f"/{relative}") or key == relative for key in self.uploader.list_objects(relative) or []
        ):
            return None
        tmp = self.out / f".tmp-remote-{os.getpid()}-{relative}"
        try:
            CloudDownloader.direct_download(f"{self.url}/{relative}", str(tmp), 60)
            return json.loads(tmp.read_text(encoding="utf-8"))
        finally:
            tmp.unlink(missing_ok=True)

    def fetch_chunk_meta(self, chunk: int) -> None:
        """A chunk complete only on the remote: its index.json and chunk.json into ``out/chunkNNNNNN/`` (no shards),
        renamed into place complete (another array task may be doing the same)."""
        name = _chunk_name(chunk)
        tmp = self.out / f".tmp-{name}-meta-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for filename in (INDEX_FILENAME, CHUNK_META):
            CloudDownloader.direct_download(f"{self.url}/{name}/{filename}", str(tmp / filename), 60)
        try:
            os.rename(tmp, self.out / name)
        except OSError:  # already there (fetched by another task, or metadata of a keep_local=false chunk)
            shutil.rmtree(tmp, ignore_errors=True)


# ================================================================================================= results
@dataclass
class ExtractResult:
    out_dir: str
    num_items: int  # images in the source
    num_samples: int  # written to the dataset (all runs)
    written_this_run: int  # written by this invocation (all ranks)
    skipped: list[dict[str, Any]]  # {sample_id, path, error} of every rank (rank 0; empty elsewhere)
    ignored: list[dict[str, Any]]  # {path, reason}
    mean: Optional[torch.Tensor]  # (1, C, 1, 1)
    std: Optional[torch.Tensor]
    elapsed_s: float
    manifest: Optional[dict[str, Any]]  # rank 0 only
    remote: Optional[str] = None
    array: tuple[int, int] = (0, 1)  # (task, tasks) of a job array
    finalized: bool = False  # every chunk complete: index.json, statistics and manifest written
    remaining_chunks: int = 0  # not finalized: chunks other array tasks still have to extract


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    with open(Path(out_dir) / MANIFEST_FILENAME, encoding="utf-8") as f:
        return json.load(f)


# ===================================================================================================== job
def _plan(
    cfg: ExtractConfig, source: Any, latent_shape: Sequence[int], features_shape: Optional[Sequence[int]]
) -> dict[str, Any]:
    f = cfg.features
    return json.loads(
        json.dumps(
            {
                "format": FORMAT_VERSION,
                "num_items": len(source),
                "source_fingerprint": _source_fingerprint(source),
                "chunk_size": cfg.chunk_size,
                "tokenizer": config_to_dict(cfg.tokenizer),
                "latent_shape": list(latent_shape) if latent_shape is not None else None,
                "latent_dtype": cfg.latent_dtype,
                "features": None
                if not f.enabled
                else {
                    "model": f.model,
                    "random_init": f.random_init,
                    "model_kwargs": f.model_kwargs,
                    "imagenet_norm": f.imagenet_norm,
                    "shape": list(features_shape or []),
                    # only when set, so that a job started before these options existed still resumes
                    **({"flip": True} if f.flip else {}),
                    **({"interpolation": f.interpolation} if f.interpolation != "bilinear" else {}),
                },
                "image_shape": [3, cfg.source.image_size, cfg.source.image_size] if cfg.images else None,
                "seed": cfg.seed,
            },
            default=str,
        )
    )


def _check_plan(out: Path, plan: dict[str, Any], remote: Optional[_Remote] = None) -> None:
    """Write the plan, or compare it with the one on disk (rank 0); ExtractError on a mismatch. With a remote, the
    same with the remote's copy (uploaded at the first start), so a new node cannot add chunks of other settings."""
    path = out / PLAN_FILENAME
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, plan)
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ExtractError(f"out_dir: {path} is unreadable ({err}); remove it or use another out_dir") from None
    _compare_plans(old, plan, f"out_dir: {out}")
    if remote is not None:
        theirs = remote.read_json(PLAN_FILENAME)
        if theirs is None:
            remote.upload(PLAN_FILENAME)
        else:
            _compare_plans(theirs, plan, f"remote: {remote.url}")


def _compare_plans(old: dict[str, Any], plan: dict[str, Any], where: str) -> None:
    if old != plan:
        diffs = [
            f"{k}: {old.get(k)!r} -> {plan.get(k)!r}" for k in sorted(set(old) | set(plan)) if old.get(k) != plan.get(k)
        ]
        raise ExtractError(
            f"{where} holds a job with different settings ({'; '.join(diffs)}). Resume with the same "
            f"source, chunk_size, tokenizer, features, images, latent_dtype and seed (any number of ranks or "
            f"array tasks), or choose another out_dir"
        )


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


def parse_array(spec: str, environ: Optional[dict[str, str]] = None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); ``"slurm"`` -> this Slurm array task's (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN,
    SLURM_ARRAY_TASK_COUNT)."""
    env = os.environ if environ is None else environ
    if spec.strip().lower() == "slurm":
        try:
            task, first, count = (
                int(env[k]) for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
            )
        except (KeyError, ValueError):
            raise ConfigError(
                "--array slurm: SLURM_ARRAY_TASK_ID/_MIN/_COUNT are not set (not a Slurm job array task)"
            ) from None
        index = task - first
    else:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not match:
            raise ConfigError(f"--array: expected I/N (task I of N, 0-based) or 'slurm', got {spec!r}")
        index, count = int(match.group(1)), int(match.group(2))
    if not 0 <= index < count:
        raise ConfigError(f"--array: task {index} is not in 0..{count - 1}")
    return index, count


def _assign(
    cfg: ExtractConfig, out: Path, num_items: int, task_chunks: list[int], remote: Optional[_Remote]
) -> dict[str, Any]:
    """Rank 0: which chunks of this task to extract and which complete ones still to upload; removes the partial
    chunks of this task (not those of other array tasks, which may be writing them now)."""
    num_chunks = math.ceil(num_items / cfg.chunk_size)
    remote_done = remote.complete_chunks() if remote is not None else set()
    ours = set(task_chunks)
    complete_local: set[int] = set()
    for entry in sorted(out.iterdir()) if out.is_dir() else []:
        tmp = entry.name.startswith(".tmp-")
        match = _CHUNK_RE.match(entry.name[len(".tmp-") :] if tmp else entry.name)
        if not match:
            continue
        chunk = int(match.group(1))
        if chunk >= num_chunks:
            raise ExtractError(
                f"out_dir: {entry} does not belong to this job's plan ({num_chunks} chunks); remove it or use "
                f"another out_dir"
            )
        if tmp:
            if chunk in ours:
                log.info("removing partial chunk %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
            continue
        meta = _read_chunk_meta(entry)
        expected = len(_chunk_items(chunk, cfg.chunk_size, num_items))
        if meta is None or meta.get("num_items") != expected:
            raise ExtractError(
                f"out_dir: {entry} does not belong to this job's plan (chunk {chunk} of {num_chunks}); remove it "
                f"or use another out_dir"
            )
        if chunk in remote_done or all((entry / f).is_file() for f in _shard_files(entry)):
            complete_local.add(chunk)
        elif chunk in ours:  # metadata only, shards neither here nor on the remote: redo it
            log.warning("chunk %s lacks shard files and is not on the remote: extracting it again", entry)
            shutil.rmtree(entry)
    complete = complete_local | remote_done
    return {
        "todo": [c for c in task_chunks if c not in complete],
        "upload": sorted(c for c in complete_local - remote_done if c in ours) if remote is not None else [],
        "fetch": sorted(c for c in remote_done - complete_local if c in ours),
        "done_before": len([c for c in task_chunks if c in complete]),
    }


def extract(cfg: ExtractConfig, dist: Any = None, array: Optional[tuple[int, int]] = None) -> ExtractResult:
    """Run (or resume) the extraction described by ``cfg`` on this rank. Collective when a process group is
    initialised (every rank calls it); without one it is a single-process job. ``array=(i, n)``: only the
    chunks ``c`` with ``c % n == i`` (one task of a job array; default: ``cfg.array_index``/``array_count``);
    the task that completes the last chunk writes the merged index, statistics and manifest."""
    problems = check_extract_config(cfg)
    if problems:
        raise ConfigError("\n".join(f"config: {k}: {p}" for k, p in problems))
    if array is None:
        array = (cfg.array_index, cfg.array_count) if cfg.array_index is not None else (0, 1)
    task, num_tasks = array
    t_start = time.time()
    rank, world = rank_and_world()
    device = _resolve_device(cfg.device, dist)
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    out = Path(cfg.out_dir)

    # -- what to do: the source (identical on every rank), models, schema, plan
    source = build_source(cfg.source)
    fingerprints = all_gather_object(_source_fingerprint(source))
    if len(set(fingerprints)) != 1:
        raise ExtractError(
            f"source: ranks see different image lists (fingerprints {fingerprints}); is "
            f"{cfg.source.path} the same on every node?"
        )
    tokenizer: Optional[Tokenizer] = None
    latent_shape = None
    if cfg.tokenizer.kind != NO_TOKENIZER:
        tokenizer = build_tokenizer(cfg.tokenizer.kind, **cfg.tokenizer.kwargs).to(device)
        latent_shape = tokenizer.latent_shape(cfg.source.image_size)
    grid = (cfg.features.grid, cfg.features.grid) if cfg.features.grid else latent_shape[1:]
    features = build_features(cfg.features, grid).to(device) if cfg.features.enabled else None
    features_shape = features.output_shape if features is not None else None
    columns = latent_columns(
        cfg.latent_dtype,
        with_features=features is not None,
        latent_shape=latent_shape,
        features_shape=features_shape,
        with_latents=tokenizer is not None,
        image_size=cfg.source.image_size if cfg.images else None,
        with_flip_features=features is not None and cfg.features.flip,
    )
    plan = _plan(cfg, source, latent_shape, features_shape)
    num_items = len(source)
    num_chunks = math.ceil(num_items / cfg.chunk_size)
    task_chunks = [c for c in range(num_chunks) if c % num_tasks == task]

    # -- this task's work: rank 0 checks the plan and the chunks on disk (and on the remote), every rank takes
    #    every world-th chunk of what is left (so any number of ranks can resume any job)
    remote: Optional[_Remote] = None
    assignment: dict[str, Any] = {}
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            remote = _Remote(out, cfg.remote) if cfg.remote else None
            _check_plan(out, plan, remote)
            assignment = _assign(cfg, out, num_items, task_chunks, remote)
        except Exception as err:  # noqa: BLE001 - every rank must learn about it
            assignment = {"error": f"{type(err).__name__}: {err}" if not isinstance(err, ExtractError) else str(err)}
    assignment = broadcast_object(assignment)
    if "error" in assignment:
        raise ExtractError(assignment["error"])
    if rank != 0 and cfg.remote:
        remote = _Remote(out, cfg.remote)
    todo, uploads = assignment["todo"][rank::world], assignment["upload"][rank::world]
    if rank == 0:
        log.info(
            "extract: %d images in %d chunk(s) of <= %d%s; %d rank(s); %d chunk(s) done, %d to do%s",
            num_items,
            num_chunks,
            cfg.chunk_size,
            f"; array task {task} of {num_tasks}: {len(task_chunks)} chunk(s)" if num_tasks > 1 else "",
            world,
            assignment["done_before"],
            len(assignment["todo"]),
            f", {len(assignment['upload'])} to upload to {cfg.remote}" if assignment["upload"] else "",
        )
    if remote is not None:
        for chunk in uploads:  # committed locally by a run killed before (or during) their upload
            remote.upload_chunk(chunk, cfg.keep_local)
        if rank == 0:
            for chunk in assignment["fetch"]:
                remote.fetch_chunk_meta(chunk)

    # -- the loop
    written = 0
    if todo:
        written = _run_batches(cfg, source, tokenizer, features, columns, out, todo, device, rank, world, remote)

    # -- finish: when every chunk of the job is complete (this was the last task), rank 0 merges them
    summaries = all_gather_object({"written": written})
    result = ExtractResult(
        out_dir=str(out),
        num_items=num_items,
        num_samples=0,
        written_this_run=sum(s["written"] for s in summaries),
        skipped=[],
        ignored=[{"path": i.path, "reason": i.reason} for i in getattr(source, "ignored", [])],
        mean=None,
        std=None,
        elapsed_s=time.time() - t_start,
        manifest=None,
        remote=cfg.remote,
        array=(task, num_tasks),
    )
    final: dict[str, Any] = {}
    if rank == 0:
        try:
            final = _finalize(
                cfg, out, source, plan, world, columns, num_chunks, tokenizer is not None, remote, t_start
            )
        except Exception as err:  # noqa: BLE001 - every rank must learn about it
            final = {"error": f"{type(err).__name__}: {err}" if not isinstance(err, ExtractError) else str(err)}
    final = broadcast_object(final)
    if "error" in final:
        raise ExtractError(final["error"])
    result.num_samples = final["num_samples"]
    result.finalized = final["finalized"]
    result.remaining_chunks = final.get("remaining", 0)
    if final["finalized"]:
        manifest = final["manifest"]
        result.skipped = manifest["skipped"]
        result.mean, result.std = final["mean"], final["std"]
        result.manifest = manifest if rank == 0 else None
    result.elapsed_s = time.time() - t_start
    if rank == 0:
        _print_summary(result)
    barrier()
    return result


def _finalize(
    cfg: ExtractConfig,
    out: Path,
    source: Any,
    plan: dict[str, Any],
    world: int,
    columns: dict[str, str],
    num_chunks: int,
    has_latents: bool,
    remote: Optional[_Remote],
    t_start: float,
) -> dict[str, Any]:
    """Rank 0: if every chunk is complete, the merged index, statistics and manifest (uploaded to the remote,
    index.json last); otherwise how many chunks other tasks still have to do."""
    remote_done = remote.complete_chunks() if remote is not None else set()
    metas: list[dict[str, Any]] = []
    missing = 0
    for chunk in range(num_chunks):
        directory = out / _chunk_name(chunk)
        if chunk in remote_done and not (directory / CHUNK_META).is_file():
            remote.fetch_chunk_meta(chunk)  # type: ignore[union-attr]
        meta = _read_chunk_meta(directory)
        if meta is None or (remote is not None and chunk not in remote_done):  # with a remote: complete there
            missing += 1
        else:
            metas.append(meta)
    if missing:
        count = sum(m["count"] for m in metas)
        return {"finalized": False, "num_samples": count, "remaining": missing}
    moments = RunningMoments()
    for meta in metas:
        moments.merge(_moments_from_json(meta["moments"]))
    num_samples = sum(m["count"] for m in metas)
    if num_samples == 0:
        raise ExtractError(f"source: none of the {len(source)} images could be read (see the skipped files above)")
    _merge_index(out, [_chunk_name(m["chunk"]) for m in metas if m["count"] > 0])
    stats = moments.to_tensor_stats() if has_latents else {"mean": None, "std": None}
    if has_latents:
        save_latent_stats(out, stats["mean"], stats["std"])
    manifest = _write_manifest(cfg, out, source, plan, world, metas, moments, columns, time.time() - t_start)
    if remote is not None:
        for name in [PLAN_FILENAME, STATS_FILENAME if has_latents else None, MANIFEST_FILENAME, INDEX_FILENAME]:
            if name:
                remote.upload(name)  # index.json last: the remote dataset is complete once it is there
    return {"finalized": True, "num_samples": num_samples, "manifest": manifest, **stats}


def _run_batches(
    cfg: ExtractConfig,
    source: Any,
    tokenizer: Optional[Tokenizer],
    features: Optional[FeatureExtractor],
    columns: dict[str, str],
    out: Path,
    chunks: list[int],
    device: torch.device,
    rank: int,
    world: int,
    remote: Optional[_Remote],
) -> int:
    num_items = len(source)
    batches: list[list[int]] = []
    batch_chunk: list[int] = []
    for chunk in chunks:
        ids = list(_chunk_items(chunk, cfg.chunk_size, num_items))
        for i in range(0, len(ids), cfg.batch_size):
            batches.append(ids[i : i + cfg.batch_size])
            batch_chunk.append(chunk)
    loader_kwargs: dict[str, Any] = {}
    if cfg.num_workers > 0:
        loader_kwargs["prefetch_factor"] = 4
    loader = DataLoader(
        source,
        batch_sampler=batches,
        num_workers=cfg.num_workers,
        collate_fn=collate_items,
        pin_memory=device.type == "cuda",
        **loader_kwargs,
    )
    last_of_chunk = {chunk: i for i, chunk in enumerate(batch_chunk)}
    dtype = np.dtype(cfg.latent_dtype)
    progress = Progress(
        sum(len(b) for b in batches),
        desc=f"extract (rank 0 of {world}, its {len(chunks)} chunk(s))",
        unit="img",
        enabled=rank == 0 and cfg.progress_bar,
        logger=log,
    )
    writer: Optional[_ChunkWriter] = None
    generator: Optional[torch.Generator] = None
    written = skipped = 0
    with progress:
        for i, batch in enumerate(loader):
            chunk = batch_chunk[i]
            if writer is None:
                items = _chunk_items(chunk, cfg.chunk_size, num_items)
                writer = _ChunkWriter(out, chunk, items, columns, cfg.shard_size_limit)
                generator = torch.Generator(device=device).manual_seed(_chunk_seed(cfg.seed, chunk))
            if cfg.throttle_s:
                time.sleep(cfg.throttle_s)  # with the chunk's .tmp directory open, for kill tests
            for bad in batch["bad"]:
                log.warning("skipping sample %d (%s): %s", bad.sample_id, bad.path, bad.error)
                writer.skip(bad)
                skipped += 1
            if batch["image"] is not None:
                written += _encode_and_write(cfg, batch, tokenizer, features, writer, generator, device, dtype)
            progress.update(len(batch["bad"]) + int(batch["sample_id"].numel()))
            if skipped:
                progress.set_postfix(skipped=skipped)
            if last_of_chunk[chunk] == i:
                writer.commit()
                writer = None
                if remote is not None:
                    remote.upload_chunk(chunk, cfg.keep_local)
    return written


def _encode_and_write(
    cfg: ExtractConfig,
    batch: dict[str, Any],
    tokenizer: Optional[Tokenizer],
    features: Optional[FeatureExtractor],
    writer: _ChunkWriter,
    generator: torch.Generator,
    device: torch.device,
    dtype: np.dtype,
) -> int:
    x = batch["image"].to(device, non_blocking=True)
    n = x.shape[0]
    with torch.inference_mode():
        z = (
            tokenizer.encode(torch.cat([x, torch.flip(x, dims=[-1])]), sample=cfg.tokenizer.sample, generator=generator)
            if tokenizer is not None
            else None
        )
        feats = None
        if features is not None:  # one forward over the images and (features.flip) their flips
            feats = features(torch.cat([x, torch.flip(x, dims=[-1])]) if cfg.features.flip else x)
    columns: dict[str, np.ndarray] = {}
    if z is not None:
        z = z.to(torch.float32).cpu().numpy().astype(dtype)
        columns["latent"], columns["latent_flip"] = z[:n], z[n:]
        writer.moments.update(z[:n])  # exact stats of the stored (non-flipped) values
    if feats is not None:
        feats = feats.to(torch.float32).cpu().numpy().astype(np.float16)
        columns["features"] = feats[:n]
        if cfg.features.flip:
            columns["features_flip"] = feats[n:]
    if cfg.images:
        columns["image"] = _to_uint8_exact(batch["image"]).numpy()
    labels, ids = batch["label"].tolist(), batch["sample_id"].tolist()
    for j in range(n):
        record = {"label": int(labels[j]), "sample_id": int(ids[j])}
        record.update((name, np.ascontiguousarray(array[j])) for name, array in columns.items())
        writer.write(record)
    return n


def _to_uint8_exact(images: torch.Tensor) -> torch.Tensor:
    """The [-1, 1] images as the 8-bit pixels they came from; an error if they did not come from 8-bit pixels
    (the stored image must be exactly what the tokenizer and DINOv2 saw)."""
    pixels = normalized_to_uint8(images)
    if not torch.equal(uint8_to_normalized(pixels), images.to(torch.float32)):
        raise ExtractError(
            "images: the source images are not 8-bit (x != (u / 255 - 0.5) / 0.5 for uint8 u), so "
            "the stored uint8 image would differ from what the tokenizer and DINOv2 saw"
        )
    return pixels


def _write_manifest(
    cfg: ExtractConfig,
    out: Path,
    source: Any,
    plan: dict[str, Any],
    world: int,
    metas: list[dict[str, Any]],
    total: RunningMoments,
    columns: dict[str, str],
    elapsed: float,
) -> dict[str, Any]:
    ids: list[int] = []
    digests: list[str] = []
    skipped: list[dict[str, Any]] = []
    for meta in metas:
        ids.extend(meta["sample_ids"])
        digests.extend(meta["digests"])
        skipped.extend(meta["skipped"])
    chunks = len(metas)
    order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
    sorted_ids = np.asarray(ids, dtype="<i8")[order]
    if len(np.unique(sorted_ids)) != len(sorted_ids):
        raise ExtractError(f"out_dir: {out} holds duplicate sample ids (chunks from another job?)")
    content = hashlib.sha256()
    for k in order:
        content.update(bytes.fromhex(digests[k]))
    skipped.sort(key=lambda s: s["sample_id"])
    ignored = [{"path": i.path, "reason": i.reason} for i in getattr(source, "ignored", [])]
    manifest = {
        "format": FORMAT_VERSION,
        "num_items": len(source),
        "num_samples": int(len(sorted_ids)),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_ignored": len(ignored),
        "ignored": ignored,
        "sample_ids_sha256": hashlib.sha256(sorted_ids.tobytes()).hexdigest(),
        "content_sha256": content.hexdigest(),
        "latent_shape": plan["latent_shape"],
        "latent_dtype": cfg.latent_dtype,
        "features_shape": (plan["features"] or {}).get("shape"),
        "image_shape": plan["image_shape"],
        "columns": columns,
        "stats": None
        if not total.count
        else {
            "count_per_channel": int(total.count),
            "mean": total.mean.tolist(),
            "std": total.std().tolist(),
            "file": "latents_stats.pt",
        },
        "world_size": world,
        "chunk_size": cfg.chunk_size,
        "num_chunks": chunks,
        "plan": plan,
        "config": config_to_dict(cfg),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "last_run_elapsed_s": round(elapsed, 3),
    }
    atomic_write_json(out / MANIFEST_FILENAME, manifest)
    return manifest


def _print_summary(result: ExtractResult) -> None:
    rate = result.written_this_run / result.elapsed_s if result.elapsed_s > 0 else 0.0
    if not result.finalized:
        task, tasks = result.array
        print(
            f"extract: array task {task} of {tasks} done ({result.written_this_run} written by this run in "
            f"{result.elapsed_s:.1f} s, {rate:.1f} img/s); {result.remaining_chunks} chunk(s) of other tasks remain: "
            f"the task that completes the last one writes index.json, statistics and manifest",
            flush=True,
        )
        return
    lines = [
        f"extract: {result.num_samples} of {result.num_items} images in {result.out_dir} "
        f"({result.written_this_run} written by this run in {result.elapsed_s:.1f} s, {rate:.1f} img/s)",
        f"extract: {len(result.skipped)} skipped (unreadable)" + (":" if result.skipped else ""),
    ]
    if result.remote:
        lines.append(f"extract: uploaded to {result.remote}")
    lines += [f"  skipped sample {s['sample_id']}: {s['path']}: {s['error']}" for s in result.skipped]
    if result.ignored:
        lines.append(f"extract: {len(result.ignored)} ignored (not images):")
        lines += [f"  ignored {i['path']}: {i['reason']}" for i in result.ignored]
    if result.mean is not None:
        lines.append(
            f"extract: latent mean {[round(v, 4) for v in result.mean.flatten().tolist()[:8]]}"
            f"{' ...' if result.mean.numel() > 8 else ''}, std "
            f"{[round(v, 4) for v in result.std.flatten().tolist()[:8]]}"
            f"{' ...' if result.std.numel() > 8 else ''}"
        )
    print("\n".join(lines), flush=True)


# ===================================================================================================== CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Extract tokenizer latents (+ flips, DINOv2 features) to MDS.")
    parser.add_argument("config", help="extraction YAML (e.g. configs/extract_synthetic.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. source.num_samples=512 out_dir=/tmp/x")
    parser.add_argument(
        "--array",
        default=os.environ.get("LLAT_EXTRACT_ARRAY") or None,
        help="run as task I of an N-task job array: 'I/N' (0-based) or 'slurm' (SLURM_ARRAY_TASK_ID/_MIN/_COUNT); "
        "default: $LLAT_EXTRACT_ARRAY, else the config's array_index/array_count",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_extract_config(args.config, args.overrides)
        if args.array:
            cfg.array_index, cfg.array_count = parse_array(args.array)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    dist = init_distributed()
    logging.basicConfig(
        level=logging.INFO if dist.rank == 0 else logging.WARNING,
        format=f"[%(asctime)s r{dist.rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    try:
        extract(cfg, dist)
    except (ConfigError, ExtractError, FileNotFoundError) as err:
        print(f"error (rank {dist.rank}): {err}", file=sys.stderr)
        return 2
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
