"""REPA training end to end on 2 gloo ranks (tests/dist_utils.py), the tiny DiT config, real MDS shards with stored
features and flip features: FSDP2 and DeepSpeed (ZeRO-2) runs of 4 steps with a checkpoint at step 2 resume from it
bit-exactly (losses, REPA losses and final weights), and the exported weights drop the projector and load into the
plain model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_utils import train_on_shared_ranks

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/tiny_dit.yaml")
CKPT, TOTAL, Z = 2, 4, 8
ENGINES = ("fsdp2", "deepspeed")

pytestmark = pytest.mark.timeout(300)


def write_repa_latents(out: Path, n: int = 64) -> Path:
    """``n`` class-dependent 3x16x16 'latents' with flips and Z x 8 x 8 'features' (the tiny DiT's 8x8 token grid)
    of the image and of its flip."""
    from data.streaming import write_latent_dataset

    rng = np.random.default_rng(0)
    encoder = rng.normal(size=(Z, 12)).astype(np.float32)  # a fixed linear "encoder" of each 2x2 patch

    def encode(img):  # (3, 16, 16) -> (Z, 8, 8)
        patches = img.reshape(3, 8, 2, 8, 2).transpose(0, 2, 4, 1, 3).reshape(12, 8, 8)
        return np.tanh(np.einsum("zc,chw->zhw", encoder, patches))

    def samples():
        for i in range(n):
            img = rng.normal(size=(3, 16, 16)).astype(np.float32) * 0.5 + (i % 10 - 4.5) / 5
            flip = img[:, :, ::-1].copy()
            feats, feats_flip = encode(img), encode(flip)
            yield {
                "latent": img,
                "latent_flip": flip,
                "label": i % 10,
                "sample_id": i,
                "features": feats,
                "features_flip": feats_flip,
            }

    write_latent_dataset(out, samples(), latent_dtype="float32", with_features=True, size_limit=1 << 16)
    return out


def _overrides(data: Path, run_dir: Path, engine: str) -> list[str]:
    return [
        f"data.path={data}",
        f"run_dir={run_dir}",
        "wandb.mode=disabled",
        f"train.max_steps={TOTAL}",
        f"checkpoint.every_steps={CKPT}",
        "checkpoint.keep_last=5",
        "data.use_features=true",
        "repa.enabled=true",
        "repa.depth=1",
        f"repa.z_dim={Z}",
        "repa.projector_dim=16",
        f"engine.kind={engine}",
        *(["engine.zero_stage=2"] if engine == "deepspeed" else []),
    ]


def _resume_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > CKPT:
            shutil.rmtree(ckpt)
    (dst / "metrics.jsonl").unlink(missing_ok=True)
    return dst


def _records(run_dir: Path) -> dict[int, dict]:
    recs = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in recs if "repa_loss" in r}


def test_repa_fsdp2_and_deepspeed_resume_bit_exact_and_export_plain(tmp_path):
    from launchers.experiment import load_config
    from models.lightningdit import build_model
    from models.loading import export_state, load_into_model

    data = write_repa_latents(tmp_path / "mds")
    runs = {engine: (tmp_path / f"{engine}_ref", tmp_path / f"{engine}_resumed") for engine in ENGINES}
    for engine, (ref, _) in runs.items():
        assert train_on_shared_ranks(CONFIG, _overrides(data, ref, engine)) == 0
    for ref, resumed in runs.values():
        _resume_dir(ref, resumed)
    for engine, (_, resumed) in runs.items():
        assert train_on_shared_ranks(CONFIG, _overrides(data, resumed, engine)) == 0

    plain_keys = list(build_model(load_config(CONFIG).model).state_dict())
    for engine, (ref, resumed) in runs.items():
        want, got = _records(ref), _records(resumed)
        assert sorted(want) == list(range(1, TOTAL + 1)) and sorted(got) == list(range(CKPT + 1, TOTAL + 1)), engine
        for step in got:  # bit-exact continuation: every logged value of the resumed steps
            for key in ("loss", "repa_loss", "diffusion_loss", "grad_norm"):
                assert got[step][key] == want[step][key], (engine, step, key)
            assert want[step]["loss"] == pytest.approx(want[step]["diffusion_loss"] + 0.5 * want[step]["repa_loss"])
        assert want[TOTAL]["repa_loss"] < want[1]["repa_loss"], (engine, "the projector does not learn")
        a, b = export_state(ref), export_state(resumed)
        for which in ("model", "ema"):
            assert sorted(a[which]) == sorted(plain_keys), (engine, which)  # no repa_projector.*
            assert all(torch.equal(a[which][k], b[which][k]) for k in plain_keys), (engine, which)
        # The export and the REPA run's own checkpoint both load strictly into the plain model.
        torch.save(a, tmp_path / f"{engine}.pt")
        model = build_model(load_config(CONFIG).model)
        load_into_model(model, tmp_path / f"{engine}.pt", which="ema", strict=True)
        if engine == "fsdp2":
            step_dir = ref / "checkpoints" / f"step_{TOTAL:07d}"
            load_into_model(build_model(load_config(CONFIG).model), step_dir, which="ema", strict=True)
