"""Extraction at scale, in process: the shipped ImageNet-256 extraction configs, job-array task selection (``--array``,
``parse_array``), chunks independent of the number of ranks and array tasks, and the checks of the new keys
(remote, keep_local, array_index/array_count; data.cache_limit). The kill / S3 / other-world-size runs:
tests/integration/test_extract_distributed.py and test_train_s3.py.
"""

from __future__ import annotations

import json

import pytest

from core.config import Checks, ConfigError
from data.config import DataConfig, check_data_config
from data.extract import extract, load_extract_config, main, parse_array, read_manifest
from launchers.experiment import load_config
from models.vavae import f16d32_config

from test_extract import COMMON, CONFIG, REPO, N


def test_shipped_imagenet_configs_load_and_fit_the_dit_recipe():
    latents = load_extract_config(REPO / "configs" / "extract_imagenet256_vavae.yaml")
    assert latents.source.kind == "folder" and latents.source.image_size == 256
    assert latents.tokenizer.kind == "vavae" and latents.tokenizer.sample  # posterior samples, as official
    assert latents.tokenizer.kwargs["checkpoint"].endswith("vavae-imagenet256-f16d32-dinov2.pt")
    assert not latents.features.enabled and not latents.images and latents.remote is None
    # The DiT recipes read what this writes: the same directory, 32 x (256 / 16)^2 latents.
    arch = f16d32_config()
    factor = 2 ** (len(arch["ch_mult"]) - 1)
    for recipe in ("lightningdit_xl.yaml", "lightningdit_xl_64ep.yaml"):
        cfg = load_config(REPO / "configs" / recipe)
        assert cfg.data.path == latents.out_dir, recipe
        assert (cfg.model.in_channels, cfg.model.input_size) == (arch["embed_dim"], 256 // factor), recipe
        assert cfg.data.random_flip  # latent_flip is extracted

    features = load_extract_config(REPO / "configs" / "extract_vavae_features.yaml")
    assert features.source.kind == "folder" and features.source.image_size == 256
    assert features.tokenizer.kind == "none" and features.images and features.features.enabled
    assert features.features.grid == 256 // factor and features.features.weights and not features.features.random_init
    stage1 = load_config(REPO / "configs" / "vavae_f16d32_stage1.yaml")
    assert features.features.model == stage1.vavae.vf.dinov2.model
    assert features.features.imagenet_norm == stage1.vavae.vf.dinov2.imagenet_norm


def test_parse_array():
    assert parse_array("3/8") == (3, 8)
    env = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parse_array("slurm", env) == (2, 4)
    with pytest.raises(ConfigError, match=r"task 8 is not in 0..7"):
        parse_array("8/8")
    with pytest.raises(ConfigError, match=r"expected I/N"):
        parse_array("first")
    with pytest.raises(ConfigError, match=r"not a Slurm job array task"):
        parse_array("slurm", {})


def test_config_checks_of_the_new_keys():
    with pytest.raises(ConfigError) as err:
        load_extract_config(CONFIG, ["remote=/data/x", "keep_local=false", "array_count=2", "array_index=2"])
    text = str(err.value)
    assert "remote: must be an object-store URL such as s3://bucket/prefix, got '/data/x'" in text
    assert "array_index: must be null or in 0..1 (array_count), got 2" in text
    with pytest.raises(ConfigError, match=r"keep_local: false needs a remote"):
        load_extract_config(CONFIG, ["keep_local=false"])

    checks = Checks()
    check_data_config(DataConfig(path="/cache", remote="s3://b/p", cache_limit="lots"), checks)
    assert checks.pairs() == [
        ("data.cache_limit", "must be a size in bytes or with a unit such as 50gb, got 'lots'"),
    ]
    checks = Checks()
    check_data_config(DataConfig(path="/cache", cache_limit=10**9), checks)
    assert checks.pairs() == [
        (
            "data.cache_limit",
            "needs data.remote: shards evicted from the cache at data.path are fetched again from the remote",
        ),
    ]
    checks = Checks()
    check_data_config(DataConfig(path="/cache", remote="s3://b/p", cache_limit="50gb", download_timeout=0), checks)
    assert checks.pairs() == [("data.download_timeout", "must be > 0, got 0")]


def test_array_tasks_write_their_chunks_and_the_last_one_the_index(tmp_path, capsys):
    """Three tasks of a job array on one process, in the order 2, 0, 1: each writes exactly its chunks (c % 3), and
    only the last one merges; the result equals a single job's."""
    single = tmp_path / "single"
    extract(load_extract_config(CONFIG, [f"out_dir={single}", *COMMON]))
    out = tmp_path / "array"
    chunks = lambda: sorted(int(p.name[5:]) for p in out.glob("chunk*"))  # noqa: E731
    assert main([str(CONFIG), f"out_dir={out}", *COMMON, "--array", "2/3"]) == 0
    assert chunks() == [2, 5, 8] and not (out / "index.json").exists()
    assert "array task 2 of 3 done (30 written by this run" in capsys.readouterr().out
    r0 = extract(load_extract_config(CONFIG, [f"out_dir={out}", *COMMON, "array_index=0", "array_count=3"]))
    assert not r0.finalized and r0.remaining_chunks == 3 and chunks() == [0, 2, 3, 5, 6, 8, 9]
    r1 = extract(load_extract_config(CONFIG, [f"out_dir={out}", *COMMON]), array=(1, 3))
    assert r1.finalized and r1.num_samples == N and r1.written_this_run == 30 and chunks() == list(range(10))
    a, b = read_manifest(single), read_manifest(out)
    for key in ("num_samples", "sample_ids_sha256", "content_sha256", "stats"):
        assert a[key] == b[key], key
    assert json.loads((single / "index.json").read_text()) == json.loads((out / "index.json").read_text())
    # Re-running any task when all chunks are complete only rewrites the merged files.
    again = extract(load_extract_config(CONFIG, [f"out_dir={out}", *COMMON]), array=(2, 3))
    assert again.finalized and again.written_this_run == 0
