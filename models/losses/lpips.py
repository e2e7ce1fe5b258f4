"""LPIPS (VGG16) perceptual distance, the taming-transformers / LDM variant, with weights from local files.

    lpips = build_lpips(vgg_weights="/data/weights/vgg16-397923af.pth",
                        lin_weights="/data/weights/lpips_vgg_v0.1.pth")
    d = lpips(x, y)          # x, y in [-1, 1], (B, 3, H, W) -> (B, 1, 1, 1)

Computation: ``ScalingLayer`` ((x - shift) / scale with shift (-.030, -.088, -.188), scale (.458, .448, .450));
torchvision's VGG16 ``features`` cut after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (indices [0:4],
[4:9], [9:16], [16:23], [23:30]); each feature map unit-normalised over channels (eps 1e-10); the squared
difference goes through a 1x1 conv to one channel (``lin0..lin4``; dropout before it, inactive: the module
is always in eval mode), is averaged over space and summed over the five layers.

Parameter names follow taming's LPIPS (``scaling_layer.shift``, ``net.slice1.0.weight`` ...,
``lin0.model.1.weight``), so ``loss.perceptual_loss.*`` of a released VA-VAE training checkpoint loads as is.

Weights (never downloaded):

* ``vgg_weights``: torchvision's ``vgg16`` state dict (``features.N.*``; ``classifier.*`` ignored), or a full
  LPIPS state dict in the layout above (then ``lin_weights`` may be omitted);
* ``lin_weights``: the LPIPS linear heads (``lin{0..4}.model.1.weight``; the ``lpips`` package's
  ``weights/v0.1/vgg.pth`` and taming's ``vgg.pth`` use this layout).

``random_init=True`` (tests only) builds the same network with random convolutions and non-negative
random heads (so that the distance stays >= 0 and cannot be exploited by the autoencoder).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["LPIPS", "VGG16_SLICES", "build_lpips", "vgg16_features"]

VGG16_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # torchvision vgg16.features index ranges
CHANNELS = (64, 128, 256, 512, 512)
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layer for layer (its ``make_layers(cfgs["D"])``: 3x3 convs with padding
    1, in-place ReLUs, 2x2 max-pools), built here so that importing torchvision (seconds) is not needed."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(v)
    return nn.Sequential(*layers)


class VGG16Slices(nn.Module):
    """torchvision's VGG16 ``features`` split into five slices (layer indices kept, as in taming)."""

    def __init__(self):
        super().__init__()
        features = vgg16_features()
        for n, (start, stop) in enumerate(VGG16_SLICES, 1):
            block = nn.Sequential()
            for i in range(start, stop):
                block.add_module(str(i), features[i])
            setattr(self, f"slice{n}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for n in range(1, len(VGG16_SLICES) + 1):
            x = getattr(self, f"slice{n}")(x)
            out.append(x)
        return out


class NetLinLayer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Frozen VGG16 LPIPS; ``forward(x, y)`` -> (B, 1, 1, 1). Gradients flow to the inputs only."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for i, c in enumerate(CHANNELS):
            setattr(self, f"lin{i}", NetLinLayer(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always eval: the heads' dropout stays off

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_unit_normalize(f) for f in self.net(self.scaling_layer(x))]

    def distance(self, feats_x: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """LPIPS between precomputed ``features(x)`` and ``y`` (lets the caller run x without autograd)."""
        total = None
        for i, (fx, fy) in enumerate(zip(feats_x, self.features(y))):
            term = getattr(self, f"lin{i}").model((fx - fy) ** 2).mean(dim=[2, 3], keepdim=True)
            total = term if total is None else total + term
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(self.features(x), y)


def _read(path: Path, key: str) -> Mapping[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{key}: cannot read {path}: {type(err).__name__}: {err}") from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{key}: {path} is not a state dict")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


def _existing(path: Optional[str], key: str, what: str) -> Path:
    if not path:
        raise FileNotFoundError(
            f"{key}: not set; give the path of a local {what} file (no downloads), or set "
            f"{key.rsplit('.', 1)[0]}.random_init=true (tests only)"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{key}: {what} file {p} does not exist")
    return p


def build_lpips(
    vgg_weights: Optional[str] = None,
    lin_weights: Optional[str] = None,
    *,
    random_init: bool = False,
    config_key: str = "lpips",
) -> LPIPS:
    """An LPIPS module with weights from local files (see the module docstring); eval mode, frozen."""
    model = LPIPS()
    if random_init:
        log.warning(
            "%s: LPIPS VGG16 is RANDOMLY INITIALISED (%s.random_init=true): not a perceptual metric (tests only)",
            config_key,
            config_key,
        )
        with torch.no_grad():
            for i in range(len(CHANNELS)):
                w = getattr(model, f"lin{i}").model[1].weight
                w.copy_(torch.rand_like(w) / w.shape[1])
        return model
    vgg_path = _existing(vgg_weights, f"{config_key}.vgg_weights", "VGG16 weights")
    sd = dict(_read(vgg_path, f"{config_key}.vgg_weights"))
    state: dict[str, torch.Tensor] = {}
    if any(k.startswith("net.slice") for k in sd):  # a full LPIPS state dict
        state.update({k: v for k, v in sd.items() if k.startswith(("net.", "lin", "scaling_layer."))})
    else:  # torchvision vgg16
        slice_of = {i: n for n, (a, b) in enumerate(VGG16_SLICES, 1) for i in range(a, b)}
        for k, v in sd.items():
            if k.startswith("features."):
                idx, rest = k[len("features.") :].split(".", 1)
                if int(idx) in slice_of:
                    state[f"net.slice{slice_of[int(idx)]}.{idx}.{rest}"] = v
    if lin_weights or not any(k.startswith("lin") for k in state):
        lin_path = _existing(lin_weights, f"{config_key}.lin_weights", "LPIPS linear-head weights")
        lin = _read(lin_path, f"{config_key}.lin_weights")
        heads = {k: v for k, v in lin.items() if k.startswith("lin")}
        if not heads:
            raise ValueError(
                f"{config_key}.lin_weights: {lin_path} holds no 'lin{{i}}.model.1.weight' keys "
                f"(found {sorted(lin)[:8]})"
            )
        state.update(heads)
    target = model.state_dict()
    state.setdefault("scaling_layer.shift", target["scaling_layer.shift"])
    state.setdefault("scaling_layer.scale", target["scaling_layer.scale"])
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [k for k in state if k in target and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{config_key}: LPIPS weights from {vgg_path}"
            f"{' + ' + str(lin_weights) if lin_weights else ''} do not match: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, mis-shaped {shapes[:8]}"
        )
    model.load_state_dict(state, strict=True)
    log.info("%s: LPIPS VGG16 weights from %s%s", config_key, vgg_path, f" and {lin_weights}" if lin_weights else "")
    return model
