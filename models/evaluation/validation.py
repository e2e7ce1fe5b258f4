"""The DiT's validation loss: the flow-matching loss of held-out latents at fixed timesteps with fixed noise.

``ValidationLoss(cfg, dist, latent_shape)``; ``evaluate(part, which)`` (collective, every rank) returns
``{"val_loss": mean, "val_loss/t0.000": ..., ...}`` for the weights ``which`` of ``part`` (``"ema"``, ``"ema_1"``,
..., ``"model"``). ``DiTTask.evaluate`` calls it every ``eval.val_every_epochs`` for every EMA and the raw weights.

* Data: the held-out samples ``data.val_path`` (a local MDS dataset kept out of ``data.path``: data/holdout.py),
  read once straight from the shard files (``data.holdout.read_mds_samples``: no streaming shared memory) with the
  training reader's normalisation (``LatentDataset``'s ops, the statistics of ``data.path``; never flipped), in
  their stored order.
* Timesteps: ``eval.val_timesteps`` K points evenly spaced in [0, 1] (``t_k = k / (K - 1)``; t = 0 noise, t = 1
  data). Noise: one draw of shape (K, C, H, W) per sample from a CPU generator seeded by
  ``seed_for(eval.seed, sample_id, 0, "val/noise")`` — a function of the sample id alone, never of the rank.
* Loss: the velocity MSE ``mean((v(x_t, t, y) - (x1 - x0))^2)`` per sample and timestep (``Transport``'s ``mse``),
  with the full fp32 weights (``TrainedPart.full_model``: the same plain model whatever the engine, sharding or
  precision) in eval mode (no label dropout).
* The same number on any world size and after any resume: the samples are cut into fixed chunks of
  ``eval.val_batch_size`` (the last padded with copies of its last sample), chunk c runs on rank c mod W, so every
  sample meets the same batch on any number of ranks; the per-sample losses are gathered and averaged in sample
  order in float64. Bit-equal across world sizes on one kind of device (tests/integration/test_val_ema.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from core.distributed import all_gather_object
from core.rng import seed_for
from data.holdout import read_mds_samples
from data.streaming import STATS_FILENAME, load_latent_stats
from models.transport import Transport

__all__ = ["ValidationLoss", "val_timesteps"]


def val_timesteps(k: int) -> torch.Tensor:
    """``k`` timesteps evenly spaced in [0, 1], float32."""
    return torch.tensor([i / (k - 1) for i in range(k)], dtype=torch.float32)


def _t_key(t: float) -> str:
    return f"val_loss/t{t:.3f}"


class ValidationLoss:
    """The validation loss of one run (module doc)."""

    def __init__(self, cfg, dist, latent_shape: Sequence[int]):
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device
        self.latent_shape = tuple(latent_shape)
        self.transport = Transport(use_cosine_loss=False)
        self.t = val_timesteps(cfg.eval.val_timesteps)
        self._data: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ data
    def _chunks(self, n: int) -> list[int]:
        b = self.cfg.eval.val_batch_size
        return list(range(self.dist.rank, math.ceil(n / b), self.dist.world_size))

    def _load(self) -> dict[str, Any]:
        """This rank's chunks of the held-out set: latents, labels, sample ids, noise (read once)."""
        if self._data is not None:
            return self._data

        d = self.cfg.data
        mean = std = None
        if d.latent_norm:  # the training reader's normalisation (LatentDataset), with data.path's statistics
            mean, std = (t.reshape(-1, 1, 1) for t in load_latent_stats(Path(d.path) / STATS_FILENAME))
        samples = list(read_mds_samples(d.val_path))
        n, b, k = len(samples), self.cfg.eval.val_batch_size, len(self.t)
        if n == 0:
            raise ValueError(f"data.val_path: {d.val_path} holds no samples")
        chunks = []
        for c in self._chunks(n):
            idx = list(range(c * b, min((c + 1) * b, n)))
            latents, labels, noise = [], [], []
            for i in idx:
                raw = samples[i]
                z = torch.from_numpy(raw["latent"].copy())
                if tuple(z.shape) != self.latent_shape:
                    raise ValueError(
                        f"data.val_path: latents of {d.val_path} have shape {tuple(z.shape)}, the model expects "
                        f"{self.latent_shape}"
                    )
                z = torch.sub(z, mean).div_(std) if mean is not None else z.to(torch.float32, copy=True)
                latents.append(z.mul_(d.latent_multiplier))
                labels.append(torch.tensor(int(raw["label"]), dtype=torch.long))
                g = torch.Generator().manual_seed(self._noise_seed(int(raw["sample_id"])))
                noise.append(torch.randn((k, *self.latent_shape), generator=g))
            pad = b - len(idx)
            chunks.append(
                {
                    "index": torch.tensor(idx, dtype=torch.long),
                    "latent": torch.stack(latents + [latents[-1]] * pad),
                    "label": torch.stack(labels + [labels[-1]] * pad),
                    "noise": torch.stack(noise + [noise[-1]] * pad, dim=1),  # [K, B, C, H, W]
                }
            )
        self._data = {"num_samples": n, "chunks": chunks}
        return self._data

    def _noise_seed(self, sample_id: int) -> int:
        return seed_for(self.cfg.eval.seed, sample_id, 0, "val/noise")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, part: Any, which: str) -> dict[str, float]:
        """Collective: the validation loss of weights ``which`` of ``part`` (module doc), identical on every rank."""
        data = self._load()
        losses, index = [], []
        with part.full_model(which) as model:
            model.eval()
            for chunk in data["chunks"]:
                x1 = chunk["latent"].to(self.device)
                y = chunk["label"].to(self.device)
                per_t = []
                for k, t in enumerate(self.t.tolist()):
                    tt = torch.full((x1.shape[0],), t, dtype=torch.float32, device=self.device)
                    terms = self.transport.training_losses(
                        model, x1, {"y": y}, t=tt, noise=chunk["noise"][k].to(self.device)
                    )
                    per_t.append(terms["mse"].float().cpu())
                n = len(chunk["index"])
                losses.append(torch.stack(per_t, dim=1)[:n])  # [n, K], padding dropped
                index.append(chunk["index"])
        local = (
            torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
            torch.cat(losses) if losses else torch.zeros(0, len(self.t)),
        )
        gathered = all_gather_object(local) if self.dist.world_size > 1 else [local]
        idx = torch.cat([g[0] for g in gathered])
        table = torch.cat([g[1] for g in gathered])[torch.argsort(idx)].double()  # sample order
        if len(idx) != data["num_samples"]:
            raise RuntimeError(f"validation loss: {len(idx)} losses for {data['num_samples']} held-out samples")
        per_t = table.mean(dim=0)
        out = {"val_loss": float(per_t.mean())}
        out.update({_t_key(t): float(v) for t, v in zip(self.t.tolist(), per_t.tolist())})
        return out


def evaluate_dit(task: Any, part: Any, step: int, kinds: frozenset[str]) -> dict[str, Any]:
    """``DiTTask.evaluate``: what is due of the in-loop evaluation (``"samples"``: models/evaluation/in_loop.py, once
    per EMA of ``train.ema_decays``) and of the validation loss (``"val"``: every EMA and the raw weights).
    Collective, every rank. Keys: the primary EMA's unprefixed (``fid``, ``val_loss``, ``val_loss/t0.000``), the
    others under their name (``ema_1/fid``, ``ema_1/val_loss``, ``model/val_loss``); the trainer adds ``eval/``."""
    keys = part.ema_keys() if getattr(part, "ema", None) is not None else []
    results: dict[str, Any] = {}

    def add(which: str, values: dict[str, Any], primary: str) -> None:
        prefix = "" if which == primary else f"{which}/"
        results.update({prefix + k: v for k, v in values.items()})

    if "samples" in kinds:
        for which in keys or ["model"]:
            add(which, task._evaluator().evaluate(part, step, which), (keys or ["model"])[0])
    if "val" in kinds:
        for which in keys + ["model"]:
            add(which, task._validator().evaluate(part, which), "ema")
    return results
