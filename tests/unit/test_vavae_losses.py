"""VA-VAE losses: VF loss on hand-computed tensors and margins, the adaptive weights against gradient norms
computed independently, LPIPS (VGG16 layout, local weight files), the PatchGAN discriminator, DINOv2 wrapper
errors, and the VA-VAE config section.

LPIPS VGG16, the DINOv2 ViT and every model here are RANDOMLY INITIALISED (random_init / no weight files):
no downloads, structure and formulas only.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.config import ConfigError
from launchers.experiment import load_config
from models.losses import (
    NLayerDiscriminator,
    adaptive_weight,
    build_lpips,
    distmat_loss,
    generator_loss,
    hinge_d_loss,
    marginal_cosine_loss,
    vf_loss,
)

REPO = Path(__file__).resolve().parents[2]
TINY16 = [
    "data.image_size=16",
    "vavae.model.resolution=16",
    "vavae.model.attn_resolutions=[8]",
    "vavae.disc.n_layers=2",
]
R2 = 1 / math.sqrt(2)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ VF loss
def _hand_pair():
    # One image, D=2 channels, 1x2 tokens. z' tokens (1,0), (0,1); DINOv2 tokens (1,1), (1,0).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    f = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).reshape(1, 2, 1, 2)
    return z, f


def test_vf_terms_on_hand_computed_tensors():
    z, f = _hand_pair()
    # cos per token: 1/sqrt(2) and 0.
    torch.testing.assert_close(marginal_cosine_loss(z, f, 0.0), torch.tensor(((1 - R2) + 1.0) / 2))
    torch.testing.assert_close(marginal_cosine_loss(z, f, 0.5), torch.tensor((0.0 + 0.5) / 2))
    # Gram matrices: S_z = I, S_F = [[1, 1/sqrt2], [1/sqrt2, 1]] -> |diff| off-diagonal 1/sqrt2.
    torch.testing.assert_close(distmat_loss(z, f, 0.0), torch.tensor(2 * R2 / 4))
    torch.testing.assert_close(distmat_loss(z, f, 0.25), torch.tensor(2 * (R2 - 0.25) / 4))
    terms = vf_loss(z, f, cos_margin=0.5, distmat_margin=0.25, cos_weight=2.0, distmat_weight=3.0)
    torch.testing.assert_close(terms.cos, torch.tensor(0.25))
    torch.testing.assert_close(terms.total, 3.0 * terms.distmat + 2.0 * terms.cos)


def test_vf_margins_zero_below_margin():
    z, f = _hand_pair()
    assert distmat_loss(z, f, 0.8) == 0  # every |S_z - S_F| <= 1/sqrt2 < 0.8
    assert marginal_cosine_loss(z, f, 1.0) == 0  # 1 - m1 - cos <= 0 for cos >= 0
    g = torch.Generator().manual_seed(0)
    zp = torch.randn(2, 8, 3, 3, generator=g, requires_grad=True)
    feats = zp.detach() * 3.0 + 0.01 * torch.randn(2, 8, 3, 3, generator=g)  # nearly aligned (scale-free)
    terms = vf_loss(zp, feats, cos_margin=0.05, distmat_margin=0.05)
    assert terms.total == 0
    terms.total.backward()
    assert torch.all(zp.grad == 0)  # no gradient inside the margins
    # Without margins the same pair has a small positive loss.
    assert vf_loss(zp, feats, cos_margin=0.0, distmat_margin=0.0).total > 0
    with pytest.raises(ValueError, match="feature grid must be the latent grid"):
        vf_loss(zp, feats[:, :, :2])


def test_adaptive_weight_clamps_and_detaches():
    a = torch.tensor([3.0, 4.0], requires_grad=True)
    b = torch.tensor([0.0, 1.0])
    w = adaptive_weight(a * 1, b, max_value=1e4)
    torch.testing.assert_close(w, torch.tensor(5.0 / (1.0 + 1e-4)))
    assert not w.requires_grad
    assert adaptive_weight(a, torch.zeros(2), max_value=10.0) == 10.0


# ------------------------------------------------------------------ adaptive weights vs independent gradients
def _tiny_task(overrides=()):
    from launchers.experiment import load_config
    from models.tasks.vavae import VAVAETask

    cfg = load_config(REPO / "configs/tiny_vavae.yaml", TINY16 + list(overrides))
    dist = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    task = VAVAETask(cfg, dist)
    specs = task.build_models()
    return cfg, task, specs["autoencoder"].module, specs["discriminator"].module


def test_adaptive_weights_equal_ratio_of_gradient_norms():
    cfg, task, ae, disc = _tiny_task(["vavae.loss.disc_start=0", "vavae.loss.kl_weight=0.01"])
    lo, vfc = cfg.vavae.loss, cfg.vavae.vf
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    state = task.generator.get_state()
    loss, m, _ = task.autoencoder_loss(x, ae, disc, step=0)
    loss.backward()
    task_grads = {n: p.grad.clone() for n, p in ae.named_parameters()}
    assert all(p.grad is None for p in disc.parameters())  # the generator term never touches D's grads
    ae.zero_grad(set_to_none=True)

    # Independently: the official formulas, one full backward per term, reading .grad of the two weights.
    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    recon, mean, logvar, z, z_proj = ae(x, generator=g)
    rec = (x - recon).abs() + lo.perceptual_weight * task.lpips(x, recon)
    nll = rec.sum() / x.shape[0]
    kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=[1, 2, 3])).sum() / x.shape[0]
    gen = -disc(recon).mean()
    feats = task.vf_model(x, grid=z_proj.shape[-2:])
    vf = vf_loss(z_proj, feats, cos_margin=vfc.cos_margin, distmat_margin=vfc.distmat_margin).total

    def grad_of(value, weight):
        ae.zero_grad(set_to_none=True)
        disc.zero_grad(set_to_none=True)
        value.backward(retain_graph=True)
        return weight.grad.clone()

    w_dec, w_enc = ae.decoder.conv_out.weight, ae.encoder.conv_out.weight
    d_weight = grad_of(nll, w_dec).norm() / (grad_of(gen, w_dec).norm() + 1e-4) * lo.disc_weight
    vf_weight = grad_of(nll, w_enc).norm() / (grad_of(vf, w_enc).norm() + 1e-4) * vfc.weight
    torch.testing.assert_close(m["d_weight"], d_weight, rtol=1e-4, atol=0)
    torch.testing.assert_close(m["vf_weight"], vf_weight, rtol=1e-4, atol=0)
    torch.testing.assert_close(m["g"], gen.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["nll"], nll.detach(), rtol=1e-5, atol=0)

    # The full objective with those (detached) weights has the task's gradients.
    total = nll + lo.kl_weight * kl + d_weight.detach() * gen + vf_weight.detach() * vf
    torch.testing.assert_close(m["loss"], total.detach(), rtol=1e-5, atol=0)
    ae.zero_grad(set_to_none=True)
    total.backward()
    scale = max(float(g.abs().max()) for g in task_grads.values())  # fp32 summation order differs (GAN surrogate)
    for n, p in ae.named_parameters():
        torch.testing.assert_close(p.grad, task_grads[n], rtol=1e-4, atol=1e-6 * scale, msg=lambda s: f"{n}: {s}")


def test_gan_terms_off_before_disc_start_and_vf_switch():
    cfg, task, ae, disc = _tiny_task(["vavae.loss.disc_start=5"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    _, m, recon = task.autoencoder_loss(x, ae, disc, step=4)
    assert m["disc_factor"] == 0 and m["d_weight"] == 0 and m["g"] == 0
    d_loss, dm = task.discriminator_loss(x, recon, disc, step=4)
    assert d_loss == 0 and d_loss.requires_grad  # zero-gradient Adam steps, as officially
    _, m5, recon5 = task.autoencoder_loss(x, ae, disc, step=5)
    assert m5["disc_factor"] == 1 and m5["d_weight"] > 0
    assert task.discriminator_loss(x, recon5, disc, step=5)[0] > 0
    # VF off: no projection, no DINOv2, no VF metrics.
    _, task_off, ae_off, disc_off = _tiny_task(["vavae.vf.enabled=false"])
    assert task_off.vf_model is None and ae_off.vf_dim is None and not hasattr(ae_off, "linear_proj")
    _, m_off, _ = task_off.autoencoder_loss(x, ae_off, disc_off, step=0)
    assert "vf" not in m_off and "vf_weight" not in m_off


# ---------------------------------------------------------------------------------------------- LPIPS
def test_lpips_layout_local_weights_and_values(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    from models.losses.lpips import vgg16_features

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])  # torchvision's vgg16().features
    assert repr(vgg16_features()) == repr(features)  # our copy is layer-for-layer the same
    vgg_file, lin_file = tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth"
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision file: ignored
    torch.save(sd, vgg_file)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, lin_file)

    lpips = build_lpips(str(vgg_file), str(lin_file), config_key="vavae.lpips")
    keys = lpips.state_dict()
    assert "net.slice1.0.weight" in keys and "net.slice2.5.weight" in keys and "net.slice5.28.weight" in keys
    assert {k for k in keys if k.startswith("lin")} == set(lins) and "scaling_layer.shift" in keys
    assert sum(p.numel() for p in lpips.net.parameters()) == 14_714_688  # VGG16 conv stack
    assert torch.equal(keys["net.slice4.21.weight"], features[21].weight)
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert torch.all(lpips(x, x) == 0)
    d = lpips(x, y)
    assert d.shape == (2, 1, 1, 1) and torch.all(d > 0)
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    # distance(features(x), y) is the same computation with x's features precomputed.
    torch.testing.assert_close(lpips.distance(lpips.features(x), y), d)

    with pytest.raises(FileNotFoundError, match=r"vavae\.lpips\.vgg_weights: not set"):
        build_lpips(None, None, config_key="vavae.lpips")
    with pytest.raises(FileNotFoundError, match=r"vavae\.lpips\.lin_weights: .*nope\.pth does not exist"):
        build_lpips(str(vgg_file), str(tmp_path / "nope.pth"), config_key="vavae.lpips")


# --------------------------------------------------------------------------------------- discriminator
def test_patchgan_layout_and_hinge_loss():
    d = NLayerDiscriminator(3, 64, 3)
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and shapes["main.0.bias"] == (64,)
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes  # BatchNorm: no bias
    assert shapes["main.8.weight"] == (512, 256, 4, 4) and shapes["main.9.running_var"] == (512,)
    assert shapes["main.11.weight"] == (1, 512, 4, 4) and shapes["main.11.bias"] == (1,)
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    real = torch.tensor([2.0, 0.0])
    fake = torch.tensor([-2.0, 0.5])
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.5 + 0.75)))
    torch.testing.assert_close(generator_loss(fake), torch.tensor(0.75))
    # Several inputs: one forward each (BatchNorm statistics per input, as two separate official calls).
    small = NLayerDiscriminator(3, 8, 2)
    a, b = torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)
    la, lb = small(a, b)
    torch.testing.assert_close(la, small(a))
    torch.testing.assert_close(lb, small(b))
    assert la.shape == (2, 1, 2, 2)
    # bf16 parameters (FSDP2 mixed precision) with fp32 running statistics: BatchNorm computes in fp32.
    half = NLayerDiscriminator(3, 8, 2)
    half.load_state_dict(small.state_dict())
    for p in half.parameters():
        p.data = p.data.bfloat16()
    out = half(a)
    assert out.dtype == torch.float32 and half.main[3].running_mean.dtype == torch.float32
    torch.testing.assert_close(out, small(a), atol=0.05, rtol=0.05)


# --------------------------------------------------------------------------------------- DINOv2, config
def test_dinov2_wrapper_grid_normalisation_and_missing_weights(tmp_path):
    from models.dinov2 import DINOv2Features

    kw = dict(model_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2}, random_init=True)
    torch.manual_seed(0)
    official = DINOv2Features("vit_small_patch14_dinov2", grid=(8, 8), **kw)
    torch.manual_seed(0)
    normed = DINOv2Features("vit_small_patch14_dinov2", grid=(8, 8), imagenet_norm=True, **kw)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    f = official(x)
    assert f.shape == (2, 32, 8, 8) and official.input_hw == (112, 112)
    assert official(x, grid=(4, 2)).shape == (2, 32, 4, 2)
    assert not torch.allclose(f, normed(x))  # [-1, 1] (official) vs ImageNet mean/std
    tokens = official.model.forward_features(
        torch.nn.functional.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False)
    )[:, 1:]
    torch.testing.assert_close(f[:, :, 2, 5], tokens[:, 2 * 8 + 5])
    with pytest.raises(FileNotFoundError, match=r"vavae\.vf\.dinov2\.weights: DINOv2 weights file .*missing\.pth"):
        DINOv2Features("vit_small_patch14_dinov2", str(tmp_path / "missing.pth"), config_key="vavae.vf.dinov2")


def test_vavae_config_section_and_stage_configs():
    for stage in (1, 2, 3):
        cfg = load_config(REPO / f"configs/vavae_f16d32_stage{stage}.yaml")
        assert cfg.task == "vavae" and cfg.engine.precision == "fp32" and cfg.vavae.ema_decay is None
        assert cfg.vavae.model.ch_mult == [1, 1, 2, 2, 4] and cfg.vavae.vf.dinov2.imagenet_norm is False
        assert (cfg.vavae.init_from is None) == (stage == 1)
        assert cfg.optimizer.name == "adam" and tuple(cfg.optimizer.betas) == (0.5, 0.9) and cfg.optimizer.lr == 1e-4
    s1, s3 = (load_config(REPO / f"configs/vavae_f16d32_stage{i}.yaml") for i in (1, 3))
    assert (s1.vavae.vf.weight, s1.vavae.vf.cos_margin, s1.vavae.vf.distmat_margin) == (0.5, 0.0, 0.0)
    assert (s3.vavae.vf.weight, s3.vavae.vf.cos_margin, s3.vavae.vf.distmat_margin) == (0.1, 0.5, 0.25)
    assert s3.vavae.loss.disc_start == 1

    tiny = REPO / "configs/tiny_vavae.yaml"
    with pytest.raises(ConfigError, match=r"data\.path: set the MDS dataset directory"):
        load_config(tiny, ["data.kind=streaming"])  # images (+ DINOv2 features) in MDS shards
    with pytest.raises(ConfigError, match=r"vavae\.vf\.dinov2\.weights: not set"):
        load_config(tiny, ["vavae.vf.dinov2.random_init=false"])
    # The discriminator may have its own learning rate (the trainer schedules each part from its own base LR).
    assert load_config(tiny, ["vavae.disc_optimizer.lr=0.1"]).vavae.disc_optimizer.lr == 0.1
    with pytest.raises(ConfigError, match=r"vavae\.disc_optimizer\.lr: must be > 0"):
        load_config(tiny, ["vavae.disc_optimizer.lr=0"])
    with pytest.raises(ConfigError, match=r"data\.image_size: image size 31 is not divisible"):
        load_config(tiny, ["data.image_size=31"])
