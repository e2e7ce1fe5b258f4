"""VA-VAE training with PRECOMPUTED DINOv2 features (vavae.vf.features: precomputed, data.kind: streaming).

One extraction (data/extract.py, in process): 16 synthetic 16 px images (the first of tests/integration/test_train_vavae.py's
SMALL run), stored as uint8 with the features of the tiny config's own RANDOMLY INITIALISED DINOv2 on the f2
autoencoder's 8 x 8 latent grid, no latents (tokenizer.kind: none). Random-init DINOv2 weights come from a fixed seed
(models/dinov2.py), so the extraction's model and the task's online model are the same network. Training runs: global
batch 4 -> 4 steps per epoch, 8 steps, GAN terms from step index 3.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core.config import ConfigError
from launchers.experiment import load_config

from test_train_resume import final_state
from test_train_vavae import CONFIG, REPO, SMALL, complete_steps, records, train_shared

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]
NUM_IMAGES, TOTAL, DISC_START = 16, 8, 3
RUN = [f"train.max_steps={TOTAL}", f"vavae.loss.disc_start={DISC_START}", "checkpoint.every_steps=100"]


def precomputed(path: Path) -> list[str]:
    return ["data.kind=streaming", f"data.path={path}", "vavae.vf.features=precomputed"]


def _dist() -> SimpleNamespace:
    return SimpleNamespace(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from data.extract import ExtractConfig, FeaturesConfig, SourceConfig, TokenizerConfig, extract

    tiny = load_config(REPO / CONFIG, SMALL)
    d = tiny.vavae.vf.dinov2
    grid = tiny.data.image_size // 2 ** (len(tiny.vavae.model.ch_mult) - 1)
    out = tmp_path_factory.mktemp("vavae_features") / "mds"
    extract(
        ExtractConfig(
            out_dir=str(out),
            images=True,
            batch_size=8,
            num_workers=0,
            progress_bar=False,
            source=SourceConfig(
                kind="synthetic",
                num_samples=NUM_IMAGES,
                image_size=tiny.data.image_size,
                num_classes=tiny.data.synthetic_num_classes,
                seed=tiny.seed,
            ),
            tokenizer=TokenizerConfig(kind="none"),
            features=FeaturesConfig(
                enabled=True,
                model=d.model,
                random_init=True,
                model_kwargs=d.model_kwargs,
                imagenet_norm=d.imagenet_norm,
                grid=grid,
            ),
        )
    )
    return out


def test_online_features_and_vf_loss_equal_the_precomputed_ones(dataset, monkeypatch):
    """Same samples: the stored images are the source images exactly; the stored features equal DINOv2 run online
    on them up to float16 storage; the VF terms of the precomputed task equal those of the online task."""
    from data.synthetic import SyntheticImages
    from models.tasks.vavae import VAVAETask

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)  # build_data fills them in from dist (restored after)
    base = SMALL + ["vavae.loss.perceptual_weight=0", "vavae.loss.disc_start=0"]
    online = VAVAETask(load_config(REPO / CONFIG, base), _dist())
    pre = VAVAETask(load_config(REPO / CONFIG, base + precomputed(dataset)), _dist())
    assert pre.vf_model is None and pre.vf_dim == online.vf_dim == 32  # D from the dataset's index.json

    source = pre.build_data(micro_batch_size=4, global_batch_size=4)
    assert source.steps_per_epoch == NUM_IMAGES // 4
    batch = next(source.iterator(epoch=0, step_in_epoch=0))
    del source
    gc.collect()
    x, stored = batch["image"], batch["features"]
    assert stored.dtype == torch.float16 and stored.shape == (4, 32, 8, 8)
    images = SyntheticImages(NUM_IMAGES, image_size=16, num_classes=10, seed=0)
    for image, sid in zip(x, batch["sample_id"].tolist()):
        assert torch.equal(image, images[sid][0])
    with torch.no_grad():
        torch.testing.assert_close(stored.float(), online.vf_model(x), rtol=2e-3, atol=2e-3)

    specs_o, specs_p = online.build_models(), pre.build_models()  # same seed: same weights and noise
    _, m_o, _ = online.autoencoder_loss(x, specs_o["autoencoder"].module, specs_o["discriminator"].module, step=0)
    _, m_p, _ = pre.autoencoder_loss(
        x, specs_p["autoencoder"].module, specs_p["discriminator"].module, step=0, features=stored.float()
    )
    for key in ("rec", "nll", "kl", "g"):
        assert torch.equal(m_o[key], m_p[key]), key
    for key in ("vf", "vf_cos", "vf_distmat", "vf_weight", "loss"):
        torch.testing.assert_close(m_p[key], m_o[key], rtol=1e-2, atol=1e-3, msg=key)
    assert float(m_p["vf"]) > 0
    with pytest.raises(ValueError, match=r"vavae\.vf\.features=precomputed: the batch has no DINOv2 `features`"):
        pre.autoencoder_loss(x, specs_p["autoencoder"].module, specs_p["discriminator"].module, step=0)

    # vf.features online on the same shards: images only, DINOv2 runs in the loss.
    online_streaming = VAVAETask(
        load_config(REPO / CONFIG, base + ["data.kind=streaming", f"data.path={dataset}"]), _dist()
    )
    source = online_streaming.build_data(micro_batch_size=4, global_batch_size=4)
    again = next(source.iterator(epoch=0, step_in_epoch=0))
    del source
    gc.collect()
    assert "features" not in again and torch.equal(again["image"], x)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted run on the precomputed features (2 shared ranks, final checkpoint only)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train_shared(run_dir, *precomputed(dataset), *RUN)
    return run_dir


def test_precomputed_run_logs_vf_terms(reference):
    log = records(reference)
    assert sorted(log) == list(range(1, TOTAL + 1))
    assert [log[s]["autoencoder/disc_factor"] for s in range(1, TOTAL + 1)] == [0.0] * DISC_START + [1.0] * (
        TOTAL - DISC_START
    )
    for s in log:
        assert log[s]["autoencoder/vf_weight"] > 0 and log[s]["autoencoder/vf"] > 0
        assert all(math.isfinite(log[s][f"autoencoder/{k}"]) for k in ("vf", "vf_cos", "vf_distmat", "loss"))
    assert complete_steps(reference) == [TOTAL]


def test_precomputed_run_resumes_bit_exactly(dataset, reference, tmp_path):
    """Stop after step 3 (mid-epoch, before disc_start), resume to the end (across disc_start and the epoch boundary
    at 4): every logged value and every checkpoint tensor equal the uninterrupted run's."""
    run_dir = tmp_path / "run"
    train_shared(run_dir, *precomputed(dataset), *RUN, "train.max_steps=3")  # both on the shared ranks
    assert complete_steps(run_dir) == [3]
    assert "resumed from step 3" in train_shared(run_dir, *precomputed(dataset), *RUN)
    assert records(run_dir) == records(reference)
    got, ref = final_state(run_dir, TOTAL), final_state(reference, TOTAL)
    assert got.keys() == ref.keys() and any(k.startswith("autoencoder.optim") for k in ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), f"{k} differs"


def test_config_errors_name_the_keys(dataset, tmp_path):
    from data.streaming import latent_columns, open_writer
    from models.tasks.vavae import VAVAETask

    with pytest.raises(
        ConfigError,
        match=r"vavae\.vf\.features: 'precomputed' reads .*set data\.kind=streaming"
        r".*got data\.kind 'synthetic'",
    ):
        load_config(REPO / CONFIG, SMALL + ["vavae.vf.features=precomputed"])
    with pytest.raises(ConfigError, match=r"data\.random_flip: must be false with vavae\.vf\.features=precomputed"):
        load_config(REPO / CONFIG, SMALL + precomputed(dataset) + ["data.random_flip=true"])
    # 32 px images: a 16 x 16 latent grid, but the stored features are on 8 x 8.
    cfg = load_config(REPO / CONFIG, SMALL + precomputed(dataset) + ["data.image_size=32", "vavae.model.resolution=32"])
    with pytest.raises(
        ValueError,
        match=r"data\.path: the DINOv2 features of .* 8x8 token grid, but the autoencoder's "
        r"latent grid is 16x16 .*features\.grid=16",
    ):
        VAVAETask(cfg, _dist())
    images_only = tmp_path / "images_only"
    with open_writer(images_only, latent_columns(with_latents=False, image_size=16)) as writer:
        writer.write({"image": np.zeros((3, 16, 16), np.uint8), "label": 0, "sample_id": 0})
    with pytest.raises(
        ValueError,
        match=r"data\.path: vavae\.vf\.features=precomputed, but the dataset at .* has no "
        r"`features` column",
    ):
        VAVAETask(load_config(REPO / CONFIG, SMALL + precomputed(images_only)), _dist())
