"""A held-out split of an MDS dataset: a fixed set of sample ids kept out of training, for the validation loss.

    python -m data.holdout SRC OUT --val-fraction 0.01 [--seed 0]      # or --val-ids 3,17,42
    # then train with data.path=OUT/train data.val_path=OUT/val eval.val_every_epochs=...

``split_dataset`` reads every sample of the dataset ``SRC`` (written by data/extract.py or
``write_latent_dataset``) in its stored order and writes two MDS datasets with the same columns: ``OUT/val``, the
held-out samples, and ``OUT/train``, all the others; so the training data cannot contain a held-out sample, by
construction (streaming cannot skip samples of one dataset without changing its epoch layout). Both get ``SRC``'s
``latents_stats.pt`` (the latent normalisation of the whole source: training and validation latents are
normalised alike) and its ``manifest.json`` (the tokenizer that decodes the latents, their shape; with the
split's ``num_samples`` and without the whole source's checksums); ``OUT/holdout.json`` records the source, the
rule and the held-out ids.

The held-out ids are a pure function of the source's sample ids and the rule: ``--val-ids`` names them; with
``--val-fraction f`` they are the ``round(f * N)`` (at least 1) ids with the smallest ``splitmix64`` hash of
(seed, id) — a uniform, class-blind choice that does not depend on the storage order, the shard size or the
number of extraction ranks. ``SRC`` is read straight from its shard files (``read_mds_samples``), never written
to. The copy costs the dataset's size on disk once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Union

from streaming.base.compression import decompress

from core.fileio import atomic_write_json
from data.extract import MANIFEST_FILENAME
from data.streaming import (
    INDEX_FILENAME,
    STATS_FILENAME,
    _SampleDecoder,
    _splitmix64,
    open_writer,
    read_columns,
)

__all__ = ["HOLDOUT_FILE", "choose_heldout", "main", "read_holdout", "read_mds_samples", "split_dataset"]

HOLDOUT_FILE = "holdout.json"
_MASK64 = (1 << 64) - 1


def choose_heldout(
    sample_ids: Sequence[int], *, fraction: Optional[float] = None, ids: Optional[Sequence[int]] = None, seed: int = 0
) -> list[int]:
    """The held-out ids (sorted) among ``sample_ids``: ``ids`` (each must be one of them), or the ``round(fraction
    * N)`` (at least 1, fewer than N) ids with the smallest hash of (seed, id). Exactly one of the two."""
    if (fraction is None) == (ids is None):
        raise ValueError("give exactly one of a held-out fraction and a list of held-out ids")
    present = set(int(i) for i in sample_ids)
    if len(present) != len(sample_ids):
        raise ValueError("the dataset has repeated sample ids")
    if ids is not None:
        chosen = sorted(set(int(i) for i in ids))
        missing = [i for i in chosen if i not in present]
        if missing:
            raise ValueError(f"held-out ids not in the dataset: {missing[:10]}")
    else:
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
        n = max(1, round(float(fraction) * len(present)))
        seed_hash = _splitmix64(int(seed) & _MASK64)
        chosen = sorted(sorted(present, key=lambda i: (_splitmix64(seed_hash ^ (i & _MASK64)), i))[:n])
    if len(chosen) >= len(present):
        raise ValueError(f"holding out {len(chosen)} of {len(present)} samples leaves none to train on")
    return chosen


def read_mds_samples(directory: Union[str, Path]) -> Iterator[dict[str, Any]]:
    """Every raw sample (column -> decoded value) of the local MDS dataset ``directory``, in its stored order.

    Read directly from the shard files (a compressed shard is decompressed in memory; nothing is written), without
    a StreamingDataset and so without streaming's shared memory: for small sequential reads (the split here, the
    held-out set of the validation loss), not for training."""
    directory = Path(directory)
    index = json.loads((directory / INDEX_FILENAME).read_text())
    for shard in index["shards"]:
        raw = directory / shard["raw_data"]["basename"]
        if raw.is_file():
            data = raw.read_bytes()
        else:
            zipped = shard.get("zip_data") or {}
            if not zipped or not (directory / zipped["basename"]).is_file():
                raise FileNotFoundError(f"{directory}: shard {shard['raw_data']['basename']} is missing")
            data = decompress(shard["compression"], (directory / zipped["basename"]).read_bytes())
        decode = _SampleDecoder(SimpleNamespace(**{k: shard[k] for k in _COLUMN_KEYS}))
        (count,) = struct.unpack_from("<I", data, 0)
        offsets = struct.unpack_from(f"<{count + 1}I", data, 4)
        for i in range(count):
            yield decode(bytearray(data[offsets[i] : offsets[i + 1]]))


_COLUMN_KEYS = ("column_names", "column_encodings", "column_sizes")


def split_dataset(
    src: Union[str, Path],
    out: Union[str, Path],
    *,
    fraction: Optional[float] = None,
    ids: Optional[Sequence[int]] = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``out/train`` and ``out/val`` from ``src`` (module doc); returns what ``out/holdout.json`` holds."""
    src, out = Path(src), Path(out)
    columns = read_columns(src)
    if "sample_id" not in columns:
        raise ValueError(f"{src}: no sample_id column")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty")
    all_ids = [int(s["sample_id"]) for s in read_mds_samples(src)]
    val_ids = choose_heldout(all_ids, fraction=fraction, ids=ids, seed=seed)
    held = set(val_ids)
    counts = {"train": 0, "val": 0}
    with open_writer(out / "train", columns) as train, open_writer(out / "val", columns) as val:
        for sample in read_mds_samples(src):
            sid = int(sample["sample_id"])
            (val if sid in held else train).write(sample)
            counts["val" if sid in held else "train"] += 1
    if (src / STATS_FILENAME).is_file():
        for split in ("train", "val"):
            shutil.copyfile(src / STATS_FILENAME, out / split / STATS_FILENAME)
    if (src / MANIFEST_FILENAME).is_file():  # what decodes the latents (the tokenizer), their shape, the extraction
        manifest = json.loads((src / MANIFEST_FILENAME).read_text())
        for key in [k for k in manifest if k.endswith("sha256")]:  # checksums of the whole source: not of a split
            del manifest[key]
        for split in ("train", "val"):
            split_manifest = {**manifest, "num_samples": counts[split], "holdout": {"split": split, "source": str(src)}}
            atomic_write_json(out / split / MANIFEST_FILENAME, split_manifest, indent=2)
    record = {
        "source": str(src),
        "rule": {"fraction": fraction, "seed": seed} if ids is None else {"ids": "given"},
        "counts": counts,
        "val_ids": val_ids,
        "val_ids_sha256": hashlib.sha256(json.dumps(val_ids).encode()).hexdigest(),
    }
    atomic_write_json(out / HOLDOUT_FILE, record, indent=2)
    return record


def read_holdout(out: Union[str, Path]) -> dict[str, Any]:
    """``out/holdout.json`` of a split written by ``split_dataset``."""
    return json.loads((Path(out) / HOLDOUT_FILE).read_text())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="MDS dataset to split (data/extract.py output)")
    p.add_argument("out", help="output directory: OUT/train, OUT/val, OUT/holdout.json")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--val-fraction", type=float, help="fraction of the samples held out (hash-chosen)")
    group.add_argument("--val-ids", help="comma-separated sample ids held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the hash choice (--val-fraction)")
    args = p.parse_args(argv)
    ids = [int(x) for x in args.val_ids.split(",") if x.strip()] if args.val_ids else None
    try:
        record = split_dataset(args.src, args.out, fraction=args.val_fraction, ids=ids, seed=args.seed)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"holdout: {err}", file=sys.stderr)
        return 2
    print(
        f"held out {record['counts']['val']} of {sum(record['counts'].values())} samples: {args.out}/val; "
        f"training data: {args.out}/train"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
