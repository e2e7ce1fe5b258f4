"""The extraction job (data/extract.py) on 2 REAL ranks started by ``python -m torch.distributed.run``; the resume
test SIGKILLs the whole job (launcher and ranks, each rank being its own process group under torch elastic) after
some chunks are complete, and starts it again. The uninterrupted reference extraction runs ``extract()`` on the 2
shared ranks of tests/dist_utils.py (no launch). The single-process checks: tests/unit/test_extract.py.
"""

from __future__ import annotations

import json
import os
import re
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

try:
    from dist_utils import run_distributed
    from test_extract import CLASSES, COMMON, CONFIG, REPO, SIZE, N, _clean_shared_memory, read_raw  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.dist_utils import run_distributed
    from tests.unit.test_extract import CLASSES, COMMON, CONFIG, REPO, SIZE, N, _clean_shared_memory, read_raw  # noqa: F401


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
    # Per-rank chunk sets, merged into one index.
    assert sorted(p.name for p in (out / "rank00000").iterdir() if p.name.startswith("chunk")) == [
        f"chunk{c:06d}" for c in range(5)
    ]
    index = json.loads((out / "index.json").read_text())
    assert {s["zip_data"]["basename"].split("/")[0] for s in index["shards"]} == {"rank00000", "rank00001"}
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
    # Rank r holds the strided indices r, r+2, ...; its chunk 1 is its positions 10..19.
    meta = json.loads((out / "rank00000" / "chunk000001" / "chunk.json").read_text())
    assert meta["sample_ids"] == list(range(20, 40, 2))
    meta = json.loads((out / "rank00001" / "chunk000004" / "chunk.json").read_text())
    assert meta["sample_ids"] == list(range(81, 96, 2))

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


def test_sigkill_mid_job_then_restart_gives_the_same_dataset(two_rank_run, tmp_path):
    reference, _ = two_rank_run
    out = tmp_path / "killed"
    # throttle_s slows each batch so the job is still running when we kill it.
    proc = subprocess.Popen(
        torchrun_cmd(out, "throttle_s=0.12"),
        cwd=REPO,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def complete() -> list[Path]:
        return sorted(out.glob("rank*/chunk*"))

    def partial() -> list[Path]:
        return sorted(out.glob("rank*/.tmp-chunk*"))

    deadline = time.time() + 90
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

    restart = subprocess.run(torchrun_cmd(out), cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert restart.returncode == 0, restart.stdout[-3000:] + restart.stderr[-3000:]
    written = int(re.search(r"\((\d+) written by this run", restart.stdout).group(1))
    assert 0 < written <= N - 10 * len(done_at_kill) + 2  # complete chunks were not redone
    assert not partial()  # partial chunks were removed and redone
    for chunk in done_at_kill:  # untouched since the kill
        assert chunk.is_dir()

    a, b = read_manifest(reference), read_manifest(out)
    for key in ("num_samples", "sample_ids_sha256", "content_sha256", "stats", "num_skipped"):
        assert a[key] == b[key], key
    ma, sa = load_latent_stats(reference)
    mb, sb = load_latent_stats(out)
    assert torch.equal(ma, mb) and torch.equal(sa, sb)
    assert sorted(int(s["sample_id"]) for s in read_raw(out)) == list(range(N))

    # A restart with another world size (here 1 process) is refused instead of mixing layouts.
    with pytest.raises(ExtractError, match=r"world_size: 2 -> 1"):
        extract(load_extract_config(CONFIG, [f"out_dir={out}", *COMMON]))
