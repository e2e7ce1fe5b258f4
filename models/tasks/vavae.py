"""VA-VAE training task: autoencoder + PatchGAN discriminator on images, on the shared trainer/engine.

Parts (each wrapped by the engine, checkpointed and resumed like the DiT's model):

* ``autoencoder``  ``models.vavae.VAVAE`` (encoder, decoder, quant convs, VF projection ``linear_proj``),
  optimizer ``cfg.optimizer`` (official: Adam, lr 1e-4, betas (0.5, 0.9)), no EMA;
* ``discriminator`` ``NLayerDiscriminator``, optimizer ``cfg.vavae.disc_optimizer`` (same settings).

One training step = phase "autoencoder" (one Adam step of the AE), then phase "discriminator" (one Adam step of
the discriminator), for every micro-batch — the official manual optimisation. Frozen networks (LPIPS VGG16,
DINOv2) belong to the task, are built from local weight files on every rank and are not checkpointed.

Autoencoder objective (LDM ``LPIPSWithDiscriminator`` + VF, hustvl/LightningDiT):

    rec  = |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)            (per pixel; LPIPS broadcast)
    nll  = sum(rec / exp(logvar) + logvar) / B                           (logvar a constant, 0)
    kl   = sum(KL(q(z|x) || N(0, I))) / B
    g    = -mean D(x_hat)
    d_w  = clamp(||d nll/dW_dec|| / (||d g/dW_dec|| + 1e-4), 0, 1e4) * disc_weight     W_dec = decoder.conv_out.weight
    w_vf = clamp(||d nll/dW_enc|| / (||d vf/dW_enc|| + 1e-4), 0, 1e8) * vf.weight      W_enc = encoder.conv_out.weight
    loss = nll + kl_weight * kl + d_w * disc_factor(step) * g + w_vf * vf

and the discriminator's ``disc_factor(step) * hinge(D(x), D(x_hat.detach()))`` on the reconstructions of the
same forward (the official code calls the loss again with detached inputs; it does not re-run the
autoencoder). The VF target is DINOv2 on the batch's images (``vavae.vf.features: online``) or the batch's
stored ``features`` (``precomputed``: ``data.kind: streaming`` over a dataset from data/extract.py with images
and features on the latent grid; no DINOv2 model is built, and ``vf_dim`` comes from the dataset's index).
``disc_factor(step)`` is ``disc_factor`` from ``disc_start`` on, 0 before; ``step`` counts optimizer steps of the
autoencoder (= training steps). Before ``disc_start`` the discriminator still takes (zero-gradient) Adam steps, as
officially, so Adam's step count matches.

Adaptive weights under FSDP2 (the gradients w.r.t. one layer's weight, by autograd, on the live graph):

* The autoencoder and discriminator are sharded as ONE FSDP unit each (``blocks_attr=None``), and the task asks
  the engine to keep the autoencoder unit unsharded after its forward (``TrainedPart.set_reshard_after_forward(
  False)``; FSDP2's public ``set_reshard_after_forward`` underneath). So after ``ae(x)`` the module attributes
  ``decoder.conv_out.weight`` / ``encoder.conv_out.weight`` are the *unsharded* parameters that the forward graph
  used; they are read right after the forward (before any backward can reshard) and ``torch.autograd.grad`` is
  taken w.r.t. them. This is each rank's local gradient of its local loss — exactly what the official DDP code
  computes per GPU (no reduction). The parameters are ~70M for f16d32, so one unit costs nothing in memory
  (activations dominate).
* Each ``autograd.grad`` through the autoencoder's outputs fires FSDP2's pre-backward hook and, at its end, the
  post-backward callback, which reshards the unit; autograd.grad never accumulates ``.grad``, so nothing is
  reduce-scattered, and the real backward (the trainer's) unshards again. Cost: one extra all-gather of the
  autoencoder per partial pass (up to 3 per micro-batch: nll w.r.t. both weights, g and vf; 70M parameters);
  verified against an unsharded reference in tests/integration/test_vavae_fsdp2.py (2 gloo ranks, accumulation).
* The generator term goes through the *discriminator's* FSDP unit. To keep the discriminator's gradients out
  of the autoencoder's backward (they would be reduce-scattered into the discriminator's gradient and leak into
  its step), ``g`` is evaluated on a detached copy of ``x_hat``: ``G = dg/dx_hat`` comes from
  ``autograd.grad`` (no parameter gradients), and the loss carries ``sum(x_hat * G)`` — the same gradient for
  every autoencoder parameter — with its value replaced by ``g`` for logging.
* On DeepSpeed (ZeRO-1, 2 and 3) the same code runs: ``set_partial_grads(True)`` keeps the partial passes out of
  DeepSpeed's gradient machinery and, under ZeRO-3, makes each of them gather again the sub-modules it reaches
  (``core/engines/deepspeed.py``, ``_DirectForward``); parity with FSDP2 in tests/integration/test_vavae_deepspeed.py.
* BatchNorm running statistics of the discriminator are broadcast from rank 0 after each discriminator forward
  (rank 0's trajectory, as DDP's ``broadcast_buffers`` kept officially), so every rank and every checkpoint hold
  the same buffers.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor
from torch.utils.data import Dataset

from core.config import Checks
from core.rng import seed_for
from core.task import PartSpec, StepContext, Task
from data.images import load_rgb, read_file_list, scan_image_folder, smallest_max_size, uint8_to_normalized
from data.sources import MapSource, StreamingSource
from data.streaming import ImageDataset, parse_ndarray_encoding, read_columns
from data.synthetic import SyntheticImages
from models.dinov2 import DINOv2Features
from models.losses import (
    NLayerDiscriminator,
    adaptive_weight,
    adopt_weight,
    build_lpips,
    generator_loss,
    hinge_d_loss,
    vanilla_d_loss,
    vf_loss,
)
from models.vavae import VAVAE, load_vavae_state, load_vavae_weights, vavae_from_config
from models.vavae_config import check_vavae_task

log = logging.getLogger(__name__)

__all__ = ["EpochMapSource", "TrainImages", "VAVAETask", "build_image_dataset"]

ADAPTIVE_DISC_MAX = 1e4
ADAPTIVE_VF_MAX = 1e8


# ================================================================================================= data
class TrainImages(Dataset):
    """Training images in [-1, 1] (``{"image": [3,S,S], "label": int}``) with per-epoch deterministic crops/flips.

    ``records`` (data/images.ImageRecord) are made as the official VA-VAE training makes them (taming's
    ``ImagePaths``): decoded to RGB uint8, short side resized to S by ``data.images.smallest_max_size``
    (albumentations ``SmallestMaxSize``: cv2 INTER_LINEAR), then an S x S crop: ``"random"`` (official training,
    ``RandomCrop``: offsets uniform over every position) or ``"center"`` (official validation, ``CenterCrop``:
    offsets rounded down). The official training does not flip; ``random_flip`` adds a horizontal flip with p=0.5.
    The uint8 crop is scaled to [-1, 1] by ``data.images.uint8_to_normalized`` (``(u / 255 - 0.5) / 0.5`` in
    float32; the official ``u / 127.5 - 1`` in float64 differs by at most one float32 ulp, 6e-8).
    Random choices come from a generator seeded by (seed, epoch, index), so a resumed run sees the same crops.
    ``synthetic`` (data/synthetic.SyntheticImages) replaces the files (images already at size S: flip only).
    """

    def __init__(
        self,
        *,
        records=None,
        synthetic=None,
        image_size: int,
        crop: str = "random",
        random_flip: bool = False,
        seed: int = 0,
    ):
        if (records is None) == (synthetic is None):
            raise ValueError("TrainImages: give exactly one of records / synthetic")
        self.records = list(records) if records is not None else None
        self.synthetic = synthetic
        self.image_size = int(image_size)
        self.crop = crop
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else len(self.synthetic)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, int(index), 0x7A4E])

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        if self.synthetic is not None:
            image, label = self.synthetic[index]
            tensor = image if isinstance(image, torch.Tensor) else torch.as_tensor(image)
        else:
            record = self.records[index]
            try:
                pixels = smallest_max_size(np.array(load_rgb(record.path), dtype=np.uint8), self.image_size)
            except Exception as err:  # noqa: BLE001 - name the file
                raise RuntimeError(
                    f"data.path: cannot decode training image {record.path}: {type(err).__name__}: {err}"
                ) from err
            s = self.image_size
            height, width = pixels.shape[:2]
            if self.crop == "random":
                left = int(rng.integers(0, width - s + 1))
                top = int(rng.integers(0, height - s + 1))
            else:
                left, top = (width - s) // 2, (height - s) // 2
            crop = np.ascontiguousarray(pixels[top : top + s, left : left + s])
            tensor = uint8_to_normalized(torch.from_numpy(crop).permute(2, 0, 1))
            label = record.label
        if self.random_flip and rng.random() < 0.5:
            tensor = torch.flip(tensor, dims=[-1])
        return {"image": tensor.contiguous(), "label": int(label)}


def build_image_dataset(data_cfg, seed: int) -> TrainImages:
    """The training dataset of an image ``data`` section ("images" folder / file list, or "synthetic")."""
    if data_cfg.kind == "synthetic":
        synthetic = SyntheticImages(
            data_cfg.synthetic_num_samples,
            image_size=data_cfg.image_size,
            num_classes=data_cfg.synthetic_num_classes,
            seed=seed,
        )
        return TrainImages(
            synthetic=synthetic, image_size=data_cfg.image_size, random_flip=data_cfg.random_flip, seed=seed
        )
    if data_cfg.kind == "images":
        path = Path(data_cfg.path)
        if path.is_file():
            records = read_file_list(path)
        elif path.is_dir():
            records, _, ignored = scan_image_folder(path)
            if ignored:
                log.warning(
                    "data.path: %d files under %s are not training images (e.g. %s)",
                    len(ignored),
                    path,
                    ignored[0].path,
                )
        else:
            raise FileNotFoundError(f"data.path: {path} is neither an image folder nor a file list")
        return TrainImages(
            records=records,
            image_size=data_cfg.image_size,
            crop=data_cfg.image_crop,
            random_flip=data_cfg.random_flip,
            seed=seed,
        )
    raise ValueError(f"data.kind: the VA-VAE task trains on images ('images' or 'synthetic'), got {data_cfg.kind!r}")


def EpochMapSource(dataset: TrainImages, **kwargs):  # noqa: N802 - a class factory
    """``data.sources.MapSource`` that tells the dataset its epoch before iterating (per-epoch crops/flips)."""

    class _EpochMapSource(MapSource):
        def iterator(self, epoch: int, step_in_epoch: int):
            self.dataset.set_epoch(epoch)
            return super().iterator(epoch, step_in_epoch)

    return _EpochMapSource(dataset, **kwargs)


# ================================================================================================= task
def _unsharded(weight: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(weight, DTensor):
        raise RuntimeError(
            f"VA-VAE adaptive weights: {name} is a sharded DTensor after the forward. The gradient norms are taken "
            f"w.r.t. the unsharded weight that the forward used, which needs the autoencoder to be ONE FSDP unit "
            f"(PartSpec blocks_attr=None) kept unsharded between forward and backward "
            f"(part.set_reshard_after_forward(False))"
        )
    return weight


def _precomputed_features_dim(data_cfg, grid: tuple[int, int]) -> int:
    """D of the dataset's ``features`` column [D, h, w] (read from its index.json), checked against the latent grid."""

    columns = read_columns(data_cfg.path, data_cfg.remote)
    where = data_cfg.remote or data_cfg.path
    if "features" not in columns:
        raise ValueError(
            f"data.path: vavae.vf.features=precomputed, but the dataset at {where} has no `features` "
            f"column (it has {sorted(columns)}): extract DINOv2 features with features.enabled=true and "
            f"features.grid={grid[0]} (configs/extract_vavae_features.yaml), or set "
            f"vavae.vf.features=online"
        )
    _, shape = parse_ndarray_encoding(columns["features"])
    if shape is None or len(shape) != 3:
        raise ValueError(
            f"data.path: the `features` column of {where} has encoding {columns['features']!r}; "
            f"vavae.vf.features=precomputed needs a fixed [D, h, w] shape (as data/extract.py writes it)"
        )
    if tuple(shape[1:]) != tuple(grid):
        raise ValueError(
            f"data.path: the DINOv2 features of {where} are on a {shape[1]}x{shape[2]} token grid, but "
            f"the autoencoder's latent grid is {grid[0]}x{grid[1]} (data.image_size / 2^(len("
            f"vavae.model.ch_mult)-1)): re-extract with features.grid={grid[0]}, or set "
            f"vavae.vf.features=online"
        )
    return int(shape[0])


class VAVAETask(Task):
    @classmethod
    def check_config(cls, cfg, checks: Checks) -> None:
        check_vavae_task(cfg, checks)

    def __init__(self, cfg, dist):
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device
        v = cfg.vavae
        factor = 2 ** (len(v.model.ch_mult) - 1)
        grid = (cfg.data.image_size // factor,) * 2  # the latent grid = the VF target's token grid
        # VF target: stored DINOv2 features of the batch (no model here) or DINOv2 run online.
        self.precomputed = v.vf.enabled and v.vf.features == "precomputed"
        self.vf_dim = _precomputed_features_dim(cfg.data, grid) if self.precomputed else None
        # Posterior noise: one generator per rank, saved in checkpoints (bit-exact resume; another world size: reseed).
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed * 1_000_003 + dist.rank)
        # Frozen networks: identical on every rank (fixed seed for random-init test models), never checkpointed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 12345)
            self.lpips = None
            if v.loss.perceptual_weight > 0:
                self.lpips = build_lpips(
                    v.lpips.vgg_weights, v.lpips.lin_weights, random_init=v.lpips.random_init, config_key="vavae.lpips"
                ).to(self.device)
            self.vf_model = None
            if v.vf.enabled and not self.precomputed:
                d = v.vf.dinov2
                self.vf_model = DINOv2Features(
                    d.model,
                    d.weights,
                    random_init=d.random_init,
                    grid=grid,
                    imagenet_norm=d.imagenet_norm,
                    model_kwargs=d.model_kwargs,
                    config_key="vavae.vf.dinov2",
                ).to(self.device)
                self.vf_dim = self.vf_model.dim
        self._pending: deque = deque()  # (batch id, detached reconstruction) from the AE phase

    # ------------------------------------------------------------------ models
    def build_models(self) -> dict[str, PartSpec]:
        v, cfg = self.cfg.vavae, self.cfg
        # Same initial weights on every rank (the official DDP broadcast from rank 0).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            ae = vavae_from_config(v.model, vf_dim=self.vf_dim)
            disc = NLayerDiscriminator(v.disc.in_channels, v.disc.ndf, v.disc.n_layers)
        if v.init_from:
            self._init_from(ae, disc, v.init_from)
        if ae.vf_dim is not None and v.vf.proj_fix:
            ae.linear_proj.requires_grad_(False)
        clip = cfg.train.grad_clip
        # engine.compile: the encoder, decoder and discriminator trunk are compiled inside their single FSDP units
        # (the adaptive weights' autograd.grad passes run through the compiled graphs;
        # tests/integration/test_perf_tools_distributed.py).
        return {
            "autoencoder": PartSpec(
                module=ae,
                optimizer=cfg.optimizer,
                ema_decay=v.ema_decay,
                blocks_attr=None,
                grad_clip=clip,
                compile_attrs=("encoder", "decoder"),
            ),
            "discriminator": PartSpec(
                module=disc,
                optimizer=v.disc_optimizer,
                ema_decay=None,
                blocks_attr=None,
                grad_clip=clip,
                compile_attrs=("main",),
            ),
        }

    def _init_from(self, ae: VAVAE, disc: NLayerDiscriminator, path: str) -> None:
        v = self.cfg.vavae
        try:
            parts = load_vavae_state(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"vavae.init_from: {err}") from err
        load_vavae_weights(ae, parts, load_proj=v.init_proj)
        msg = f"vavae.init_from: autoencoder{' + linear_proj' if ae.vf_dim and v.init_proj else ''} from {path}"
        if v.init_discriminator:
            if parts.discriminator:
                try:
                    disc.load_state_dict(parts.discriminator, strict=True)
                except RuntimeError as err:
                    raise ValueError(
                        f"vavae.init_from: discriminator weights of {path} do not match vavae.disc: {err}"
                    ) from err
                msg += " + discriminator"
            else:
                log.warning(
                    "vavae.init_from: %s has no discriminator weights; the discriminator starts from its "
                    "random init (set vavae.init_discriminator=false to silence this)",
                    path,
                )
        log.info(msg)

    def phases(self) -> list[str]:
        return ["autoencoder", "discriminator"]

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random images in [-1, 1] at ``data.image_size`` (what the loss reads); with vavae.vf.features=precomputed
        also ``features`` (B, vf_dim, h, w) on the latent grid, as the streaming source delivers them."""
        s, d, c = self.cfg.data.image_size, self.device, self.cfg.vavae.model.in_channels
        batch = {"image": torch.rand(batch_size, c, s, s, device=d, generator=generator) * 2 - 1}
        if self.precomputed:
            h = s // 2 ** (len(self.cfg.vavae.model.ch_mult) - 1)
            batch["features"] = torch.randn(batch_size, self.vf_dim, h, h, device=d, generator=generator)
        return batch

    def build_data(self, *, micro_batch_size: int, global_batch_size: int):
        if self.cfg.data.kind == "streaming":  # stored images (+ their DINOv2 features) in MDS shards
            return StreamingSource(
                self.cfg.data,
                micro_batch_size=micro_batch_size,
                global_batch_size=global_batch_size,
                seed=self.cfg.seed,
                dist=self.dist,
                dataset_cls=ImageDataset,
                use_features=self.precomputed,
            )
        dataset = build_image_dataset(self.cfg.data, self.cfg.seed)
        return EpochMapSource(
            dataset,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            seed=self.cfg.seed,
            dist=self.dist,
            num_workers=self.cfg.data.num_workers,
            shuffle=self.cfg.data.shuffle,
        )

    # ------------------------------------------------------------------ losses
    def _autocast(self):
        """bf16 compute for the frozen networks (LPIPS, DINOv2). They are not engine parts: under precision "bf16" the
        engine's parameter cast does not reach them, so they get autocast here. Under "bf16-autocast" the trainer
        already runs the whole loss in ``Engine.autocast()``; enabled here too, so as not to switch it off."""
        enabled = self.cfg.engine.precision in ("bf16", "bf16-autocast")
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _sync_disc_buffers(self, disc) -> None:
        """After each discriminator forward: rank 0's BatchNorm running statistics on every rank (the official DDP
        run broadcast them from rank 0 before each forward: the same rank-0 trajectory), so that any rank's copy
        in a checkpoint is the same and a resumed run continues it exactly. They never affect training (train-mode
        BatchNorm uses batch statistics)."""
        if self.dist.world_size > 1:
            for buf in disc.buffers():
                tdist.broadcast(buf, src=0)

    def loss(
        self, phase: str, batch: dict[str, torch.Tensor], parts: dict[str, Any], ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["image"].to(self.device, non_blocking=True).float()
        if phase == "autoencoder":
            features = batch["features"].to(self.device, non_blocking=True).float() if self.precomputed else None
            # The adaptive weights need the unsharded weights of this forward's graph and autograd.grad passes
            # through both parts before their backward (module doc; idempotent).
            parts["autoencoder"].set_reshard_after_forward(False)
            parts["autoencoder"].set_partial_grads(True)
            parts["discriminator"].set_partial_grads(True)
            loss, metrics, recon = self.autoencoder_loss(
                x, parts["autoencoder"].module, parts["discriminator"].module, ctx.step, features=features
            )
            self._pending.append((id(batch), recon))
            return loss, metrics
        if phase == "discriminator":
            if not self._pending or self._pending[0][0] != id(batch):
                raise RuntimeError(
                    "VA-VAE: the discriminator phase needs the reconstructions of the autoencoder "
                    "phase on the same micro-batch (phases() order: autoencoder, discriminator)"
                )
            _, recon = self._pending.popleft()
            return self.discriminator_loss(x, recon, parts["discriminator"].module, ctx.step)
        raise ValueError(f"VA-VAE task: unknown phase {phase!r}")

    def autoencoder_loss(
        self, x: torch.Tensor, ae, disc, step: int, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(loss to backward, metrics, detached reconstruction) of the autoencoder phase; see the module doc.
        ``features``: the stored DINOv2 features of ``x`` (B, D, h, w), required with vavae.vf.features=precomputed
        (otherwise DINOv2 runs on ``x``)."""
        if self.precomputed and features is None:
            raise ValueError(
                "vavae.vf.features=precomputed: the batch has no DINOv2 `features` (data.kind "
                "'streaming' over a dataset with a features column provides them)"
            )
        v = self.cfg.vavae
        lo, vfc = v.loss, v.vf
        out = VAVAE.output(ae(x, sample_posterior=lo.sample_posterior, generator=self.generator))
        # The unsharded weights of this forward's graph (read before any backward reshards the unit).
        w_dec = _unsharded(ae.decoder.conv_out.weight, "decoder.conv_out.weight")
        w_enc = _unsharded(ae.encoder.conv_out.weight, "encoder.conv_out.weight")
        recon = out.recon
        batch = x.shape[0]

        rec = torch.abs(x - recon)
        if self.lpips is not None:
            with torch.no_grad(), self._autocast():
                feats_x = self.lpips.features(x)
            with self._autocast():
                p_loss = self.lpips.distance(feats_x, recon).float()
            rec = rec + lo.perceptual_weight * p_loss
        nll = torch.sum(rec / math.exp(lo.logvar_init) + lo.logvar_init) / batch
        kl = torch.sum(out.kl()) / batch
        total = nll + lo.kl_weight * kl
        zero = torch.zeros((), device=x.device)

        disc_factor = adopt_weight(lo.disc_factor, step, threshold=lo.disc_start)
        use_gan = disc_factor > 0 and lo.disc_weight > 0
        use_vf = self.vf_dim is not None and vfc.weight > 0
        want = ([w_dec] if use_gan else []) + ([w_enc] if use_vf and vfc.adaptive else [])
        nll_grads = torch.autograd.grad(nll, want, retain_graph=True) if want else ()

        g_value, d_weight = zero, zero
        if use_gan:
            recon_d = recon.detach().requires_grad_(True)
            g = generator_loss(disc(recon_d))
            self._sync_disc_buffers(disc)
            (grad_recon,) = torch.autograd.grad(g, recon_d)  # dg/dx_hat; no discriminator .grad
            (g_grad,) = torch.autograd.grad(recon, w_dec, grad_outputs=grad_recon, retain_graph=True)
            d_weight = adaptive_weight(nll_grads[0], g_grad, ADAPTIVE_DISC_MAX) * lo.disc_weight
            surrogate = torch.sum(recon * grad_recon)  # same parameter gradients as g
            g_value = g.detach()
            total = total + d_weight * disc_factor * (surrogate - surrogate.detach() + g_value)

        metrics = {
            "rec": rec.detach().mean(),
            "nll": nll.detach(),
            "kl": kl.detach(),
            "g": g_value,
            "d_weight": d_weight,
            "disc_factor": torch.tensor(float(disc_factor), device=x.device),
        }
        if self.vf_model is not None:
            with torch.no_grad(), self._autocast():
                features = self.vf_model(x, grid=out.z_proj.shape[-2:]).float()
        if self.vf_dim is not None:
            terms = vf_loss(
                out.z_proj,
                features,
                cos_margin=vfc.cos_margin,
                distmat_margin=vfc.distmat_margin,
                cos_weight=vfc.cos_weight,
                distmat_weight=vfc.distmat_weight,
            )
            vf_weight = torch.tensor(float(vfc.weight), device=x.device)
            if use_vf:
                if vfc.adaptive:
                    (vf_grad,) = torch.autograd.grad(terms.total, w_enc, retain_graph=True)
                    vf_weight = adaptive_weight(nll_grads[-1], vf_grad, ADAPTIVE_VF_MAX) * vfc.weight
                total = total + vf_weight * terms.total
            metrics.update(
                {
                    "vf": terms.total.detach(),
                    "vf_distmat": terms.distmat.detach(),
                    "vf_cos": terms.cos.detach(),
                    "vf_weight": vf_weight,
                }
            )
        metrics["loss"] = total.detach()
        return total, metrics, recon.detach()

    def discriminator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, disc, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lo = self.cfg.vavae.loss
        logits_real, logits_fake = disc(x.detach(), recon.detach())
        self._sync_disc_buffers(disc)
        factor = adopt_weight(lo.disc_factor, step, threshold=lo.disc_start)
        d_loss = factor * (hinge_d_loss if lo.disc_loss == "hinge" else vanilla_d_loss)(logits_real, logits_fake)
        return d_loss, {
            "loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def reseed(self, step: int, rank: int) -> None:
        """Resumed on another world size: a fresh stream for ``rank`` from (seed, step, rank) (core/rng.py)."""
        self.generator.manual_seed(seed_for(self.cfg.seed, step, rank, "vavae/posterior"))
