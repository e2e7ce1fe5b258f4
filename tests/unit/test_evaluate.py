"""FID and friends (models/evaluation/metrics.py, tools/evaluate.py) and the in-loop evaluation (DiTTask.evaluate).

All metric tests use the TINY RANDOMLY INITIALISED feature extractor ``tiny-random`` (metrics.py: two convs
and a linear layer with weights from a fixed seed), which metrics.py registers with torch-fidelity. It stands in for
Inception-v3 so that the tests run on a CPU in seconds without a weights file; its values say nothing about image
quality, but every code path (torch-fidelity's extractor registry, feature extraction, its metric functions, the
reference cache, stored statistics, the collective in-loop sampling) is the one Inception goes through.
The collective in-loop evaluation on 2 gloo ranks: tests/integration/test_evaluate_in_loop.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core.engines import LocalPart
from models.evaluation import metrics as fid

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


def _synthetic(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    from data.synthetic import SyntheticImages

    ds = SyntheticImages(n, image_size=size, num_classes=10, seed=seed, output="uint8")
    return np.stack([ds[i][0] for i in range(n)])


def _write_folder(images: np.ndarray, folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    a = _synthetic(64, seed=0)
    shifted = np.clip(a.astype(np.int16) + 40, 0, 255).astype(np.uint8)  # brighter copies of the same set
    return SimpleNamespace(
        root=root,
        a=a,
        shifted=shifted,
        folder_a=_write_folder(a, root / "a"),
        folder_shifted=_write_folder(shifted, root / "shifted"),
    )


def _scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """The Fréchet distance the textbook way (ADM / pytorch-fid): scipy.linalg.sqrtm of the covariance product."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_fid_self_zero_shifted_positive_and_matches_scipy_and_torch_fidelity(images, tmp_path):
    common = dict(feature_extractor=fid.TINY, cache_dir=tmp_path / "cache")
    same = fid.evaluate_images(images.folder_a, images.folder_a, metrics=["fid"], **common)
    assert abs(same["fid"]) < 1e-6
    shifted = fid.evaluate_images(images.folder_shifted, images.folder_a, metrics=["fid"], **common)
    assert shifted["fid"] > 1e-3
    assert shifted["num_samples"] == 64 and shifted["num_reference"] == 64

    # The same number from the features directly: numpy/scipy Fréchet distance.
    ex = fid.Extractor(fid.TINY, metrics=["fid"])
    fa = fid.extract_features(ex, images.a)[ex.layers["fid"]].double().numpy()
    fs = fid.extract_features(ex, images.shifted)[ex.layers["fid"]].double().numpy()
    assert shifted["fid"] == pytest.approx(_scipy_fid(fs, fa), rel=1e-6, abs=1e-9)

    # ... and from torch-fidelity's own pipeline on the two folders with the registered tiny extractor.
    import torch_fidelity

    ref = torch_fidelity.calculate_metrics(
        input1=str(images.folder_shifted),
        input2=str(images.folder_a),
        fid=True,
        feature_extractor=fid.TINY,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    assert shifted["fid"] == pytest.approx(ref[torch_fidelity.KEY_METRIC_FID], rel=1e-4)

    # A statistics-only reference (ADM layout, here from the tiny extractor) gives the same FID.
    stats_file = fid.save_statistics(tmp_path / "a_stats.npz", fid.extract_features(ex, images.a), ex)
    with np.load(stats_file) as data:
        assert {"mu", "sigma", "extractor"} <= set(data.files)
    from_stats = fid.evaluate_images(images.shifted, stats_file, metrics=["fid", "kid"], **common)
    assert from_stats["fid"] == pytest.approx(shifted["fid"], rel=1e-9)
    assert from_stats["skipped"] == ["kid"]  # KID needs reference images


def test_all_metrics_npz_inputs_and_the_reference_cache(images, tmp_path):
    np.savez(tmp_path / "a.npz", arr_0=images.a)  # ADM layout: arr_0, uint8 N x H x W x 3
    cache = tmp_path / "cache"
    first = fid.evaluate_images(
        images.shifted, tmp_path / "a.npz", metrics=["all"], feature_extractor=fid.TINY, cache_dir=cache
    )
    assert not first["reference_cached"]
    for key in ("fid", "sfid", "is", "is_std", "kid", "kid_std", "precision", "recall"):
        assert np.isfinite(first[key]), key
    self_score = fid.evaluate_images(
        images.a, tmp_path / "a.npz", metrics=["all"], feature_extractor=fid.TINY, cache_dir=cache
    )
    assert self_score["reference_cached"]  # features + statistics came from the cache
    assert abs(self_score["fid"]) < 1e-6 and abs(self_score["sfid"]) < 1e-3
    assert self_score["precision"] == 1.0 and self_score["recall"] == 1.0
    assert self_score["sfid"] < first["sfid"] and self_score["kid"] < first["kid"]
    assert len(list(cache.glob("ref-*.pt"))) == 1

    # Changing the reference file (size/mtime) invalidates its cache entry.
    time.sleep(0.01)
    np.savez(tmp_path / "a.npz", arr_0=images.shifted)
    again = fid.evaluate_images(
        images.shifted, tmp_path / "a.npz", metrics=["fid"], feature_extractor=fid.TINY, cache_dir=cache
    )
    assert not again["reference_cached"] and abs(again["fid"]) < 1e-6


def test_missing_weights_are_a_clear_error_and_never_a_download(monkeypatch):
    import torch.hub

    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(ValueError, match=r"eval\.feature_extractor_weights.*weights-inception-2015-12-05"):
        fid.Extractor(fid.INCEPTION, weights=None, metrics=["fid"])
    with pytest.raises(FileNotFoundError, match=r"eval\.feature_extractor_weights.*/no/such/file\.pth"):
        fid.Extractor(fid.INCEPTION, weights="/no/such/file.pth", metrics=["fid"])
    with pytest.raises(ValueError, match=r"eval\.metrics: unknown metric 'fdi'"):
        fid.normalize_metrics(["fdi"], key="eval.metrics")


def test_inception_path_with_a_local_weights_file_and_the_sfid_layer(images, tmp_path, monkeypatch):
    """The real inception-v3-compat extractor, from a local weights file (here: RANDOM weights, saved once; the
    actual file is not available offline): FID uses pool3 (2048-d), sFID the first 7 channels of the 17x17
    Mixed_6d.branch1x1 map in (H, W, C) order (2023-d), IS the logits."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    with monkeypatch.context() as m:  # build one with random weights, without any download
        m.setattr(inc, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        random_net = inc.FeatureExtractorInceptionV3(fid.INCEPTION, ["2048"])
    weights = tmp_path / "random-inception.pth"
    torch.save(random_net.state_dict(), weights)

    ex = fid.Extractor(fid.INCEPTION, weights=str(weights), metrics=["fid", "sfid", "is"])
    assert ex.layers == {"fid": "2048", "is": "logits_unbiased", "sfid": "spatial"}
    batch = torch.from_numpy(images.a[:1]).permute(0, 3, 1, 2).contiguous()  # CPU Inception: ~6 GFLOP/image
    maps = {}
    handle = ex.module.Mixed_6d.branch1x1.register_forward_hook(lambda mod, i, o: maps.setdefault("m", o))
    feats = ex(batch)
    handle.remove()
    assert feats["2048"].shape == (1, 2048) and feats["logits_unbiased"].shape == (1, 1008)
    assert maps["m"].shape == (1, 192, 17, 17)
    assert torch.equal(feats["spatial"], maps["m"][:, :7].permute(0, 2, 3, 1).reshape(1, 17 * 17 * 7))


class DoubledTiny(fid.TinyRandomExtractor):
    """A custom extractor given as 'module:Class' (features x2: the FID is multiplied by 4)."""

    def forward(self, x):
        return tuple(2 * f for f in super().forward(x))


def test_custom_extractor_spec_is_registered_with_torch_fidelity(images):
    spec = f"{__name__}:DoubledTiny"
    base = fid.evaluate_images(images.shifted, images.a, metrics=["fid"], feature_extractor=fid.TINY, use_cache=False)
    doubled = fid.evaluate_images(images.shifted, images.a, metrics=["fid"], feature_extractor=spec, use_cache=False)
    assert doubled["fid"] == pytest.approx(4 * base["fid"], rel=1e-6)
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY[spec] is DoubledTiny


def test_evaluate_cli_table_and_json(images, tmp_path, capsys):
    from tools import evaluate

    out = tmp_path / "m.json"
    rc = evaluate.main(
        [
            str(images.folder_shifted),
            "--reference",
            str(images.folder_a),
            "--feature-extractor",
            fid.TINY,
            "--metrics",
            "fid,is,pr",
            "--cache-dir",
            str(tmp_path / "c"),
            "--json",
            str(out),
            "--num-workers",
            "0",
            "--quiet",
            "--save-stats",
            str(tmp_path / "s.npz"),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "FID" in text and "precision" in text and "recall" in text
    import json

    result = json.loads(out.read_text())
    assert {"fid", "is", "precision", "recall", "num_samples", "reference"} <= set(result)
    assert (tmp_path / "s.npz").is_file()
    rc = evaluate.main([str(images.folder_a), "--reference", str(images.folder_a), "--quiet"])
    assert rc == 2
    assert "--weights" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ in-loop evaluation
@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """The tiny config's images (16 px synthetic) as the FID reference folder; the model samples 3x16x16 latents
    that the identity tokenizer turns into images."""
    root = tmp_path_factory.mktemp("train_data")
    _write_folder(_synthetic(48, seed=3), root / "ref")
    return root


def _eval_cfg(data: Path, run_dir: Path, extra: tuple[str, ...] = ()):
    from launchers.experiment import load_config

    # No data directory and no latent normalisation: identity decoding (explicit; the latents are the images),
    # and the worker processes skip importing MosaicML streaming (slow).
    return load_config(
        REPO / "configs/tiny_dit.yaml",
        [
            "data.latent_norm=false",
            "sampling.tokenizer=identity",
            f"run_dir={run_dir}",
            "eval.every_epochs=1",
            "eval.num_samples=20",
            "eval.batch_size=4",
            f"eval.reference={data / 'ref'}",
            f"eval.feature_extractor={fid.TINY}",
            f"eval.cache_dir={data / 'cache'}",
            "eval.metrics=[fid,is,pr]",
            "eval.grid_size=6",
            "eval.sampling_overrides=[num_steps=4]",
            *extra,
        ],
    )


def _perturbed_model(cfg):
    from models.lightningdit import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # zero-initialised output layers would make the model a no-op
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return model


def test_in_loop_evaluate_setup_error_names_the_key(train_data, tmp_path):
    from core.distributed import DistInfo
    from models.tasks.dit import DiTTask

    cfg = _eval_cfg(train_data, tmp_path / "run")
    dist = DistInfo(0, 1, 0, 1, torch.device("cpu"), "none")
    DiTTask(cfg, dist).check()  # the start-up check passes on a good section
    cfg.eval.feature_extractor = fid.INCEPTION
    with pytest.raises(ValueError, match=r"eval\.feature_extractor_weights"):
        DiTTask(cfg, dist).check()
    model = _perturbed_model(cfg).eval()
    with pytest.raises(ValueError, match=r"eval\.feature_extractor_weights"):
        DiTTask(cfg, dist).evaluate({"model": LocalPart("model", model, ema=model)}, step=1)
    cfg.eval.feature_extractor = fid.TINY
    cfg.eval.reference = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"eval\.reference: reference not found"):
        DiTTask(cfg, dist).evaluate({"model": LocalPart("model", model, ema=model)}, step=1)
    cfg.eval.reference = str(train_data / "ref")
    cfg.eval.sampling_overrides = ["num_stepz=3"]
    with pytest.raises(ValueError, match=r"eval\.sampling_overrides: .*num_stepz.*did you mean 'num_steps'"):
        DiTTask(cfg, dist).check()


def test_in_loop_evaluate_without_a_tokenizer_fails_at_start_up(train_data, tmp_path):
    """No manifest under data.path and no sampling.tokenizer: the start-up check and the first evaluation both
    name the key (never a silent identity decoding)."""
    from core.distributed import DistInfo
    from models.tasks.dit import DiTTask

    cfg = _eval_cfg(train_data, tmp_path / "run")
    cfg.sampling.tokenizer = ""
    dist = DistInfo(0, 1, 0, 1, torch.device("cpu"), "none")
    with pytest.raises(ValueError, match=r"sampling\.tokenizer"):
        DiTTask(cfg, dist).check()
    model = _perturbed_model(cfg).eval()
    with pytest.raises(ValueError, match=r"sampling\.tokenizer"):
        DiTTask(cfg, dist).evaluate({"model": LocalPart("model", model, ema=model)}, step=1)
