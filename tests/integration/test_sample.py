"""FID sampling with tools/sample.py: per-index determinism, SIGKILL + resume (on another world size), npz layout.

The model is the tiny config's LightningDiT with random weights (perturbed so that it is not a no-op), saved as
an official-style ``{"ema": state_dict}`` file and loaded with ``--config`` (the official-checkpoint path);
``data.latent_norm=false``, no data directory and ``sampling.tokenizer=identity`` (explicit: without a tokenizer
sampling is an error) make the images the latents.
"""

from __future__ import annotations

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

from dist_utils import run_distributed

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]
N, BATCH = 22, 4  # 6 chunks, the last one short
OVERRIDES = ["data.latent_norm=false", "sampling.num_steps=4", "sampling.tokenizer=identity"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from launchers.experiment import load_config
    from models.lightningdit import build_model

    cfg = load_config(REPO / "configs/tiny_dit.yaml", OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    path = tmp_path_factory.mktemp("ckpt") / "tiny_official_style.pt"
    torch.save({"ema": model.state_dict()}, path)
    return path


def _args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(ckpt),
        "--config",
        str(REPO / "configs/tiny_dit.yaml"),
        *OVERRIDES,
        "--num",
        str(N),
        "--batch-size",
        str(BATCH),
        "--out",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def uninterrupted(checkpoint, tmp_path_factory) -> Path:
    from tools import sample

    out = tmp_path_factory.mktemp("uninterrupted") / "samples"
    assert sample.main(_args(checkpoint, out, "--npz", str(out.parent / "samples.npz"))) == 0
    return out


def test_uninterrupted_run_writes_every_index_and_an_adm_npz(uninterrupted):
    files = _pngs(uninterrupted)
    assert sorted(files) == [f"{i:06d}.png" for i in range(N)]
    arr = np.load(uninterrupted.parent / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 16, 16, 3)  # ADM layout, index order
    for i in range(N):
        assert np.array_equal(arr[i], files[f"{i:06d}.png"])
    assert len({a.tobytes() for a in arr}) == N  # every image differs
    settings = json.loads((uninterrupted / "sampling.json").read_text())
    assert settings["labels"] == "uniform" and settings["sampling"]["num_steps"] == 4


def test_per_index_draws_do_not_depend_on_the_batch():
    from models.evaluation.generation import index_noise

    z_all, y_all = index_noise(range(10), seed=7, num_classes=10, latent_shape=(3, 4, 4))
    z_one, y_one = index_noise([6], seed=7, num_classes=10, latent_shape=(3, 4, 4))
    assert torch.equal(z_all[6], z_one[0]) and y_all[6] == y_one[0]
    z_bal, y_bal = index_noise(range(10), seed=7, num_classes=10, latent_shape=(3, 4, 4), labels="balanced")
    assert torch.equal(z_bal, z_all) and y_bal.tolist() == list(range(10))  # same noise, balanced labels
    assert not torch.equal(index_noise([6], seed=8, num_classes=10, latent_shape=(3, 4, 4))[0], z_one)


def _resume_on_ranks(dist, args):
    from tools import sample

    return sample.main(args)


def test_sigkill_then_resume_on_two_ranks_gives_the_uninterrupted_images(checkpoint, uninterrupted, tmp_path):
    out = tmp_path / "samples"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        LLAT_DEBUG_SAMPLE_SLEEP="0.3",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.Popen(
        [sys.executable, "tools/sample.py", *_args(checkpoint, out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while len(list(out.glob("*.png"))) < 2 * BATCH:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "sampling did not start"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: a node failure
        proc.wait()
    killed_with = len(list(out.glob("*.png")))
    assert 2 * BATCH <= killed_with < N, killed_with

    # Resume with 2 ranks (a different world size): only the missing chunks are sampled.
    codes = run_distributed(
        _resume_on_ranks, world_size=2, args=(_args(checkpoint, out, "--npz", str(tmp_path / "s.npz")),)
    )
    assert codes == [0, 0]
    got, want = _pngs(out), _pngs(uninterrupted)
    assert sorted(got) == [f"{i:06d}.png" for i in range(N)]  # exactly N files, no leftovers
    assert not list(out.glob(".*.tmp-*"))  # no temporary files left
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], np.load(uninterrupted.parent / "samples.npz")["arr_0"])


def test_other_settings_are_refused_and_the_grid_still_works(checkpoint, uninterrupted, tmp_path, capsys):
    from tools import sample

    args = _args(checkpoint, uninterrupted)
    args[args.index("sampling.num_steps=4")] = "sampling.num_steps=5"
    assert sample.main(args) == 2
    assert "other settings" in capsys.readouterr().err
    grid = tmp_path / "grid.png"
    assert (
        sample.main(
            [
                str(checkpoint),
                "--config",
                str(REPO / "configs/tiny_dit.yaml"),
                *OVERRIDES,
                "--grid",
                str(grid),
                "--per-class",
                "2",
                "--scale",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(grid).size == (2 * 16, 10 * 16)


# ------------------------------------------------------------------------------------ decoding settings
def test_a_missing_tokenizer_is_an_error_naming_what_to_pass(checkpoint, tmp_path, capsys):
    """No data directory, no manifest and no sampling.tokenizer: no silent identity decoding."""
    from tools import sample

    args = [
        str(checkpoint),
        "--config",
        str(REPO / "configs/tiny_dit.yaml"),
        "data.latent_norm=false",
        "sampling.num_steps=4",
        "--grid",
        str(tmp_path / "g.png"),
        "--per-class",
        "1",
        "--device",
        "cpu",
    ]
    assert sample.main(args) == 2
    err = capsys.readouterr().err
    assert "sampling.tokenizer" in err and "--tokenizer" in err and "identity" in err
    assert not (tmp_path / "g.png").exists()
    # A data directory without manifest.json: the same error, naming the directory.
    (tmp_path / "data").mkdir()
    assert sample.main(args + [f"data.path={tmp_path / 'data'}"]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


def test_released_statistics_and_tokenizer_without_a_data_directory(checkpoint, tmp_path):
    """--tokenizer / --latent-stats (sampling.tokenizer / sampling.latent_stats): the official latents_stats.pt
    layout ({'mean', 'std'} of shape (1, C, 1, 1)) de-normalises without data.path."""
    from models.evaluation.generation import latent_decoder
    from tools import sample

    mean = torch.tensor([0.1, -0.2, 0.3]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 0.75]).reshape(1, 3, 1, 1)
    stats = tmp_path / "latents_stats.pt"
    torch.save({"mean": mean, "std": std}, stats)
    decode = latent_decoder(None, True, 1.0, "cpu", tokenizer="identity", latent_stats=str(stats))
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.3
    assert decode.tokenizer_kind == "identity"
    torch.testing.assert_close(decode(z), (z * std + mean).clamp(-1, 1))
    flat = tmp_path / "flat_stats.pth"  # any file name; (C,) vectors are accepted too
    torch.save({"mean": mean.flatten(), "std": std.flatten()}, flat)
    torch.testing.assert_close(
        latent_decoder(None, True, 1.0, tokenizer="identity", latent_stats=str(flat))(z), decode(z)
    )

    grid = tmp_path / "grid.png"
    base = [
        str(checkpoint),
        "--config",
        str(REPO / "configs/tiny_dit.yaml"),
        "sampling.num_steps=4",
        "--grid",
        str(grid),
        "--per-class",
        "1",
        "--scale",
        "1",
        "--device",
        "cpu",
    ]
    assert sample.main(base + ["--tokenizer", "identity", "--latent-stats", str(stats)]) == 0  # latent_norm: true
    assert grid.is_file()
    # data.latent_norm=true and no statistics anywhere: the error names the three ways out.
    with pytest.raises(ValueError, match=r"sampling\.latent_stats"):
        latent_decoder(None, True, 1.0, tokenizer="identity")
    with pytest.raises(ValueError, match="data.latent_norm is false"):
        latent_decoder(None, False, 1.0, tokenizer="identity", latent_stats=str(stats))
    with pytest.raises(FileNotFoundError, match=r"sampling\.latent_stats"):
        latent_decoder(None, True, 1.0, tokenizer="identity", latent_stats=str(tmp_path / "missing.pt"))


def test_tokenizer_spec_precedence(tmp_path):
    from models.evaluation.generation import tokenizer_spec

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"plan": {"tokenizer": {"kind": "identity", "kwargs": {}}}}))
    assert tokenizer_spec("", data) == {"kind": "identity", "kwargs": {}}  # the extraction's record
    ckpt = tmp_path / "vavae.pt"
    ckpt.write_bytes(b"")
    assert tokenizer_spec(str(ckpt), data) == {"kind": "vavae", "kwargs": {"checkpoint": str(ckpt)}}  # explicit wins
    with pytest.raises(FileNotFoundError, match=r"sampling\.tokenizer: tokenizer checkpoint not found"):
        tokenizer_spec(str(tmp_path / "nope.pt"), data)
    with pytest.raises(ValueError, match=r"sampling\.tokenizer"):
        tokenizer_spec("", None)
