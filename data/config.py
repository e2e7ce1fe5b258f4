"""The ``data:`` section of an experiment config (the training data of every task) and its value checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

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
    # streaming from `remote` (s3://bucket/prefix, gs://...; credentials and endpoint from the standard environment
    # variables, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / S3_ENDPOINT_URL, never from a config file):
    cache_limit: Optional[Union[int, str]] = None  # bound on the local cache at `path` (bytes or "50gb"); shards
    #                                                beyond it are evicted (least recently used) and fetched again
    download_retry: int = 2  # attempts per shard download
    download_timeout: float = 60.0  # seconds per shard download
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
    checks.need(d.download_retry >= 0, "data.download_retry", f"must be >= 0, got {d.download_retry}")
    checks.positive(d.download_timeout, "data.download_timeout")
    if d.cache_limit is not None:
        try:
            from streaming.base.util import bytes_to_int

            limit = bytes_to_int(d.cache_limit)
        except ValueError:
            limit = None
        checks.need(
            limit is not None and limit > 0,
            "data.cache_limit",
            f"must be a size in bytes or with a unit such as 50gb, got {d.cache_limit!r}",
        )
        checks.need(
            bool(d.remote),
            "data.cache_limit",
            "needs data.remote: shards evicted from the cache at data.path are fetched again from the remote",
        )
