"""LightningDiT: official state-dict layout, hand-checkable numerics, CFG, compile, FLOP count (CPU, fast)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models.lightningdit import (
    LightningDiT,
    LightningDiT_models,
    ModelConfig,
    apply_rope,
    build_model,
    flops_per_image,
    get_2d_sincos_pos_embed,
    rope_tables,
    timestep_embedding,
)

# Keys, shapes and kinds of the released checkpoints (a copy in the repository: the test never skips).
TSV = Path(__file__).resolve().parents[1] / "data" / "lightningdit_xl1_state_dict.tsv"
RELEASED = dict(input_size=16, in_channels=32, use_swiglu=True, use_rope=True, use_rmsnorm=True)
TINY = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def tiny(**kw) -> LightningDiT:
    args = dict(TINY, use_swiglu=True, use_rope=True, use_rmsnorm=True)
    args.update(kw)
    return LightningDiT(**args)


def randomize(model: nn.Module, std: float = 0.1) -> nn.Module:
    """Non-zero weights everywhere (the official init zeroes adaLN and the output layer)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, std)
    return model


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------


def _read_tsv(depth: int = 28) -> dict[str, tuple[tuple[int, ...], str]]:
    rows: dict[str, tuple[tuple[int, ...], str]] = {}
    for line in TSV.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, kind = line.split("\t")
        shape_t = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
        if key.startswith("blocks.0."):  # "blocks.0 stands for blocks.0 .. blocks.27"
            for i in range(depth):
                rows[f"blocks.{i}." + key[len("blocks.0.") :]] = (shape_t, kind)
        else:
            rows[key] = (shape_t, kind)
    return rows


def test_xl1_state_dict_matches_official_tsv():
    ref = _read_tsv()
    assert len(ref) == 351
    with torch.device("meta"):
        model = LightningDiT_models["LightningDiT-XL/1"](**RELEASED)
    sd = model.state_dict()
    assert set(sd) == set(ref)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: s for k, (s, _) in ref.items()}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for key, (_, kind) in ref.items():
        if kind == "buffer":
            assert key in buffers and key not in params, key
        elif kind == "frozen-param":
            assert key in params and not params[key].requires_grad, key
        else:
            assert kind == "param" and key in params and params[key].requires_grad, key
    assert n_params(model) == 675_256_736
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 674_961_824


@pytest.mark.parametrize(
    "name,millions",
    [
        ("LightningDiT-XL/2", 675.26),
        ("LightningDiT-B/2", 130.56),
        ("LightningDiT-B/1", 130.56),
        ("LightningDiT-L/2", 458.15),
        ("LightningDiT-1p0B/1", 1029.40),
        ("LightningDiT-1p6B/2", 1631.77),
    ],
)
def test_registry_param_counts(name, millions):
    with torch.device("meta"):
        model = LightningDiT_models[name](**RELEASED)
    assert round(n_params(model) / 1e6, 2) == millions


def test_plain_dit_variant_layout():
    with torch.device("meta"):
        model = LightningDiT_models["LightningDiT-XL/1"](input_size=16, in_channels=32)
    assert round(n_params(model) / 1e6, 2) == 675.15
    sd = model.state_dict()
    assert "blocks.0.mlp.fc1.weight" in sd and "blocks.0.mlp.fc2.weight" in sd
    assert not any(".norm" in k for k in sd) and "feat_rope.freqs_cos" not in sd
    with torch.device("meta"):
        qk = LightningDiT_models["LightningDiT-XL/1"](**RELEASED, use_qknorm=True, wo_shift=True)
    sd = qk.state_dict()
    assert sd["blocks.3.attn.q_norm.weight"].shape == (72,) and sd["blocks.3.attn.k_norm.weight"].shape == (72,)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (4608, 1152)


def test_swiglu_hidden_size():
    for name, hidden in [("LightningDiT-XL/1", 3072), ("LightningDiT-B/1", 2048), ("LightningDiT-L/2", 2730)]:
        with torch.device("meta"):
            model = LightningDiT_models[name](**RELEASED)
        assert model.blocks[0].mlp.w3.in_features == hidden
        assert model.blocks[0].mlp.w12.out_features == 2 * hidden


def test_meta_build_then_materialise():
    torch.manual_seed(0)
    ref = tiny()
    with torch.device("meta"):
        model = tiny()
    assert model.pos_embed.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    torch.testing.assert_close(model.pos_embed, ref.pos_embed, rtol=0, atol=0)
    torch.testing.assert_close(model.feat_rope.freqs_cos, ref.feat_rope.freqs_cos, rtol=0, atol=0)
    torch.testing.assert_close(model.feat_rope.freqs_sin, ref.feat_rope.freqs_sin, rtol=0, atol=0)
    assert torch.count_nonzero(model.blocks[0].adaLN_modulation[1].weight) == 0
    assert torch.all(model.blocks[0].norm1.weight == 1)
    assert model.blocks[0].attn.qkv.weight.std() > 0


# --------------------------------------------------------------------------------------------------
# Numerics of the pieces
# --------------------------------------------------------------------------------------------------


def test_timestep_embedding_raw_t_cos_first():
    t = torch.tensor([0.0, 0.5])
    emb = timestep_embedding(t, 256)
    assert emb.shape == (2, 256)
    f1 = math.exp(-math.log(10000) / 128)
    assert emb[1, 0].item() == pytest.approx(math.cos(0.5))
    assert emb[1, 1].item() == pytest.approx(math.cos(0.5 * f1))
    assert emb[1, 128].item() == pytest.approx(math.sin(0.5))
    assert emb[1, 129].item() == pytest.approx(math.sin(0.5 * f1))
    assert torch.all(emb[0, :128] == 1) and torch.all(emb[0, 128:] == 0)


def test_rope_table_and_rotation():
    # head_dim 8 -> dim 4 -> frequencies (1, 10000^-0.5 = 0.01), each repeated twice; [row | col]
    cos, sin = rope_tables(head_dim=8, grid_size=4)
    assert cos.shape == (16, 8)
    h, w = 2, 3
    angles = torch.tensor([h, h, 0.01 * h, 0.01 * h, w, w, 0.01 * w, 0.01 * w], dtype=torch.float32)
    torch.testing.assert_close(cos[h * 4 + w], angles.cos())
    torch.testing.assert_close(sin[h * 4 + w], angles.sin())
    # interleaved pairs: e0 rotates into (cos h, sin h); e4 (column half) into (cos w, sin w)
    x = torch.zeros(1, 1, 16, 8)
    x[..., 0] = 1.0
    x[..., 4] = 2.0
    out = apply_rope(x, cos, sin)[0, 0, h * 4 + w]
    expect = torch.tensor([math.cos(h), math.sin(h), 0, 0, 2 * math.cos(w), 2 * math.sin(w), 0, 0])
    torch.testing.assert_close(out, expect)
    # the model's buffers are exactly these tables
    model = tiny()
    c16, s16 = rope_tables(16, 4)
    assert torch.equal(model.feat_rope.freqs_cos, c16) and torch.equal(model.feat_rope.freqs_sin, s16)


def test_pos_embed_first_half_is_column():
    D, G = 16, 4
    pe = get_2d_sincos_pos_embed(D, G)
    assert pe.shape == (G * G, D)
    h, w = 1, 3
    row = pe[h * G + w]
    assert row[0].item() == pytest.approx(math.sin(w))  # column, sin part, omega_0 = 1
    assert row[D // 4].item() == pytest.approx(math.cos(w))  # column, cos part
    assert row[D // 2].item() == pytest.approx(math.sin(h))  # row
    assert row[3 * D // 4].item() == pytest.approx(math.cos(h))
    assert row[1].item() == pytest.approx(math.sin(w * 10000 ** (-1 / 4)))
    model = tiny()
    assert torch.equal(model.pos_embed[0], get_2d_sincos_pos_embed(64, 4))
    assert not model.pos_embed.requires_grad


def test_zero_init_output_and_learn_sigma():
    torch.manual_seed(0)
    model = tiny().eval()
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 2])
    assert torch.count_nonzero(model(x, t, y)) == 0
    ls = tiny(learn_sigma=True).eval()
    assert ls.final_layer.linear.out_features == 8
    with torch.no_grad():
        ls.final_layer.linear.bias.copy_(torch.tensor([1.0] * 4 + [2.0] * 4))  # p=1: channels in order
    out = ls(x, t, y)
    assert out.shape == (2, 4, 4, 4) and torch.all(out == 1.0)  # first half returned, as official


@pytest.mark.parametrize("wo_shift", [False, True])
def test_adaln_chunk_order(wo_shift):
    D = 8
    model = tiny(hidden_size=D, num_heads=2, use_rope=False, wo_shift=wo_shift, depth=1)
    block = model.blocks[0]

    class AttnId(nn.Module):
        def forward(self, x, cos=None, sin=None):
            return x

    block.attn, block.mlp = AttnId(), nn.Identity()
    vals = {"shift_msa": 0.1, "scale_msa": 0.2, "gate_msa": 0.3, "shift_mlp": -0.4, "scale_mlp": 0.5, "gate_mlp": 0.7}
    order = (
        ["scale_msa", "gate_msa", "scale_mlp", "gate_mlp"]
        if wo_shift
        else ["shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp"]
    )
    with torch.no_grad():
        lin = block.adaLN_modulation[1]
        lin.weight.zero_()
        lin.bias.copy_(torch.cat([torch.full((D,), vals[n]) for n in order]))
    if wo_shift:
        vals["shift_msa"] = vals["shift_mlp"] = 0.0
    x = torch.randn(2, 3, D)
    c = torch.randn(2, D)

    def rms(v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)

    x1 = x + vals["gate_msa"] * (rms(x) * (1 + vals["scale_msa"]) + vals["shift_msa"])
    x2 = x1 + vals["gate_mlp"] * (rms(x1) * (1 + vals["scale_mlp"]) + vals["shift_mlp"])
    torch.testing.assert_close(block(x, c), x2)


def test_label_dropout_uses_null_class_in_training():
    torch.manual_seed(0)
    model = randomize(tiny(class_dropout_prob=1.0))
    x, t = torch.randn(2, 4, 4, 4), torch.rand(2)
    y = torch.tensor([1, 2])
    null = torch.full((2,), 10)
    model.eval()
    ref_null, ref_cond = model(x, t, null), model(x, t, y)
    model.train()
    torch.testing.assert_close(model(x, t, y), ref_null)
    assert not torch.allclose(ref_cond, ref_null)
    assert model.y_embedder.embedding_table.num_embeddings == 11
    assert tiny(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10  # official: no null row


def test_checkpointing_matches_plain():
    torch.manual_seed(0)
    a = randomize(tiny()).eval()
    b = tiny(use_checkpoint=True).eval()
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 2])
    oa, ob = a(x, t, y), b(x, t, y)
    torch.testing.assert_close(oa, ob)
    oa.square().sum().backward()
    ob.square().sum().backward()
    torch.testing.assert_close(a.blocks[0].attn.qkv.weight.grad, b.blocks[0].attn.qkv.weight.grad)


# --------------------------------------------------------------------------------------------------
# CFG
# --------------------------------------------------------------------------------------------------


def test_forward_with_cfg_three_channels_and_interval():
    torch.manual_seed(0)
    model = randomize(tiny()).eval()
    n, s = 2, 4.0
    z = torch.randn(n, 4, 4, 4)
    x = torch.cat([z, torch.randn_like(z)])  # second half is ignored (model runs on [z, z])
    labels, null = torch.tensor([3, 7]), torch.full((n,), 10)
    t_half = torch.tensor([0.05, 0.6])
    t = torch.cat([t_half, t_half])
    y = torch.cat([labels, null])
    with torch.no_grad():
        cond, uncond = model(z, t_half, labels), model(z, t_half, null)
        guided = uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3])
        out = model.forward_with_cfg(x, t, y, s)
        assert out.shape == (2 * n, 4, 4, 4)
        torch.testing.assert_close(out[:n, :3], guided, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[n:, :3], guided, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:n, 3:], cond[:, 3:], atol=1e-5, rtol=1e-5)  # no CFG past channel 2
        torch.testing.assert_close(out[n:, 3:], uncond[:, 3:], atol=1e-5, rtol=1e-5)
        # interval: guidance off where t < start (sample 0: t=0.05), on elsewhere (sample 1: t=0.6)
        out_i = model.forward_with_cfg(x, t, y, s, cfg_interval=True, cfg_interval_start=0.1)
        torch.testing.assert_close(out_i[0, :3], cond[0, :3], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_i[n, :3], cond[0, :3], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_i[1, :3], guided[1], atol=1e-5, rtol=1e-5)
        # cfg_interval=False ignores the start
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, s, False, 0.9), out)


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def test_build_model_from_config():
    cfg = ModelConfig(
        type="custom",
        input_size=4,
        in_channels=4,
        hidden_size=64,
        depth=2,
        num_heads=4,
        patch_size=2,
        mlp_ratio=2.0,
        num_classes=10,
    )
    m = build_model(cfg)
    assert (m.hidden_size, m.depth, m.num_heads, m.patch_size, m.mlp_ratio) == (64, 2, 4, 2, 2.0)
    assert m.use_swiglu and m.use_rope and m.use_rmsnorm and m.num_patches == 4
    with torch.device("meta"):
        xl = build_model(ModelConfig())  # registry name: custom fields ignored
    assert (xl.hidden_size, xl.depth, xl.patch_size, xl.in_channels, xl.num_patches) == (1152, 28, 1, 32, 256)
    assert n_params(xl) == 675_256_736
    assert flops_per_image(ModelConfig(), training=False) == xl.flops_per_image(False)
    with pytest.raises(ValueError) as err:
        build_model(ModelConfig(type="LightningDiT-XL1"))
    msg = str(err.value)
    assert "Did you mean 'LightningDiT-XL/1'" in msg and "LightningDiT-1p6B/2" in msg and "custom" in msg


# --------------------------------------------------------------------------------------------------
# FLOPs (torch.compile + Inductor: integration/test_lightningdit_compile.py)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant", [dict(), dict(use_swiglu=False, use_rmsnorm=False, wo_shift=True, learn_sigma=True)]
)
def test_flops_per_image_matches_flop_counter(variant):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = randomize(tiny(**variant))
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([1, 2, 3])
    # the math SDPA backend decomposes into matmuls the counter sees (the CPU fused kernel is not counted)
    with sdpa_kernel(SDPBackend.MATH):
        model.eval()
        with FlopCounterMode(display=False) as fc:
            with torch.no_grad():
                model(x, t, y)
        assert fc.get_total_flops() == pytest.approx(3 * model.flops_per_image(training=False), rel=0.02)
        model.train()
        with FlopCounterMode(display=False) as fc:
            model(x, t, y).square().mean().backward()
        assert fc.get_total_flops() == pytest.approx(3 * model.flops_per_image(training=True), rel=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (host-sync detection is CUDA-only)")
def test_cuda_forward_has_no_host_sync():
    torch.manual_seed(0)
    model = randomize(tiny()).cuda().train()
    x = torch.randn(2, 4, 4, 4, device="cuda")
    t, y = torch.rand(4, device="cuda"), torch.tensor([1, 2, 10, 10], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, t[:2], y[:2]).float().square().mean().backward()
            model.eval()
            with torch.no_grad():
                model.forward_with_cfg(torch.cat([x, x]), t, y, 4.0, True, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
