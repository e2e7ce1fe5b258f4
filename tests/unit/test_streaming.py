"""Latent MDS datasets: real shards written to temporary directories, read back with streaming (in this process;
through DataLoader worker processes: tests/integration/test_streaming_workers.py)."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.streaming import (
    CorruptShardError,
    ImageDataset,
    LatentDataset,
    RunningMoments,
    build_streaming_loader,
    denormalize_latents,
    ensure_streaming_env,
    flip_decision,
    latent_columns,
    load_latent_stats,
    merge_shard_indexes,
    normalize_latents,
    open_writer,
    read_columns,
    save_latent_stats,
    steps_per_epoch,
    verify_dataset,
    write_latent_dataset,
)

C, H = 4, 4
ID0 = 1000  # stored sample_id = ID0 + position, so it differs from streaming's index


pytestmark = pytest.mark.usefixtures("clean_streaming_shm")  # tests/conftest.py


def make_samples(n: int, seed: int = 0, channels: int = C, size: int = H) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        z = (
            rng.standard_normal((channels, size, size)) * (1 + np.arange(channels))[:, None, None]
            + 3 * np.arange(channels)[:, None, None]
        )
        out.append(
            {
                "latent": z.astype(np.float32),
                "latent_flip": (z[..., ::-1] + 0.5).astype(np.float32),  # distinguishable from latent
                "label": i % 10,
                "sample_id": ID0 + i,
            }
        )
    return out


def write(path: Path, n: int, **kw) -> tuple[Path, list[dict]]:
    samples = make_samples(n)
    kw.setdefault("size_limit", 1500)  # several shards
    write_latent_dataset(path, samples, **kw)
    return path, samples


def data_cfg(path: Path, **kw) -> DataConfig:
    cfg = DataConfig(path=str(path))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


# -------------------------------------------------------------------------------- schema / round trip
def test_latent_columns():
    cols = latent_columns("float16", with_features=True, latent_shape=(32, 16, 16), features_shape=(768, 16, 16))
    assert cols == {
        "latent": "ndarray:float16:32,16,16",
        "latent_flip": "ndarray:float16:32,16,16",
        "label": "int64",
        "sample_id": "int64",
        "features": "ndarray:float16:768,16,16",
    }
    assert latent_columns("float32")["latent"] == "ndarray:float32"
    with pytest.raises(ValueError):
        latent_columns("bfloat16")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_values_labels_and_normalisation(tmp_path, dtype):
    path, samples = write(tmp_path / "ds", 40, latent_dtype=dtype)
    index = json.loads((path / "index.json").read_text())
    assert len(index["shards"]) > 1
    shard = index["shards"][0]
    assert shard["compression"] == "zstd" and shard["zip_data"]["hashes"].get("xxh64")
    encodings = dict(zip(shard["column_names"], shard["column_encodings"]))
    assert encodings["latent"] == f"ndarray:{dtype}:{C},{H},{H}"

    stored = np.stack([s["latent"].astype(dtype).astype(np.float64) for s in samples])
    mean, std = load_latent_stats(path)
    assert mean.shape == std.shape == (1, C, 1, 1)
    np.testing.assert_allclose(mean.flatten().numpy(), stored.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std.flatten().numpy(), stored.std(axis=(0, 2, 3), ddof=1), rtol=1e-6)

    raw = LatentDataset(local=str(path), latent_norm=False, random_flip=False, batch_size=4)
    seen = set()
    for i in range(raw.num_samples):
        item = raw[i]
        sid = int(item["sample_id"])
        seen.add(sid)
        src = samples[sid - ID0]
        assert item["latent"].dtype == torch.float32 and item["label"].dtype == torch.int64
        assert int(item["label"]) == src["label"] and not bool(item["flipped"])
        np.testing.assert_array_equal(item["latent"].numpy(), src["latent"].astype(dtype).astype(np.float32))
    assert seen == {ID0 + i for i in range(40)}
    del raw

    norm = LatentDataset(local=str(path), latent_norm=True, latent_multiplier=0.5, random_flip=False, batch_size=4)
    for i in (0, 17, 39):
        item = norm[i]
        z = torch.from_numpy(samples[int(item["sample_id"]) - ID0]["latent"].astype(dtype).astype(np.float32))
        expected = (z - mean[0]) / std[0] * 0.5
        torch.testing.assert_close(item["latent"], expected)
        torch.testing.assert_close(denormalize_latents(item["latent"], mean[0], std[0], 0.5), z, rtol=1e-5, atol=1e-5)
    # Whole dataset normalised: ~zero mean, std = multiplier per channel.
    all_z = torch.stack([norm[i]["latent"] for i in range(norm.num_samples)])
    torch.testing.assert_close(all_z.mean(dim=(0, 2, 3)), torch.zeros(C), atol=1e-4, rtol=0)
    torch.testing.assert_close(all_z.std(dim=(0, 2, 3)), torch.full((C,), 0.5), atol=1e-4, rtol=0)


def test_features_column(tmp_path):
    samples = make_samples(6)
    rng = np.random.default_rng(1)
    for s in samples:
        s["features"] = rng.standard_normal((8, 2, 2)).astype(np.float32)
    write_latent_dataset(tmp_path / "ds", samples, with_features=True)
    ds = LatentDataset(local=str(tmp_path / "ds"), use_features=True, batch_size=2)
    item = ds[3]
    ref = samples[int(item["sample_id"]) - ID0]["features"].astype(np.float16)
    assert item["features"].dtype == torch.float16
    np.testing.assert_array_equal(item["features"].numpy(), ref)


def test_image_dataset_images_features_flips_and_schema_errors(tmp_path):
    """The VA-VAE reader: uint8 images back to the exact [-1, 1] floats, features as stored, flips by the shared
    hash, and schema/shape errors naming the config key and the column."""
    from data.images import uint8_to_normalized

    rng = np.random.default_rng(0)
    columns = latent_columns(with_latents=False, with_features=True, features_shape=(8, 2, 2), image_size=H)
    assert columns == {
        "label": "int64",
        "sample_id": "int64",
        "features": "ndarray:float16:8,2,2",
        "image": "ndarray:uint8:3,4,4",
    }
    samples = [
        {
            "image": rng.integers(0, 256, (3, H, H), dtype=np.uint8),
            "label": i % 10,
            "sample_id": ID0 + i,
            "features": rng.standard_normal((8, 2, 2)).astype(np.float16),
        }
        for i in range(12)
    ]
    with open_writer(tmp_path / "ds", columns, size_limit=300) as writer:
        for sample in samples:
            writer.write(sample)
    assert read_columns(tmp_path / "ds") == columns
    ds = ImageDataset(local=str(tmp_path / "ds"), use_features=True, image_size=H, batch_size=2)
    for i in range(12):
        item = ds[i]
        src = samples[int(item["sample_id"]) - ID0]
        assert item["image"].dtype == torch.float32 and int(item["label"]) == src["label"]
        assert torch.equal(item["image"], uint8_to_normalized(torch.from_numpy(src["image"])))
        assert -1 <= item["image"].min() and item["image"].max() <= 1
        np.testing.assert_array_equal(item["features"].numpy(), src["features"])
    del ds
    flipping = ImageDataset(local=str(tmp_path / "ds"), random_flip=True, flip_seed=5, batch_size=2)
    for i in range(12):
        item = flipping[i]
        image = uint8_to_normalized(torch.from_numpy(samples[int(item["sample_id"]) - ID0]["image"]))
        flip = flip_decision(5, 0, int(item["sample_id"]))
        assert "features" not in item and torch.equal(item["image"], image.flip(-1) if flip else image)
    del flipping

    with pytest.raises(ValueError, match=r"data\.random_flip: must be false .*non-flipped image"):
        ImageDataset(local=str(tmp_path / "ds"), use_features=True, random_flip=True, batch_size=2)
    with pytest.raises(ValueError, match=r"data\.image_size: .*\(3, 4, 4\).*data\.image_size is 8"):
        ImageDataset(local=str(tmp_path / "ds"), image_size=8, batch_size=2)
    latents, _ = write(tmp_path / "latents", 4)  # a DiT dataset: no images
    with pytest.raises(ValueError, match=r"data\.path: .*lacks column\(s\) \['image', 'features'\].*images: true"):
        ImageDataset(local=str(latents), use_features=True, batch_size=2)
    gc.collect()


# ----------------------------------------------------------------------------------------- flips
def test_flip_decision_is_a_fair_deterministic_function():
    ids = range(20000)
    e0 = np.array([flip_decision(7, 0, i) for i in ids])
    assert abs(e0.mean() - 0.5) < 0.015
    assert (e0 == np.array([flip_decision(7, 0, i) for i in ids])).all()
    e1 = np.array([flip_decision(7, 1, i) for i in ids])
    assert abs((e0 == e1).mean() - 0.5) < 0.02  # independent across epochs
    s8 = np.array([flip_decision(8, 0, i) for i in ids])
    assert abs((e0 == s8).mean() - 0.5) < 0.02  # and across seeds


def test_dataset_flip_picks_latent_flip(tmp_path):
    path, samples = write(tmp_path / "ds", 64)
    ds = LatentDataset(local=str(path), latent_norm=False, random_flip=True, flip_seed=5, batch_size=4)
    flips = []
    for i in range(ds.num_samples):
        item = ds[i]
        sid = int(item["sample_id"])
        flipped = bool(item["flipped"])
        assert flipped == flip_decision(5, 0, sid)
        key = "latent_flip" if flipped else "latent"
        np.testing.assert_array_equal(
            item["latent"].numpy(), samples[sid - ID0][key].astype(np.float16).astype(np.float32)
        )
        flips.append(flipped)
    assert 0.25 < np.mean(flips) < 0.75


# ------------------------------------------------------------------------------------ statistics
def test_running_moments_match_numpy_and_merge():
    rng = np.random.default_rng(0)
    loc = np.array([100.0, -3.0, 0.5])[None, :, None, None]
    scale = np.array([0.01, 2.0, 1e-3])[None, :, None, None]
    data = rng.standard_normal((257, 3, 5, 6)) * scale + loc
    ref_mean = data.mean(axis=(0, 2, 3))
    ref_std = data.std(axis=(0, 2, 3), ddof=1)

    whole = RunningMoments()
    for lo, hi in [(0, 1), (1, 50), (50, 51), (51, 200), (200, 257)]:
        whole.update(torch.from_numpy(data[lo:hi]) if lo % 2 else data[lo:hi])
    np.testing.assert_allclose(whole.mean.numpy(), ref_mean, rtol=1e-12)
    np.testing.assert_allclose(whole.std().numpy(), ref_std, rtol=1e-9)
    np.testing.assert_allclose(whole.std(unbiased=False).numpy(), data.std(axis=(0, 2, 3)), rtol=1e-9)

    a, b = RunningMoments().update(data[:100]), RunningMoments().update(data[100:])
    merged = RunningMoments().merge(a).merge(b)
    assert merged.count == 257 * 30
    np.testing.assert_allclose(merged.mean.numpy(), ref_mean, rtol=1e-12)
    np.testing.assert_allclose(merged.std().numpy(), ref_std, rtol=1e-9)

    restored = RunningMoments()
    restored.load_state_dict(merged.state_dict())
    stats = restored.to_tensor_stats()
    assert stats["mean"].shape == stats["std"].shape == (1, 3, 1, 1) and stats["mean"].dtype == torch.float32
    np.testing.assert_allclose(stats["std"].flatten().numpy(), ref_std, rtol=1e-6)


def test_stats_file_round_trip_and_errors(tmp_path):
    mean, std = torch.randn(C), torch.rand(C) + 0.5
    file = save_latent_stats(tmp_path / "ds", mean, std)
    assert file == tmp_path / "ds" / "latents_stats.pt"
    obj = torch.load(file, weights_only=True)  # official layout
    assert set(obj) == {"mean", "std"} and obj["mean"].shape == (1, C, 1, 1)
    m, s = load_latent_stats(tmp_path / "ds")
    torch.testing.assert_close(m.flatten(), mean)
    m2, _ = load_latent_stats(file)
    torch.testing.assert_close(m2, m)
    z = torch.randn(2, C, 3, 3)
    torch.testing.assert_close(denormalize_latents(normalize_latents(z, m, s, 0.7), m, s, 0.7), z)
    with pytest.raises(FileNotFoundError, match="latents_stats.pt"):
        load_latent_stats(tmp_path / "nowhere")
    torch.save({"mean": torch.zeros(1, C, 1, 1), "std": torch.zeros(1, C, 1, 1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        load_latent_stats(tmp_path / "bad.pt")


def test_missing_stats_with_latent_norm_names_config_and_file(tmp_path):
    path, _ = write(tmp_path / "ds", 8, compute_stats=False)
    with pytest.raises(FileNotFoundError) as info:
        LatentDataset(local=str(path), latent_norm=True, batch_size=2)
    assert "data.latent_norm" in str(info.value) and str(path / "latents_stats.pt") in str(info.value)
    LatentDataset(local=str(path), latent_norm=False, batch_size=2)  # fine without normalisation


def test_shape_disagreements_are_reported(tmp_path):
    path, _ = write(tmp_path / "ds", 8)
    save_latent_stats(path, torch.zeros(C + 1), torch.ones(C + 1))
    with pytest.raises(ValueError, match=r"have 4 channels.*latents_stats.pt has 5"):
        LatentDataset(local=str(path), batch_size=2)
    with pytest.raises(ValueError, match=r"model expects \(8, 4, 4\)"):
        LatentDataset(local=str(path), latent_norm=False, expected_shape=(8, 4, 4), batch_size=2)
    # Shapes not fixed in the encoding: checked when a sample is read.
    dyn, _ = write(tmp_path / "dyn", 8, fixed_shape=False)
    save_latent_stats(dyn, torch.zeros(3), torch.ones(3))
    ds = LatentDataset(local=str(dyn), batch_size=2)
    with pytest.raises(ValueError, match="3"):
        ds[0]


# ---------------------------------------------------------------------------- loader and resume
def collect(loader, max_batches=None):
    ids, flips = [], []
    for k, batch in enumerate(loader):
        ids.append(batch["sample_id"].tolist())
        flips.append(batch["flipped"].tolist())
        if max_batches is not None and k + 1 == max_batches:
            break
    return ids, flips


def test_build_streaming_loader_and_steps_per_epoch(tmp_path):
    path, _ = write(tmp_path / "ds", 50)
    loader, ds = build_streaming_loader(data_cfg(path, num_workers=0), batch_size=4, seed=0)
    assert len(ds) == 50 and len(loader) == 12
    assert steps_per_epoch(ds, 8) == 6
    ids, _ = collect(loader)
    assert len(ids) == 12 and all(len(b) == 4 for b in ids)
    flat = [i for b in ids for i in b]
    assert len(set(flat)) == 48 and set(flat) <= {ID0 + i for i in range(50)}
    batch = next(iter(loader))
    assert batch["latent"].shape == (4, C, H, H) and batch["label"].dtype == torch.int64


# ---------------------------------------------------------------------------------- corruption
def _shard_files(path: Path) -> list[Path]:
    return sorted(path.glob("shard.*.mds.zstd"))


def test_truncated_or_missing_shard_and_bad_index(tmp_path):
    path, _ = write(tmp_path / "ds", 40)
    assert verify_dataset(path) == 40
    shards = _shard_files(path)
    shards[1].write_bytes(shards[1].read_bytes()[:-10])
    with pytest.raises(CorruptShardError, match=rf"{shards[1].name} has \d+ bytes.*truncated"):
        LatentDataset(local=str(path), batch_size=4)
    shards[1].unlink()
    with pytest.raises(CorruptShardError, match=rf"{shards[1].name} is missing"):
        LatentDataset(local=str(path), batch_size=4)

    (path / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(path / "index.json")):
        LatentDataset(local=str(path), batch_size=4)
    (path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(path / "index.json")):
        LatentDataset(local=str(path), batch_size=4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentDataset(local=str(tmp_path / "absent"), batch_size=4)


# ----------------------------------------------------------------------------- merge / env checks
def test_merge_shard_indexes_and_stats(tmp_path):
    out = tmp_path / "out"
    samples = make_samples(50)
    parts = [samples[:20], samples[20:]]
    moments = []
    for r, part in enumerate(parts):
        write_latent_dataset(out / f"rank_{r:02d}", part, size_limit=1500, compute_stats=False)
        moments.append(RunningMoments().update(np.stack([s["latent"].astype(np.float16) for s in part])))
    merge_shard_indexes(out, ["rank_00", "rank_01"])
    stats = RunningMoments().merge(moments[0]).merge(moments[1]).to_tensor_stats()
    save_latent_stats(out, stats["mean"], stats["std"])
    assert verify_dataset(out) == 50
    ds = LatentDataset(local=str(out), batch_size=5)
    assert ds.num_samples == 50
    assert {int(ds[i]["sample_id"]) for i in range(50)} == {ID0 + i for i in range(50)}
    with pytest.raises(ValueError):
        merge_shard_indexes(out, ["rank_00/sub"])


def test_streaming_env_is_filled_and_checked(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "0")  # records the original state, restored after the test
        monkeypatch.delenv(key)
    info = SimpleNamespace(rank=0, world_size=1, local_rank=0, local_world_size=1)
    ensure_streaming_env(info)
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["LOCAL_WORLD_SIZE"] == "1"
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=8"):
        ensure_streaming_env(info)
