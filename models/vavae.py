"""VA-VAE: the LDM KL autoencoder ("VQGAN-KL", SD-VAE architecture) with official parameter names.

    ae = AutoencoderKL(embed_dim=32, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                       attn_resolutions=(16,), z_channels=32, resolution=256)      # = f16d32_config()
    posterior = ae.encode(x)            # x in [-1, 1], (B, 3, H, W) -> DiagonalGaussianDistribution
    z = posterior.sample(generator)     # (B, embed_dim, H/16, W/16); posterior.mode() is the mean
    x_hat = ae.decode(z)                # (B, 3, H, W), not clamped (no tanh)

The constructor takes the LDM ``ddconfig`` keyword names. State-dict keys are the official ones
(``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``; 342 keys / 69,836,067 parameters
for f16d32). ``VAVAE`` adds the VF-loss projection ``linear_proj`` (Conv1x1 embed_dim -> foundation-model
width, no bias; the official ``reverse_proj: true``) so that its keys match a released training checkpoint
once the loss / foundation-model entries are set aside.

Architecture facts (LDM ``model.py``): GroupNorm(32, eps 1e-6, affine) + swish; ResnetBlocks (no time
embedding; 1x1 ``nin_shortcut`` when channels change); single-head AttnBlocks (1x1 q/k/v/proj_out,
scale c^-0.5) at the levels whose resolution is in ``attn_resolutions`` and in the middle;
``Downsample`` = pad (0, 1, 0, 1) + 3x3 conv stride 2; ``Upsample`` = nearest x2 + 3x3 conv; the
decoder has ``num_res_blocks + 1`` blocks per level. Posterior log-variance is clamped to [-30, 20].

Checkpoint loading (``split_vavae_state_dict`` / ``load_vavae_weights``): a released training
checkpoint ``{"state_dict": {...}}`` holds, besides the autoencoder, ``loss.*`` (LPIPS, discriminator,
``loss.logvar``), ``foundation_model.*`` (the frozen DINOv2) and ``linear_proj.weight``. Those prefixes
are filtered *explicitly* (by name, reported) and the autoencoder loads strictly. Our own checkpoints
(DCP directories written by the FSDP2 engine) hold the autoencoder + projection under
``autoencoder.model`` and the discriminator under ``discriminator.model``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from core.checkpoint import resolve_checkpoint_dir
from data.tokenizers import Tokenizer
from models.loading import _find_dcp_dir, _is_dtensor, load_checkpoint_state

log = logging.getLogger(__name__)

__all__ = [
    "AttnBlock",
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussianDistribution",
    "Downsample",
    "Encoder",
    "ResnetBlock",
    "Upsample",
    "VAVAE",
    "VAVAEOutput",
    "VAVAEStateParts",
    "f16d32_config",
    "load_vavae_state",
    "load_vavae_weights",
    "split_vavae_state_dict",
    "vavae_from_config",
]

# Prefixes of a released VA-VAE training checkpoint that are not part of the autoencoder.
LOSS_PREFIX = "loss."
DISC_PREFIX = "loss.discriminator."
LPIPS_PREFIX = "loss.perceptual_loss."
FOUNDATION_PREFIX = "foundation_model."
PROJ_PREFIX = "linear_proj."
AE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def f16d32_config() -> dict[str, Any]:
    """The released VA-VAE f16d32 ``ddconfig`` + ``embed_dim`` (LDM keyword names)."""
    return dict(
        embed_dim=32,
        ch=128,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        attn_resolutions=(16,),
        z_channels=32,
        resolution=256,
        in_channels=3,
        out_ch=3,
        double_z=True,
        dropout=0.0,
    )


# ------------------------------------------------------------------------------------------------ blocks
def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 - the LDM name
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over the h*w positions, channels c, scale c^-0.5."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (b, 1 head, h*w, c)
            return t.reshape(b, c, hh * ww).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (AttnBlocks, maybe empty) and an optional
    ``downsample`` / ``upsample`` (the LDM code uses a bare nn.Module with these attributes)."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
        **_: Any,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            down = _Level()
            block_in, block_out = ch * in_mult[level], ch * mult
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                res //= 2
            self.down.append(down)
        self.mid = _Mid(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            h = down.run(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        **_: Any,
    ):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _Mid(block_in, dropout)
        levels: list[_Level] = []
        for level in reversed(range(n)):
            up = _Level()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level, as in LDM
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward_features(self, z: torch.Tensor) -> torch.Tensor:
        """Everything before ``conv_out`` (after the final GroupNorm + swish)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            h = up.run(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return swish(self.norm_out(h))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.forward_features(z))


# ------------------------------------------------------------------------------------------ posterior
class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element; ``parameters`` is (B, 2C, h, w) = mean || logvar."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over (C, h, w): one value per sample."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims)
        )


# ------------------------------------------------------------------------------------------ autoencoder
class AutoencoderKL(nn.Module):
    """The LDM KL autoencoder (inference/training model; no loss, no foundation model)."""

    def __init__(
        self,
        embed_dim: int = 32,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        z_channels: int = 32,
        resolution: int = 256,
        in_channels: int = 3,
        out_ch: int = 3,
        double_z: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not double_z:
            raise ValueError("AutoencoderKL needs double_z=True (the encoder predicts mean and log-variance)")
        if ch % 32:
            raise ValueError(f"ch={ch} must be a multiple of 32 (GroupNorm with 32 groups)")
        dd = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            in_channels=in_channels,
            out_ch=out_ch,
            resolution=resolution,
            z_channels=z_channels,
            double_z=double_z,
            dropout=dropout,
        )
        self.ddconfig = dd
        self.embed_dim = embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x.to(self.dtype))))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


@dataclass
class VAVAEOutput:
    """What one training forward produces (all float32)."""

    recon: torch.Tensor  # (B, 3, H, W)
    mean: torch.Tensor  # posterior mean (B, C, h, w)
    logvar: torch.Tensor  # clamped posterior log-variance
    z: torch.Tensor  # the latent fed to the decoder (sample or mean)
    z_proj: Optional[torch.Tensor]  # linear_proj(z) (B, D_vf, h, w), None without a projection

    def kl(self) -> torch.Tensor:
        return 0.5 * torch.sum(self.mean.pow(2) + torch.exp(self.logvar) - 1.0 - self.logvar, dim=[1, 2, 3])


class VAVAE(AutoencoderKL):
    """AutoencoderKL + the VF-loss projection ``linear_proj`` = Conv1x1(embed_dim -> vf_dim, bias=False).

    ``forward`` is the training forward: encode, sample (with ``generator``), decode, project; it returns the
    tuple ``(recon, mean, logvar, z, z_proj)`` as float32 tensors (a plain tuple, so that a wrapping engine sees
    every output). ``vf_dim=None`` builds the plain autoencoder (VF loss off)."""

    def __init__(self, *args: Any, vf_dim: Optional[int] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.vf_dim = vf_dim
        if vf_dim is not None:
            self.linear_proj = nn.Conv2d(self.embed_dim, vf_dim, kernel_size=1, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,  # type: ignore[override]
        generator: Optional[torch.Generator] = None,
    ):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        recon = self.decode(z)
        z_proj = self.linear_proj(z) if self.vf_dim is not None else None
        return _output(recon), _output(posterior.mean), _output(posterior.logvar), _output(z), _output(z_proj)

    @staticmethod
    def output(result: Sequence[Optional[torch.Tensor]]) -> VAVAEOutput:
        return VAVAEOutput(*result)


def _output(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """float32, and never a view (the posterior mean is a chunk of the moments): wrappers such as FSDP2 hook the
    outputs, and a view's hook could be lost to an in-place op on its base."""
    if t is None:
        return None
    t = t.float()
    return t.clone() if t._base is not None else t


def vavae_from_config(cfg: Any, vf_dim: Optional[int] = None) -> VAVAE:
    """A ``VAVAE`` from a config section with the ddconfig field names (``models.vavae_config.VAVAEModelConfig``)."""
    return VAVAE(
        embed_dim=cfg.embed_dim,
        ch=cfg.ch,
        ch_mult=tuple(cfg.ch_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=tuple(cfg.attn_resolutions),
        z_channels=cfg.z_channels,
        resolution=cfg.resolution,
        in_channels=cfg.in_channels,
        out_ch=cfg.out_ch,
        double_z=cfg.double_z,
        dropout=cfg.dropout,
        vf_dim=vf_dim,
    )


# ------------------------------------------------------------------------------------------ checkpoints
@dataclass
class VAVAEStateParts:
    """A VA-VAE checkpoint split by owner. ``autoencoder`` holds exactly the AutoencoderKL keys."""

    autoencoder: dict[str, torch.Tensor]
    linear_proj: dict[str, torch.Tensor]  # {"weight": (D, C, 1, 1)} or {}
    discriminator: dict[str, torch.Tensor]  # NLayerDiscriminator keys ("main.*") or {}
    lpips: dict[str, torch.Tensor]  # LPIPS keys ("net.*", "lin*.model.1.weight", ...) or {}
    foundation_model: dict[str, torch.Tensor]  # the frozen DINOv2 ("model.*" under foundation_model.)
    other: dict[str, torch.Tensor]  # e.g. loss.logvar
    source: str = ""

    def describe(self) -> str:
        return (
            f"{self.source}: autoencoder {len(self.autoencoder)} keys, linear_proj {len(self.linear_proj)}, "
            f"discriminator {len(self.discriminator)}, lpips {len(self.lpips)}, "
            f"foundation_model {len(self.foundation_model)} (ignored), other {sorted(self.other)}"
        )


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def split_vavae_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> VAVAEStateParts:
    """Split an official training/inference state dict (keys already without ``module.`` prefixes) by owner.

    Every key lands in exactly one part: the autoencoder prefixes, ``linear_proj.``, ``loss.discriminator.``,
    ``loss.perceptual_loss.``, ``foundation_model.``; anything else (``loss.logvar``, unknown keys) is
    ``other``. Nothing is silently dropped: the caller decides what ``other`` may contain."""
    parts = VAVAEStateParts(
        autoencoder={k: v for k, v in sd.items() if k.startswith(AE_PREFIXES)},
        linear_proj=_strip(sd, PROJ_PREFIX),
        discriminator=_strip(sd, DISC_PREFIX),
        lpips=_strip(sd, LPIPS_PREFIX),
        foundation_model=_strip(sd, FOUNDATION_PREFIX),
        other={},
        source=source,
    )
    claimed = AE_PREFIXES + (PROJ_PREFIX, DISC_PREFIX, LPIPS_PREFIX, FOUNDATION_PREFIX)
    parts.other = {k: v for k, v in sd.items() if not k.startswith(claimed)}
    return parts


def _read_dcp_entry(path: Path, entry: str) -> dict[str, torch.Tensor]:
    return load_checkpoint_state(path, which=entry)


def load_vavae_state(path: Union[str, Path]) -> VAVAEStateParts:
    """Read a VA-VAE checkpoint into its parts (CPU tensors). Accepts

    * a released / official training file: ``{"state_dict": {...}}`` (Lightning ``.ckpt``) or a bare state dict;
    * our run's checkpoint directory (``<run>/checkpoints/step_N`` or its ``state/``): the FSDP2 engine's
      ``autoencoder.model`` (autoencoder + ``linear_proj``) and, when present, ``discriminator.model``.
    """

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VA-VAE checkpoint not found: {path}")
    if path.is_dir():
        dcp_dir = _find_dcp_dir(path)
        meta = dcp.FileSystemReader(str(dcp_dir)).read_metadata()
        tops = {str((meta.planner_data or {}).get(k, [k.split(".", 1)[0]])[0]) for k in meta.state_dict_metadata}
        if "autoencoder.model" not in tops:
            raise ValueError(
                f"{path}: not a VA-VAE run checkpoint (no 'autoencoder.model' entry; entries: {sorted(tops)})"
            )
        ae_sd = _read_dcp_entry(dcp_dir, "autoencoder.model")
        disc_sd = _read_dcp_entry(dcp_dir, "discriminator.model") if "discriminator.model" in tops else {}
        parts = split_vavae_state_dict(ae_sd, source=str(path))
        parts.discriminator = dict(disc_sd)
    else:
        sd = load_checkpoint_state(path, which="model")  # {"state_dict": sd} / {"model": sd} / bare
        parts = split_vavae_state_dict(sd, source=str(path))
    if not parts.autoencoder:
        raise ValueError(
            f"{path}: no autoencoder weights (encoder.*/decoder.*/quant_conv.*/post_quant_conv.*) "
            f"found; {parts.describe()}"
        )
    return parts


def load_vavae_weights(
    model: AutoencoderKL,
    source: Union[str, Path, VAVAEStateParts],
    *,
    load_proj: bool = True,
    allowed_other: Sequence[str] = ("loss.logvar",),
) -> VAVAEStateParts:
    """Load the autoencoder strictly (every AutoencoderKL key, nothing else) and, for a ``VAVAE`` with a
    projection and ``load_proj``, ``linear_proj`` strictly too (an error if the checkpoint has none or its
    shape differs). Keys outside the known prefixes other than ``allowed_other`` are an error.
    Returns the split checkpoint (e.g. for the discriminator)."""
    parts = source if isinstance(source, VAVAEStateParts) else load_vavae_state(source)
    unknown = sorted(k for k in parts.other if k not in set(allowed_other))
    if unknown:
        raise ValueError(f"{parts.source}: unexpected keys outside the VA-VAE layout: {unknown[:20]}")
    target = {k: v for k, v in model.state_dict().items() if k.startswith(AE_PREFIXES)}
    missing = sorted(set(target) - set(parts.autoencoder))
    unexpected = sorted(set(parts.autoencoder) - set(target))
    shapes = [
        f"{k}: model {list(target[k].shape)} vs checkpoint {list(v.shape)}"
        for k, v in parts.autoencoder.items()
        if k in target and tuple(target[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{parts.source}: autoencoder weights do not match the model "
            f"(missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}, "
            f"mis-shaped {shapes[:10]})"
        )
    sd = dict(parts.autoencoder)
    has_proj = isinstance(model, VAVAE) and model.vf_dim is not None
    if has_proj and load_proj:
        want = model.linear_proj.weight.shape
        got = parts.linear_proj.get("weight")
        if got is None or set(parts.linear_proj) != {"weight"}:
            raise ValueError(
                f"{parts.source}: no VF projection 'linear_proj.weight' {list(want)} in the checkpoint "
                f"(found {sorted(parts.linear_proj)}); set the projection's init off to train it "
                f"from scratch"
            )
        if tuple(got.shape) != tuple(want):
            raise ValueError(f"{parts.source}: linear_proj.weight: model {list(want)} vs checkpoint {list(got.shape)}")
        sd["linear_proj.weight"] = got
    strict = not has_proj or load_proj
    _load_state(model, sd, strict=strict, source=parts.source)
    return parts


def _load_state(model: nn.Module, sd: Mapping[str, torch.Tensor], *, strict: bool, source: str) -> None:
    model_sd = model.state_dict()
    if any(_is_dtensor(v) for v in model_sd.values()):
        set_model_state_dict(model, dict(sd), options=StateDictOptions(full_state_dict=True, strict=strict))
        return
    result = model.load_state_dict(dict(sd), strict=strict)
    if not strict and result.unexpected_keys:
        raise ValueError(f"{source}: unexpected keys {result.unexpected_keys[:10]}")


# ------------------------------------------------------------------------------------------ tokenizer
def _run_model_config(path: Path) -> Optional[dict[str, Any]]:
    """``vavae.model`` of the run that wrote checkpoint directory ``path`` (step dir or its ``state/``), if found."""
    for step_dir in (path, path.parent):
        extra = step_dir / "extra" / "rank00000.pt"
        if extra.is_file():
            try:
                cfg = torch.load(extra, map_location="cpu", weights_only=False).get("config") or {}
            except Exception:  # noqa: BLE001 - fall back to explicit / default architecture
                return None
            model = (cfg.get("vavae") or {}).get("model")
            return dict(model) if isinstance(model, Mapping) else None
    return None


def _build_tokenizer_class():
    class VAVAETokenizer(Tokenizer):
        """VA-VAE as a ``data.tokenizers.Tokenizer``: ``build_tokenizer("vavae", checkpoint=PATH)``.

        ``checkpoint``: a released file (``{"state_dict": ...}`` Lightning checkpoint or a bare state dict; the
        ``loss.*``/``foundation_model.*``/``linear_proj.*`` entries are set aside), our run's checkpoint
        directory (``<run>/checkpoints/step_N``; its architecture is read from the run's saved config) or the run
        directory itself (its newest complete checkpoint). The
        architecture defaults to f16d32; any ddconfig keyword (``embed_dim``, ``ch``, ``ch_mult``, ...) overrides
        it. ``random_init=True`` builds an untrained model without a checkpoint (tests only). Encoding returns the
        posterior mean, or a sample (``sample=True``, the official extraction) drawn with ``generator``."""

        def __init__(self, checkpoint: Optional[str] = None, *, random_init: bool = False, **ddconfig: Any):
            super().__init__()
            arch = f16d32_config()
            if checkpoint and Path(checkpoint).is_dir() and not (Path(checkpoint) / ".metadata").is_file():
                checkpoint = str(resolve_checkpoint_dir(checkpoint))  # a run dir -> its newest checkpoint
            if checkpoint and Path(checkpoint).is_dir():
                found = _run_model_config(Path(checkpoint))
                if found:
                    arch.update({k: found[k] for k in arch if k in found})
            unknown = sorted(set(ddconfig) - set(arch))
            if unknown:
                raise TypeError(f"unknown VA-VAE architecture arguments {unknown}; known: {sorted(arch)}")
            arch.update(ddconfig)
            self.model = AutoencoderKL(**arch)
            if checkpoint:
                load_vavae_weights(self.model, checkpoint)
            elif not random_init:
                raise ValueError(
                    "tokenizer 'vavae': give checkpoint=<released .pt/.ckpt or our run's checkpoint "
                    "directory> (or random_init=True for an untrained test model)"
                )
            self.model.requires_grad_(False)
            self.downsample = self.model.downsample_factor
            self.channels = self.model.embed_dim

        @torch.no_grad()
        def encode(
            self, images: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None
        ) -> torch.Tensor:
            if images.dim() != 4 or images.shape[1] != self.model.ddconfig["in_channels"]:
                raise ValueError(
                    f"VA-VAE encode expects images (B, {self.model.ddconfig['in_channels']}, H, W), "
                    f"got {tuple(images.shape)}"
                )
            posterior = self.model.encode(images)
            z = posterior.sample(generator) if sample else posterior.mode()
            return z.float()

        @torch.no_grad()
        def decode(self, latents: torch.Tensor) -> torch.Tensor:
            if latents.dim() != 4 or latents.shape[1] != self.channels:
                raise ValueError(
                    f"VA-VAE decode expects latents (B, {self.channels}, h, w), got {tuple(latents.shape)}"
                )
            return self.model.decode(latents).float()

    return VAVAETokenizer


VAVAETokenizer = _build_tokenizer_class()
__all__.append("VAVAETokenizer")
