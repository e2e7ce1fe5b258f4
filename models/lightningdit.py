"""LightningDiT (arXiv 2501.01423): a DiT with SwiGLU, RMSNorm, 2D RoPE and optional qk-norm.

State-dict compatible with the official hustvl/LightningDiT checkpoints (same module names, shapes,
persistent buffers and frozen ``pos_embed`` parameter) and numerically equivalent to the official
forward pass. Written from the official code (hustvl/LightningDiT @ 2725fed4) and the paper.

Design points that differ from the official file (behaviour is the same):

* No ``torch.compile`` decorators. FSDP2 ``fully_shard``, activation checkpointing and ``torch.compile``
  are applied per block from outside (``model.blocks`` is an ``nn.ModuleList``); a block's forward takes
  tensors only: ``block(x, c, rope_cos, rope_sin)`` (the RoPE tables are ``None`` without RoPE).
* No host/device syncs in ``forward``/``forward_with_cfg``: the CFG interval uses ``torch.where`` on ``t``.
* Built with fixed tables computed in torch (no numpy), so the model builds on the ``meta`` device;
  ``init_weights()`` re-initialises everything (including ``pos_embed`` and the RoPE tables) after
  ``to_empty``.
* ``use_checkpoint=True`` uses ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``
  (official: reentrant) and is skipped when autograd is off.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from core.config import Checks

__all__ = [
    "ModelConfig",
    "CUSTOM_MODEL_TYPE",
    "check_model_config",
    "LightningDiT",
    "LightningDiTBlock",
    "LightningDiT_models",
    "build_model",
    "model_kwargs_from_config",
    "flops_per_image",
    "get_2d_sincos_pos_embed",
    "rope_tables",
    "apply_rope",
    "timestep_embedding",
]

CUSTOM_MODEL_TYPE = "custom"  # model.type for a free-form model (hidden_size/depth/... are used)


@dataclass
class ModelConfig:
    """LightningDiT architecture (official keyword names)."""

    type: str = "LightningDiT-XL/1"  # registry name (LightningDiT_models) or "custom"
    input_size: int = 16  # latent grid (image_size / tokenizer downsampling)
    in_channels: int = 32
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    use_qknorm: bool = False
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    wo_shift: bool = False
    # Only for the "custom" type (tiny test / demo models); ignored for registry names.
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    patch_size: int = 1
    mlp_ratio: float = 4.0
    init_from: Optional[str] = None  # path of a checkpoint to initialise weights from (ours or official)


# ---------------------------------------------------------------------------------------------------
# Fixed tables (computed in torch on the CPU; copied into the parameter / buffers)
# ---------------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE 1D sin-cos table: ``[sin(pos*w_k), cos(pos*w_k)]``, ``w_k = 10000^(-k/(dim/2))``; float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device="cpu") / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """2D sin-cos position table of shape ``(grid_size**2, embed_dim)`` (float32, CPU).

    Tokens are in row-major (row h, column w) order. As in the MAE/DiT function (meshgrid with w
    first), the **first half of the channels encodes the column index w** and the second half the row h.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos pos_embed needs hidden_size % 4 == 0, got {embed_dim}")
    idx = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    col = idx[None, :].expand(grid_size, grid_size)  # [h, w] -> w
    row = idx[:, None].expand(grid_size, grid_size)  # [h, w] -> h
    emb = torch.cat([_sincos_1d(embed_dim // 2, col), _sincos_1d(embed_dim // 2, row)], dim=1)
    return emb.to(torch.float32)


def rope_tables(head_dim: int, grid_size: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-02 ``VisionRotaryEmbeddingFast`` tables, shape ``(grid_size**2, head_dim)`` each (float32, CPU).

    Built with ``dim = head_dim // 2``: frequencies ``theta^(-2i/dim)`` for ``i < dim/2``, each repeated
    twice (interleaved pairs); positions are ``arange(L)/L*L`` (float32, as the official code); the angle
    vector of a token at (h, w) is ``[h * freqs (dim) | w * freqs (dim)]``, flattened row-major.
    """
    dim = head_dim // 2
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim % 4 == 0, got head_dim={head_dim}")
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device="cpu")[: dim // 2].float() / dim))
    pos = torch.arange(grid_size, device="cpu") / grid_size * grid_size
    f = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # (L, dim)
    L = grid_size
    full = torch.cat([f[:, None, :].expand(L, L, dim), f[None, :, :].expand(L, L, dim)], dim=-1)
    full = full.reshape(L * L, 2 * dim)
    return full.cos(), full.sin()


def rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`` (adjacent pairs, GPT-J style)."""
    pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = pairs.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x*cos + rotate_half(x)*sin`` over the last dim (all channels), computed in the promoted dtype
    (fp32 tables) and cast back to ``x.dtype``. ``x``: (B, H, T, head_dim); ``cos``/``sin``: (T, head_dim)."""
    out = x * cos + rotate_half_interleaved(x) * sin
    return out.to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of raw ``t`` (no x1000 scaling), **cos first**: ``[cos(t*f_k), sin(t*f_k)]``
    with ``f_k = exp(-ln(max_period) * k / (dim/2))``, k < dim/2. Output float32 ``(N, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _fill_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a full CPU table into a parameter/buffer; no-op on meta; handles FSDP2 DTensor shards."""
    if dst.is_meta:
        return
    with torch.no_grad():
        if isinstance(dst, DTensor):
            local = dst.to_local()
            src = distribute_tensor(src.to(device=local.device, dtype=dst.dtype), dst.device_mesh, dst.placements)
        else:
            src = src.to(device=dst.device, dtype=dst.dtype)
        dst.copy_(src)


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """``x*(1+scale) + shift`` with per-sample (N, D) shift/scale broadcast over tokens."""
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps)`` computed in fp32, cast back to ``x.dtype``, times a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class PatchEmbed(nn.Module):
    """Conv patchify (kernel = stride = p) to row-major tokens; same keys as timm ``PatchEmbed``."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input spatial size {tuple(x.shape[-2:])} != model input_size {self.img_size}")
        x = self.proj(x.to(self.proj.weight.dtype))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """timm-style MLP (``fc1``, GELU(tanh), ``fc2``); no dropout."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """``w3(silu(x1) * x2)`` with ``(x1, x2) = w12(x).chunk(2)``."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=True)
        self.w3 = nn.Linear(hidden_features, in_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Attention(nn.Module):
    """MHSA: qkv Linear (bias) -> optional per-head qk-norm -> RoPE on q, k -> SDPA -> proj."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim) if use_rmsnorm else nn.LayerNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim) if use_rmsnorm else nn.LayerNorm(self.head_dim)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(
        self, x: torch.Tensor, rope_cos: Optional[torch.Tensor] = None, rope_sin: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope_cos is not None:
            q = apply_rope(q, rope_cos, rope_sin)
            k = apply_rope(k, rope_cos, rope_sin)
        if q.dtype != v.dtype:  # fp32 qk-norm weights with low-precision activations
            q, k = q.to(v.dtype), k.to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TimestepEmbedder(nn.Module):
    """Raw t in [0, 1] -> 256 sinusoidal features (cos first) -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with a null row (index ``num_classes``) when ``dropout_prob > 0``; in training
    each label is replaced by the null class with probability ``dropout_prob`` (``torch.rand``)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class LightningDiTBlock(nn.Module):
    """Pre-norm adaLN block. ``forward(x, c, rope_cos, rope_sin)`` takes tensors only (or ``None``).

    adaLN chunks: ``(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)``;
    with ``wo_shift``: ``(scale_msa, gate_msa, scale_mlp, gate_mlp)``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        use_qknorm: bool = False,
        use_swiglu: bool = False,
        use_rmsnorm: bool = False,
        wo_shift: bool = False,
    ):
        super().__init__()
        if use_rmsnorm:
            self.norm1 = RMSNorm(hidden_size)
            self.norm2 = RMSNorm(hidden_size)
        else:
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        if use_swiglu:
            self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden_dim))
        else:
            self.mlp = Mlp(hidden_size, mlp_hidden_dim)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size, bias=True)
        )

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope_cos: Optional[torch.Tensor] = None,
        rope_sin: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        mod = self.adaLN_modulation(c)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope_cos, rope_sin)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> norm_final -> modulate -> Linear(D, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = False):
        super().__init__()
        if use_rmsnorm:
            self.norm_final = RMSNorm(hidden_size)
        else:
            self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class VisionRotaryEmbeddingFast(nn.Module):
    """Holds the persistent 2D RoPE tables ``freqs_cos``/``freqs_sin`` of shape (T, head_dim)."""

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"use_rope needs head_dim (hidden_size/num_heads) % 4 == 0, got {head_dim}")
        self.head_dim = head_dim
        self.grid_size = grid_size
        self.theta = theta
        T = grid_size * grid_size
        self.register_buffer("freqs_cos", torch.zeros(T, head_dim), persistent=True)
        self.register_buffer("freqs_sin", torch.zeros(T, head_dim), persistent=True)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        cos, sin = rope_tables(self.head_dim, self.grid_size, self.theta)
        _fill_(self.freqs_cos, cos)
        _fill_(self.freqs_sin, sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, self.freqs_cos, self.freqs_sin)


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


class LightningDiT(nn.Module):
    """LightningDiT backbone. ``forward(x, t, y)``: x (N, C, H, W), raw t (N,) in [0, 1] (t=0 noise,
    t=1 data), y (N,) int labels; returns the velocity (N, C, H, W).

    With ``learn_sigma`` the final layer predicts ``2*C`` channels and ``forward`` returns **only the
    first C** (the official code does ``x, _ = x.chunk(2, dim=1)``), so outputs always have C channels.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        use_qknorm: bool = False,
        use_swiglu: bool = False,
        use_rope: bool = False,
        use_rmsnorm: bool = False,
        wo_shift: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.use_qknorm = use_qknorm
        self.use_swiglu = use_swiglu
        self.use_rope = use_rope
        self.use_rmsnorm = use_rmsnorm
        self.wo_shift = wo_shift
        self.use_checkpoint = use_checkpoint

        # Registration order follows the official model (same RNG consumption at construction).
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.grid_size = input_size // patch_size
        self.num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        if use_rope:
            self.feat_rope = VisionRotaryEmbeddingFast(self.head_dim, self.grid_size)
        else:
            self.feat_rope = None
        self.blocks = nn.ModuleList(
            [
                LightningDiTBlock(
                    hidden_size,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    use_qknorm=use_qknorm,
                    use_swiglu=use_swiglu,
                    use_rmsnorm=use_rmsnorm,
                    wo_shift=wo_shift,
                )
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm=use_rmsnorm)
        self.init_weights()

    # -- initialisation --------------------------------------------------------------------------

    def init_buffers(self) -> None:
        """(Re)compute the fixed tables: the frozen sin-cos ``pos_embed`` and the RoPE buffers."""
        _fill_(self.pos_embed, get_2d_sincos_pos_embed(self.hidden_size, self.grid_size).unsqueeze(0))
        if self.feat_rope is not None:
            self.feat_rope.reset_buffers()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official initialisation (facts §1.5); safe to call after ``to_empty`` on a meta-built model.

        All Linear: xavier_uniform weight, zero bias. Patch conv: xavier_uniform on its (D, C*p*p) view,
        zero bias. Label table N(0, 0.02); t-MLP weights N(0, 0.02). adaLN last Linear of every block and
        of the final layer, and the final ``linear``: zero. Norm weights 1. pos_embed / RoPE: the tables.
        """
        for m in self.modules():  # same relative order of Linear layers as nn.Module.apply
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.reset_parameters()
        self.init_buffers()
        w = self.x_embedder.proj.weight
        fan_out, fan_in = w.shape[0], math.prod(w.shape[1:])
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier_uniform on the (D, C*p*p) view
        w.uniform_(-bound, bound)
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    initialize_weights = init_weights  # official name

    # -- forward ---------------------------------------------------------------------------------

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W) via (n, h, w, p, q, c) -> (n, c, h, p, w, q)."""
        c, p, h = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def rope(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.feat_rope is None:
            return None, None
        return self.feat_rope.freqs_cos, self.feat_rope.freqs_sin

    repa_depth: Optional[int] = None  # set with the `repa_projector` submodule by models/repa.py:attach_repa

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_repa: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The velocity (N, C, H, W); with ``return_repa`` also the REPA projection (N, T, z_dim) of the tokens after
        block ``repa_depth`` (models/repa.py; run inside this forward so that engines see the projector's use)."""
        if return_repa and self.repa_depth is None:
            raise ValueError("return_repa=True needs a REPA projector (models.repa.attach_repa)")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        rope_cos, rope_sin = self.rope()
        ckpt = self.use_checkpoint and torch.is_grad_enabled()
        tokens = None
        for i, block in enumerate(self.blocks):
            if ckpt:
                x = checkpoint(block, x, c, rope_cos, rope_sin, use_reentrant=False)
            else:
                x = block(x, c, rope_cos, rope_sin)
            if return_repa and i + 1 == self.repa_depth:
                tokens = x
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        x = self.unpatchify(x)  # (N, C_out, H, W)
        if self.learn_sigma:
            x = x[:, : self.in_channels]
        if return_repa:  # cloned: the Linear's 3-D output is a view, which FSDP2 warns about as a module output
            return x, self.repa_projector(tokens).clone()
        return x

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        cfg_interval: bool = False,
        cfg_interval_start: float = 0.0,
    ) -> torch.Tensor:
        """Classifier-free guidance on a doubled batch, official semantics.

        ``x`` = [z; z'] (only the first half is used: the model runs on [z; z]), ``y`` = [labels; null],
        ``t`` of length 2N. Guidance ``uncond + s*(cond - uncond)`` is applied to **channels 0..2 only**
        (DiT legacy); other channels keep the raw model output (cond in the first half, uncond in the
        second). With ``cfg_interval``, samples whose ``t < cfg_interval_start`` use the conditional
        prediction (official: decided by ``t[0]`` for the whole batch; here per sample with
        ``torch.where``, identical when all t are equal, and without a host sync). Returns (2N, C, H, W)
        with the guided channels duplicated in both halves.
        """
        n = x.shape[0] // 2
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        half = x[:n]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = eps[:n], eps[n:]
        guided = uncond + cfg_scale * (cond - uncond)
        if cfg_interval:
            off = (t[:n] < cfg_interval_start).reshape(n, 1, 1, 1)
            guided = torch.where(off, cond, guided)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

    # -- accounting ------------------------------------------------------------------------------

    def mlp_hidden_features(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        return int(2 / 3 * hidden) if self.use_swiglu else hidden

    def flops_per_image(self, training: bool = True) -> int:
        """Matmul + attention FLOPs for one image (2 FLOPs per multiply-add); ``training`` = 3x forward.

        With T = (input_size/p)^2 tokens, D = hidden, F = MLP hidden (int(2/3*int(r*D)) for SwiGLU,
        int(r*D) otherwise), C = in_channels, C_out = out_channels, L = depth, and A = 6 (4 if wo_shift):

            patch embed   2*T*D*C*p^2
            t embedder    2*(256*D + D*D)                (per image, not per token)
            per block     2*D*A*D                        adaLN (per image)
                          + 2*T*D*3D + 2*T*D*D           qkv, proj
                          + 4*T^2*D                      QK^T and AV (all heads)
                          + 2*T*D*2F + 2*T*F*D  (SwiGLU: w12, w3)  or  4*T*D*F (fc1, fc2)
            final layer   2*D*2D + 2*T*D*p^2*C_out

        Element-wise work (norms, modulation, softmax, RoPE, activations) and the embedding lookup are
        not counted; this matches ``torch.utils.flop_counter.FlopCounterMode`` on the forward pass.
        Training counts backward as 2x forward (total 3x), the usual MFU convention.
        """
        T, D, L = self.num_patches, self.hidden_size, self.depth
        Fh, p, C = self.mlp_hidden_features(), self.patch_size, self.in_channels
        A = 4 if self.wo_shift else 6
        mlp = (2 * T * D * 2 * Fh + 2 * T * Fh * D) if self.use_swiglu else 4 * T * D * Fh
        block = 2 * D * A * D + 2 * T * D * 3 * D + 2 * T * D * D + 4 * T * T * D + mlp
        fwd = (
            2 * T * D * C * p * p
            + 2 * (self.t_embedder.frequency_embedding_size * D + D * D)
            + L * block
            + 2 * D * 2 * D
            + 2 * T * D * p * p * self.out_channels
        )
        return 3 * fwd if training else fwd


# ---------------------------------------------------------------------------------------------------
# Registry and builders
# ---------------------------------------------------------------------------------------------------


def _factory(depth: int, hidden_size: int, patch_size: int, num_heads: int) -> Callable[..., LightningDiT]:
    def make(**kwargs) -> LightningDiT:
        return LightningDiT(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, **kwargs)

    return make


LightningDiT_B_1 = _factory(12, 768, 1, 12)
LightningDiT_B_2 = _factory(12, 768, 2, 12)
LightningDiT_L_2 = _factory(24, 1024, 2, 16)
LightningDiT_XL_1 = _factory(28, 1152, 1, 16)
LightningDiT_XL_2 = _factory(28, 1152, 2, 16)
LightningDiT_1p0B_1 = _factory(24, 1536, 1, 24)
LightningDiT_1p0B_2 = _factory(24, 1536, 2, 24)
LightningDiT_1p6B_1 = _factory(28, 1792, 1, 28)
LightningDiT_1p6B_2 = _factory(28, 1792, 2, 28)

LightningDiT_models: dict[str, Callable[..., LightningDiT]] = {
    "LightningDiT-B/1": LightningDiT_B_1,
    "LightningDiT-B/2": LightningDiT_B_2,
    "LightningDiT-L/2": LightningDiT_L_2,
    "LightningDiT-XL/1": LightningDiT_XL_1,
    "LightningDiT-XL/2": LightningDiT_XL_2,
    "LightningDiT-1p0B/1": LightningDiT_1p0B_1,
    "LightningDiT-1p0B/2": LightningDiT_1p0B_2,
    "LightningDiT-1p6B/1": LightningDiT_1p6B_1,
    "LightningDiT-1p6B/2": LightningDiT_1p6B_2,
}

_COMMON_FIELDS = (
    "input_size",
    "in_channels",
    "num_classes",
    "class_dropout_prob",
    "learn_sigma",
    "use_qknorm",
    "use_swiglu",
    "use_rope",
    "use_rmsnorm",
    "wo_shift",
)
_CUSTOM_FIELDS = ("hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio")


def _check_type(name: str) -> None:
    if name == "custom" or name in LightningDiT_models:
        return
    valid = ["custom", *LightningDiT_models]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown model type {name!r}.{hint} Valid types: {', '.join(valid)}")


def check_model_config(m: ModelConfig, checks: Checks) -> None:
    """Value checks of the ``model`` section: a registry name (or "custom" with a consistent architecture) and
    positive sizes."""
    if m.type == CUSTOM_MODEL_TYPE:
        for k in ("hidden_size", "depth", "num_heads", "patch_size"):
            checks.positive(getattr(m, k), f"model.{k}")
        checks.positive(m.mlp_ratio, "model.mlp_ratio")
        if m.hidden_size > 0 and m.num_heads > 0:
            checks.need(
                m.hidden_size % m.num_heads == 0,
                "model.hidden_size",
                f"hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}",
                ("model.num_heads",),
            )
        if m.patch_size > 0 and m.input_size > 0:
            checks.need(
                m.input_size % m.patch_size == 0,
                "model.input_size",
                f"input_size {m.input_size} is not divisible by patch_size {m.patch_size}",
                ("model.patch_size",),
            )
    elif m.type not in LightningDiT_models:
        names = sorted(LightningDiT_models) + [CUSTOM_MODEL_TYPE]
        close = difflib.get_close_matches(m.type, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        checks.need(False, "model.type", f"unknown model {m.type!r}{hint} (known: {', '.join(names)})")
    checks.positive(m.input_size, "model.input_size")
    checks.positive(m.in_channels, "model.in_channels")
    checks.positive(m.num_classes, "model.num_classes")
    checks.unit(m.class_dropout_prob, "model.class_dropout_prob")


def model_kwargs_from_config(cfg: ModelConfig) -> tuple[str, dict]:
    """(type, constructor kwargs) for a ``ModelConfig``; raises ValueError on an unknown type."""
    _check_type(cfg.type)
    kwargs = {k: getattr(cfg, k) for k in _COMMON_FIELDS}
    if cfg.type == "custom":
        kwargs.update({k: getattr(cfg, k) for k in _CUSTOM_FIELDS})
    return cfg.type, kwargs


def build_model(cfg: ModelConfig, **overrides) -> LightningDiT:
    """Build a LightningDiT from ``ModelConfig``. ``type`` is a registry name (architecture from the
    registry; hidden_size/depth/num_heads/patch_size/mlp_ratio in the config are ignored) or ``"custom"``
    (architecture from the config). Weights are freshly initialised (``cfg.init_from`` is not read here).
    ``overrides`` go to the constructor (e.g. ``use_checkpoint=True``). Works under ``torch.device('meta')``."""
    name, kwargs = model_kwargs_from_config(cfg)
    kwargs.update(overrides)
    if name == "custom":
        return LightningDiT(**kwargs)
    return LightningDiT_models[name](**kwargs)


def flops_per_image(model_or_cfg: Union[LightningDiT, ModelConfig], training: bool = True) -> int:
    """``LightningDiT.flops_per_image`` for a model or a ``ModelConfig`` (built on the meta device)."""
    if isinstance(model_or_cfg, LightningDiT):
        return model_or_cfg.flops_per_image(training)
    inner = getattr(model_or_cfg, "_orig_mod", None) or getattr(model_or_cfg, "module", None)
    if isinstance(inner, LightningDiT):
        return inner.flops_per_image(training)
    with torch.device("meta"):
        model = build_model(model_or_cfg)
    return model.flops_per_image(training)
