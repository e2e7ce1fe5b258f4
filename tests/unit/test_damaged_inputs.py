"""Damaged training data is caught where it enters (data/streaming.py), naming the shard file and the sample: a
decompressed shard that no longer matches the xxh64 hash of its index.json, a label outside [0, num_classes), a
non-finite latent."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
from streaming.base.util import clean_stale_shared_memory

from data.streaming import CorruptShardError, LatentDataset, write_latent_dataset

from test_streaming import make_samples

pytestmark = pytest.mark.usefixtures("clean_streaming_shm")  # tests/conftest.py


def _read_all(path: Path, **kw) -> int:
    ds = LatentDataset(local=str(path), latent_norm=False, random_flip=False, batch_size=4, **kw)
    try:
        return sum(int(ds[i]["label"]) >= 0 for i in range(ds.num_samples))
    finally:
        del ds
        gc.collect()
        clean_stale_shared_memory()


def test_overwritten_middle_of_a_decompressed_shard_names_the_shard(tmp_path):
    """4 KiB overwritten in the middle of a decompressed .mds (decompressed by a first run, so streaming does not
    decompress it again and checks no hash): the first read from that shard fails naming the file and the sample."""
    path = tmp_path / "ds"
    write_latent_dataset(path, make_samples(40, size=16), size_limit=1 << 15)  # ~4 KiB samples, 5 shards
    assert _read_all(path) == 40  # decompresses every shard (zip hash checked), raw hashes checked and remembered
    shards = sorted(path.glob("shard.*.mds"))
    assert len(shards) >= 3, shards
    victim = shards[1]
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle - 2048 : middle + 2048] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError) as info:
        _read_all(path)
    message = str(info.value)
    assert f"shard file {victim} (shard 1 of {path}) fails its xxh64 checksum recorded in index.json" in message
    assert "found reading sample " in message


def test_label_out_of_range_and_nonfinite_latent_name_shard_and_sample(tmp_path):
    samples = make_samples(12)
    samples[5]["label"] = 12
    write_latent_dataset(tmp_path / "labels", samples, size_limit=1500, compute_stats=False)
    with pytest.raises(
        CorruptShardError, match=r"sample_id 1005: label 12 is outside \[0, 10\) \(model.num_classes\)"
    ) as info:
        _read_all(tmp_path / "labels", num_classes=10)
    assert "shard file " + str(tmp_path / "labels" / "shard.") in str(info.value)
    assert _read_all(tmp_path / "labels", num_classes=13) == 12

    samples = make_samples(12)
    samples[7]["latent"][1, 2, 3] = np.nan
    write_latent_dataset(tmp_path / "nan", samples, size_limit=1500, compute_stats=False)
    with pytest.raises(
        CorruptShardError,
        match=r"decoding sample 7 of .*: shard file .*shard\.\d+\.mds.*sample_id 1007: non-finite values in 'latent'",
    ):
        _read_all(tmp_path / "nan")
