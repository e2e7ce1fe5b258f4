"""Sample images from a trained run or a checkpoint: a class grid, or N images for FID (PNGs and/or an npz).

    # a class grid (one row per class)
    python tools/sample.py runs/tiny_dit --grid runs/tiny_dit/samples.png --per-class 8
    # 50,000 images for FID, official protocol (sampler from the run's config), on 8 GPUs, resumable
    torchrun --nproc_per_node 8 tools/sample.py runs/xl --num 50000 --out samples/xl --npz samples/xl.npz
    # an official checkpoint file: the architecture and sampler come from a config
    python tools/sample.py lightningdit-xl-imagenet256-800ep.pt --config configs/lightningdit_xl.yaml \\
        data.path=/data/imagenet256_vavae --num 50000 --out samples/official
    # any sampler setting as a dotted override
    python tools/sample.py runs/xl sampling.cfg_scale=1.0 sampling.num_steps=100 --num 10000 --out samples/nocfg

Sources: a run directory (``config.yaml`` + ``checkpoints/``; the newest complete checkpoint unless ``--ckpt``),
a run's ``config.yaml``, one of its checkpoint directories (``checkpoints/step_0000100``; the config is found in
the run directory above it), or a checkpoint file (ours or official; needs ``--config``). EMA weights by default
(``--which model`` for the raw weights). Latents are de-normalised with the statistics stored with the training
data (``data.path``) and decoded with the tokenizer its extraction recorded (``manifest.json``; identity when
absent).

FID sampling (``--num N --out DIR``), deterministic per image:

* Image ``i`` is a function of (checkpoint, sampler settings, ``--seed``, ``i``) only: its label and its
  initial noise come from a generator seeded with ``SeedSequence([seed, i])`` (label first, then the noise
  z ~ N(0, I), both drawn on the CPU). ``--labels uniform`` (default, the official protocol: independent
  uniform random labels) or ``balanced`` (label = i mod num_classes; the noise stays the same).
* Work is cut into chunks of ``--batch-size`` consecutive indices; chunk c holds i in [c*B, (c+1)*B). Rank r of
  W samples the chunks still missing, in order, r, r+W, ... . A chunk is one sampler batch, so its images do
  not depend on the world size: a restart, on any number of ranks, produces the same images. (Bitwise
  identity also needs the same ``--batch-size`` and the same kind of hardware: batch shape and kernels can
  change the last bits of floating-point results.) With the SDE sampler (``euler_maruyama``) the per-step noise
  is drawn per chunk from a generator seeded with (seed, chunk), so the same holds.
* Files are ``{i:06d}.png`` (written atomically: temporary file + rename). A restarted job skips every index
  whose file exists, so killing it at any moment loses at most the chunks in flight. ``sampling.json`` in the
  output folder records the settings; resuming with different ones is refused.
* The official sampler differs only in its seeding (one generator per rank seeded ``seed * world + rank``, so its
  images depend on the world size); the protocol is the same: uniform random labels, ``clamp(127.5 x + 128)``
  to uint8, ``{idx:06d}.png``.
* ``--npz PATH`` packs the PNGs, in index order, into ``arr_0`` (uint8 N x H x W x 3), the layout of ADM's
  evaluator and the official ``save_npz``; it is written in a stream (memory stays small for 50k images).

Multi-process: torchrun (``torchrun --nproc_per_node 8 tools/sample.py ...``), Slurm ``srun``, or the local
launcher with the run's config.yaml as the source and this tool's options after ``--``:
``python launchers/local.py --nproc 2 --entry tools/sample.py runs/x/config.yaml [overrides] -- --num 1000 --out
samples/x``. Every rank loads the model; no collective runs during sampling.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

log = logging.getLogger("llat")

MANIFEST = "sampling.json"
SCHEME = "per-index-seed/v1"
LABEL_MODES = ("uniform", "balanced")


class SamplingError(RuntimeError):
    """The output folder cannot be used (other settings) or images are missing after sampling."""


# ------------------------------------------------------------------------------------------ model loading
def _latest_checkpoint(run_dir: Path) -> Path:
    from core.checkpoint import complete_checkpoints
    found = complete_checkpoints(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    return found[-1][1]


def load_run(run_dir: Path, overrides=(), ckpt: Optional[Path] = None, which: str = "ema",
             device: str = "cpu"):
    """(config, model in eval mode, checkpoint path) for a run directory."""
    from launchers.experiment import load_config
    from models.lightningdit import build_model
    from models.loading import load_into_model

    cfg = load_config(run_dir / "config.yaml", overrides)
    model = build_model(cfg.model)
    path = ckpt or _latest_checkpoint(run_dir)
    load_into_model(model, path, which=which, strict=True)
    return cfg, model.to(device).eval(), path


def resolve_source(source: Path, config: Optional[Path] = None,
                   ckpt: Optional[Path] = None) -> tuple[Path, Path]:
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
            raise FileNotFoundError(f"{source}: a checkpoint without a run directory around it; pass --config "
                                    f"(the experiment YAML describing its model and sampler)")
    if ckpt is None:
        ckpt = _latest_checkpoint(run_dir)
    return Path(config), Path(ckpt)


def load_model(source: Path, overrides: Sequence[str] = (), config: Optional[Path] = None,
               ckpt: Optional[Path] = None, which: str = "ema", device: str = "cpu"):
    """(config, model in eval mode, checkpoint path) for a run dir / config / checkpoint dir / checkpoint file."""
    from launchers.experiment import load_config
    from models.lightningdit import build_model
    from models.loading import load_into_model

    config_path, ckpt_path = resolve_source(Path(source), config, ckpt)
    cfg = load_config(config_path, overrides)
    model = build_model(cfg.model)
    load_into_model(model, ckpt_path, which=which, strict=True)
    return cfg, model.to(device).eval(), ckpt_path


def latent_decoder(data_dir: Optional[Path], latent_norm: bool, multiplier: float, device: str = "cpu"):
    """latents (normalised, as the model sees them) -> images in [-1, 1].

    ``data_dir``: the training data (statistics + ``manifest.json`` naming the tokenizer); None or "" means no
    data directory: identity tokenizer, and then ``latent_norm`` must be false."""
    from data.tokenizers import build_tokenizer

    data_dir = Path(data_dir) if data_dir not in (None, "") else None
    mean = std = None
    if latent_norm:
        if data_dir is None:
            raise ValueError("data.path: needed to de-normalise latents (data.latent_norm is true); set data.path "
                             "to the training data or data.latent_norm=false")
        # (data.streaming imports MosaicML streaming, a slow import: only when statistics are needed)
        from data.streaming import denormalize_latents, load_latent_stats
        mean, std = (s.to(device) for s in load_latent_stats(data_dir))
    manifest = data_dir / "manifest.json" if data_dir is not None else None
    if manifest is not None and manifest.exists():
        info = json.loads(manifest.read_text())["plan"]["tokenizer"]
    else:
        info = {"kind": "identity"}
    tokenizer = build_tokenizer(info["kind"], **info.get("kwargs", {})).to(device).eval()

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        z = denormalize_latents(z, mean, std, multiplier) if mean is not None else z / multiplier
        return tokenizer.decode(z).clamp(-1, 1)
    decode.tokenizer_kind = info["kind"]            # type: ignore[attr-defined]
    return decode


def tokenizer_kind(data_dir: Optional[Path]) -> str:
    """The tokenizer recorded with the training data ("identity" when there is no manifest)."""
    if data_dir in (None, ""):
        return "identity"
    manifest = Path(data_dir) / "manifest.json"
    try:
        return json.loads(manifest.read_text())["plan"]["tokenizer"]["kind"]
    except (OSError, KeyError, ValueError):
        return "identity"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (N, 3, H, W) -> uint8, as the official FID sampling: clamp(127.5 x + 128, 0, 255)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)


@torch.no_grad()
def sample_class_grid(cfg, model, decode, per_class: int, seed: int = 0, device: str = "cpu") -> np.ndarray:
    """A uint8 image grid (H, W, 3): one row per class, `per_class` samples per row."""
    from models.sampling import Sampler

    n_cls = cfg.model.num_classes
    sampler = Sampler.from_config(cfg.sampling, null_class=n_cls)
    g = torch.Generator(device=device).manual_seed(seed)
    c, s = cfg.model.in_channels, cfg.model.input_size
    y = torch.arange(n_cls, device=device).repeat_interleave(per_class)
    z = torch.randn(len(y), c, s, s, generator=g, device=device)
    latents = sampler.sample(model, z, y, generator=g)
    images = to_uint8(decode(latents)).cpu()                    # (N, 3, H, W)
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
    from PIL import Image

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


def index_noise(indices: Sequence[int], seed: int, num_classes: int, latent_shape: Sequence[int],
                labels: str = "uniform") -> tuple[torch.Tensor, torch.Tensor]:
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
def sample_indices(sampler, model_fn: Callable, decode: Callable, indices: Sequence[int], seed: int,
                   num_classes: int, latent_shape: Sequence[int], labels: str, device, chunk: int,
                   pad_to: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(image_hwc).save(tmp, format="PNG")
    os.replace(tmp, path)


def remove_stale_temporaries(out_dir: Path) -> int:
    n = 0
    for p in out_dir.glob(".*.tmp-*"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def write_npz(files: Sequence[Path], path: Path) -> Path:
    """Pack PNG files (in the given order) into ``path`` as ``arr_0`` uint8 (N, H, W, 3), streaming (the npz is
    an uncompressed zip holding ``arr_0.npy``, exactly what ``np.savez`` writes)."""
    from PIL import Image

    if not files:
        raise ValueError("write_npz: no images")
    with Image.open(files[0]) as im:
        w, h = im.size
    shape = (len(files), h, w, 3)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for file in files:
                with Image.open(file) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                if arr.shape != (h, w, 3):
                    raise ValueError(f"{file}: shape {arr.shape}, expected {(h, w, 3)} like {files[0]}")
                f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)
    return path


def _settings(cfg, ckpt: Path, which: str, seed: int, labels: str) -> dict[str, Any]:
    from core.config import config_to_dict

    return {"scheme": SCHEME, "checkpoint": str(Path(ckpt).resolve()), "which": which, "seed": int(seed),
            "labels": labels, "model": config_to_dict(cfg.model), "sampling": config_to_dict(cfg.sampling),
            "data": {"path": cfg.data.path, "latent_norm": cfg.data.latent_norm,
                     "latent_multiplier": cfg.data.latent_multiplier}}


def _check_manifest(out_dir: Path, settings: dict[str, Any]) -> None:
    path = out_dir / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        diffs = [k for k in sorted(set(old) | set(settings)) if k not in ("num", "batch_size")
                 and old.get(k) != settings.get(k)]
        if diffs:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diffs[:4])
            raise ValueError(f"{out_dir} holds samples made with other settings ({details}); use another --out")
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ FID sampling
def _dist_info():
    """(rank, world, is_distributed) from an initialised process group, else (0, 1, False)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size(), True
    return 0, 1, False


def _broadcast(obj: Any) -> Any:
    rank, world, active = _dist_info()
    if not active or world == 1:
        return obj
    from core.distributed import broadcast_object
    return broadcast_object(obj)


def _barrier() -> None:
    if _dist_info()[2]:
        from core.distributed import barrier
        barrier()


def sample_to_folder(cfg, model, decode, out_dir: Path, num: int, *, ckpt: Path, which: str = "ema",
                     batch_size: int = 64, seed: int = 0, labels: str = "uniform", device="cpu",
                     npz: Optional[Path] = None, progress: bool = True) -> dict[str, Any]:
    """Sample images 0..num-1 into ``out_dir/{i:06d}.png`` (skipping existing ones), on every rank of the
    process group (if any); then, on rank 0, pack them into ``npz`` when given. Returns a summary (rank 0)."""
    from models.sampling import Sampler

    rank, world, _ = _dist_info()
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
    plan = _broadcast(plan)
    if "error" in plan:
        raise SamplingError(plan["error"])
    pending, done_before = plan["pending"], plan["done"]
    mine = pending[rank::world]
    sampler = Sampler.from_config(cfg.sampling, null_class=cfg.model.num_classes)
    latent_shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    debug_sleep = float(os.environ.get("LLAT_DEBUG_SAMPLE_SLEEP", "0") or 0)

    bar = None
    todo = sum(len(chunk_range(c, batch_size, num)) for c in pending)
    if rank == 0 and progress:
        from tqdm import tqdm
        bar = tqdm(total=todo, unit="img", dynamic_ncols=True, desc=f"sampling ({world} rank(s))")
    t0 = time.perf_counter()
    written = 0
    for c in mine:
        indices = list(chunk_range(c, batch_size, num))
        images, _ = sample_indices(sampler, model, decode, indices, seed, cfg.model.num_classes, latent_shape,
                                   labels, device, chunk=c)
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        for i, arr in zip(indices, arrays):
            path = out_dir / png_name(i)
            if not path.exists():
                write_png_atomic(arr, path)
                written += 1
        if bar is not None:
            bar.update(min(len(indices) * world, bar.total - bar.n))
        if debug_sleep:
            time.sleep(debug_sleep)
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    _barrier()
    summary: dict[str, Any] = {"out": str(out_dir), "num": num, "existing": done_before, "sampled": todo,
                               "rank0_img_per_s": written / elapsed if elapsed > 0 else None}
    if rank == 0:
        missing = sorted(set(range(num)) - existing_indices(out_dir, num))
        if missing:
            raise SamplingError(f"{len(missing)} images missing after sampling (first: {missing[:5]})")
        if npz is not None:
            write_npz([out_dir / png_name(i) for i in range(num)], Path(npz))
            summary["npz"] = str(npz)
    _barrier()
    return summary


# ------------------------------------------------------------------------------------------ CLI
def _setup_distributed():
    """Join the process group when started by torchrun / Slurm with more than one process."""
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if world > 1:
        from core.distributed import init_distributed
        return init_distributed()
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="run directory, its config.yaml, a checkpoint directory or a "
                                             "checkpoint file (with --config)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sampling.cfg_scale=4")
    p.add_argument("--config", type=Path, default=None, help="experiment YAML (model + sampler) for a checkpoint "
                                                             "outside a run directory, e.g. an official .pt")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: newest complete one of the run)")
    p.add_argument("--which", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: this rank's CUDA device, else cpu")
    g = p.add_argument_group("class grid")
    g.add_argument("--grid", type=Path, default=None, help="output PNG: one row per class")
    g.add_argument("--per-class", type=int, default=8)
    g.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of small images")
    f = p.add_argument_group("FID samples")
    f.add_argument("--num", type=int, default=None, help="number of images (e.g. 50000)")
    f.add_argument("--out", type=Path, default=None, help="output folder of {idx:06d}.png files")
    f.add_argument("--npz", type=Path, default=None, help="also pack the images into this ADM-layout .npz")
    f.add_argument("--batch-size", type=int, default=64, help="images per sampler batch (per rank)")
    f.add_argument("--labels", default="uniform", choices=LABEL_MODES,
                   help="uniform random labels (official) or class-balanced (i mod num_classes)")
    f.add_argument("--no-progress", action="store_true")
    args = p.parse_intermixed_args(argv)
    if args.grid is None and args.num is None:
        p.error("nothing to do: give --grid PNG and/or --num N --out DIR")
    if args.num is not None and (args.out is None or args.num < 1 or args.batch_size < 1):
        p.error("--num needs --out DIR, N >= 1 and --batch-size >= 1")

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dist = _setup_distributed()
    try:
        device = args.device or (str(dist.device) if dist is not None else
                                 ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            cfg, model, ckpt = load_model(args.source, args.overrides, args.config, args.ckpt, args.which, device)
            decode = latent_decoder(cfg.data.path or None, cfg.data.latent_norm, cfg.data.latent_multiplier,
                                    device)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        rank = dist.rank if dist is not None else 0
        if args.grid is not None and rank == 0:
            grid = sample_class_grid(cfg, model, decode, args.per_class, args.seed, device)
            out = save_png(grid, args.grid, args.scale)
            print(f"sampled {cfg.model.num_classes} classes x {args.per_class} from {ckpt} ({args.which}) -> {out}")
        if args.num is not None:
            try:
                summary = sample_to_folder(cfg, model, decode, args.out, args.num, ckpt=ckpt, which=args.which,
                                           batch_size=args.batch_size, seed=args.seed, labels=args.labels,
                                           device=device, npz=args.npz, progress=not args.no_progress)
            except SamplingError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            if rank == 0:
                print(json.dumps(summary))
        return 0
    finally:
        if dist is not None:
            from core.distributed import teardown
            teardown()


if __name__ == "__main__":
    raise SystemExit(main())
