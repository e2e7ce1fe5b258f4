"""Sample-quality metrics through torch-fidelity: FID, sFID, Inception Score, KID, precision/recall.

Shared by ``tools/evaluate.py`` (sample folder / npz against a reference), ``tools/eval_tokenizer.py`` (rFID)
and the in-loop evaluation (``models/evaluation/in_loop.py``). torch-fidelity supplies the feature extractors
(its registry, its ``create_feature_extractor``) and the metric arithmetic (``fid_statistics_to_metric``,
``isc_features_to_metric``, ``kid_features_to_metric``, ``prc_features_to_metric``); this module adds what it
does not do: reading ADM-style ``.npz`` files, comparing against precomputed ``mu``/``sigma`` reference
statistics, sFID, a reference cache keyed by file identity, and strict local weights (no downloads).

Inputs (``load_image_set``): an image folder (searched recursively, sorted paths), an ``.npz`` holding ``arr_0``
(uint8 N x H x W x 3, the ADM / official ``save_npz`` layout; read through a memory map when stored
uncompressed), an ``.npy`` of the same layout, or an in-memory uint8 array/tensor (NHWC or NCHW).

References (``Reference``):

* images (folder / ``arr_0``): features are extracted once and cached under ``cache_dir`` (key: the resolved
  path, its size/mtime (for folders: of every file), the centre crop, the extractor name and its weights
  file's path/size/mtime); every metric is available.
* statistics: an ``.npz`` with ``mu``/``sigma`` (and ``mu_s``/``sigma_s`` for sFID), e.g. ADM's
  ``VIRTUAL_imagenet256_labeled.npz``. FID (and sFID) compare the samples' statistics with the stored ones.
  ADM's statistics are Inception-v3 pool3 (2048-d) features, so they are used only with the
  ``inception-v3-compat`` extractor (files written by ``save_statistics`` with another extractor name it in an
  ``extractor`` entry and are used with that one). ADM's reference batches also hold ``arr_0`` (10k images): as in ADM's
  evaluator those images serve KID and precision/recall, while FID/sFID use the stored statistics. Without
  images, KID and precision/recall are skipped (reported in ``skipped``); IS needs the samples only.

sFID (ADM evaluator): the Fréchet distance of "mixed_6/conv" features, the first 7 channels of a 17x17 map
(2023-d, flattened in TensorFlow's H, W, C order). In torch-fidelity's port of the same TF graph this op is the
output (ReLU after batch norm) of ``Mixed_6d.branch1x1`` (torch-fidelity's weight converter maps
``mixed_6/conv/*`` to ``Mixed_6d.branch1x1.*``). torch-fidelity does not expose it, so it is read with a
forward hook on that module. The mapping of the TF op name to the post-ReLU output is inferred, not verified
against ADM's TensorFlow evaluator.

Numbers from torch-fidelity's Inception port agree with the TensorFlow graph that ADM's evaluator runs to
about 1e-3 relative FID, so paper numbers (ADM evaluator) and ours can differ in the second decimal.

Weights: every extractor except ``tiny-random`` needs a local weights file (``weights``); a missing or empty
path is an error naming the config key (``eval.feature_extractor_weights`` or the CLI flag), never a
download. For ``inception-v3-compat`` the file is torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``.

``tiny-random``: a tiny conv net with weights drawn from a fixed seed, registered with torch-fidelity by this
module. It makes the whole pipeline (in-loop FID included) run on a CPU in seconds for tests and the demo.
Its numbers measure nothing about image quality.

Custom extractors: ``feature_extractor="package.module:ClassName"`` imports a ``FeatureExtractorBase``
subclass and registers it with torch-fidelity under that string.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.debug import debug_sleep_seconds
from core.fileio import atomic_torch_save, atomic_write_bytes
from core.progress import Progress
from data.images import center_crop_arr

__all__ = [
    "INCEPTION",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "TINY",
    "METRICS",
    "METRIC_ALIASES",
    "Extractor",
    "ImageSet",
    "Reference",
    "ReferenceData",
    "TinyRandomExtractor",
    "check_weights",
    "resolve_extractor",
    "compute_metrics",
    "default_cache_dir",
    "evaluate_images",
    "extract_features",
    "frechet_distance",
    "format_result",
    "load_image_set",
    "normalize_metrics",
    "reference_data",
    "statistics",
    "save_statistics",
]

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
TINY = "tiny-random"
METRICS = ("fid", "sfid", "is", "kid", "pr")
METRIC_ALIASES = {
    "isc": "is",
    "inception_score": "is",
    "prc": "pr",
    "precision": "pr",
    "recall": "pr",
    "precision_recall": "pr",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------- extractors
def _fidelity():
    """Import torch-fidelity (registers its built-in extractors) and register ours once."""
    import torch_fidelity  # noqa: F401
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if TINY not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY, TinyRandomExtractor)
    return FEATURE_EXTRACTORS_REGISTRY


def _feature_extractor_base():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    return FeatureExtractorBase


class TinyRandomExtractor(_feature_extractor_base()):
    """Two stride-2 convolutions and a linear layer with weights from a fixed seed (no training, no file).

    For tests and CPU demos only: its FID is a distance between feature distributions of a random network,
    not a measure of image quality. Features: ``pool`` (32-d, FID/KID/PR), ``logits`` (10-d, IS).
    Inputs: uint8 (B, 3, H, W) images of any size, resized to 32x32 like Inception resizes to 299x299.
    ``feature_extractor_weights_path`` (optional) loads a state dict instead of the seeded weights.
    """

    INPUT_SIZE = 32
    SEED = 20250117

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 10)
        g = torch.Generator().manual_seed(self.SEED)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if feature_extractor_weights_path:
            self.load_state_dict(torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "pool", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(
                f"expected uint8 images (B, 3, H, W), got {getattr(x, 'dtype', type(x))} "
                f"{tuple(getattr(x, 'shape', ()))}"
            )
        x = (x.float() - 128.0) / 128.0
        x = F.interpolate(x, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False)
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        pool = h.mean(dim=(2, 3))
        out = {"pool": pool, "logits": self.fc(pool)}
        return tuple(out[name] for name in self.features_list)


# sFID: (module whose output is the spatial map, number of leading channels kept)
_SPATIAL = {INCEPTION: ("Mixed_6d.branch1x1", 7), TINY: ("conv1", 2)}
SPATIAL = "spatial"  # the name of the sFID feature in our feature dicts


def resolve_extractor(name: str) -> str:
    registry = _fidelity()
    if name in registry:
        return name
    if ":" in name:
        module_name, _, cls_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"feature extractor {name!r}: cannot import {cls_name} from {module_name}: {err}") from err
        from torch_fidelity.registry import register_feature_extractor

        register_feature_extractor(name, cls)
        return name
    raise ValueError(
        f"unknown feature extractor {name!r}; registered: {', '.join(sorted(registry))} "
        f"(or give 'package.module:ClassName')"
    )


def _file_fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_weights(name: str, weights: Optional[str], key: str) -> Optional[Path]:
    """The local weights file for extractor ``name`` (None when the extractor needs none)."""
    if not weights:
        if name == TINY or ":" in name:
            return None
        hint = ""
        if name == INCEPTION:
            hint = (
                f" Download {INCEPTION_WEIGHTS_FILE} once (torch-fidelity release v0.2.0: "
                f"{INCEPTION_WEIGHTS_URL}) and point {key} at it."
            )
        raise ValueError(
            f"{key}: a local weights file for the {name!r} feature extractor is required "
            f"(nothing is downloaded at run time).{hint}"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: feature-extractor weights file not found: {weights}")
    return path


def normalize_metrics(metrics: Iterable[str], key: str = "metrics") -> list[str]:
    """Canonical metric names (``fid``, ``sfid``, ``is``, ``kid``, ``pr``), in that order; ``all`` = every one."""
    out = set()
    for m in metrics:
        m = str(m).strip().lower()
        if not m:
            continue
        if m == "all":
            out.update(METRICS)
            continue
        m = METRIC_ALIASES.get(m, m)
        if m not in METRICS:
            raise ValueError(f"{key}: unknown metric {m!r}; known: {', '.join(METRICS)}, all")
        out.add(m)
    if not out:
        raise ValueError(f"{key}: no metric requested; known: {', '.join(METRICS)}, all")
    return [m for m in METRICS if m in out]


class Extractor:
    """A torch-fidelity feature extractor on ``device`` that returns the features the requested metrics need.

    ``layers``: metric -> feature name (``fid``/``kid``/``pr`` share torch-fidelity's default layer for the
    extractor, ``is`` uses its IS layer, ``sfid`` the ``spatial`` feature). ``__call__(uint8 images)`` returns
    ``{feature name: float32 CPU tensor (B, D)}``.
    """

    def __init__(
        self,
        name: str = INCEPTION,
        weights: Optional[str] = None,
        metrics: Sequence[str] = ("fid",),
        device: Union[str, torch.device] = "cpu",
        weights_key: str = "eval.feature_extractor_weights",
    ):
        from torch_fidelity.utils import create_feature_extractor

        self.name = resolve_extractor(name)
        self.metrics = normalize_metrics(metrics)
        self.weights = check_weights(self.name, weights, weights_key)
        self.device = torch.device(device)
        cls = _fidelity()[self.name]
        self.layers: dict[str, str] = {}
        for metric, fidelity_name in (("fid", "fid"), ("kid", "kid"), ("pr", "prc"), ("is", "isc")):
            if metric in self.metrics:
                self.layers[metric] = cls.get_default_feature_layer_for_metric(fidelity_name)
        fid_layer = cls.get_default_feature_layer_for_metric("fid")
        if "sfid" in self.metrics:
            if self.name not in _SPATIAL:
                raise ValueError(
                    f"sfid: the {self.name!r} feature extractor has no spatial features "
                    f"(sFID is defined for {INCEPTION})"
                )
            self.layers["sfid"] = SPATIAL
        model_layers = sorted({v for v in self.layers.values() if v != SPATIAL} or {fid_layer})
        self.module = create_feature_extractor(
            self.name,
            model_layers,
            cuda=False,
            verbose=False,
            feature_extractor_weights_path=str(self.weights) if self.weights else None,
        )
        self.module.to(self.device)
        self._spatial: Optional[torch.Tensor] = None
        if "sfid" in self.metrics:
            module_path, self._spatial_channels = _SPATIAL[self.name]
            # Every requested layer lies after this module in both networks, so the hook always fires.
            self.module.get_submodule(module_path).register_forward_hook(self._keep_spatial)
        self.fingerprint = {
            "extractor": self.name,
            "weights": _file_fingerprint(self.weights) if self.weights else None,
            "version": CACHE_VERSION,
        }

    def _keep_spatial(self, module, inputs, output) -> None:
        # First channels, in TensorFlow's (H, W, C) flattening order.
        self._spatial = output[:, : self._spatial_channels].permute(0, 2, 3, 1).flatten(1)

    @property
    def feature_names(self) -> list[str]:
        return sorted(set(self.layers.values()))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self._spatial = None
        out = self.module.convert_features_tuple_to_dict(self.module(images.to(self.device)))
        feats = {k: v.detach().float().cpu() for k, v in out.items()}
        if "sfid" in self.metrics:
            feats[SPATIAL] = self._spatial.detach().float().cpu()
            self._spatial = None
        return {k: feats[k] for k in self.feature_names}


# ---------------------------------------------------------------------------------------------- images
def _npz_member(path: Path, name: str = "arr_0") -> np.ndarray:
    """Array ``name`` of an npz: memory-mapped when stored uncompressed (np.savez's default), else loaded."""
    member = name + ".npy"
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(member)
            stored = info.compress_type == zipfile.ZIP_STORED
        if stored:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise ValueError("bad local header")
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
            if not fortran and not dtype.hasobject and int(np.prod(shape)) > 0:
                return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (KeyError, ValueError, OSError, AttributeError):
        pass
    with np.load(path) as data:
        if name not in data.files:
            raise KeyError(f"{path}: no {name!r} array (arrays: {data.files})")
        return data[name]


class ImageSet(torch.utils.data.Dataset):
    """uint8 CHW image tensors from files or an array (see ``load_image_set``)."""

    def __init__(
        self,
        files: Optional[list[Path]] = None,
        array: Optional[np.ndarray] = None,
        channels_last: bool = True,
        center_crop: Optional[int] = None,
        source: str = "<array>",
    ):
        self.files = files
        self.array = array
        self.channels_last = channels_last
        self.center_crop = center_crop
        self.source = source

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else int(self.array.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.files is not None:
            with Image.open(self.files[i]) as img:
                img = img.convert("RGB")
                if self.center_crop:
                    img = center_crop_arr(img, self.center_crop)
                arr = np.asarray(img, dtype=np.uint8)
            return torch.from_numpy(arr.copy()).permute(2, 0, 1)
        arr = np.asarray(self.array[i])
        t = torch.from_numpy(arr.copy())
        return t.permute(2, 0, 1) if self.channels_last else t


def _array_set(arr: Any, source: str) -> ImageSet:
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(
            f"{source}: expected uint8 images of shape (N, H, W, 3) or (N, 3, H, W), got {arr.dtype} {arr.shape}"
        )
    if arr.shape[-1] == 3:
        return ImageSet(array=arr, channels_last=True, source=source)
    if arr.shape[1] == 3:
        return ImageSet(array=arr, channels_last=False, source=source)
    raise ValueError(f"{source}: expected 3 colour channels, got shape {arr.shape}")


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path."""
    files = [
        Path(root) / f
        for root, _, names in os.walk(folder)
        for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    ]
    return sorted(files)


def load_image_set(source: Any, center_crop: Optional[int] = None) -> ImageSet:
    """An ``ImageSet`` from a folder, an ``.npz`` (``arr_0``), an ``.npy``, or a uint8 array/tensor."""
    if isinstance(source, ImageSet):
        return source
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _array_set(source, "<array>")
    path = Path(source).expanduser()
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
        return ImageSet(files=files, center_crop=center_crop, source=str(path))
    if not path.is_file():
        raise FileNotFoundError(f"image set not found: {path}")
    if path.suffix == ".npz":
        return _array_set(_npz_member(path, "arr_0"), str(path))
    if path.suffix == ".npy":
        return _array_set(np.load(path, mmap_mode="r"), str(path))
    raise ValueError(f"{path}: expected an image folder, an .npz (arr_0) or an .npy of uint8 images")


def _collate(items: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in items}
    if len(shapes) > 1:
        raise ValueError(
            f"images of different sizes in one batch {sorted(shapes)}; resize them or pass a centre "
            f"crop (center_crop / --center-crop)"
        )
    return torch.stack(items)


def extract_features(
    extractor: Extractor,
    images: Any,
    batch_size: int = 100,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> dict[str, torch.Tensor]:
    """Features of every image of ``images`` (anything ``load_image_set`` takes, or an iterable of uint8
    batches), in order."""
    if isinstance(images, (ImageSet, np.ndarray, torch.Tensor, str, os.PathLike)):
        dataset = load_image_set(images)
        batches: Iterable[torch.Tensor] = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=extractor.device.type == "cuda",
        )
        total = len(dataset)
    else:
        batches, total = images, None
    parts: dict[str, list[torch.Tensor]] = {}
    debug_sleep = debug_sleep_seconds("EVAL")  # tests preempt the evaluate job mid-way (core/debug.py)
    with Progress(total, desc=desc, unit="img", enabled=progress, leave=False) as bar:
        for batch in batches:
            for k, v in extractor(batch).items():
                parts.setdefault(k, []).append(v)
            bar.update(len(batch))
            if debug_sleep:
                time.sleep(debug_sleep)
    if not parts:
        return {k: torch.zeros(0, 0) for k in extractor.feature_names}
    return {k: torch.cat(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------- statistics
def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """mu, sigma (float64) of (N, D) features, through torch-fidelity's ``fid_features_to_statistics``."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for statistics, got shape {tuple(features.shape)}")
    stats = fid_features_to_statistics(features.double())
    return {"mu": np.asarray(stats["mu"], dtype=np.float64), "sigma": np.asarray(stats["sigma"], dtype=np.float64)}


def frechet_distance(stats1: Mapping[str, np.ndarray], stats2: Mapping[str, np.ndarray]) -> float:
    """Fréchet distance of two Gaussians (torch-fidelity's ``fid_statistics_to_metric``), float64."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {"mu": np.asarray(stats1["mu"], np.float64), "sigma": np.asarray(stats1["sigma"], np.float64)}
    s2 = {"mu": np.asarray(stats2["mu"], np.float64), "sigma": np.asarray(stats2["sigma"], np.float64)}
    if s1["mu"].shape != s2["mu"].shape or s1["sigma"].shape != s2["sigma"].shape:
        raise ValueError(f"statistics of different dimension: mu {s1['mu'].shape} vs {s2['mu'].shape}")
    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


def save_statistics(path: Union[str, Path], features: Mapping[str, torch.Tensor], extractor: Extractor) -> Path:
    """Write ADM-layout statistics (``mu``, ``sigma`` [, ``mu_s``, ``sigma_s``]) of ``features`` to an npz, plus
    ``extractor`` (its name) unless it is Inception-v3 (ADM's files have no such key and mean Inception-v3)."""
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    fid_layer = extractor.layers.get("fid") or extractor.layers.get("kid") or extractor.layers.get("pr")
    if fid_layer is None:
        raise ValueError("save_statistics needs the FID features: request the 'fid' metric")
    out.update(statistics(features[fid_layer]))
    if SPATIAL in features:
        s = statistics(features[SPATIAL])
        out["mu_s"], out["sigma_s"] = s["mu"], s["sigma"]
    if extractor.name != INCEPTION:
        out["extractor"] = np.array(extractor.name)
    atomic_write_bytes(path, _npz_bytes(out))
    return path


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """What ``np.savez(file, **arrays)`` writes, as bytes."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- references
def default_cache_dir() -> Path:
    return Path(os.environ.get("LLAT_FID_CACHE") or Path.home() / ".cache" / "lightning_latent" / "fid")


@dataclass
class Reference:
    """What a reference path holds: images (folder / arr_0) and/or ADM statistics (mu/sigma[, mu_s/sigma_s])."""

    path: Path
    has_images: bool
    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # "fid"/"sfid" -> {mu, sigma}
    center_crop: Optional[int] = None
    stats_extractor: str = INCEPTION  # what made the stored statistics (ADM's files: Inception-v3)
    images: Any = None  # in-memory reference images (array / ImageSet): never cached

    @classmethod
    def from_images(cls, images: Any) -> Reference:
        return cls(Path("<in-memory images>"), True, images=load_image_set(images))

    @classmethod
    def open(cls, path: Union[str, Path], center_crop: Optional[int] = None, key: str = "eval.reference") -> Reference:
        if not str(path):
            raise ValueError(
                f"{key}: no reference given (an image folder, an .npz of images, or an ADM "
                f"statistics .npz with mu/sigma)"
            )
        p = Path(path).expanduser()
        if p.is_dir():
            return cls(p, True, center_crop=center_crop)
        if not p.is_file():
            raise FileNotFoundError(f"{key}: reference not found: {path}")
        if p.suffix == ".npy":
            return cls(p, True, center_crop=center_crop)
        if p.suffix != ".npz":
            raise ValueError(f"{key}: {path}: expected an image folder, an .npz or an .npy")
        with np.load(p) as data:
            files = set(data.files)
            stats = {}
            if {"mu", "sigma"} <= files:
                stats["fid"] = {"mu": data["mu"].astype(np.float64), "sigma": data["sigma"].astype(np.float64)}
            if {"mu_s", "sigma_s"} <= files:
                stats["sfid"] = {"mu": data["mu_s"].astype(np.float64), "sigma": data["sigma_s"].astype(np.float64)}
            made_by = str(data["extractor"]) if "extractor" in files else INCEPTION
        if "arr_0" not in files and not stats:
            raise ValueError(
                f"{key}: {path} holds neither images (arr_0) nor statistics (mu, sigma); arrays: {sorted(files)}"
            )
        return cls(p, "arr_0" in files, stats, center_crop, made_by)

    def fingerprint(self) -> dict[str, Any]:
        if self.path.is_dir():
            h = hashlib.sha256()
            files = image_files(self.path)
            for f in files:
                st = f.stat()
                h.update(f"{f.relative_to(self.path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            ident = {"path": str(self.path.resolve()), "files": len(files), "listing": h.hexdigest()}
        else:
            ident = _file_fingerprint(self.path)
        return {**ident, "center_crop": self.center_crop}

    def describe(self) -> str:
        kinds = (["images"] if self.has_images else []) + [f"{k} statistics" for k in self.stats]
        if self.images is not None:
            return f"<{len(self.images)} in-memory images>"
        return f"{self.path} ({', '.join(kinds)})"


@dataclass
class ReferenceData:
    """What the metrics need of the reference: statistics per metric and (for KID / PR) features."""

    n: Optional[int]
    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # "fid"/"sfid" -> {mu, sigma}
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # feature name -> (N, D)
    stored_stats: tuple[str, ...] = ()  # metrics using stored mu/sigma
    cached: bool = False


def reference_data(
    reference: Reference,
    extractor: Extractor,
    cache_dir: Optional[Union[str, Path]] = None,
    batch_size: int = 100,
    num_workers: int = 0,
    progress: bool = False,
    use_cache: bool = True,
) -> ReferenceData:
    """Reference statistics/features for ``extractor``'s metrics: stored ADM statistics where they apply, else
    extracted from the reference images (cached under ``cache_dir``)."""
    metrics = extractor.metrics
    same = reference.stats_extractor == extractor.name
    use_stored = [m for m in ("fid", "sfid") if m in metrics and m in reference.stats and same]
    if not same and reference.stats and not reference.has_images:
        raise ValueError(
            f"reference {reference.path} holds statistics of {reference.stats_extractor!r} features "
            f"only; they cannot be compared with {extractor.name!r} features"
        )
    out = ReferenceData(n=None, stored_stats=tuple(use_stored))
    for m in use_stored:
        out.stats[m] = reference.stats[m]
    need_stats = [m for m in ("fid", "sfid") if m in metrics and m not in use_stored]
    need_feats = [m for m in ("kid", "pr") if m in metrics]
    if not (need_stats or need_feats):
        return out
    if not reference.has_images:
        if need_stats:
            raise ValueError(
                f"reference {reference.path}: no statistics for {need_stats} and no images to compute them from"
            )
        return out  # KID / PR need images: the caller reports them as skipped
    stat_layers = {m: extractor.layers[m] for m in need_stats}
    feat_layers = sorted({extractor.layers[m] for m in need_feats})

    cache_file = None
    if use_cache and reference.images is None:
        key_src = json.dumps({"reference": reference.fingerprint(), "extractor": extractor.fingerprint}, sort_keys=True)
        key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
        cache_file = Path(cache_dir or default_cache_dir()) / f"ref-{key}.pt"
        if cache_file.is_file():
            try:
                entry = torch.load(cache_file, map_location="cpu", weights_only=False)
                if all(layer in entry["stats"] for layer in stat_layers.values()) and all(
                    layer in entry["features"] for layer in feat_layers
                ):
                    out.n = int(entry["n"])
                    out.stats.update({m: entry["stats"][layer] for m, layer in stat_layers.items()})
                    out.features = {layer: entry["features"][layer] for layer in feat_layers}
                    out.cached = True
                    return out
            except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed
                pass
    source = reference.images if reference.images is not None else load_image_set(reference.path, reference.center_crop)
    feats = extract_features(
        extractor, source, batch_size=batch_size, num_workers=num_workers, progress=progress, desc="reference"
    )
    n = next(iter(feats.values())).shape[0]
    stats_by_layer = {layer: statistics(feats[layer]) for layer in set(stat_layers.values())}
    out.n = n
    out.stats.update({m: stats_by_layer[layer] for m, layer in stat_layers.items()})
    out.features = {layer: feats[layer] for layer in feat_layers}
    if cache_file is not None:
        atomic_torch_save({"n": n, "stats": stats_by_layer, "features": out.features, "source": key_src}, cache_file)
    return out


# ---------------------------------------------------------------------------------------------- metrics
def compute_metrics(
    features: Mapping[str, torch.Tensor],
    extractor: Extractor,
    ref: ReferenceData,
    kid_subset_size: Optional[int] = None,
    rng_seed: int = 2020,
) -> dict[str, Any]:
    """Metrics of sample ``features`` (from ``extractor``) against ``ref``. Keys: ``fid``, ``sfid``, ``is``,
    ``is_std``, ``kid``, ``kid_std``, ``precision``, ``recall`` (those requested and computable), and
    ``num_samples``; ``skipped`` lists metrics that need reference images the reference does not have."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    n = next(iter(features.values())).shape[0]
    out: dict[str, Any] = {}
    skipped: list[str] = []
    for m in ("fid", "sfid"):
        if m in extractor.metrics:
            out[m] = frechet_distance(statistics(features[extractor.layers[m]]), ref.stats[m])
    if "is" in extractor.metrics:
        isc = isc_features_to_metric(
            features[extractor.layers["is"]], splits=max(1, min(10, n)), shuffle=True, rng_seed=rng_seed
        )
        out["is"], out["is_std"] = float(isc[KEY_METRIC_ISC_MEAN]), float(isc[KEY_METRIC_ISC_STD])
    if "kid" in extractor.metrics:
        layer = extractor.layers["kid"]
        if layer in ref.features:
            real = ref.features[layer]
            size = min(kid_subset_size or 1000, n, real.shape[0])
            if size < 2:
                raise ValueError(f"KID needs at least 2 samples and 2 reference images, got {n} and {real.shape[0]}")
            kid = kid_features_to_metric(
                features[layer], real, kid_subsets=100, kid_subset_size=size, rng_seed=rng_seed, verbose=False
            )
            out["kid"], out["kid_std"] = float(kid[KEY_METRIC_KID_MEAN]), float(kid[KEY_METRIC_KID_STD])
        else:
            skipped.append("kid")
    if "pr" in extractor.metrics:
        layer = extractor.layers["pr"]
        if layer in ref.features:
            real = ref.features[layer]
            if min(n, real.shape[0]) < 4:
                raise ValueError(
                    f"precision/recall need at least 4 samples and 4 reference images "
                    f"(k=3 neighbours), got {n} and {real.shape[0]}"
                )
            prc = prc_features_to_metric(
                features[layer], real, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True, verbose=False
            )
            out["precision"], out["recall"] = float(prc[KEY_METRIC_PRECISION]), float(prc[KEY_METRIC_RECALL])
        else:
            skipped.append("pr")
    out["num_samples"] = int(n)
    if ref.n is not None:
        out["num_reference"] = int(ref.n)
    if skipped:
        out["skipped"] = skipped
    return out


def evaluate_images(
    samples: Any,
    reference: Union[str, Path, Reference],
    metrics: Sequence[str] = ("fid",),
    feature_extractor: str = INCEPTION,
    weights: Optional[str] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 100,
    num_workers: int = 0,
    center_crop: Optional[int] = None,
    kid_subset_size: Optional[int] = None,
    progress: bool = False,
    use_cache: bool = True,
    weights_key: str = "--weights",
    return_features: bool = False,
) -> dict[str, Any]:
    """Everything in one call: metrics of a sample set (folder / npz / array) against a reference."""
    extractor = Extractor(feature_extractor, weights, metrics, device, weights_key=weights_key)
    if isinstance(reference, Reference):
        ref = reference
    elif isinstance(reference, (np.ndarray, torch.Tensor, ImageSet)):
        ref = Reference.from_images(reference)
    else:
        ref = Reference.open(reference, center_crop, key="reference")
    ref_data = reference_data(ref, extractor, cache_dir, batch_size, num_workers, progress, use_cache)
    feats = extract_features(
        extractor,
        load_image_set(samples, center_crop),
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        desc="samples",
    )
    result = compute_metrics(feats, extractor, ref_data, kid_subset_size)
    result["feature_extractor"] = extractor.name
    result["reference"] = ref.describe()
    result["reference_cached"] = ref_data.cached
    if ref_data.stored_stats:
        result["stored_statistics"] = list(ref_data.stored_stats)
    if return_features:  # for callers that also want statistics or the raw features
        result["_features"], result["_extractor"] = feats, extractor
    return result


RESULT_LABELS = [
    ("fid", "FID"),
    ("sfid", "sFID"),
    ("is", "IS"),
    ("is_std", "IS std"),
    ("kid", "KID"),
    ("kid_std", "KID std"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("num_samples", "samples"),
    ("num_reference", "reference images"),
]


def format_result(result: Mapping[str, Any]) -> str:
    """A plain-text table of an ``evaluate_images`` result (what ``tools/evaluate.py`` prints)."""
    rows = [(label, result[key]) for key, label in RESULT_LABELS if key in result]
    width = max([len(label) for label, _ in rows] + [len("reference")])
    lines = []
    for label, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{label.ljust(width)}  {text}")
    if result.get("skipped"):
        lines.append(f"{'skipped'.ljust(width)}  {', '.join(result['skipped'])} (the reference has no images)")
    lines.append(f"{'reference'.ljust(width)}  {result.get('reference', '?')}")
    lines.append(f"{'extractor'.ljust(width)}  {result.get('feature_extractor', '?')}")
    return "\n".join(lines)
