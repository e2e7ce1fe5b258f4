"""Data-loader throughput from real MDS shards: samples/s per loader worker, and the workers each GPU needs.

    python tools/bench_data.py                              # both schemas, local and remote, 0/1/2 workers
    python tools/bench_data.py --schema latent --workers 1 2 4 --step-ms 213    # + data wait at 600 img/s, b 128
    python tools/bench_data.py --compare HEAD~1             # the reader at a git revision vs this tree (ratio)

The shards are written by the tool itself into a temporary directory, from random data of the real schema
(``data/streaming.py``; zstd, xxh64 hashes, as ``data/extract.py`` writes them):

* ``latent``: the XL latent schema (DiT training, ``LatentDataset``): ``latent`` and ``latent_flip`` float16
  [32, 16, 16], ``label``, ``sample_id``; read with the latent statistics (normalisation) and random flips on.
* ``image``: the VA-VAE stage-1 schema (``ImageDataset`` with ``use_features``): ``image`` uint8 [3, 256, 256],
  ``features`` float16 [1024, 16, 16] (DINOv2-L on the 16x16 latent grid), ``label``, ``sample_id``.

Each schema is read ``local`` (``data.path`` = the written directory; streaming decompresses each shard once next
to it, before the timed epoch) and ``remote`` (``data.remote`` = the written directory, ``data.path`` = a fresh
cache directory: every timed epoch downloads, checks and decompresses its shards, streaming's remote path).
One row = one epoch through the real ``build_streaming_loader`` (shuffled, drop_last) with ``--workers`` loader
processes; the clock starts when the first batch arrives (worker start-up excluded), so ``samples/s`` is the
steady rate and ``per worker`` = samples/s / workers (0 workers: the main process reads; the rate of one
process). ``workers/GPU`` = ceil(``--target`` / per worker) -- what one GPU's loader needs to serve ``--target``
img/s -- and ``per node`` = that x ``--gpus`` (the cores a node must have for its loaders).

``--step-ms T``: the consumer also spends T ms per batch (a stand-in for the GPU step; 128 / 600 img/s = 213 ms)
and ``data wait`` is the time it spent blocked in the loader / its wall time, the trainer's ``data_wait_frac``.

``--compare REV``: the reader code (``data/`` and ``core/``) at git revision REV against this tree's, on the same
shards: every row is measured ``--repeats`` times, old and new interleaved (each in its own process), and the
row reports both rates (median) and their ratio; the batches both produce (with normalisation and flips on, for
the image schema also with flips and no features) are hashed, and ``identical`` says whether the bytes and
order agree.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path and __name__ == "__main__" and "--child" not in sys.argv:
    sys.path.insert(0, str(REPO))

SCHEMAS = ("latent", "image")
PATHS = ("local", "remote")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--schema", nargs="+", default=list(SCHEMAS), choices=SCHEMAS)
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker processes per row")
    p.add_argument("--latent-shape", type=int, nargs=3, default=[32, 16, 16], metavar=("C", "H", "W"))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--features-shape", type=int, nargs=3, default=[1024, 16, 16], metavar=("D", "h", "w"))
    p.add_argument("--latent-samples", type=int, default=4096, help="samples written for the latent schema")
    p.add_argument("--image-samples", type=int, default=512, help="samples written for the image schema")
    p.add_argument("--latent-batch", type=int, default=128, help="per-GPU batch of the latent loader")
    p.add_argument("--image-batch", type=int, default=32, help="per-GPU batch of the image loader")
    p.add_argument("--shard-mib", type=float, default=64, help="uncompressed shard size limit (streaming's default)")
    p.add_argument("--target", type=float, default=600.0, help="img/s one GPU consumes")
    p.add_argument("--gpus", type=int, default=8, help="GPUs (loaders) per node")
    p.add_argument("--step-ms", type=float, default=0.0, help="consumer time per batch (data-wait measurement)")
    p.add_argument("--repeats", type=int, default=1, help="measurements per row (median)")
    p.add_argument("--compare", default=None, metavar="REV", help="git revision whose reader is the baseline")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each process (torch)")
    p.add_argument("--dir", default=None, help="where to write the shards (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # measure specs from stdin (internal)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- shards
def write_shards(schema: str, out: Path, args) -> Path:
    """Random samples of ``schema`` as MDS shards in ``out`` (with latent statistics for the latent schema)."""
    # lazy: --help without numpy/torch/streaming; and the --child reader process (--compare) runs this file against
    # another revision's data/ and core/, so their names are bound only where the code that needs them runs
    import numpy as np
    import torch

    from data.streaming import latent_columns, open_writer, save_latent_stats

    rng = np.random.default_rng(args.seed)
    limit = int(args.shard_mib * 2**20)
    if schema == "latent":
        shape = tuple(args.latent_shape)
        columns = latent_columns("float16", latent_shape=shape)
        n = args.latent_samples
    else:
        s = args.image_size
        columns = latent_columns(
            with_latents=False, with_features=True, features_shape=tuple(args.features_shape), image_size=s
        )
        n = args.image_samples
    with open_writer(out, columns, limit) as writer:
        for i in range(n):
            sample = {"label": int(rng.integers(0, 1000)), "sample_id": 10 * i + 7}  # ids != stream index
            if schema == "latent":
                sample["latent"] = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
                sample["latent_flip"] = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
            else:
                sample["image"] = rng.integers(0, 256, (3, s, s), dtype=np.uint8)
                sample["features"] = rng.standard_normal(tuple(args.features_shape), dtype=np.float32).astype(
                    np.float16
                )
            writer.write(sample)
    if schema == "latent":
        c = shape[0]
        save_latent_stats(out, torch.linspace(-0.5, 0.5, c), torch.linspace(0.5, 2.0, c))
    return out


# ---------------------------------------------------------------------------------------- measuring
def _loader(spec: dict):
    from data.streaming import ImageDataset, build_streaming_loader  # lazy: see write_shards

    image = spec["schema"] == "image"
    cfg = SimpleNamespace(
        path=spec["local"],
        remote=spec.get("remote"),
        shuffle=True,
        predownload=None,
        num_workers=spec["workers"],
        latent_norm=True,
        latent_multiplier=0.75,
        random_flip=spec.get("flip", not image),
        use_features=spec.get("features", image),
        image_size=spec.get("image_size"),
    )
    kwargs = {"dataset_cls": ImageDataset, "use_features": cfg.use_features} if image else {}
    return build_streaming_loader(
        cfg,
        batch_size=spec["batch"],
        seed=spec.get("seed", 0),
        pin_memory=False,
        persistent_workers=spec["workers"] > 0,
        **kwargs,
    )


def measure(spec: dict) -> dict:
    """One epoch through the loader of ``spec``: wall-clock samples/s and data wait from its first batch on, and
    the CPU time spent per sample (immune to other jobs on the machine's cores) by the workers over the whole
    epoch (they are persistent, so it is read after the epoch), by the main process receiving the batches after
    the first, or, without workers, by the main process over the whole epoch. With spec["digest"] also a hash of
    every batch's bytes, in order."""
    import torch  # lazy: see write_shards

    torch.set_num_threads(spec.get("threads", 1))
    loader, dataset = _loader(spec)
    key = "image" if spec["schema"] == "image" else "latent"
    step_s = spec.get("step_ms", 0.0) / 1000
    digest = hashlib.sha256() if spec.get("digest") else None
    try:
        start_cpu = time.process_time()
        it = iter(loader)
        first = next(it)
        if digest is not None:
            _update_digest(digest, first)
        pids = _child_pids() if spec["workers"] else []
        n, waited = 0, 0.0
        main0 = time.process_time() if pids else start_cpu
        t0 = time.perf_counter()
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            waited += time.perf_counter() - t
            n += len(batch[key])
            if digest is not None:
                _update_digest(digest, batch)
            if step_s:
                _busy(step_s)
        elapsed = time.perf_counter() - t0
        main_cpu, workers_cpu = time.process_time() - main0, _cpu_seconds(pids)
        del it
    finally:
        del loader, dataset
        gc.collect()
    total = n + len(first[key])  # the workers' and (without workers) the main process's CPU: whole epoch
    nan = float("nan")
    out = {
        "samples": n,
        "seconds": elapsed,
        "samples/s": n / elapsed if elapsed > 0 else nan,
        "data wait": waited / elapsed if elapsed > 0 else nan,
        "main cpu ms/sample": 1000 * main_cpu / (n if pids else total) if n else nan,
        "worker cpu ms/sample": 1000 * workers_cpu / total if pids else nan,
    }
    if digest is not None:
        out["digest"] = digest.hexdigest()
    return out


def _child_pids() -> list[int]:
    """Processes whose parent is this one (the loader's workers), from /proc."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes ``pids`` (all their threads), from /proc."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def _busy(seconds: float) -> None:
    time.sleep(seconds)  # the GPU step: the main process waits on the device (the workers keep the cores)


def _update_digest(digest, batch: dict) -> None:
    for k in sorted(batch):
        v = batch[k]
        digest.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        digest.update(v.contiguous().numpy().tobytes())


class Reader:
    """A process that imports the reader from ``tree`` and runs ``measure`` on request (one JSON line each way)."""

    def __init__(self, tree: Path, threads: int):
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
        self.tree = tree
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child"],
            cwd=str(tree),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def measure(self, spec: dict) -> dict:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the measuring process of {self.tree} ended ({self.proc.wait()}); see above")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def _serve() -> int:
    for line in sys.stdin:
        print(json.dumps(measure(json.loads(line))), flush=True)
    return 0


def _checkout(rev: str, dest: Path) -> Path:
    """The reader packages (data/, core/) of git revision ``rev`` in ``dest``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "data", "core"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"error: git archive {rev} failed: {archive.stderr.decode().strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def workers_needed(per_worker: float, target: float) -> float:
    return math.ceil(target / per_worker) if per_worker > 0 else float("nan")


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return _serve()
    # lazy: see write_shards
    import torch

    from core.metrics import format_table

    readers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_data_", dir=args.dir) as tmp:
        tmp = Path(tmp)
        try:
            if args.compare:
                readers = {
                    "old": Reader(_checkout(args.compare, tmp / "old"), args.threads),
                    "new": Reader(REPO, args.threads),
                }
            datasets = {}
            for schema in args.schema:
                t = time.perf_counter()
                datasets[schema] = write_shards(schema, tmp / f"{schema}_data", args)
                print(
                    f"wrote {len(list(datasets[schema].glob('*.zstd')))} {schema} shards in "
                    f"{time.perf_counter() - t:.1f} s",
                    file=sys.stderr,
                )
            counter = iter(range(1 << 30))
            rows = []
            for schema in args.schema:
                for path in args.paths:
                    for workers in args.workers:
                        rows.append(_row(schema, path, workers, datasets[schema], tmp, counter, args, readers))
                        print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            identical = _identity(args, datasets, tmp, counter, readers) if readers else {}
        finally:
            for reader in readers.values():
                reader.close()

    print(
        f"reader {'at ' + args.compare + ' (old) vs this tree (new)' if args.compare else 'of this tree'}; "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} intra-op thread(s) per process, "
        f"{args.repeats} epoch(s) per row; target {args.target:g} img/s per GPU x {args.gpus} GPUs = "
        f"{args.target * args.gpus:g} samples/s per node"
        + (f"; consumer step {args.step_ms:g} ms per batch" if args.step_ms else "")
    )
    print(format_table(rows))
    for schema, same in identical.items():
        print(
            f"{schema}: batches of the old and new reader {'identical' if same else 'DIFFER'} (bytes and order, hashed)"
        )
    for schema in args.schema:
        best = max(
            (
                r["per worker"]
                for r in rows
                if r["schema"] == schema and r["workers"] > 0 and math.isfinite(r["per worker"])
            ),
            default=float("nan"),
        )
        if math.isfinite(best):
            need = workers_needed(best, args.target)
            print(
                f"{schema}: {best:.0f} samples/s per worker (per CPU-second of a worker) at best -> {need} "
                f"worker(s) per GPU for {args.target:g} img/s, {need * args.gpus} per node of {args.gpus} GPUs"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "identical": identical, "args": vars(args)}, indent=1))
    return 1 if identical and not all(identical.values()) else 0


def _spec(schema, path, workers, data, tmp, counter, args) -> dict:
    spec = {
        "schema": schema,
        "workers": workers,
        "threads": args.threads,
        "seed": args.seed,
        "batch": args.latent_batch if schema == "latent" else args.image_batch,
        "step_ms": args.step_ms,
        "image_size": args.image_size if schema == "image" else None,
    }
    if path == "remote":  # a fresh cache: the epoch downloads and decompresses every shard
        spec.update(remote=str(data), local=str(tmp / f"cache_{next(counter)}"))
    else:
        spec["local"] = str(data)
    return spec


def _cpu_ms(result: dict) -> float:
    """CPU ms per sample of whoever reads: the workers, or the main process without workers."""
    w = result["worker cpu ms/sample"]
    return w if math.isfinite(w) else result["main cpu ms/sample"]


def _row(schema, path, workers, data, tmp, counter, args, readers) -> dict:
    run = {name: reader.measure for name, reader in readers.items()} or {"new": measure}
    if path == "local":  # streaming decompresses each shard next to the dataset once: not in the timed epoch
        run["new"]({**_spec(schema, path, 0, data, tmp, counter, args), "step_ms": 0})
    names = list(run)
    results: dict[str, list] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # interleaved, alternating order
            results[name].append(run[name](_spec(schema, path, workers, data, tmp, counter, args)))
    med = {
        name: {k: statistics.median(x[k] for x in res) for k in ("samples/s", "data wait", "main cpu ms/sample")}
        for name, res in results.items()
    }
    for name, res in results.items():
        med[name]["cpu"] = statistics.median(_cpu_ms(x) for x in res)
    new = med["new"]
    row = {
        "schema": schema,
        "path": path,
        "workers": workers,
        "batch": args.latent_batch if schema == "latent" else args.image_batch,
    }
    if "old" in med:
        old = med["old"]
        row.update(
            {
                "old samples/s": old["samples/s"],
                "new samples/s": new["samples/s"],
                "wall new/old": new["samples/s"] / old["samples/s"],
                "old cpu ms/smp": old["cpu"],
                "new cpu ms/smp": new["cpu"],
                "cpu old/new": old["cpu"] / new["cpu"],
            }
        )
    else:
        row.update({"samples/s": new["samples/s"], "cpu ms/smp": new["cpu"]})
    if workers:
        row["main cpu ms/smp"] = new["main cpu ms/sample"]
    per_worker = 1000 / new["cpu"]
    row.update(
        {
            "per worker": per_worker,
            "workers/GPU": workers_needed(per_worker, args.target),
            "per node": workers_needed(per_worker, args.target) * args.gpus,
        }
    )
    if args.step_ms:
        row["data wait"] = new["data wait"]
    return row


def _identity(args, datasets, tmp, counter, readers) -> dict:
    """Old and new reader: the same batch bytes in the same order (latents normalised + flipped; images with
    features, and flipped without)."""
    out = {}
    variants = [("latent", {})] if "latent" in datasets else []
    if "image" in datasets:
        variants += [("image", {}), ("image-flip", {"flip": True, "features": False})]
    for name, extra in variants:
        schema = name.split("-")[0]
        spec = {
            **_spec(schema, "local", 0, datasets[schema], tmp, counter, args),
            "step_ms": 0,
            "digest": True,
            **extra,
        }
        out[name] = readers["old"].measure(spec)["digest"] == readers["new"].measure(spec)["digest"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
