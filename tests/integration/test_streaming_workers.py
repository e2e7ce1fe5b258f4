"""Latent MDS datasets read through DataLoader WORKER PROCESSES (and, for comparison, without): mid-epoch resume and
corrupt shards. The in-process checks: tests/unit/test_streaming.py."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest

from data.streaming import (
    CorruptShardError,
    LatentDataset,
    build_streaming_loader,
    latent_columns,
    open_writer,
    verify_dataset,
)

from test_streaming import ID0, C, H, _shard_files, collect, data_cfg, make_samples, write

pytestmark = pytest.mark.usefixtures("clean_streaming_shm")  # tests/conftest.py


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_gives_the_remaining_samples_and_flips(tmp_path, workers):
    n, bs, seed, stop = 96, 4, 3, 7
    data, _ = write(tmp_path / "data", n)

    # Reference: two uninterrupted epochs, no workers. Each loader gets its own local cache dir
    # (remote = the written dataset), as several datasets may not share one.
    ref_loader, _ = build_streaming_loader(
        data_cfg(tmp_path / "cache_ref", remote=str(data), num_workers=0), batch_size=bs, seed=seed
    )
    ref = [collect(ref_loader) for _ in range(2)]
    del ref_loader
    for ids, _ in ref:
        flat = [i for b in ids for i in b]
        assert sorted(flat) == list(range(ID0, ID0 + n))
    assert ref[0][0] != ref[1][0]  # reshuffled per epoch
    flip_of = [{i: f for b, fb in zip(*ref[e]) for i, f in zip(b, fb)} for e in range(2)]
    assert any(flip_of[0][i] != flip_of[1][i] for i in flip_of[0])

    # Interrupted run: position the loader at the start of epoch 1 (as the trainer does), stop
    # after `stop` batches and take the state.
    cfg = data_cfg(tmp_path / "cache_a", remote=str(data), num_workers=workers)
    loader, _ = build_streaming_loader(cfg, batch_size=bs, seed=seed)
    state = dict(loader.state_dict())
    state.update(epoch=1, sample_in_epoch=0)
    loader.load_state_dict(state)
    head = collect(loader, max_batches=stop)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["sample_in_epoch"] == stop * bs
    del loader
    gc.collect()
    assert head[0] == ref[1][0][:stop] and head[1] == ref[1][1][:stop]

    # Resumed run in a fresh loader: exactly the remaining batches, in order, with the same flips.
    cfg_b = data_cfg(tmp_path / "cache_b", remote=str(data), num_workers=workers)
    resumed, _ = build_streaming_loader(cfg_b, batch_size=bs, seed=seed)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
    tail = collect(resumed)
    assert tail[0] == ref[1][0][stop:]
    assert tail[1] == ref[1][1][stop:]


@pytest.mark.parametrize("hashes,workers", [(("xxh64",), 0), ((), 0), (("xxh64",), 1)])
def test_corrupt_shard_bytes_name_the_file(tmp_path, hashes, workers):
    path = tmp_path / "ds"
    samples = make_samples(40)
    with open_writer(path, latent_columns("float16", latent_shape=(C, H, H)), size_limit=1500, hashes=hashes) as writer:
        for s in samples:
            writer.write({k: (v.astype(np.float16) if isinstance(v, np.ndarray) else v) for k, v in s.items()})
    bad = _shard_files(path)[2]
    data = bytearray(bad.read_bytes())
    if hashes:
        mid = len(data) // 2
        data[mid : mid + 8] = bytes(255 - b for b in data[mid : mid + 8])
    else:
        data[0:4] = b"\x00\x00\x00\x00"  # break the zstd frame
    bad.write_bytes(bytes(data))

    ds = LatentDataset(local=str(path), latent_norm=False, batch_size=4)
    from streaming import StreamingDataLoader

    loader = StreamingDataLoader(ds, batch_size=4, num_workers=workers)
    with pytest.raises(CorruptShardError, match=bad.name):
        collect(loader)
    if hashes:
        with pytest.raises(CorruptShardError, match=rf"{bad.name} fails its xxh64 checksum"):
            verify_dataset(path)
