"""Image generation for evaluation: per-index seeding, chunking, decoding latents to images, PNG/npz files.

The library behind ``tools/sample.py`` (the command line; its docstring shows the commands) and the in-loop
evaluation (``models/evaluation/in_loop.py``).

Sources (``resolve_source`` / ``load_model``): a run directory (``config.yaml`` + ``checkpoints/``; the newest
complete checkpoint unless one is given), a run's ``config.yaml``, one of its checkpoint directories
(``checkpoints/step_0000100``; the config is found in the run directory above it), or a checkpoint file (ours or
official; needs a config). EMA weights by default.

Decoding (``latent_decoder`` / ``decoder_from_config``): latents, as the model sees them, are de-normalised and
decoded by a tokenizer. Two config keys (``SamplingConfig``) say how, so that a released checkpoint samples
without its training data:

* ``sampling.tokenizer`` (``tools/sample.py --tokenizer``): the tokenizer that decodes the latents: the path of a
  VA-VAE checkpoint (a released ``.pt``/``.ckpt`` file, our run's checkpoint directory or its run directory), or
  the name of a registered tokenizer that needs no arguments (``identity``: the latents are [-1, 1] pixels).
  Empty (the default): the tokenizer the extraction of ``data.path`` recorded in its ``manifest.json``. With
  neither, building the decoder is an error that names this key: never a silent pixel-space fallback
  (32-channel VA-VAE latents would decode to garbage). When both are there, ``sampling.tokenizer`` wins.
* ``sampling.latent_stats`` (``--latent-stats``): the statistics to de-normalise with when ``data.latent_norm``
  is true: a ``latents_stats.pt`` file (``{'mean', 'std'}`` tensors, e.g. the official LightningDiT file as
  released, shape (1, C, 1, 1); any shape with C values is accepted) or a dataset directory holding one.
  Empty: ``<data.path>/latents_stats.pt``. Setting it with ``data.latent_norm=false`` is an error.

FID sampling (``sample_to_folder``), deterministic per image:

* Image ``i`` is a function of (checkpoint, sampler settings, ``seed``, ``i``) only: its label and its
  initial noise come from a generator seeded with ``SeedSequence([seed, i])`` (label first, then the noise
  z ~ N(0, I), both drawn on the CPU). ``labels="uniform"`` (default, the official protocol: independent
  uniform random labels) or ``"balanced"`` (label = i mod num_classes; the noise stays the same).
* Work is cut into chunks of ``batch_size`` consecutive indices; chunk c holds i in [c*B, (c+1)*B). Rank r of
  W samples the chunks still missing, in order, r, r+W, ... . A chunk is one sampler batch, so its images do
  not depend on the world size: a restart, on any number of ranks, produces the same images. (Bitwise
  identity also needs the same batch size and the same kind of hardware: batch shape and kernels can
  change the last bits of floating-point results.) With the SDE sampler (``euler_maruyama``) the per-step noise
  is drawn per chunk from a generator seeded with (seed, chunk), so the same holds.
* Files are ``{i:06d}.png``, written atomically (``core.fileio``). A restarted job skips every index whose file
  exists, so killing it at any moment loses at most the chunks in flight. ``sampling.json`` in the output folder
  records the settings; resuming with different ones is refused.
* The official sampler differs only in its seeding (one generator per rank seeded ``seed * world + rank``, so its
  images depend on the world size); the protocol is the same: uniform random labels, ``clamp(127.5 x + 128)``
  to uint8, ``{idx:06d}.png``.
* ``write_npz`` packs the PNGs, in index order, into ``arr_0`` (uint8 N x H x W x 3), the layout of ADM's
  evaluator and the official ``save_npz``; it is written in a stream (memory stays small for 50k images).

Every rank of a process group (if any) samples its chunks; the only collectives are the plan broadcast and two
barriers in ``sample_to_folder``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from core.checkpoint import complete_checkpoints
from core.config import config_to_dict
from core.debug import debug_sleep_seconds
from core.distributed import barrier, broadcast_object, rank_and_world
from core.fileio import atomic_save_with, atomic_write, atomic_write_text, is_temporary
from core.progress import Progress
from data.streaming import denormalize_latents, load_latent_stats
from data.tokenizers import available_tokenizers, build_tokenizer
from models.sampling import Sampler

__all__ = [
    "IDENTITY",
    "LABEL_MODES",
    "MANIFEST",
    "SCHEME",
    "SamplingError",
    "check_decoding",
    "chunk_range",
    "decoder_from_config",
    "existing_indices",
    "image_grid",
    "index_noise",
    "index_seed",
    "latent_decoder",
    "png_name",
    "remove_stale_temporaries",
    "resolve_source",
    "sample_class_grid",
    "sample_indices",
    "sample_to_folder",
    "save_png",
    "sde_generator",
    "to_uint8",
    "tokenizer_spec",
    "write_npz",
    "write_png_atomic",
]

log = logging.getLogger("llat")

MANIFEST = "sampling.json"
SCHEME = "per-index-seed/v1"
LABEL_MODES = ("uniform", "balanced")
IDENTITY = "identity"
TOKENIZER_KEY, STATS_KEY = "sampling.tokenizer", "sampling.latent_stats"


class SamplingError(RuntimeError):
    """The output folder cannot be used (other settings) or images are missing after sampling."""


# ------------------------------------------------------------------------------------------ model loading
def _latest_checkpoint(run_dir: Path) -> Path:
    found = complete_checkpoints(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    return found[-1][1]


def resolve_source(source: Path, config: Optional[Path] = None, ckpt: Optional[Path] = None) -> tuple[Path, Path]:
    """(config file, checkpoint) for any accepted source (see the module doc); the checkpoint defaults to the
    newest complete one of the run."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"source not found: {source}")
    run_dir = None
    if source.is_file() and source.suffix in (".yaml", ".yml"):
        run_dir = source.parent
        config = config or source
    elif source.is_dir() and (source / "config.yaml").is_file():
        run_dir = source
        config = config or source / "config.yaml"
    else:
        # A checkpoint (file, or one of our DCP checkpoint directories): the config is given or found above it.
        ckpt = ckpt or source
        if config is None:
            for parent in list(source.resolve().parents)[:4]:
                if (parent / "config.yaml").is_file():
                    config = parent / "config.yaml"
                    break
        if config is None:
            raise FileNotFoundError(
                f"{source}: a checkpoint without a run directory around it; pass --config "
                f"(the experiment YAML describing its model and sampler)"
            )
    if ckpt is None:
        ckpt = _latest_checkpoint(run_dir)
    return Path(config), Path(ckpt)


# ------------------------------------------------------------------------------------------ decoding
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) -> uint8, exactly as the official FID sampling (and the official tokenizer
    evaluation's PNGs): ``clamp(127.5 x + 128, 0, 255)``, computed in float32."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)


def tokenizer_spec(tokenizer: str = "", data_dir: Optional[Path] = None) -> dict[str, Any]:
    """``{"kind", "kwargs"}`` of the tokenizer that decodes the latents (module doc): ``tokenizer`` (the value of
    ``sampling.tokenizer``) when given, else the one ``data_dir``'s ``manifest.json`` records. Cheap: no weights
    are read. Raises ValueError / FileNotFoundError naming ``sampling.tokenizer`` when there is none."""

    data_dir = Path(data_dir) if data_dir not in (None, "") else None
    manifest = data_dir / "manifest.json" if data_dir is not None else None
    recorded = None
    if manifest is not None and manifest.is_file():
        try:
            info = json.loads(manifest.read_text())["plan"]["tokenizer"]
            recorded = {"kind": str(info["kind"]), "kwargs": dict(info.get("kwargs") or {})}
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{manifest}: cannot read the tokenizer it records ({type(err).__name__}: {err}); "
                f"set {TOKENIZER_KEY} instead"
            ) from None
    if tokenizer:
        tokenizer = str(tokenizer)
        if tokenizer in available_tokenizers():
            spec: dict[str, Any] = {"kind": tokenizer, "kwargs": {}}
        else:
            path = Path(tokenizer).expanduser()
            if not path.exists():
                raise FileNotFoundError(
                    f"{TOKENIZER_KEY}: tokenizer checkpoint not found: {tokenizer} (give a "
                    f"VA-VAE checkpoint file or run checkpoint directory, or one of "
                    f"{', '.join(available_tokenizers())})"
                )
            spec = {"kind": "vavae", "kwargs": {"checkpoint": str(path)}}
        if recorded is not None and recorded["kind"] != spec["kind"]:
            log.warning(
                "%s=%s, but %s records the %r tokenizer: decoding with %s",
                TOKENIZER_KEY,
                tokenizer,
                manifest,
                recorded["kind"],
                tokenizer,
            )
        return spec
    if recorded is not None:
        return recorded
    where = (
        f"data.path ({data_dir}) has no manifest.json naming one"
        if data_dir is not None
        else "data.path is not set (no manifest.json naming one)"
    )
    raise ValueError(
        f"no tokenizer to decode the latents: {where}. Set {TOKENIZER_KEY} (tools/sample.py: "
        f"--tokenizer) to the VA-VAE checkpoint the latents came from, or {TOKENIZER_KEY}={IDENTITY} "
        f"for pixel-space latents"
    )


def _stats_source(latent_norm: bool, latent_stats: str, data_dir: Optional[Path]) -> Optional[Path]:
    """Where the de-normalisation statistics come from (None: no de-normalisation)."""
    if not latent_norm:
        if latent_stats:
            raise ValueError(
                f"{STATS_KEY} is set but data.latent_norm is false (the model's latents are not "
                f"normalised): unset one of them"
            )
        return None
    if latent_stats:
        return Path(latent_stats).expanduser()
    if data_dir is None:
        raise ValueError(
            f"data.path: needed to de-normalise latents (data.latent_norm is true); set data.path "
            f"to the training data, {STATS_KEY} (tools/sample.py: --latent-stats) to its "
            f"latents_stats.pt, or data.latent_norm=false"
        )
    return data_dir


def latent_decoder(
    data_dir: Optional[Path],
    latent_norm: bool,
    multiplier: float,
    device: str = "cpu",
    *,
    tokenizer: str = "",
    latent_stats: str = "",
):
    """latents (normalised, as the model sees them) -> images in [-1, 1].

    ``data_dir``: the training data (statistics + ``manifest.json`` naming the tokenizer), None or "" for none.
    ``tokenizer`` / ``latent_stats``: the values of ``sampling.tokenizer`` / ``sampling.latent_stats`` (module
    doc), which take precedence over what ``data_dir`` holds. The returned function carries ``tokenizer_kind``."""

    data_dir = Path(data_dir) if data_dir not in (None, "") else None
    mean = std = None
    stats = _stats_source(latent_norm, latent_stats, data_dir)
    if stats is not None:
        # (data.streaming imports MosaicML streaming, a slow import: only when statistics are needed)

        try:
            mean, std = (s.to(device) for s in load_latent_stats(stats))
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{STATS_KEY if latent_stats else 'data.path'}: {err}") from None
    info = tokenizer_spec(tokenizer, data_dir)
    tok = build_tokenizer(info["kind"], **info.get("kwargs", {})).to(device).eval()

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        z = denormalize_latents(z, mean, std, multiplier) if mean is not None else z / multiplier
        return tok.decode(z).clamp(-1, 1)

    decode.tokenizer_kind = info["kind"]  # type: ignore[attr-defined]
    return decode


def decoder_from_config(cfg, device: str = "cpu"):
    """``latent_decoder`` for an experiment config: ``data.path`` / ``data.latent_norm`` /
    ``data.latent_multiplier`` and ``sampling.tokenizer`` / ``sampling.latent_stats``."""
    return latent_decoder(
        cfg.data.path or None,
        cfg.data.latent_norm,
        cfg.data.latent_multiplier,
        device,
        tokenizer=cfg.sampling.tokenizer,
        latent_stats=cfg.sampling.latent_stats,
    )


def check_decoding(cfg) -> None:
    """Cheap start-up check of the decoding settings (no weights read): raises what ``decoder_from_config``
    would raise about a missing tokenizer or statistics file."""
    data_dir = Path(cfg.data.path) if cfg.data.path else None
    stats = _stats_source(cfg.data.latent_norm, cfg.sampling.latent_stats, data_dir)
    if stats is not None and cfg.sampling.latent_stats and not stats.exists():
        raise FileNotFoundError(f"{STATS_KEY}: latent statistics file not found: {stats}")
    tokenizer_spec(cfg.sampling.tokenizer, data_dir)


@torch.no_grad()
def sample_class_grid(cfg, model, decode, per_class: int, seed: int = 0, device: str = "cpu") -> np.ndarray:
    """A uint8 image grid (H, W, 3): one row per class, `per_class` samples per row."""

    n_cls = cfg.model.num_classes
    sampler = Sampler.from_config(cfg.sampling, null_class=n_cls)
    g = torch.Generator(device=device).manual_seed(seed)
    c, s = cfg.model.in_channels, cfg.model.input_size
    y = torch.arange(n_cls, device=device).repeat_interleave(per_class)
    z = torch.randn(len(y), c, s, s, generator=g, device=device)
    latents = sampler.sample(model, z, y, generator=g)
    images = to_uint8(decode(latents)).cpu()  # (N, 3, H, W)
    n, ch, h, w = images.shape
    grid = images.view(n_cls, per_class, ch, h, w).permute(0, 3, 1, 4, 2).reshape(n_cls * h, per_class * w, ch)
    return grid.numpy()


def image_grid(images: torch.Tensor, columns: int = 8) -> np.ndarray:
    """uint8 (N, 3, H, W) -> one (rows*H, columns*W, 3) grid, row-major, black padding."""
    n, ch, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    canvas = torch.zeros(rows * columns, ch, h, w, dtype=torch.uint8)
    canvas[:n] = images.cpu()
    return canvas.view(rows, columns, ch, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, ch).numpy()


def save_png(array: np.ndarray, path: Path, scale: int = 1) -> Path:
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# ------------------------------------------------------------------------------------------ per-index draws
def index_seed(seed: int, index: int) -> int:
    """64-bit seed of image ``index`` (independent streams for every (seed, index))."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0])


def index_noise(
    indices: Sequence[int], seed: int, num_classes: int, latent_shape: Sequence[int], labels: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z float32 (n, C, H, W), y int64 (n,)) on the CPU for these image indices (see the module doc)."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    zs, ys = [], []
    for i in indices:
        g = torch.Generator().manual_seed(index_seed(seed, i))
        y = int(torch.randint(num_classes, (1,), generator=g))
        zs.append(torch.randn(tuple(latent_shape), generator=g))
        ys.append(i % num_classes if labels == "balanced" else y)
    if not zs:
        return torch.zeros(0, *latent_shape), torch.zeros(0, dtype=torch.long)
    return torch.stack(zs), torch.tensor(ys, dtype=torch.long)


def chunk_range(chunk: int, batch_size: int, num: int) -> range:
    return range(chunk * batch_size, min((chunk + 1) * batch_size, num))


def sde_generator(seed: int, chunk: int, device) -> torch.Generator:
    """Generator of the SDE sampler's per-step noise for one chunk."""
    return torch.Generator(device=device).manual_seed(index_seed(seed + 0x5DE, chunk))


@torch.no_grad()
def sample_indices(
    sampler,
    model_fn: Callable,
    decode: Callable,
    indices: Sequence[int],
    seed: int,
    num_classes: int,
    latent_shape: Sequence[int],
    labels: str,
    device,
    chunk: int,
    pad_to: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (n, 3, H, W) on ``device`` and labels for ``indices`` (one sampler batch).

    ``pad_to``: run the sampler on a batch of exactly this size (zeros noise, label 0 in the padding), e.g. to
    keep collective forwards (an FSDP-sharded model) the same shape on every rank; padding is not decoded."""
    z, y = index_noise(indices, seed, num_classes, latent_shape, labels)
    n = len(indices)
    if pad_to is not None and pad_to > n:
        z = torch.cat([z, torch.zeros(pad_to - n, *latent_shape)])
        y = torch.cat([y, torch.zeros(pad_to - n, dtype=torch.long)])
    gen = sde_generator(seed, chunk, device) if sampler.method == "euler_maruyama" else None
    latents = sampler.sample(model_fn, z.to(device), y.to(device), generator=gen)
    if n == 0:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8, device=device), y[:0]
    return to_uint8(decode(latents[:n])), y[:n]


# ------------------------------------------------------------------------------------------ files
def png_name(index: int) -> str:
    return f"{index:06d}.png"


def existing_indices(out_dir: Path, num: int) -> set[int]:
    found = set()
    if not out_dir.is_dir():
        return found
    for entry in os.scandir(out_dir):
        name = entry.name
        if name.endswith(".png") and name[:-4].isdigit():
            i = int(name[:-4])
            if i < num and name == png_name(i):
                found.add(i)
    return found


def write_png_atomic(image_hwc: np.ndarray, path: Path) -> None:
    atomic_save_with(path, lambda tmp: Image.fromarray(image_hwc).save(tmp, format="PNG"))


def remove_stale_temporaries(out_dir: Path) -> int:
    n = 0
    for p in out_dir.glob(".*"):
        if not is_temporary(p):
            continue
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def write_npz(files: Sequence[Path], path: Path) -> Path:
    """Pack PNG files (in the given order) into ``path`` as ``arr_0`` uint8 (N, H, W, 3), streaming (the npz is
    an uncompressed zip holding ``arr_0.npy``, exactly what ``np.savez`` writes)."""
    if not files:
        raise ValueError("write_npz: no images")
    with Image.open(files[0]) as im:
        w, h = im.size
    shape = (len(files), h, w, 3)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    path = Path(path)
    with (
        atomic_write(path, "wb") as out,
        zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for file in files:
                with Image.open(file) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                if arr.shape != (h, w, 3):
                    raise ValueError(f"{file}: shape {arr.shape}, expected {(h, w, 3)} like {files[0]}")
                f.write(np.ascontiguousarray(arr).tobytes())
    return path


def _settings(cfg, ckpt: Path, which: str, seed: int, labels: str) -> dict[str, Any]:
    return {
        "scheme": SCHEME,
        "checkpoint": str(Path(ckpt).resolve()),
        "which": which,
        "seed": int(seed),
        "labels": labels,
        "model": config_to_dict(cfg.model),
        "sampling": _sampler_settings(cfg.sampling),
        "data": _decode_settings(cfg),
    }


def _decode_settings(cfg) -> dict[str, Any]:
    """How latents become images. ``sampling.tokenizer`` / ``sampling.latent_stats`` are recorded here, and only
    when set, so that folders written before these keys existed stay resumable."""
    out = {"path": cfg.data.path, "latent_norm": cfg.data.latent_norm, "latent_multiplier": cfg.data.latent_multiplier}
    for key in ("tokenizer", "latent_stats"):
        if getattr(cfg.sampling, key):
            out[key] = getattr(cfg.sampling, key)
    return out


def _sampler_settings(sampling) -> dict[str, Any]:
    """The sampler part of ``sampling`` (the decoding keys are recorded under ``data``, see ``_decode_settings``)."""

    return {k: v for k, v in config_to_dict(sampling).items() if k not in ("tokenizer", "latent_stats")}


def _check_manifest(out_dir: Path, settings: dict[str, Any]) -> None:
    path = out_dir / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        diffs = [
            k
            for k in sorted(set(old) | set(settings))
            if k not in ("num", "batch_size") and old.get(k) != settings.get(k)
        ]
        if diffs:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diffs[:4])
            raise ValueError(f"{out_dir} holds samples made with other settings ({details}); use another --out")
    atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True))


# ------------------------------------------------------------------------------------------ FID sampling
def sample_to_folder(
    cfg,
    model,
    decode,
    out_dir: Path,
    num: int,
    *,
    ckpt: Path,
    which: str = "ema",
    batch_size: int = 64,
    seed: int = 0,
    labels: str = "uniform",
    device="cpu",
    npz: Optional[Path] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample images 0..num-1 into ``out_dir/{i:06d}.png`` (skipping existing ones), on every rank of the
    process group (if any); then, on rank 0, pack them into ``npz`` when given. Returns a summary (rank 0)."""

    rank, world = rank_and_world()
    out_dir = Path(out_dir)
    settings = _settings(cfg, ckpt, which, seed, labels)
    plan: dict[str, Any] = {}
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            _check_manifest(out_dir, {**settings, "num": num, "batch_size": batch_size})
            remove_stale_temporaries(out_dir)
            done = existing_indices(out_dir, num)
            chunks = math.ceil(num / batch_size)
            pending = [c for c in range(chunks) if any(i not in done for i in chunk_range(c, batch_size, num))]
            plan = {"pending": pending, "done": len(done)}
        except Exception as err:  # noqa: BLE001 - every rank must learn about it
            plan = {"error": f"{type(err).__name__}: {err}"}
    plan = broadcast_object(plan)
    if "error" in plan:
        raise SamplingError(plan["error"])
    pending, done_before = plan["pending"], plan["done"]
    mine = pending[rank::world]
    sampler = Sampler.from_config(cfg.sampling, null_class=cfg.model.num_classes)
    latent_shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    debug_sleep = debug_sleep_seconds("SAMPLE")  # tests preempt the job mid-way (core/debug.py)

    todo = sum(len(chunk_range(c, batch_size, num)) for c in pending)
    bar = Progress(todo, desc=f"sampling ({world} rank(s))", unit="img", enabled=rank == 0 and progress, logger=log)
    t0 = time.perf_counter()
    written = 0
    for c in mine:
        indices = list(chunk_range(c, batch_size, num))
        images, _ = sample_indices(
            sampler, model, decode, indices, seed, cfg.model.num_classes, latent_shape, labels, device, chunk=c
        )
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        for i, arr in zip(indices, arrays):
            path = out_dir / png_name(i)
            if not path.exists():
                write_png_atomic(arr, path)
                written += 1
        bar.update(min(len(indices) * world, bar.total - bar.n))
        if debug_sleep:
            time.sleep(debug_sleep)
    elapsed = time.perf_counter() - t0
    bar.close()
    barrier()
    summary: dict[str, Any] = {
        "out": str(out_dir),
        "num": num,
        "existing": done_before,
        "sampled": todo,
        "rank0_img_per_s": written / elapsed if elapsed > 0 else None,
    }
    if rank == 0:
        missing = sorted(set(range(num)) - existing_indices(out_dir, num))
        if missing:
            raise SamplingError(f"{len(missing)} images missing after sampling (first: {missing[:5]})")
        if npz is not None:
            write_npz([out_dir / png_name(i) for i in range(num)], Path(npz))
            summary["npz"] = str(npz)
    barrier()
    return summary
