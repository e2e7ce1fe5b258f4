"""The fast MDS reader gives the values the straightforward reader computes (bit for bit, every dtype, flips,
normalisation, with and without loader workers), its open-file cache behaves like opening the file per sample, and
tools/bench_data.py measures both schemas on real shards."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.streaming import (
    ImageDataset,
    build_streaming_loader,
    flip_decision,
    latent_columns,
    load_latent_stats,
    open_writer,
    save_latent_stats,
)

ID0 = 500


pytestmark = pytest.mark.usefixtures("clean_streaming_shm")  # tests/conftest.py


def _cfg(path, **kw):
    base = dict(
        path=str(path),
        remote=None,
        shuffle=True,
        predownload=None,
        num_workers=0,
        latent_norm=True,
        latent_multiplier=0.75,
        random_flip=True,
        use_features=False,
        image_size=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def _reference_latent(src: np.ndarray, mean, std, multiplier) -> torch.Tensor:
    """The reader's documented values, computed the plain way: float32, (z - mean) / std, then * multiplier."""
    z = torch.from_numpy(np.array(src, dtype=np.float32))
    if mean is not None:
        z = (z - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1)
    return z * multiplier


@pytest.mark.parametrize("dtype,workers,norm", [("float16", 0, True), ("float32", 0, False), ("float16", 1, True)])
def test_latent_batches_are_the_reference_values(tmp_path, dtype, workers, norm):
    rng = np.random.default_rng(0)
    n, shape = 40, (4, 3, 5)
    samples = {}
    with open_writer(
        tmp_path / "ds",
        latent_columns(dtype, with_features=True, latent_shape=shape, features_shape=(6, 2, 2)),
        size_limit=2000,
    ) as writer:
        for i in range(n):
            s = {
                "latent": (rng.standard_normal(shape) * 3 + 1).astype(dtype),
                "latent_flip": rng.standard_normal(shape).astype(dtype),
                "label": int(rng.integers(0, 1000)),
                "sample_id": ID0 + 3 * i,
                "features": rng.standard_normal((6, 2, 2)).astype(np.float16),
            }
            writer.write(s)
            samples[s["sample_id"]] = s
    save_latent_stats(tmp_path / "ds", torch.tensor([0.1, -0.2, 0.3, 1.7]), torch.tensor([0.9, 1.3, 0.7, 2.1]))
    mean, std = load_latent_stats(tmp_path / "ds")
    loader, ds = build_streaming_loader(
        _cfg(tmp_path / "ds", num_workers=workers, latent_norm=norm, use_features=True),
        batch_size=4,
        seed=3,
        pin_memory=False,
    )
    seen = 0
    for batch in loader:
        assert batch["latent"].dtype == torch.float32 and batch["label"].dtype == torch.int64
        assert batch["sample_id"].dtype == torch.int64 and batch["flipped"].dtype == torch.bool
        assert batch["features"].dtype == torch.float16
        for j, sid in enumerate(batch["sample_id"].tolist()):
            src = samples[sid]
            flipped = flip_decision(3, 0, sid)
            assert bool(batch["flipped"][j]) == flipped and int(batch["label"][j]) == src["label"]
            want = _reference_latent(src["latent_flip" if flipped else "latent"], mean if norm else None, std, 0.75)
            assert torch.equal(batch["latent"][j], want)
            assert torch.equal(batch["features"][j], torch.from_numpy(src["features"]))
            seen += 1
    assert seen == n // 4 * 4
    # random access (ds[i]) gives the same items as the loader
    item = ds[7]
    src = samples[int(item["sample_id"])]
    key = "latent_flip" if bool(item["flipped"]) else "latent"
    assert torch.equal(item["latent"], _reference_latent(src[key], mean if norm else None, std, 0.75))
    assert item["label"].shape == () and item["sample_id"].dtype == torch.int64
    del loader, ds


@pytest.mark.parametrize("flip,workers", [(False, 0), (True, 1)])
def test_image_batches_are_the_reference_values(tmp_path, flip, workers):
    rng = np.random.default_rng(1)
    columns = latent_columns(with_latents=False, with_features=not flip, features_shape=(8, 2, 2), image_size=6)
    samples = {}
    with open_writer(tmp_path / "ds", columns, size_limit=1500) as writer:
        for i in range(24):
            s = {"image": rng.integers(0, 256, (3, 6, 6), dtype=np.uint8), "label": i % 7, "sample_id": ID0 + i}
            if not flip:
                s["features"] = rng.standard_normal((8, 2, 2)).astype(np.float16)
            writer.write(s)
            samples[s["sample_id"]] = s
    loader, _ = build_streaming_loader(
        _cfg(tmp_path / "ds", num_workers=workers, random_flip=flip, use_features=not flip, image_size=6),
        batch_size=4,
        seed=5,
        pin_memory=False,
        dataset_cls=ImageDataset,
        use_features=not flip,
    )
    flips = []
    for batch in loader:
        for j, sid in enumerate(batch["sample_id"].tolist()):
            src = samples[sid]
            want = torch.from_numpy(src["image"]).to(torch.float32).div(255).sub(0.5).div(0.5)
            flipped = flip and flip_decision(5, 0, sid)
            flips.append(flipped)
            if flipped:
                want = torch.flip(want, dims=[-1])
            assert torch.equal(batch["image"][j], want)
            if not flip:
                assert torch.equal(batch["features"][j], torch.from_numpy(src["features"]))
    assert len(flips) == 24 and (any(flips) if flip else not any(flips))


def test_open_shard_files_follow_deletion_and_replacement(tmp_path):
    from data.streaming import _OpenShards

    def mds(path, payloads):
        offsets, pos = [], 4 + 4 * (len(payloads) + 1)
        for p in payloads:
            offsets.append(pos)
            pos += len(p)
        offsets.append(pos)
        path.write_bytes(
            np.uint32(len(payloads)).tobytes() + np.array(offsets, np.uint32).tobytes() + b"".join(payloads)
        )

    files = _OpenShards()
    shard = tmp_path / "shard.00000.mds"
    mds(shard, [b"abc", b"defg"])
    assert bytes(files.read_sample(str(shard), 1, shard.name)) == b"defg"
    with pytest.raises(IndexError):
        files.read_sample(str(shard), 2, shard.name)
    shard.unlink()  # evicted: like opening it anew, the shard is missing
    with pytest.raises(FileNotFoundError):
        files.read_sample(str(shard), 0, shard.name)
    mds(tmp_path / "new", [b"xyz"])
    os.replace(tmp_path / "new", shard)  # fetched again: the new file is read
    assert bytes(files.read_sample(str(shard), 0, shard.name)) == b"xyz"


def test_bench_data_measures_both_schemas(capsys):
    from tools import bench_data

    rc = bench_data.main(
        [
            "--latent-shape",
            "4",
            "4",
            "4",
            "--image-size",
            "8",
            "--features-shape",
            "8",
            "2",
            "2",
            "--latent-samples",
            "64",
            "--image-samples",
            "16",
            "--latent-batch",
            "8",
            "--image-batch",
            "4",
            "--workers",
            "0",
            "1",
            "--shard-mib",
            "0.05",
            "--target",
            "600",
            "--gpus",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if " | " in ln]
    header = [h.strip() for h in lines[0].split("|")]
    assert header[:5] == ["schema", "path", "workers", "batch", "samples/s"] and "workers/GPU" in header
    rows = [[c.strip() for c in ln.split("|")] for ln in lines[1:]]
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (s, p, w) for s in ("latent", "image") for p in ("local", "remote") for w in ("0", "1")
    }
    assert all(float(r[4]) > 0 for r in rows)
    assert "worker(s) per GPU for 600 img/s" in out
