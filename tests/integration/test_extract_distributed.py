"""The extraction job (data/extract.py) on 2 REAL ranks started by ``python -m torch.distributed.run``; the resume
test SIGKILLs the whole job (launcher and ranks, each rank being its own process group under torch elastic) after
some chunks are complete, and starts it again. The uninterrupted reference extraction runs ``extract()`` on the 2
shared ranks of tests/dist_utils.py (no launch). The single-process checks: tests/unit/test_extract.py.
The resume test uploads to S3 (moto's server on localhost) and finishes the job on 1 rank as a 2-task job array.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.extract import ExtractError, extract, load_extract_config, read_manifest
from data.streaming import build_streaming_loader, load_latent_stats
from data.synthetic import SyntheticImages

from dist_utils import run_distributed
from test_extract import CLASSES, COMMON, CONFIG, REPO, SIZE, N, read_raw

pytestmark = pytest.mark.usefixtures("clean_streaming_shm")  # tests/conftest.py


def reference_images() -> torch.Tensor:
    ds = SyntheticImages(N, image_size=SIZE, num_classes=CLASSES, seed=0)
    return torch.stack([ds[i][0] for i in range(N)])


def torchrun_cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "data" / "extract.py"),
        str(CONFIG),
        f"out_dir={out}",
        *COMMON,
        *extra,
    ]


def run_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _extract_on_ranks(dist, out: str) -> str:
    """data/extract.py's job on a shared rank: ``extract()`` with the script's config; returns what it logged and
    printed."""
    import contextlib
    import io
    import logging

    buf = io.StringIO()
    logger = logging.getLogger("data.extract")
    logger.addHandler(logging.StreamHandler(buf))  # the shared rank puts its logging back after the call
    logger.setLevel(logging.INFO)
    with contextlib.redirect_stdout(buf):
        extract(load_extract_config(CONFIG, [f"out_dir={out}", *COMMON]), dist)
    return buf.getvalue()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("extract") / "full"
    logs = run_distributed(_extract_on_ranks, world_size=2, args=(str(out),))
    return out, "".join(logs)


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank, as a scheduler ending the job would. torch elastic starts each rank
    in a session of its own, so this kills every process group of the job's process tree."""
    import psutil

    pids = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_two_ranks_every_image_once_flips_stats_and_reader(two_rank_run):
    out, log = two_rank_run
    assert f"extract: {N} of {N} images" in log
    # Chunks of consecutive images (independent of the number of ranks), merged into one index.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("chunk")) == [f"chunk{c:06d}" for c in range(10)]
    index = json.loads((out / "index.json").read_text())
    assert {s["zip_data"]["basename"].split("/")[0] for s in index["shards"]} == {f"chunk{c:06d}" for c in range(10)}
    assert all(s["compression"] == "zstd" for s in index["shards"])

    samples = read_raw(out)
    ids = [int(s["sample_id"]) for s in samples]
    assert sorted(ids) == list(range(N))  # every image exactly once
    images = reference_images()
    for s in samples:
        sid = int(s["sample_id"])
        latent, flip = torch.tensor(s["latent"]), torch.tensor(s["latent_flip"])
        assert torch.equal(latent, images[sid])  # identity tokenizer, float32 storage
        assert torch.equal(flip, torch.flip(latent, dims=[-1]))
        assert int(s["label"]) == sid % CLASSES
    # Chunk c holds the images 10c .. 10c + 9 (the last one 90 .. 95), whichever rank wrote it.
    meta = json.loads((out / "chunk000001" / "chunk.json").read_text())
    assert meta["sample_ids"] == list(range(10, 20)) and meta["items"] == [10, 20]
    meta = json.loads((out / "chunk000009" / "chunk.json").read_text())
    assert meta["sample_ids"] == list(range(90, 96))

    # Statistics: one numpy pass over all images (float64) == merged per-chunk moments.
    x = images.numpy().astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
    mean, std = x.mean(axis=1), x.std(axis=1, ddof=1)
    manifest = read_manifest(out)
    np.testing.assert_allclose(manifest["stats"]["mean"], mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(manifest["stats"]["std"], std, rtol=1e-12)
    file_mean, file_std = load_latent_stats(out)
    assert file_mean.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(file_mean.flatten().numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(file_std.flatten().numpy(), std, rtol=1e-6)
    assert manifest["num_samples"] == N and manifest["num_skipped"] == 0 and manifest["world_size"] == 2

    # The training reader takes the output as it is (normalised with the stored stats).
    loader, dataset = build_streaming_loader(
        DataConfig(path=str(out), num_workers=0, shuffle=False),
        batch_size=8,
        seed=0,
        drop_last=False,
        expected_shape=(3, SIZE, SIZE),
    )
    seen = []
    for batch in loader:
        for z, sid, flipped in zip(batch["latent"], batch["sample_id"].tolist(), batch["flipped"].tolist()):
            ref = torch.flip(images[sid], dims=[-1]) if flipped else images[sid]
            expected = (ref - file_mean[0]) / file_std[0]
            torch.testing.assert_close(z, expected)
            seen.append(sid)
    assert sorted(seen) == list(range(N))
    del loader, dataset


def read_remote(remote: str, cache: Path) -> dict[int, dict]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = StreamingDataset(remote=remote, local=str(cache), shuffle=False, batch_size=1)
    try:
        return {int(s["sample_id"]): s for s in (ds[i] for i in range(len(ds)))}
    finally:
        del ds
        gc.collect()


def _remote_chunks(s3_server, bucket: str) -> set[int]:
    return {int(k.split("/")[-2][5:]) for k in s3_server.keys(bucket) if k.endswith("/chunk.json")}


def test_sigkill_on_two_ranks_then_finish_on_one_rank_as_job_array_to_s3(two_rank_run, s3_server, tmp_path):
    """SIGKILL a 2-rank job that uploads to S3 (moto server, tests/s3_utils.py) after some chunks are complete;
    finish it on ONE rank as task 0 then task 1 of a 2-task job array: the local and the remote dataset equal the
    uninterrupted 2-rank run's. A kill *during* a chunk's upload is reproduced by removing that chunk's commit
    marker (chunk.json, uploaded last) and a shard from the bucket after the kill: the state such a kill leaves."""
    reference, _ = two_rank_run
    bucket = s3_server.new_bucket("extract")
    remote = f"s3://{bucket}/imagenet"
    out = tmp_path / "killed"
    # throttle_s slows each batch so the job is still running when we kill it.
    proc = subprocess.Popen(
        torchrun_cmd(out, "throttle_s=0.12", f"remote={remote}"),
        cwd=REPO,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def complete() -> list[Path]:
        return sorted(out.glob("chunk*"))

    def partial() -> list[Path]:
        return sorted(out.glob(".tmp-chunk*"))

    deadline = time.time() + 120
    try:
        while not (len(complete()) >= 3 and partial()):
            assert proc.poll() is None, "the job ended before it could be killed:\n" + proc.stdout.read().decode()
            assert time.time() < deadline, "no chunk completed in time"
            time.sleep(0.02)
        kill_job(proc)  # the launcher and both ranks, at once
    finally:
        if proc.poll() is None:
            kill_job(proc)
        proc.wait(timeout=30)
    done_at_kill, partial_at_kill = complete(), partial()
    time.sleep(0.8)  # > 2 chunks' time at throttle_s: no rank may still be running
    assert complete() == done_at_kill and partial() == partial_at_kill
    assert 3 <= len(done_at_kill) < 10 and partial_at_kill, (done_at_kill, partial_at_kill)
    assert not (out / "manifest.json").exists() and not (out / "index.json").exists()
    done = {int(p.name[5:]) for p in done_at_kill}
    uploaded = _remote_chunks(s3_server, bucket)
    assert uploaded and uploaded <= done and "imagenet/index.json" not in s3_server.keys(bucket)
    torn = min(uploaded)  # killed mid-upload: committed locally, incomplete on the remote
    s3_server.delete(bucket, f"imagenet/chunk{torn:06d}/chunk.json")
    s3_server.delete(bucket, f"imagenet/chunk{torn:06d}/shard.00000.mds.zstd")

    # Another number of ranks (1), as task 0 then task 1 of a job array (chunk c belongs to task c % 2).
    def run_task(task: int, *extra: str):
        overrides = [f"out_dir={out}", *COMMON, f"remote={remote}", *extra]
        return extract(load_extract_config(CONFIG, overrides), array=(task, 2))

    def size(c: int) -> int:
        return len(range(10 * c, min(10 * c + 10, N)))

    first = run_task(0)
    assert first.written_this_run == sum(size(c) for c in range(0, 10, 2) if c not in done)  # complete ones kept
    assert set(range(0, 10, 2)) <= _remote_chunks(s3_server, bucket)  # the torn chunk uploaded again if even
    assert not partial() or all(int(p.name[10:]) % 2 for p in partial())  # task 0 removed only its partials
    odd_complete = all(c in done for c in range(1, 10, 2)) and torn % 2 == 0
    assert first.finalized == odd_complete and (out / "index.json").exists() == odd_complete
    second = run_task(1, "keep_local=false")  # its new chunks keep only their metadata locally once uploaded
    assert second.written_this_run == sum(size(c) for c in range(1, 10, 2) if c not in done)
    for c in range(1, 10, 2):
        shards = list((out / f"chunk{c:06d}").glob("shard.*"))
        # uploaded by this run (new, torn, or committed locally but not yet uploaded at the kill): shards deleted
        assert bool(shards) == (c in uploaded and c != torn), c
        assert (out / f"chunk{c:06d}" / "chunk.json").is_file() and (out / f"chunk{c:06d}" / "index.json").is_file()
    assert second.finalized and second.num_samples == N and not partial()
    assert _remote_chunks(s3_server, bucket) == set(range(10))

    a, b = read_manifest(reference), read_manifest(out)
    for key in ("num_samples", "sample_ids_sha256", "content_sha256", "stats", "num_skipped", "num_chunks"):
        assert a[key] == b[key], key
    assert a["world_size"] == 2 and b["world_size"] == 1
    ma, sa = load_latent_stats(reference)
    mb, sb = load_latent_stats(out)
    assert torch.equal(ma, mb) and torch.equal(sa, sb)
    # The remote is the complete dataset: the merged files (index.json as written locally), every sample equal to
    # the uninterrupted run's.
    keys = s3_server.keys(bucket, "imagenet/")
    assert {f"imagenet/{n}" for n in ("index.json", "manifest.json", "latents_stats.pt", "extract_plan.json")} <= set(
        keys
    )
    assert json.loads(s3_server.read(bucket, "imagenet/index.json")) == json.loads((out / "index.json").read_text())
    expected = {int(s["sample_id"]): s for s in read_raw(reference)}
    assert len(expected) == N
    got = read_remote(remote, tmp_path / "cache")
    assert sorted(got) == list(range(N))
    for sid, sample in expected.items():
        for column in ("latent", "latent_flip", "label"):
            np.testing.assert_array_equal(got[sid][column], sample[column], err_msg=f"sample {sid}: {column}")

    # A new node with an empty out_dir: every chunk is complete on the remote, so nothing is extracted again (the
    # chunks' metadata are fetched), and the merged files are the same.
    fresh = tmp_path / "fresh"
    again = extract(load_extract_config(CONFIG, [f"out_dir={fresh}", *COMMON, f"remote={remote}"]))
    assert again.finalized and again.written_this_run == 0 and again.num_samples == N
    assert read_manifest(fresh)["content_sha256"] == a["content_sha256"] and not list(fresh.glob("chunk*/shard.*"))
    with pytest.raises(
        ExtractError, match=r"remote: s3://.*/imagenet holds a job with different settings \(chunk_size"
    ):
        extract(
            load_extract_config(CONFIG, [f"out_dir={tmp_path / 'other'}", *COMMON, f"remote={remote}", "chunk_size=12"])
        )
    # A restart with other chunk contents is refused instead of mixing them.
    with pytest.raises(ExtractError, match=r"chunk_size: 10 -> 12"):
        extract(load_extract_config(CONFIG, [f"out_dir={out}", *COMMON, "chunk_size=12"]))
