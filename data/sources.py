"""Training data sources: where the trainer's micro-batches come from, resumable at any step.

A `DataSource` knows its epoch length in optimizer steps and produces the micro-batches of an epoch
from any position (epoch, step in epoch). The position is all a resume needs, so it is a pure function of
the global step: no loader state has to be trusted across a kill, and an epoch boundary restarts the next
epoch from its beginning.

* `StreamingSource`  MDS shards through MosaicML streaming: precomputed latents (DiT training, `LatentDataset`) or
                     stored images with their DINOv2 features (VA-VAE training, `ImageDataset`).
* `MapSource`        any map-style torch Dataset (e.g. image files for VA-VAE training), with a seeded per-epoch
                     permutation split across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
from streaming.base.util import clean_stale_shared_memory
from torch.utils.data import DataLoader, Dataset

from core.task import DataSource  # noqa: F401  (the protocol these sources implement: the trainer's contract)
from data.streaming import LatentDataset, build_streaming_loader, steps_per_epoch


class StreamingSource:
    """MDS shards (data/streaming.py) read through a StreamingDataLoader: a `dataset_cls` reader (default
    `LatentDataset`) built from the `data` config section and `dataset_kwargs` (e.g. expected_shape)."""

    def __init__(
        self,
        cfg,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        dist,
        dataset_cls: Optional[type] = None,
        **dataset_kwargs: Any,
    ):
        # Streaming keeps per-dataset state in shared memory; a killed run leaks it. Without a remote the next
        # run simply takes a fresh prefix. With a remote, a leaked entry for the same local directory is an
        # error ("Reused local directory"), so clean first — streaming's cleanup removes every streaming
        # segment on the node, live ones included, which is why it is not done otherwise (two local jobs on one
        # node must not break each other). Collective.
        if cfg.remote:
            clean_stale_shared_memory()
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.loader, self.dataset = build_streaming_loader(
            cfg,
            batch_size=micro_batch_size,
            seed=seed,
            dist=dist,
            dataset_cls=dataset_cls or LatentDataset,
            **dataset_kwargs,
        )
        self.num_samples = self.dataset.num_samples
        self.steps_per_epoch = steps_per_epoch(self.dataset, global_batch_size)
        # Streaming's shuffle depends on its number of canonical nodes: fixed at the first start of a run
        # and kept across resumes (also on another number of nodes), so the data order never changes.
        self.num_canonical_nodes = (self.loader.state_dict() or {}).get("num_canonical_nodes")

    def iterator(self, epoch: int, step_in_epoch: int) -> Iterator[dict[str, Any]]:
        # Streaming treats a resume state for an epoch before the one it would start next as stale (and starts the
        # next epoch from its beginning): an epoch entered again in this process (a rollback, core/trainer.py)
        # must not be.
        self.dataset.next_epoch = epoch
        self.loader.load_state_dict(
            {
                "epoch": epoch,
                "sample_in_epoch": step_in_epoch * self.global_batch_size,
                "shuffle_seed": self.seed,
                "num_canonical_nodes": self.num_canonical_nodes,
                "initial_physical_nodes": None,
            }
        )
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return {"num_canonical_nodes": self.num_canonical_nodes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_canonical_nodes = state.get("num_canonical_nodes", self.num_canonical_nodes)


class _Batches(torch.utils.data.Sampler):
    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class MapSource:
    """A map-style Dataset split across ranks: epoch e uses the permutation seeded by (seed, e); rank r takes
    positions r, r + world, ... of it (drop_last over global batches), in micro-batches."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        dist,
        num_workers: int = 0,
        shuffle: bool = True,
        collate_fn=None,
    ):
        self.dataset = dataset
        self.micro = micro_batch_size
        self.accum = global_batch_size // (micro_batch_size * dist.world_size)
        self.rank, self.world = dist.rank, dist.world_size
        self.seed, self.shuffle = seed, shuffle
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.num_samples = len(dataset)
        self.steps_per_epoch = self.num_samples // global_batch_size
        self.global_batch_size = global_batch_size

    def _rank_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        used = order[: self.steps_per_epoch * self.global_batch_size]
        return used[self.rank :: self.world].tolist()

    def iterator(self, epoch: int, step_in_epoch: int) -> Iterator[dict[str, Any]]:
        idx = self._rank_indices(epoch)
        batches = [idx[i : i + self.micro] for i in range(0, len(idx), self.micro)]
        batches = batches[step_in_epoch * self.accum :]
        loader = DataLoader(
            self.dataset,
            batch_sampler=_Batches(batches),
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(self.seed),
            pin_memory=torch.cuda.is_available(),
        )
        return iter(loader)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
