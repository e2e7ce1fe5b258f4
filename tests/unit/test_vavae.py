"""VA-VAE model: official keys/shapes (f16d32 vs the reference TSV), checkpoint loading, posterior, tokenizer (the
adaptive weights under FSDP2 against an unsharded reference on gloo ranks: tests/integration/test_vavae_fsdp2.py).

Every pretrained network here is RANDOMLY INITIALISED (``random_init: true`` in configs/tiny_vavae.yaml):
the tests check structure and numerics, not perceptual quality.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models.vavae import (
    VAVAE,
    AutoencoderKL,
    DiagonalGaussianDistribution,
    f16d32_config,
    load_vavae_state,
    load_vavae_weights,
    split_vavae_state_dict,
)

REPO = Path(__file__).resolve().parents[2]
# Keys and shapes of the released f16d32 model (a copy in the repository: the test never skips).
TSV = Path(__file__).resolve().parents[1] / "data" / "vavae_f16d32_state_dict.tsv"
TINY = dict(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=4, resolution=16)
# configs/tiny_vavae.yaml at 16 px (4x cheaper than its 32 px): the latent grid is 8 x 8.
TINY16 = [
    "data.image_size=16",
    "vavae.model.resolution=16",
    "vavae.model.attn_resolutions=[8]",
    "vavae.disc.n_layers=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tsv() -> dict[str, list[int]]:
    rows = {}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        rows[key] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return rows


def test_f16d32_on_meta_matches_the_official_state_dict():
    with torch.device("meta"):
        model = AutoencoderKL(**f16d32_config())
    ref = _tsv()
    sd = model.state_dict()
    assert len(sd) == len(ref) == 342
    assert list(sd) == list(ref)  # same names, same order
    assert {k: list(v.shape) for k, v in sd.items()} == ref
    assert sum(p.numel() for p in model.parameters()) == 69_836_067
    assert model.downsample_factor == 16
    # The training model adds exactly the VF projection of the released training checkpoint.
    with torch.device("meta"):
        train = VAVAE(**f16d32_config(), vf_dim=1024)
    extra = set(train.state_dict()) - set(sd)
    assert extra == {"linear_proj.weight"} and tuple(train.linear_proj.weight.shape) == (1024, 32, 1, 1)


def _official_training_checkpoint(model: VAVAE, path: Path) -> dict[str, torch.Tensor]:
    """The layout of a released VA-VAE Lightning checkpoint, from a randomly initialised model."""
    from models.losses import NLayerDiscriminator

    sd = {k: v.clone() for k, v in model.state_dict().items()}  # encoder/decoder/quant convs/linear_proj
    disc = NLayerDiscriminator(3, 8, 2)
    sd.update({f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()})
    sd.update(
        {
            "loss.logvar": torch.zeros(()),
            "loss.perceptual_loss.scaling_layer.shift": torch.zeros(1, 3, 1, 1),
            "loss.perceptual_loss.net.slice1.0.weight": torch.zeros(64, 3, 3, 3),
            "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1),
            "foundation_model.model.cls_token": torch.zeros(1, 1, 1024),
            "foundation_model.model.blocks.0.attn.qkv.weight": torch.zeros(3072, 1024),
        }
    )
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1234, "optimizer_states": []}, path)
    return sd


def test_official_training_checkpoint_loads_strictly(tmp_path):
    # The released layout at a small size (f16d32's names are checked on meta above): 32 latent channels and the
    # 1024-wide DINOv2 projection, so linear_proj.weight is (1024, 32, 1, 1) as in the released file.
    arch = dict(TINY, embed_dim=32)
    torch.manual_seed(0)
    source = VAVAE(**arch, vf_dim=1024)
    ckpt = tmp_path / "last.ckpt"
    _official_training_checkpoint(source, ckpt)

    parts = load_vavae_state(ckpt)
    assert len(parts.autoencoder) == len(AutoencoderKL(**arch).state_dict())
    assert set(parts.linear_proj) == {"weight"} and tuple(parts.linear_proj["weight"].shape) == (1024, 32, 1, 1)
    assert set(parts.other) == {"loss.logvar"} and len(parts.foundation_model) == 2
    assert parts.discriminator and parts.lpips

    target = VAVAE(**arch, vf_dim=1024)
    load_vavae_weights(target, parts)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    # The inference model (no projection) loads the same file strictly too.
    plain = AutoencoderKL(**arch)
    load_vavae_weights(plain, ckpt)
    assert torch.equal(plain.decoder.conv_out.weight, source.decoder.conv_out.weight)

    # Strict on the rest: a missing autoencoder key, an unknown key, a wrong projection width.
    sd = torch.load(ckpt, weights_only=False)["state_dict"]
    broken = dict(sd)
    broken.pop("decoder.conv_out.bias")
    with pytest.raises(ValueError, match=r"missing \['decoder\.conv_out\.bias'\]"):
        load_vavae_weights(AutoencoderKL(**arch), split_vavae_state_dict(broken, "broken"))
    with pytest.raises(ValueError, match="unexpected keys outside the VA-VAE layout"):
        load_vavae_weights(AutoencoderKL(**arch), split_vavae_state_dict({**sd, "loss.extra": torch.zeros(1)}, "odd"))
    with pytest.raises(ValueError, match=r"linear_proj\.weight: model \[768, 32, 1, 1\] vs checkpoint"):
        load_vavae_weights(VAVAE(**arch, vf_dim=768), parts)


def test_posterior_clamp_sample_mode_kl():
    mean = torch.randn(2, 3, 4, 4)
    logvar = torch.full((2, 3, 4, 4), 50.0)
    logvar[1] = -100.0
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert post.logvar[0].max() == 20.0 and post.logvar[1].min() == -30.0
    assert torch.equal(post.mode(), mean)
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == mean.shape
    expected = 0.5 * (mean.pow(2) + post.logvar.exp() - 1 - post.logvar).sum(dim=[1, 2, 3])
    torch.testing.assert_close(post.kl(), expected)
    # N(0, 1) has zero KL.
    assert torch.all(DiagonalGaussianDistribution(torch.zeros(1, 4, 2, 2)).kl() == 0)


def test_tiny_autoencoder_shapes_and_training_forward():
    torch.manual_seed(0)
    ae = VAVAE(**TINY, vf_dim=12)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, mean, logvar, z, z_proj = ae(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and mean.shape == (2, 4, 8, 8) and z_proj.shape == (2, 12, 8, 8)
    torch.testing.assert_close(z_proj, ae.linear_proj(z))
    assert torch.equal(ae(x, sample_posterior=False)[3], ae.encode(x).mode())


def test_vavae_tokenizer_from_official_file(tmp_path):
    from data.tokenizers import build_tokenizer

    torch.manual_seed(1)
    source = VAVAE(**TINY, vf_dim=16)
    ckpt = tmp_path / "vavae.pt"
    _official_training_checkpoint(source, ckpt)
    tok = build_tokenizer("vavae", checkpoint=str(ckpt), **TINY)
    assert tok.downsample == 2 and tok.channels == 4 and tok.latent_shape(16) == (4, 8, 8)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = tok.encode(x)
    torch.testing.assert_close(z, source.encode(x).mean)
    zs = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(zs, z)
    torch.testing.assert_close(tok.decode(z), source.decode(z))
    with pytest.raises(ValueError, match="give checkpoint="):
        build_tokenizer("vavae")


# ------------------------------------------------------------------------------------------ tools/eval_tokenizer
def test_eval_metrics_psnr_and_ssim_definitions():
    from models.evaluation.reconstruction import gaussian_window, psnr_uint8, ssim, to_uint8

    ref = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    rec = ref.clone()
    rec[0] += 1  # MSE 1 -> 20 log10(255)
    torch.testing.assert_close(psnr_uint8(ref, rec), torch.tensor([20 * math.log10(255.0), 100.0]))
    assert torch.equal(
        to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])), torch.tensor([0, 128, 255, 255], dtype=torch.uint8)
    )
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 11, 11, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(1, 1, 11, 11, generator=g)).clamp(-1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(1))
    # 11x11 image: exactly one window position; SSIM from explicitly weighted moments.
    w = torch.outer(gaussian_window(), gaussian_window())
    xd, yd = x[0, 0].double(), y[0, 0].double()
    mx, my = (w * xd).sum(), (w * yd).sum()
    vx, vy = (w * xd * xd).sum() - mx**2, (w * yd * yd).sum() - my**2
    cxy = (w * xd * yd).sum() - mx * my
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    torch.testing.assert_close(ssim(x, y), expected.float().reshape(1))


def test_eval_tokenizer_cli_on_a_folder(tmp_path):
    import json

    from data.synthetic import write_image_folder
    from tools.eval_tokenizer import main

    write_image_folder(tmp_path / "images", num_samples=5, image_size=16, num_classes=2)
    arch = [
        "embed_dim=4",
        "ch=32",
        "ch_mult=[1,2]",
        "num_res_blocks=1",
        "attn_resolutions=[8]",
        "z_channels=4",
        "resolution=16",
    ]
    out = tmp_path / "out"
    assert (
        main(
            [
                "--random-init",
                "--arch",
                *arch,
                "--images",
                str(tmp_path / "images"),
                "--image-size",
                "16",
                "--batch-size",
                "2",
                "--num-workers",
                "0",
                "--lpips-random-init",
                "--out-dir",
                str(out),
                "--json",
                str(tmp_path / "m.json"),
                "--device",
                "cpu",
                "--fid-extractor",
                "tiny-random",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["num_images"] == 5 and result["posterior"] == "sample"
    assert 0 < result["psnr"] < 100 and -1 <= result["ssim"] <= 1 and result["lpips"] > 0
    assert len(list((out / "ref").glob("*.png"))) == 5 and len(list((out / "rec").glob("*.png"))) == 5
    # rFID by the evaluation code on the written folders: the number models/evaluation/metrics.py gives for them
    # (up to the float summation order of another batch size).
    from models.evaluation.metrics import evaluate_images

    direct = evaluate_images(str(out / "rec"), str(out / "ref"), feature_extractor="tiny-random", use_cache=False)
    assert result["rfid"] == pytest.approx(direct["fid"], rel=1e-6) and result["rfid"] > 0
    assert result["rfid_feature_extractor"] == "tiny-random"
    base = [
        "--random-init",
        "--arch",
        *arch,
        "--images",
        str(tmp_path / "images"),
        "--image-size",
        "16",
        "--batch-size",
        "5",
        "--num-workers",
        "0",
        "--no-lpips",
        "--device",
        "cpu",
    ]
    with pytest.raises(SystemExit):  # rFID compares written folders: --out-dir is required
        main(base + ["--fid-extractor", "tiny-random"])
    with pytest.raises(Exception, match="--fid-weights"):  # Inception: a local weights file, never a download
        main(base + ["--out-dir", str(tmp_path / "out2"), "--fid-extractor", "inception-v3-compat"])


def test_eval_tokenizer_without_a_tokenizer_names_what_to_pass(tmp_path, capsys):
    from tools.eval_tokenizer import main

    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path), "--no-lpips"])
    assert "--checkpoint is required" in capsys.readouterr().err
