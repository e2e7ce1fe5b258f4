"""The ``data:`` section of an experiment config (the training data of every task) and its value checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from core.config import Checks

__all__ = ["DataConfig", "check_data_config"]


@dataclass
class DataConfig:
    """Training data: MDS shards of precomputed latents (see data/streaming.py) for the DiT; images for VA-VAE
    ("images": an ImageNet-style folder or a "<path> <label>" file list at `path`; "synthetic": the embedded
    procedural images of data/synthetic.py; "streaming": MDS shards with the `image` column and, for
    vavae.vf.features=precomputed, their DINOv2 `features`, written by data/extract.py)."""

    kind: Literal["streaming", "images", "synthetic"] = "streaming"
    path: str = ""  # local MDS directory (or the local cache of `remote`)
    remote: Optional[str] = None  # optional remote for streaming (s3://..., gs://...)
    # DiT validation loss (eval.val_every_epochs): local MDS directory of the held-out samples, kept out of `path`
    # (data/holdout.py writes both: OUT/train and OUT/val)
    val_path: str = ""
    latent_norm: bool = True  # per-channel (z - mean) / std with the stats stored with the dataset
    latent_multiplier: float = 1.0
    random_flip: bool = True  # pick latent_flip (VA-VAE streaming: flip the image) with p = 0.5
    use_features: bool = False  # DiT: also read the DINOv2 `features` column (VA-VAE: vavae.vf.features)
    num_workers: int = 2
    shuffle: bool = True
    predownload: Optional[int] = None
    # image kinds ("images", "synthetic"; VA-VAE training)
    image_size: int = 256  # training crop size ("streaming": the stored image size)
    image_crop: Literal["random", "center"] = "random"  # official: SmallestMaxSize + RandomCrop (val: center)
    synthetic_num_samples: int = 1024  # "synthetic": dataset size
    synthetic_num_classes: int = 10


def check_data_config(d: DataConfig, checks: Checks) -> None:
    """Value checks of the ``data`` section; what a task needs of it is checked by the task (Task.check_config)."""
    checks.need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    checks.positive(d.latent_multiplier, "data.latent_multiplier")
    checks.positive(d.predownload, "data.predownload", allow_none=True)
