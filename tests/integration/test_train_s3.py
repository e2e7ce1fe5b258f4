"""DiT training streams its latents from an S3 bucket (a real HTTP endpoint: moto's server on localhost,
tests/s3_utils.py) through a bounded local cache (``data.remote``, ``data.cache_limit``), is stopped mid-epoch (4 steps of 16 samples per epoch, stopped after step 2) and
resumed on a "new node" (an empty cache): the losses and the final model/EMA/optimizer equal those of an
uninterrupted run from a local copy of the data. One gloo rank of the shared test ranks (tests/dist_utils.py).
The extraction side (upload, kill, resume): tests/integration/test_extract_distributed.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dist_utils import run_distributed
from test_train_resume import assert_same_state, final_state, losses, write_toy_latents

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/tiny_dit.yaml")

pytestmark = pytest.mark.timeout(300)


def _train_jobs(dist, jobs):
    """Worker: train with each list of overrides in turn (resuming when the run has a checkpoint)."""
    from core.trainer import Trainer
    from launchers.experiment import load_config, validate
    from models.tasks import build_task

    out = []
    for overrides in jobs:
        cfg = validate(load_config(CONFIG, overrides), world_size=dist.world_size)
        trainer = Trainer(cfg, dist, build_task(cfg, dist))
        try:
            out.append(trainer.step)
            trainer.train()
        finally:
            trainer.close()
    return out


def test_dit_streams_from_s3_with_a_bounded_cache_and_resumes_mid_epoch(s3_server, tmp_path):
    data = write_toy_latents(tmp_path / "mds")
    bucket = s3_server.new_bucket("train")
    s3_server.upload_dir(data, bucket, "toy")
    index = json.loads((data / "index.json").read_text())
    shard = max(s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in index["shards"])
    total = sum(s["raw_data"]["bytes"] for s in index["shards"])
    limit = 6 * shard  # a few shards: the epoch cannot be cached whole
    assert limit < total / 2

    reference, run_dir, cache, cache2 = (tmp_path / name for name in ("reference", "run", "cache", "cache2"))
    common = ["wandb.mode=disabled", "checkpoint.every_steps=100"]  # a checkpoint at the last step only
    remote = [f"data.remote=s3://{bucket}/toy", f"data.cache_limit={limit}"]
    jobs = [
        [*common, f"data.path={data}", f"run_dir={reference}", "train.max_steps=3"],  # uninterrupted, local
        [*common, *remote, f"data.path={cache}", f"run_dir={run_dir}", "train.max_steps=2"],  # stops mid-epoch 0
        # requeued on another node: a new, empty cache
        [*common, *remote, f"data.path={cache2}", f"run_dir={run_dir}", "train.max_steps=3"],
    ]
    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_") or k == "S3_ENDPOINT_URL"}
    (starts,) = run_distributed(_train_jobs, world_size=1, args=(jobs,), env=env)
    assert starts == [0, 0, 2]
    for directory in (cache, cache2):
        cached = sum(p.stat().st_size for p in directory.rglob("*.mds*"))
        assert 0 < cached <= limit
    assert losses(run_dir) == losses(reference)
    assert_same_state(final_state(run_dir, 3), final_state(reference, 3))
