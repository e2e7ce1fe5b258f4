"""MDS datasets on MosaicML streaming: schema, writers, statistics and the readers (latents for the DiT, images
and DINOv2 features for VA-VAE).

Schema (one MDS sample per image; written with zstd compression and xxh64 shard hashes; data/extract.py writes
it, every column but label and sample_id optional there):

    latent        ndarray:<float16|float32>[:C,H,W]   tokenizer latent of the image (DiT training)
    latent_flip   ndarray:<float16|float32>[:C,H,W]   tokenizer latent of the horizontally flipped image
    label         int64                               class index
    sample_id     int64                               global image index (resume checks, dedup)
    features      ndarray:float16[:D,h,w]             DINOv2 patch tokens of the (non-flipped) image on an h x w
                                                      token grid (VA-VAE: the autoencoder's latent grid)
    features_flip ndarray:float16[:D,h,w]             DINOv2 patch tokens of the horizontally flipped image
                                                      (REPA: the targets of ``latent_flip``)
    image         ndarray:uint8:3,S,S                 the image itself: the exact S x S crop the tokenizer and
                                                      DINOv2 saw, not flipped (VA-VAE training)

The statistics file ``latents_stats.pt`` next to ``index.json`` holds
``{'mean': Tensor(1,C,1,1), 'std': Tensor(1,C,1,1)}``, the official LightningDiT layout, so the
official file can be dropped in. They are exact per-channel moments over every non-flipped latent
(``RunningMoments``), where the official code samples 10,000 latents. A dataset without latents has none.

Readers: ``LatentDataset`` (DiT: latent/latent_flip, label, sample_id[, features]) and ``ImageDataset`` (VA-VAE:
image[, features], label, sample_id), both built by ``build_streaming_loader`` and checked the same way (below).
``read_columns`` reads a dataset's column encodings from its ``index.json`` without building a reader.

Reading (``LatentDataset`` / ``ImageDataset`` / ``build_streaming_loader``):

* Normalisation (latents): ``z = (z - mean) / std`` when ``latent_norm``, then ``z * latent_multiplier``
  always (as the official dataset does; the SD-VAE baseline uses latent_norm=False, 0.18215). Images:
  ``u / 255`` then ``(x - 0.5) / 0.5`` (float32, [-1, 1]), bitwise what data/images.py computes from the file.
* Flip augmentation: ``latent_flip`` replaces ``latent`` (``ImageDataset``: the image is flipped) with
  p = 0.5, decided by a hash of (seed, epoch, stored sample_id) -- no RNG state, so order *and* flips are
  identical after a mid-epoch resume with any number of workers. The epoch is the one streaming itself
  iterates (recorded when ``__iter__`` starts the epoch, including the epoch restored by
  ``load_state_dict``). ``features`` belong to the non-flipped image: ``ImageDataset`` refuses flips when
  it reads them; ``LatentDataset`` returns ``features_flip`` with ``latent_flip`` when the dataset has that column
  (``pair_flip_features``: required, REPA).
* Checks: required columns present (the error names data.path and the missing column), every shard with
  the same columns, fixed shapes against what the model expects (up front, else per sample).
* Distribution: streaming finds rank and world from the environment variables RANK, WORLD_SIZE,
  LOCAL_RANK and LOCAL_WORLD_SIZE (set by torchrun), not from torch.distributed.
  ``build_streaming_loader(..., dist=...)`` fills them in when missing (e.g. under srun) and refuses
  values that disagree.
* Failures: a missing/invalid ``index.json``, a missing or truncated shard file, a shard whose hash
  does not match, or one that cannot be decompressed/decoded raises an error naming the file.
  Streaming itself would end the epoch early without an error when its background download thread
  fails; the readers' ``__iter__`` turns that into an exception.
* Disk: streaming reads uncompressed shards. Without ``remote`` it decompresses each
  ``shard.N.mds.zstd`` once into ``shard.N.mds`` *inside the dataset directory* and keeps both, so
  the directory must be writable and grows by the raw size. To keep a dataset read-only, point
  ``data.remote`` at it (a local path works) and ``data.path`` at a scratch cache directory.
* Speed: the readers install, on each MDS shard, a sample reader that keeps this process's recently used shard
  files open (``pread``; a deleted or replaced file is opened again by name) and decoders built once per column,
  and skip streaming's per-sample ``prepare_shard`` for shards this process has seen prepared when there is no
  cache limit; the values are those of streaming's own reader (tests/integration/test_bench_data.py, tools/bench_data.py).
* Shared memory: streaming coordinates the ranks/workers of a node through shared memory keyed by
  the local directory. After a crash call ``streaming.base.util.clean_stale_shared_memory()`` once,
  on every rank (it is a collective when torch.distributed is initialised), before any dataset is
  built -- never while a dataset is alive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as tdist
from streaming import MDSWriter, StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.format.mds.encodings import NDArray, Scalar, _get_coder
from streaming.base.format.mds.reader import MDSReader
from streaming.base.hashing import get_hash
from streaming.base.storage.download import CloudDownloader
from streaming.base.util import merge_index

from core.fileio import atomic_save_with, atomic_torch_save
from data.images import uint8_to_normalized

log = logging.getLogger(__name__)

STATS_FILENAME = "latents_stats.pt"
INDEX_FILENAME = "index.json"
DEFAULT_SIZE_LIMIT = 1 << 26  # bytes of uncompressed samples per shard (streaming's default)
DEFAULT_HASHES = ("xxh64",)
LATENT_DTYPES = ("float16", "float32")

__all__ = [
    "STATS_FILENAME",
    "CorruptShardError",
    "ImageDataset",
    "LatentDataset",
    "RunningMoments",
    "WrittenDataset",
    "build_streaming_loader",
    "denormalize_latents",
    "ensure_streaming_env",
    "flip_decision",
    "latent_columns",
    "load_latent_stats",
    "merge_shard_indexes",
    "normalize_latents",
    "open_writer",
    "parse_ndarray_encoding",
    "read_columns",
    "save_latent_stats",
    "steps_per_epoch",
    "verify_dataset",
    "write_latent_dataset",
]


class CorruptShardError(RuntimeError):
    """A shard file is missing, truncated, fails its hash, or cannot be decompressed or decoded
    (also when its decompressed copy cannot be written, e.g. a read-only dataset directory).

    The message always names the file. It takes a single string so that DataLoader workers can
    re-raise it in the main process with its type.
    """


# ---------------------------------------------------------------------------------------- schema
def _ndarray_encoding(dtype: str, shape: Optional[Sequence[int]]) -> str:
    if shape is None:
        return f"ndarray:{dtype}"
    if not shape or any(int(d) < 1 for d in shape):
        raise ValueError(f"invalid array shape {tuple(shape)}")
    return f"ndarray:{dtype}:" + ",".join(str(int(d)) for d in shape)


def latent_columns(
    latent_dtype: str = "float16",
    with_features: bool = False,
    *,
    latent_shape: Optional[Sequence[int]] = None,
    features_shape: Optional[Sequence[int]] = None,
    features_dtype: str = "float16",
    with_latents: bool = True,
    image_size: Optional[int] = None,
    with_flip_features: bool = False,
) -> dict[str, str]:
    """MDS column spec of the dataset (see the schema above).

    The dtype is always part of the encoding. With ``latent_shape`` (C, H, W) / ``features_shape``
    (D, h, w) the shape is fixed too (no per-sample header, and the reader can check it up front).
    ``with_latents=False`` leaves out latent/latent_flip; ``image_size`` S adds the ``image`` column
    (uint8 [3, S, S]); ``with_flip_features`` adds ``features_flip`` (the features of the flipped image, REPA).
    """
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {LATENT_DTYPES}, got {latent_dtype!r}")
    if latent_shape is not None and len(latent_shape) != 3:
        raise ValueError(f"latent_shape must be (C, H, W), got {tuple(latent_shape)}")
    columns = {}
    if with_latents:
        columns["latent"] = columns["latent_flip"] = _ndarray_encoding(latent_dtype, latent_shape)
    columns.update(label="int64", sample_id="int64")
    if with_features:
        if features_dtype not in LATENT_DTYPES:
            raise ValueError(f"features_dtype must be one of {LATENT_DTYPES}, got {features_dtype!r}")
        columns["features"] = _ndarray_encoding(features_dtype, features_shape)
        if with_flip_features:
            columns["features_flip"] = columns["features"]
    if image_size is not None:
        columns["image"] = _ndarray_encoding("uint8", (3, image_size, image_size))
    return columns


def parse_ndarray_encoding(encoding: str) -> tuple[Optional[str], Optional[tuple[int, ...]]]:
    """'ndarray:float16:4,8,8' -> ('float16', (4, 8, 8)); (None, None) for non-ndarray encodings."""
    parts = encoding.split(":")
    if parts[0] != "ndarray":
        return None, None
    dtype = parts[1] if len(parts) > 1 and parts[1] else None
    shape = tuple(int(d) for d in parts[2].split(",")) if len(parts) > 2 and parts[2] else None
    return dtype, shape


def open_writer(
    out_dir: Union[str, Path],
    columns: Mapping[str, str],
    size_limit: Union[int, str, None] = DEFAULT_SIZE_LIMIT,
    *,
    compression: Optional[str] = "zstd",
    hashes: Sequence[str] = DEFAULT_HASHES,
    exist_ok: bool = False,
) -> MDSWriter:
    """A plain ``MDSWriter`` with our defaults (zstd, xxh64 hashes). Use it as a context manager.

    ``out_dir`` may also be a remote URL or a (local, remote) tuple, as MDSWriter allows.
    """
    out = str(out_dir) if isinstance(out_dir, Path) else out_dir
    return MDSWriter(
        out=out,
        columns=dict(columns),
        compression=compression,
        hashes=sorted(hashes),
        size_limit=size_limit,
        exist_ok=exist_ok,
    )


def _as_numpy(value: Any, dtype: Optional[str] = None) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    if dtype is not None and array.dtype != np.dtype(dtype):
        array = array.astype(dtype)
    return np.ascontiguousarray(array)


@dataclass
class WrittenDataset:
    """What ``write_latent_dataset`` wrote."""

    path: str
    num_samples: int
    latent_shape: tuple[int, ...]
    mean: Optional[torch.Tensor]  # (1, C, 1, 1); None when statistics were not computed
    std: Optional[torch.Tensor]


def write_latent_dataset(
    out_dir: Union[str, Path],
    samples: Iterable[Mapping[str, Any]],
    *,
    latent_dtype: str = "float16",
    with_features: bool = False,
    size_limit: Union[int, str, None] = DEFAULT_SIZE_LIMIT,
    compute_stats: bool = True,
    fixed_shape: bool = True,
    exist_ok: bool = False,
) -> WrittenDataset:
    """Write samples (dicts with latent, latent_flip, label, sample_id[, features[, features_flip]]) as MDS shards
    (``features_flip`` is written when ``with_features`` and the first sample has it).

    Arrays may be numpy or torch, any float dtype; they are stored as ``latent_dtype``. With
    ``compute_stats`` the exact per-channel mean/std of the stored (non-flipped) latents is saved
    to ``out_dir/latents_stats.pt``. Meant for tests and small jobs; large extractions write one
    directory per rank with ``open_writer`` and combine them with ``merge_shard_indexes``.
    """
    out_dir = Path(out_dir)
    iterator = iter(samples)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError(f"write_latent_dataset({str(out_dir)!r}): no samples to write") from None
    latent_shape = tuple(_as_numpy(first["latent"]).shape)
    features_shape = tuple(_as_numpy(first["features"]).shape) if with_features else None
    flip_features = with_features and "features_flip" in first
    columns = latent_columns(
        latent_dtype,
        with_features,
        latent_shape=latent_shape if fixed_shape else None,
        features_shape=features_shape if fixed_shape else None,
        with_flip_features=flip_features,
    )
    moments = RunningMoments() if compute_stats else None
    count = 0
    with open_writer(out_dir, columns, size_limit, exist_ok=exist_ok) as writer:
        for sample in _chain_first(first, iterator):
            missing = [k for k in ("latent", "latent_flip", "label", "sample_id") if k not in sample]
            missing += [
                k for k in ("features",) * with_features + ("features_flip",) * flip_features if k not in sample
            ]
            if missing:
                raise KeyError(f"write_latent_dataset: sample #{count} lacks {missing}")
            latent = _as_numpy(sample["latent"], latent_dtype)
            latent_flip = _as_numpy(sample["latent_flip"], latent_dtype)
            if latent.shape != latent_shape or latent_flip.shape != latent_shape:
                raise ValueError(
                    f"write_latent_dataset: sample #{count} has latent shapes "
                    f"{latent.shape}/{latent_flip.shape}, expected {latent_shape}"
                )
            record = {
                "latent": latent,
                "latent_flip": latent_flip,
                "label": int(sample["label"]),
                "sample_id": int(sample["sample_id"]),
            }
            if with_features:
                record["features"] = _as_numpy(sample["features"], "float16")
            if flip_features:
                record["features_flip"] = _as_numpy(sample["features_flip"], "float16")
            writer.write(record)
            if moments is not None:
                moments.update(latent[None])
            count += 1
    mean = std = None
    if moments is not None:
        stats = moments.to_tensor_stats()
        mean, std = stats["mean"], stats["std"]
        save_latent_stats(out_dir, mean, std)
    return WrittenDataset(str(out_dir), count, latent_shape, mean, std)


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def merge_shard_indexes(out_dir: Union[str, Path], subdirs: Sequence[str]) -> Path:
    """Combine per-rank MDS directories ``out_dir/<subdir>/`` into one ``out_dir/index.json``.

    Uses streaming's ``merge_index``; shard basenames in the merged index become
    ``<subdir>/shard.NNNNN.mds.zstd``. Subdirectories must be direct children of ``out_dir``.
    """
    out_dir = Path(out_dir)
    if not subdirs:
        raise ValueError(f"merge_shard_indexes({str(out_dir)!r}): no subdirectories given")
    index_files = []
    for sub in subdirs:
        if not sub or "/" in sub.strip("/") or os.sep in sub.strip(os.sep) or sub in (".", ".."):
            raise ValueError(
                f"merge_shard_indexes: {sub!r} must be the name of a direct subdirectory of {str(out_dir)!r}"
            )
        index = out_dir / sub / INDEX_FILENAME
        if not index.is_file():
            raise FileNotFoundError(f"merge_shard_indexes: {index} does not exist")
        index_files.append(str(index))
    merge_index(index_files, str(out_dir), keep_local=True)
    return out_dir / INDEX_FILENAME


# ------------------------------------------------------------------------------------ statistics
class RunningMoments:
    """Exact per-channel mean and variance over all elements of all latents, in float64.

    Chan/Welford parallel updates: ``update`` takes a batch [B, C, ...] (numpy or torch), ``merge``
    combines the moments of another shard/rank exactly. Channel dimension is 1.
    """

    def __init__(self) -> None:
        self.count = 0  # elements per channel seen so far
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    @property
    def num_channels(self) -> Optional[int]:
        return None if self.mean is None else int(self.mean.numel())

    def update(self, batch: Union[torch.Tensor, np.ndarray]) -> RunningMoments:
        x = torch.as_tensor(np.asarray(batch) if not isinstance(batch, torch.Tensor) else batch)
        x = x.detach().to("cpu", torch.float64)
        if x.dim() < 2:
            raise ValueError(f"RunningMoments.update expects [B, C, ...], got shape {tuple(x.shape)}")
        x = x.transpose(0, 1).reshape(x.shape[1], -1)
        n = x.shape[1]
        if n == 0:
            return self
        mean = x.mean(dim=1)
        m2 = ((x - mean[:, None]) ** 2).sum(dim=1)
        self._combine(n, mean, m2)
        return self

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Add the moments of ``other`` (in place); returns self."""
        if other.count:
            self._combine(other.count, other.mean.clone(), other.m2.clone())
        return self

    def _combine(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if mean.numel() != self.mean.numel():
            raise ValueError(f"RunningMoments: {mean.numel()} channels cannot merge with {self.mean.numel()}")
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def var(self, unbiased: bool = True) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("RunningMoments: no data")
        dof = self.count - 1 if unbiased else self.count
        if dof <= 0:
            raise ValueError("RunningMoments: need at least two elements per channel for an unbiased variance")
        return self.m2 / dof

    def std(self, unbiased: bool = True) -> torch.Tensor:
        return self.var(unbiased).sqrt()

    def to_tensor_stats(self, unbiased: bool = True) -> dict[str, torch.Tensor]:
        """``{'mean': (1,C,1,1), 'std': (1,C,1,1)}`` float32 (torch's default unbiased std, as official)."""
        if self.count == 0:
            raise ValueError("RunningMoments: no data")
        c = self.mean.numel()
        return {
            "mean": self.mean.to(torch.float32).reshape(1, c, 1, 1),
            "std": self.std(unbiased).to(torch.float32).reshape(1, c, 1, 1),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = None if state["mean"] is None else torch.as_tensor(state["mean"], dtype=torch.float64)
        self.m2 = None if state["m2"] is None else torch.as_tensor(state["m2"], dtype=torch.float64)

    def merge_across_ranks(self, group: Any = None) -> RunningMoments:
        """Merged moments of every rank (collective; identical result on all ranks, rank order)."""
        if not (tdist.is_available() and tdist.is_initialized()):
            return self
        states: list[Any] = [None] * tdist.get_world_size(group)
        tdist.all_gather_object(states, self.state_dict(), group=group)
        merged = RunningMoments()
        for state in states:
            part = RunningMoments()
            part.load_state_dict(state)
            merged.merge(part)
        return merged


def _stats_file(path: Union[str, Path]) -> Path:
    path = Path(path)
    return path if path.suffix == ".pt" or path.is_file() else path / STATS_FILENAME


def save_latent_stats(path: Union[str, Path], mean: Any, std: Any) -> Path:
    """Write ``{'mean','std'}`` as (1,C,1,1) float32 to ``path`` (a .pt file, or a directory).

    Atomic (temporary file + rename), so readers never see a partial file.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32).detach().cpu().reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).detach().cpu().reshape(1, -1, 1, 1)
    if mean_t.shape != std_t.shape:
        raise ValueError(f"save_latent_stats: mean {tuple(mean_t.shape)} and std {tuple(std_t.shape)} differ")
    file = _stats_file(path)
    atomic_torch_save({"mean": mean_t, "std": std_t}, file)
    return file


def load_latent_stats(path: Union[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as float32 (1,C,1,1) from a dataset directory or a ``latents_stats.pt`` file."""
    file = _stats_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"latent statistics file {file} does not exist")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report the file
        raise ValueError(f"latent statistics file {file} cannot be read: {e}") from e
    if not isinstance(obj, Mapping) or "mean" not in obj or "std" not in obj:
        raise ValueError(f"latent statistics file {file} must hold a dict with 'mean' and 'std'")
    mean = torch.as_tensor(obj["mean"]).to(torch.float32)
    std = torch.as_tensor(obj["std"]).to(torch.float32)
    if mean.numel() != std.numel() or mean.numel() == 0:
        raise ValueError(
            f"latent statistics file {file}: mean {tuple(mean.shape)} and std {tuple(std.shape)} "
            f"do not describe the same channels"
        )
    mean, std = mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError(f"latent statistics file {file}: non-finite values or non-positive std")
    return mean, std


def normalize_latents(
    z: torch.Tensor, mean: Optional[torch.Tensor], std: Optional[torch.Tensor], multiplier: float = 1.0
) -> torch.Tensor:
    """Official normalisation: ``(z - mean) / std`` when stats are given, then ``* multiplier``."""
    if mean is not None:
        z = (z - mean.to(z)) / std.to(z)
    return z * multiplier


def denormalize_latents(
    z: torch.Tensor, mean: Optional[torch.Tensor], std: Optional[torch.Tensor], multiplier: float = 1.0
) -> torch.Tensor:
    """Inverse of ``normalize_latents``: ``z / multiplier * std + mean`` (before decoding)."""
    z = z / multiplier
    if mean is not None:
        z = z * std.to(z) + mean.to(z)
    return z


# --------------------------------------------------------------------------------- flip decision
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def flip_decision(seed: int, epoch: int, sample_id: int) -> bool:
    """Whether to use ``latent_flip``: a fair coin that is a pure function of (seed, epoch, sample_id)."""
    h = _splitmix64((seed & _MASK64) ^ _splitmix64((epoch & _MASK64) ^ _splitmix64(sample_id & _MASK64)))
    return bool(h >> 63)


# ---------------------------------------------------------------------------------- verification
def _read_index(directory: Path, config_key: str = "data.path") -> dict[str, Any]:
    index = directory / INDEX_FILENAME
    if not directory.is_dir():
        raise FileNotFoundError(f"{config_key}: dataset directory {directory} does not exist")
    if not index.is_file():
        raise FileNotFoundError(
            f"{config_key}: {directory} is not an MDS dataset: {index} does not exist "
            f"(per-rank directories need merge_shard_indexes first)"
        )
    try:
        with open(index) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_key}: index file {index} is unreadable or not valid JSON: {e}") from e
    shards = obj.get("shards") if isinstance(obj, dict) else None
    if not isinstance(shards, list) or obj.get("version") != 2:
        raise ValueError(
            f"{config_key}: index file {index} is not a streaming v2 index (needs 'version': 2 and a 'shards' list)"
        )
    if not shards:
        raise ValueError(f"{config_key}: index file {index} lists no shards")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or shard.get("format") != "mds" or not shard.get("raw_data"):
            raise ValueError(f"{config_key}: index file {index}: shard #{i} is not an MDS shard entry")
    return obj


def read_columns(
    local: Union[str, Path], remote: Optional[str] = None, config_key: str = "data.path"
) -> dict[str, str]:
    """Column name -> MDS encoding of a dataset, from its ``index.json`` (without building a reader): the local
    one, or with ``remote`` and no local index yet, the remote's (fetched to a temporary file)."""
    index_file = Path(local) / INDEX_FILENAME
    if remote is not None and not index_file.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                CloudDownloader.direct_download(os.path.join(remote, INDEX_FILENAME), os.path.join(tmp, INDEX_FILENAME))
            except Exception as e:  # noqa: BLE001 - name the key and the remote
                raise FileNotFoundError(
                    f"data.remote: cannot fetch {INDEX_FILENAME} from {remote}: {type(e).__name__}: {e}"
                ) from e
            index = _read_index(Path(tmp), config_key)
    else:
        index = _read_index(Path(local), config_key)
    shard = index["shards"][0]
    return dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))


def _check_shard_files(directory: Path, shard: Mapping[str, Any], check_hashes: bool) -> Optional[str]:
    """Problem with one shard's files (name + reason), or None. Checks existence, size, hashes."""
    raw, zipped = shard["raw_data"], shard.get("zip_data")
    raw_path = directory / raw["basename"]
    candidates = [(zipped, directory / zipped["basename"])] if zipped else []
    if raw_path.is_file() or not zipped:
        candidates.append((raw, raw_path))
    for info, path in candidates:
        if not path.is_file():
            return f"shard file {path} is missing"
        size = path.stat().st_size
        if size != int(info["bytes"]):
            return f"shard file {path} has {size} bytes, index.json says {info['bytes']} (truncated or overwritten)"
        if check_hashes and info.get("hashes"):
            algo = sorted(info["hashes"])[0]
            if get_hash(algo, path.read_bytes()) != info["hashes"][algo]:
                return f"shard file {path} fails its {algo} checksum (corrupt)"
    return None


def verify_dataset(path: Union[str, Path], check_hashes: bool = True) -> int:
    """Check index.json and every shard file (existence, size and, if recorded, hash).

    Returns the number of samples; raises ``CorruptShardError``/``FileNotFoundError``/``ValueError``
    naming the first bad file. ``check_hashes`` reads every byte of the dataset.
    """
    directory = Path(path)
    obj = _read_index(directory, config_key="verify_dataset")
    for shard in obj["shards"]:
        problem = _check_shard_files(directory, shard, check_hashes)
        if problem:
            raise CorruptShardError(f"{directory}: {problem}")
    return sum(int(s["samples"]) for s in obj["shards"])


def _common_hash(shards: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """A hash algorithm recorded for every shard's stored file (zip, else raw), preferring xxh64."""
    common: Optional[set[str]] = None
    for shard in shards:
        info = shard.get("zip_data") or shard["raw_data"]
        names = set((info.get("hashes") or {}).keys())
        common = names if common is None else common & names
    if not common:
        return None
    return "xxh64" if "xxh64" in common else sorted(common)[0]


# ------------------------------------------------------------------------------------ sample access
# Streaming's MDSReader opens the shard file for every sample and parses every column's encoding string again for
# every sample; at thousands of samples per second per loader worker that is most of the reader's time. The readers
# below install faster equivalents on each MDS shard (same bytes, same decoded values and types), picklable for
# spawned DataLoader workers.
_MAX_OPEN_SHARDS = 16  # open shard files kept per process


class _OpenShards:
    """Shard files this process has open (least recently used closed first), read with ``pread``.

    A file that was deleted since it was opened (a shard evicted by streaming's cache limit, or replaced) is opened
    again by name, so a missing shard raises ``FileNotFoundError`` as streaming's own reader does (streaming then
    fetches it again)."""

    def __init__(self) -> None:
        self._pid: Optional[int] = None
        self._files: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not ours
            for fd in self._files.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._files, self._pid = OrderedDict(), os.getpid()
        fd = self._files.get(path)
        if fd is not None:
            if os.fstat(fd).st_nlink > 0:
                self._files.move_to_end(path)
                return fd
            del self._files[path]
            os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        self._files[path] = fd
        while len(self._files) > _MAX_OPEN_SHARDS:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def read_sample(self, path: str, idx: int, basename: str) -> bytearray:
        """The bytes of sample ``idx`` of the MDS file ``path`` (a writable buffer: the arrays decoded from it need
        no copy before they become tensors)."""
        with self._lock:
            fd = self._fd(path)
            pair = os.pread(fd, 8, (1 + idx) * 4)
            if len(pair) != 8:
                raise IndexError(f"Relative sample index {idx} is not present in the {basename} file.")
            begin, end = struct.unpack("<II", pair)
            data = bytearray(max(end - begin, 0))
            got = os.preadv(fd, [data], begin) if data else 0
        if not data or got != len(data):
            raise IndexError(f"Relative sample index {idx} is not present in the {basename} file.")
        return data


_OPEN_SHARDS = _OpenShards()


class _SampleBytes:
    """``MDSReader.get_sample_data`` through ``_OPEN_SHARDS``."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def __call__(self, idx: int) -> bytearray:
        r = self.reader
        return _OPEN_SHARDS.read_sample(os.path.join(r.dirname, r.split, r.raw_data.basename), idx, r.raw_data.basename)


class _SampleDecoder:
    """``MDSReader.decode_sample`` with each column's decoder built once: fixed-shape arrays and scalars are read
    straight from the buffer (``np.frombuffer`` at the column's offset, as streaming's decoders do on a slice);
    other encodings go to streaming's decoder."""

    def __init__(self, reader: Any) -> None:
        self.columns = []
        for name, encoding, size in zip(reader.column_names, reader.column_encodings, reader.column_sizes):
            coder = _get_coder(encoding)
            if coder is None:
                raise ValueError(f"Unsupported encoding: {encoding}.")
            if isinstance(coder, NDArray) and coder.dtype is not None and coder.shape is not None:
                fast = (np.dtype(coder.dtype), int(np.prod(coder.shape)), tuple(coder.shape))
            elif isinstance(coder, Scalar):
                fast = (np.dtype(coder.dtype), 1, None)
            else:
                fast = None
            self.columns.append((name, size, coder, fast))

    def __call__(self, data: Union[bytes, bytearray]) -> dict[str, Any]:
        sizes, idx = [], 0
        for _, size, _, _ in self.columns:
            if not size:
                (size,) = struct.unpack_from("<I", data, idx)
                idx += 4
            sizes.append(size)
        sample = {}
        for (name, _, coder, fast), size in zip(self.columns, sizes):
            if fast is None:
                sample[name] = coder.decode(data[idx : idx + size])
            else:
                dtype, count, shape = fast
                if count * dtype.itemsize != size:
                    raise ValueError(f"column {name!r}: {size} bytes, expected {count * dtype.itemsize}")
                array = np.frombuffer(data, dtype, count, idx)
                sample[name] = array[0] if shape is None else array.reshape(shape)
            idx += size
        return sample


def _speed_up_reader(reader: Any) -> None:
    if type(reader) is MDSReader:
        reader.get_sample_data = _SampleBytes(reader)
        reader.decode_sample = _SampleDecoder(reader)


def _scalar(value: Any, dtype: type) -> torch.Tensor:
    """A 0-d tensor of ``value`` (``torch.tensor(value, dtype=...)``, at a third of its cost)."""
    return torch.from_numpy(np.array(value, dtype=dtype))


def _writable_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor of a decoded array without a copy where it may be shared (writable and aligned), else a copy."""
    if array.flags.writeable and array.flags.aligned:
        return torch.from_numpy(array)
    return torch.from_numpy(np.array(array))


# ----------------------------------------------------------------------------------------- readers
class _ShardDataset(StreamingDataset):
    """StreamingDataset with our checks and failure handling; the base of ``LatentDataset`` and ``ImageDataset``.

    Without ``remote``, ``local`` is the dataset itself and is checked up front (index.json, shard files present
    with the indexed sizes); the required columns are checked once streaming has the index; a shard that cannot
    be read raises ``CorruptShardError`` naming the file. ``validate_hash="auto"`` uses a hash recorded for every
    shard (xxh64 by our writer) so that streaming verifies each shard when it decompresses/downloads it; None
    disables. Subclasses name their columns (``_required_columns``, ``_check_encodings``), prepare what must be
    checked before streaming's shared state is touched (``_prepare``) and build the sample
    (``_to_training_sample``).
    """

    def __init__(
        self,
        *,
        local: str,
        remote: Optional[str] = None,
        random_flip: bool = False,
        flip_seed: int = 0,
        validate_hash: Optional[str] = "auto",
        **kwargs: Any,
    ) -> None:
        if not local:
            raise ValueError("data.path: the dataset directory is not set")
        self.data_dir = Path(local)
        self.random_flip = bool(random_flip)
        self.flip_seed = int(flip_seed)
        self._iter_epoch: Optional[int] = None
        self._shard_error: Optional[CorruptShardError] = None
        self._local_shards: set[int] = set()  # shards this process has seen prepared (raw file present)
        self._verified_shards: set[int] = set()  # shards whose decompressed file this process checked (_verify_shard)

        auto_hash = validate_hash == "auto"
        self._hash_wanted = auto_hash or validate_hash is not None  # _verify_shard
        if remote is None:
            index = _read_index(self.data_dir)
            for shard in index["shards"]:
                problem = _check_shard_files(self.data_dir, shard, check_hashes=False)
                if problem:
                    raise CorruptShardError(f"data.path: {problem}")
            if auto_hash:
                validate_hash = _common_hash(index["shards"])
        elif auto_hash:
            validate_hash = None  # decided below, once the index is local
        self._prepare(remote)  # config errors before touching streaming's shared state

        super().__init__(local=str(local), remote=remote, validate_hash=validate_hash, **kwargs)

        if remote is not None and auto_hash:
            infos = [
                {"zip_data": _file_info_dict(s.file_pairs[0][1]), "raw_data": _file_info_dict(s.file_pairs[0][0])}
                for s in self.shards
            ]
            algo = _common_hash(infos)
            for stream in self.streams:
                stream.validate_hash = algo
        self._check_schema()
        for reader in self.shards:
            _speed_up_reader(reader)

    # ---- what subclasses define
    def _prepare(self, remote: Optional[str]) -> None:
        pass

    def _required_columns(self) -> list[str]:
        raise NotImplementedError

    def _missing_hint(self, missing: Sequence[str]) -> str:
        """What to do about missing columns (appended to the error)."""
        return ""

    def _check_encodings(self, encodings: Mapping[str, str]) -> None:
        pass

    def _to_training_sample(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    # ---- schema
    def _check_schema(self) -> None:
        reader = self.shards[0]
        encodings = dict(zip(reader.column_names, reader.column_encodings))
        missing = [c for c in self._required_columns() if c not in encodings]
        if missing:
            raise ValueError(
                f"data.path: the dataset at {self.data_dir} lacks column(s) {missing}; it has "
                f"{sorted(encodings)}{self._missing_hint(missing)}"
            )
        for shard in self.shards[1:]:
            if list(shard.column_names) != list(reader.column_names) or list(shard.column_encodings) != list(
                reader.column_encodings
            ):
                raise ValueError(
                    f"data.path: shards of {self.data_dir} disagree on their columns "
                    f"({shard.raw_data.basename} vs {reader.raw_data.basename})"
                )
        self._check_encodings(encodings)

    # ---- epoch tracking and flips
    def _resume_incr_epoch(self) -> tuple[int, int]:
        # Called once per __iter__ in every worker: the epoch streaming is about to iterate
        # (including an epoch restored by load_state_dict). Recorded for the flip decision.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._iter_epoch = int(epoch)
        return epoch, sample_in_epoch

    @property
    def current_epoch(self) -> int:
        """Epoch of the iteration in progress in this process (0 before any iteration)."""
        if self._iter_epoch is not None:
            return self._iter_epoch
        return max(self.next_epoch - 1, 0)

    def _flipped(self, sample_id: int) -> bool:
        return self.random_flip and flip_decision(self.flip_seed, self.current_epoch, sample_id)

    # ---- failures
    def _shard_paths(self, shard_id: int) -> str:
        reader = self.shards[shard_id]
        raw, zipped = reader.file_pairs[0]
        base = Path(self.streams[self.stream_per_shard[shard_id]].local)
        return str(base / zipped.basename) if zipped else str(base / raw.basename)

    def _describe(self, shard_id: int, error: BaseException, what: str) -> CorruptShardError:
        reader = self.shards[shard_id]
        base = Path(self.streams[self.stream_per_shard[shard_id]].local)
        raw, zipped = reader.file_pairs[0]
        info = {
            "raw_data": {"basename": raw.basename, "bytes": raw.bytes, "hashes": raw.hashes},
            "zip_data": (
                {"basename": zipped.basename, "bytes": zipped.bytes, "hashes": zipped.hashes} if zipped else None
            ),
        }
        try:
            problem = _check_shard_files(base, info, check_hashes=True)
        except Exception:  # noqa: BLE001
            problem = None
        detail = problem or f"shard file {self._shard_paths(shard_id)}"
        return CorruptShardError(f"{what} failed: {detail}: {type(error).__name__}: {error}")

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        # Streaming's download thread calls this for every sample, and each call takes the cache's file lock and
        # looks for the shard file. Without a cache limit nothing removes a prepared shard, so once this process
        # has seen it prepared (decompressed) the call has nothing to do.
        if shard_id in self._local_shards and not self.cache_limit:
            return
        try:
            super().prepare_shard(shard_id, blocking)
            if self._shard_states[shard_id] == _shard_state_local():
                self._local_shards.add(shard_id)
        except Exception as e:  # noqa: BLE001
            error = self._describe(shard_id, e, f"preparing shard {shard_id} of {self.data_dir}")
            # Do not leave the shard in PREPARING: other workers would wait for it forever.
            try:
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    self._shard_states[shard_id] = _ShardState.REMOTE
            except Exception:  # noqa: BLE001
                pass
            self._shard_error = error
            self._abort_iteration()
            raise error from e

    def _abort_iteration(self) -> None:
        # Stop streaming's download/ready threads of this process: after a failure they would
        # otherwise poll forever (and block the exit of a DataLoader worker).
        event = getattr(self, "_event", None)
        if event is not None:
            event.set()
        iterator = getattr(self, "_iterator", None)
        if iterator is not None:
            iterator.non_blocking_exit()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._shard_error is not None:
            raise self._shard_error
        try:
            yield from super().__iter__()
        except GeneratorExit:
            # The consumer stopped mid-epoch: let the background threads end now.
            iterator = getattr(self, "_iterator", None)
            if iterator is not None:
                iterator.non_blocking_exit()
            raise
        except CorruptShardError:
            self._abort_iteration()
            raise
        except RuntimeError as e:
            self._abort_iteration()
            if self._shard_error is not None:
                raise self._shard_error from e
            raise
        # Streaming ends the epoch quietly when its download thread died: make that loud.
        if self._shard_error is not None:
            raise self._shard_error
        event = getattr(self, "_event", None)
        if event is not None and event.is_set():
            raise RuntimeError(
                f"{self.data_dir}: a streaming background thread failed; the epoch ended early "
                f"(see the traceback logged above)"
            )

    def _verify_shard(self, shard_id: int, sample_id: int) -> None:
        """Check the shard's decompressed file against the hash its index.json records, once per file version and node.

        Streaming checks a shard's hash only when it downloads or decompresses it; a decompressed file already in
        place (a later run, a shared dataset directory) is trusted. Here the first process of a node that reads from
        a shard hashes it (xxh64: GB/s) and leaves a marker in the node's temporary directory keyed by path, size,
        mtime and expected hash, so the other ranks and loader workers of the node skip it, and a file rewritten
        since is checked again. Raises ``CorruptShardError`` naming the shard file and the sample being read."""
        reader = self.shards[shard_id]
        raw = reader.file_pairs[0][0]
        hashes = dict(raw.hashes or {})
        algo = "xxh64" if "xxh64" in hashes else (sorted(hashes)[0] if hashes else None)
        if algo is None:
            self._verified_shards.add(shard_id)
            return
        path = Path(self.streams[self.stream_per_shard[shard_id]].local) / raw.basename
        st = path.stat()
        key = hashlib.sha1(
            f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{algo}:{hashes[algo]}".encode()
        ).hexdigest()
        marker = Path(tempfile.gettempdir()) / "llat-verified-shards" / key
        if not marker.exists():
            if get_hash(algo, path.read_bytes()) != hashes[algo]:
                self._abort_iteration()
                self._shard_error = CorruptShardError(
                    f"shard file {path} (shard {shard_id} of {self.data_dir}) fails its {algo} checksum recorded in "
                    f"index.json: the file is damaged (found reading sample {sample_id}); restore it or delete the "
                    f"decompressed file to have it decompressed again from its compressed copy"
                )
                raise self._shard_error
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
            except OSError:  # no marker: checked again by the next process, no harm
                pass
        self._verified_shards.add(shard_id)

    # ---- items
    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        if self._shard_error is not None:
            raise self._shard_error
        try:
            raw = super().get_item(sample_id, retry)
        except CorruptShardError:
            raise
        except Exception as e:  # noqa: BLE001
            self._abort_iteration()
            if self._shard_error is not None:
                raise self._shard_error from e
            shard_id, _ = self.spanner[sample_id]
            self._shard_error = self._describe(shard_id, e, f"reading sample {sample_id} of {self.data_dir}")
            raise self._shard_error from e
        if self._hash_wanted:
            shard_id, _ = self.spanner[sample_id]
            if shard_id not in self._verified_shards:
                self._verify_shard(shard_id, sample_id)
        try:
            return self._to_training_sample(raw)
        except (ValueError, KeyError, TypeError) as e:
            self._abort_iteration()
            if isinstance(e, ValueError) and str(e).startswith("data."):  # a config error (shapes), not corruption
                raise
            shard_id, _ = self.spanner[sample_id]
            self._shard_error = self._describe(shard_id, e, f"decoding sample {sample_id} of {self.data_dir}")
            raise self._shard_error from e


class LatentDataset(_ShardDataset):
    """The DiT's reader: training-ready latents.

    Each item is ``{"latent": float32 [C,H,W] (normalised), "label": int64, "sample_id": int64,
    "flipped": bool[, "features": stored dtype [D,h,w]]}``.

    Args (besides StreamingDataset's keyword arguments, e.g. shuffle, shuffle_seed, batch_size, and
    ``_ShardDataset``'s local, remote, validate_hash):
        latent_norm, latent_multiplier, random_flip, use_features: as ``DataConfig``.
        pair_flip_features: require ``features_flip`` (with ``random_flip``) and read features (REPA).
        expected_features_shape: (D, h, w) the REPA projector needs; checked against the data.
        flip_seed: seed of the flip decision (the experiment seed).
        stats_path: statistics file or directory; default ``local/latents_stats.pt`` (fetched from
            ``remote`` when missing locally).
        expected_shape: (C, H, W) the model expects; checked against the data.
    """

    def __init__(
        self,
        *,
        local: str,
        remote: Optional[str] = None,
        latent_norm: bool = True,
        latent_multiplier: float = 1.0,
        random_flip: bool = True,
        use_features: bool = False,
        flip_seed: int = 0,
        stats_path: Optional[Union[str, Path]] = None,
        expected_shape: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
        pair_flip_features: bool = False,
        expected_features_shape: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> None:
        self.num_classes = None if num_classes is None else int(num_classes)
        self.latent_norm = bool(latent_norm)
        self.latent_multiplier = float(latent_multiplier)
        self.use_features = bool(use_features) or bool(pair_flip_features)
        self.pair_flip_features = bool(pair_flip_features)
        self.expected_features_shape = (
            tuple(int(d) for d in expected_features_shape) if expected_features_shape is not None else None
        )
        self._flip_features = False  # read `features_flip` for flipped samples (set by the schema check)
        self.expected_shape = tuple(int(d) for d in expected_shape) if expected_shape is not None else None
        self.mean: Optional[torch.Tensor] = None
        self.std: Optional[torch.Tensor] = None
        self._stats_path = stats_path
        super().__init__(local=local, remote=remote, random_flip=random_flip, flip_seed=flip_seed, **kwargs)

    @staticmethod
    def config_kwargs(cfg: Any, seed: int) -> dict[str, Any]:
        """Arguments from a ``DataConfig`` (``build_streaming_loader``)."""
        return {
            "latent_norm": cfg.latent_norm,
            "latent_multiplier": cfg.latent_multiplier,
            "random_flip": cfg.random_flip,
            "use_features": cfg.use_features,
            "flip_seed": seed,
        }

    def _prepare(self, remote: Optional[str]) -> None:
        path = self._stats_path
        self.stats_file = _stats_file(path) if path is not None else self.data_dir / STATS_FILENAME
        if self.latent_norm:
            self._load_stats(remote)

    def _load_stats(self, remote: Optional[str]) -> None:
        file = self.stats_file
        if not file.is_file() and remote is not None and file.parent == self.data_dir:
            try:
                atomic_save_with(
                    file, lambda tmp: CloudDownloader.direct_download(os.path.join(remote, STATS_FILENAME), str(tmp))
                )
            except Exception as e:  # noqa: BLE001 - fall through to the clear error below
                log.warning("could not fetch %s from %s: %s", STATS_FILENAME, remote, e)
        if not file.is_file():
            where = f" (nor in data.remote {remote})" if remote is not None else ""
            raise FileNotFoundError(
                f"data.latent_norm is true but the latent statistics file {file} does not exist{where}. "
                f"Write it with data.streaming.save_latent_stats (RunningMoments over the latents), copy the "
                f"official latents_stats.pt there, or set data.latent_norm=false."
            )
        self.mean, self.std = (t.reshape(-1, 1, 1) for t in load_latent_stats(file))

    def _required_columns(self) -> list[str]:
        return (
            ["latent", "label", "sample_id"]
            + (["latent_flip"] if self.random_flip else [])
            + (["features"] if self.use_features else [])
            + (["features_flip"] if self.pair_flip_features and self.random_flip else [])
        )

    def _missing_hint(self, missing: Sequence[str]) -> str:
        if "features_flip" in missing:
            return (
                " (REPA pairs a flipped latent with the features of the flipped image: extract with "
                "features.enabled=true features.flip=true, or set data.random_flip=false)"
            )
        return " (set data.use_features=false or extract DINOv2 features)" if "features" in missing else ""

    def _check_encodings(self, encodings: Mapping[str, str]) -> None:
        # Flipped latents meet the features of the flipped image whenever the dataset has them.
        self._flip_features = self.use_features and self.random_flip and "features_flip" in encodings
        if self.expected_features_shape is not None:
            for column in ("features", "features_flip"):
                if column not in encodings:
                    continue
                _, shape = parse_ndarray_encoding(encodings[column])
                if shape is not None and tuple(shape) != self.expected_features_shape:
                    raise ValueError(
                        f"data.path: column {column!r} of {self.data_dir} has shape {tuple(shape)} but the model "
                        f"needs {self.expected_features_shape} (repa.z_dim / repa.encoder, the DiT token grid)"
                    )
        for column in ("latent", "latent_flip"):
            if column not in encodings:
                continue
            dtype, shape = parse_ndarray_encoding(encodings[column])
            if dtype is None and not encodings[column].startswith("ndarray"):
                raise ValueError(
                    f"data.path: column {column!r} of {self.data_dir} has encoding "
                    f"{encodings[column]!r}, expected ndarray:float16/float32"
                )
            if shape is not None:
                self._check_latent_shape(shape, where=f"column {column!r} ({encodings[column]})")

    def _check_latent_shape(self, shape: Sequence[int], where: str) -> None:
        shape = tuple(int(d) for d in shape)
        if len(shape) != 3:
            raise ValueError(f"data.path: latents of {self.data_dir} must be [C, H, W]; {where} has shape {shape}")
        if self.mean is not None and shape[0] != self.mean.shape[0]:
            raise ValueError(
                f"data.path: latents of {self.data_dir} have {shape[0]} channels ({where}, shape "
                f"{shape}) but the statistics file {self.stats_file} has {self.mean.shape[0]}"
            )
        if self.expected_shape is not None and shape != self.expected_shape:
            raise ValueError(
                f"data.path: latents of {self.data_dir} have shape {shape} ({where}) but the model "
                f"expects {self.expected_shape} (model.in_channels, model.input_size)"
            )

    def _to_training_sample(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        sid = int(raw["sample_id"])
        flipped = self._flipped(sid)
        array = raw["latent_flip" if flipped else "latent"]
        if (
            array.ndim != 3
            or (self.mean is not None and array.shape[0] != self.mean.shape[0])
            or (self.expected_shape is not None and tuple(array.shape) != self.expected_shape)
        ):
            self._check_latent_shape(array.shape, where=f"sample_id {sid}")
        # normalize_latents' float32 operations, in place on the one new tensor: (z - mean) / std * multiplier
        # (float16 -> float32 is exact, so subtracting the float32 mean from the stored latent is the same)
        z = _writable_tensor(array)
        if self.mean is not None:
            z = torch.sub(z, self.mean).div_(self.std)
        else:
            z = z.to(torch.float32, copy=True)
        z = z.mul_(self.latent_multiplier)
        item = {
            "latent": z,
            "label": _scalar(raw["label"], np.int64),
            "sample_id": _scalar(sid, np.int64),
            "flipped": _scalar(flipped, np.bool_),
        }
        if self.use_features:
            features = raw["features_flip" if flipped and self._flip_features else "features"]
            if self.expected_features_shape is not None and tuple(features.shape) != self.expected_features_shape:
                raise ValueError(
                    f"data.path: features of sample_id {sid} in {self.data_dir} have shape {tuple(features.shape)} "
                    f"but the model needs {self.expected_features_shape} (repa.z_dim / repa.encoder, the token grid)"
                )
            item["features"] = _writable_tensor(features)
        _check_values(item, sid, self.num_classes, "latent")
        return item


def _check_values(item: dict[str, Any], sid: int, num_classes: Optional[int], key: str) -> None:
    """Damaged values that decode fine: a label outside [0, num_classes), non-finite latents or features. Raises
    ValueError (``get_item`` names the shard file and the sample)."""
    label = int(item["label"])
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"sample_id {sid}: label {label} is outside [0, {num_classes}) (model.num_classes)")
    for name in (key, "features"):
        value = item.get(name)
        if value is not None and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"sample_id {sid}: non-finite values in {name!r}")


class ImageDataset(_ShardDataset):
    """VA-VAE's reader: the stored images (data/extract.py with ``images: true``) and optionally their DINOv2
    ``features`` (``use_features``: the precomputed VF-loss targets).

    Each item is ``{"image": float32 [3,S,S] in [-1, 1], "label": int64, "sample_id": int64[, "features": stored
    dtype [D,h,w]]}``. ``image_size`` (``data.image_size``) is checked against the stored S. ``random_flip`` flips
    the image (the same hash decision as latent flips); it is refused with ``use_features``, because the stored
    features belong to the non-flipped image.
    """

    def __init__(
        self,
        *,
        local: str,
        remote: Optional[str] = None,
        random_flip: bool = False,
        use_features: bool = False,
        flip_seed: int = 0,
        image_size: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if use_features and random_flip:
            raise ValueError(
                "data.random_flip: must be false when the precomputed DINOv2 features are read: they "
                "belong to the non-flipped image"
            )
        self.use_features = bool(use_features)
        self.image_shape = (3, int(image_size), int(image_size)) if image_size is not None else None
        super().__init__(local=local, remote=remote, random_flip=random_flip, flip_seed=flip_seed, **kwargs)

    @staticmethod
    def config_kwargs(cfg: Any, seed: int) -> dict[str, Any]:
        """Arguments from a ``DataConfig`` (``build_streaming_loader``); ``use_features`` is the caller's."""
        return {"random_flip": cfg.random_flip, "flip_seed": seed, "image_size": cfg.image_size}

    def _required_columns(self) -> list[str]:
        return ["image", "label", "sample_id"] + (["features"] if self.use_features else [])

    def _missing_hint(self, missing: Sequence[str]) -> str:
        hints = (
            ["extract the images with `images: true` (configs/extract_vavae_features.yaml)"]
            if "image" in missing
            else []
        ) + (
            [
                "extract DINOv2 features (features.enabled: true, features.grid = the latent grid) or compute them "
                "online (vavae.vf.features: online)"
            ]
            if "features" in missing
            else []
        )
        return f" ({'; '.join(hints)})" if hints else ""

    def _check_encodings(self, encodings: Mapping[str, str]) -> None:
        dtype, shape = parse_ndarray_encoding(encodings["image"])
        if dtype != "uint8":
            raise ValueError(
                f"data.path: column 'image' of {self.data_dir} has encoding {encodings['image']!r}, "
                f"expected ndarray:uint8 (as data/extract.py writes it)"
            )
        if shape is not None:
            self._check_image_shape(shape, where=f"column 'image' ({encodings['image']})")

    def _check_image_shape(self, shape: Sequence[int], where: str) -> None:
        shape = tuple(int(d) for d in shape)
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(f"data.path: images of {self.data_dir} must be [3, S, S]; {where} has shape {shape}")
        if self.image_shape is not None and shape != self.image_shape:
            raise ValueError(
                f"data.image_size: the images of {self.data_dir} have shape {shape} ({where}) but "
                f"data.image_size is {self.image_shape[-1]} (set data.image_size={shape[-1]}; "
                f"stored images are used as they are, never resized)"
            )

    def _to_training_sample(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        sid = int(raw["sample_id"])
        array = raw["image"]
        if (
            array.ndim != 3
            or array.shape[0] != 3
            or (self.image_shape is not None and tuple(array.shape) != self.image_shape)
        ):
            self._check_image_shape(array.shape, where=f"sample_id {sid}")
        image = _writable_tensor(array)
        if self._flipped(sid):  # flipping the bytes first: the same values, a quarter of the copy
            image = torch.flip(image, dims=[-1])
        item = {
            "image": uint8_to_normalized(image),
            "label": _scalar(raw["label"], np.int64),
            "sample_id": _scalar(sid, np.int64),
        }
        if self.use_features:
            item["features"] = _writable_tensor(raw["features"])
        _check_values(item, sid, None, "image")
        return item


def _shard_state_local() -> Any:
    return _ShardState.LOCAL


def _file_info_dict(info: Any) -> Optional[dict[str, Any]]:
    if info is None:
        return None
    return {"basename": info.basename, "bytes": info.bytes, "hashes": info.hashes}


# ----------------------------------------------------------------------------------------- loader
_ENV_KEYS = (
    ("RANK", "rank"),
    ("WORLD_SIZE", "world_size"),
    ("LOCAL_RANK", "local_rank"),
    ("LOCAL_WORLD_SIZE", "local_world_size"),
)


def ensure_streaming_env(dist: Any = None) -> None:
    """Make streaming see the right rank/world.

    Streaming reads RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from the environment. With
    ``dist`` (anything with rank / world_size / local_rank / local_world_size attributes), missing
    variables are set from it and conflicting ones are an error. Without it, a torch.distributed
    run whose environment lacks these variables is an error (every rank would read everything).
    """
    if dist is None:
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            env_world = os.environ.get("WORLD_SIZE")
            if (
                env_world is None
                or int(env_world) != tdist.get_world_size()
                or int(os.environ.get("RANK", -1)) != tdist.get_rank()
            ):
                raise RuntimeError(
                    f"streaming reads RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE from the environment, but they "
                    f"are unset or disagree with torch.distributed (rank {tdist.get_rank()} of "
                    f"{tdist.get_world_size()}); launch with torchrun or pass dist= to build_streaming_loader"
                )
        return
    for key, attr in _ENV_KEYS:
        value = getattr(dist, attr, None)
        if value is None:
            continue
        current = os.environ.get(key)
        if current is None:
            os.environ[key] = str(int(value))
        elif int(current) != int(value):
            raise RuntimeError(
                f"environment variable {key}={current} disagrees with the distributed setup "
                f"({attr}={value}); streaming would partition the data wrongly"
            )


def build_streaming_loader(
    cfg: Any,
    *,
    batch_size: int,
    seed: int,
    drop_last: bool = True,
    dist: Any = None,
    dataset_cls: type = LatentDataset,
    pin_memory: Optional[bool] = None,
    persistent_workers: bool = False,
    prefetch_factor: Optional[int] = None,
    **dataset_kwargs: Any,
) -> tuple[StreamingDataLoader, _ShardDataset]:
    """(StreamingDataLoader, dataset) for a ``DataConfig``; ``batch_size`` is per rank.

    ``dataset_cls`` is ``LatentDataset`` (DiT) or ``ImageDataset`` (VA-VAE), built from the config
    (``dataset_cls.config_kwargs``) and ``dataset_kwargs`` (which win; e.g. ``expected_shape``, ``stats_path``,
    ``use_features``). Call after torch.distributed is initialised (otherwise streaming initialises and destroys a
    process group of its own when WORLD_SIZE > 1). Each rank gets a disjoint 1/world share of every
    epoch (padded by repeating samples to a multiple of the world size). Resume with
    ``loader.load_state_dict(state)`` before ``iter(loader)``; see the module docstring.
    """
    if seed < 0:
        raise ValueError(f"seed: streaming needs a non-negative shuffle seed, got {seed}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ensure_streaming_env(dist)
    kwargs = {**dataset_cls.config_kwargs(cfg, seed), **dataset_kwargs}
    dataset = dataset_cls(
        local=cfg.path,
        remote=cfg.remote,
        shuffle=cfg.shuffle,
        shuffle_seed=seed,
        batch_size=batch_size,
        predownload=cfg.predownload,
        replication=None,
        cache_limit=getattr(cfg, "cache_limit", None),
        download_retry=getattr(cfg, "download_retry", 2),
        download_timeout=getattr(cfg, "download_timeout", 60.0),
        **kwargs,
    )
    workers = int(cfg.num_workers)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    # A generator of its own: torch's DataLoader draws a base seed from the *global* RNG at every iter(),
    # which would shift the training RNG stream (label dropout) after a mid-epoch resume.
    extra["generator"] = torch.Generator().manual_seed(seed)
    loader = StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        **extra,
    )
    return loader, dataset


def steps_per_epoch(dataset: StreamingDataset, global_batch_size: int) -> int:
    """Optimizer steps per epoch with drop_last: the per-rank share times the world, in global batches."""
    world = dataset._parallel_rank_world.num_ranks  # what streaming partitions over
    return (len(dataset) * world) // int(global_batch_size)
