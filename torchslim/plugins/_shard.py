"""Training in several processes: the train batches each one sees (a seeded order, its share), and DDP."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from ..engine import distributed


class TrainBatches:
    """Batches of one process, epoch by epoch.

    A torch ``DataLoader`` over a map-style dataset with a plain random or sequential sampler is
    rebuilt over its ``.dataset`` with a :class:`DistributedSampler` seeded by ``seed`` (also in
    one process, so the order depends only on the seed and the epoch). Its batch size is split
    between the processes, so the global batch, and the steps per epoch, stay those of the loader.

    Any other iterable, and any loader when ``seed`` is None, is sharded by striding whole batches
    (process ``rank`` takes batches ``rank, rank + N, ...``, the incomplete last round dropped so
    all take the same number); its order is the loader's own.
    """

    def __init__(self, loader: Iterable[Any], seed: int | None, world: int = 1, rank: int = 0) -> None:
        self.world, self.rank = world, rank
        # seed None: prune's fine-tuning keeps the loader's own order, as it always had.
        self.rebuilt = _rebuild(loader, seed, world, rank) if seed is not None else None
        self.loader = loader

    @property
    def shared(self) -> bool:
        """Whether several processes train on these batches together, each on its share."""
        return self.world > 1

    @property
    def sampler(self) -> DistributedSampler[Any] | None:
        """The seeded sampler, when the loader could be rebuilt."""
        sampler = self.rebuilt.sampler if self.rebuilt is not None else None
        return sampler if isinstance(sampler, DistributedSampler) else None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (the same order on every process, a different one each epoch)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def length(self) -> int | None:
        """Batches per epoch for this process, or None if the loader does not say."""
        if self.rebuilt is not None:
            return len(self.rebuilt)
        try:
            total = len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            return None
        return total // self.world

    def __iter__(self) -> Iterator[Any]:
        if self.rebuilt is not None:
            return iter(self.rebuilt)
        if self.world == 1:
            return iter(self.loader)
        return _strided(self.loader, self.world, self.rank)


def wrap(trainee: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``trainee`` when several processes train together."""
    if distributed.world_size() <= 1:
        return trainee
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(trainee, device_ids=[device] if device.type == "cuda" else None)


def _rebuild(loader: Iterable[Any], seed: int, world: int, rank: int) -> DataLoader[Any] | None:
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return None
    shuffle = _plain_shuffle(loader)
    if shuffle is None:
        return None  # a custom sampler (weighted, grouped...) keeps its own order
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed
    )
    return DataLoader(
        loader.dataset,
        batch_size=max(1, loader.batch_size // world),
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn,
    )


def _plain_shuffle(loader: DataLoader[Any]) -> bool | None:
    """True for a plain random sampler, False for a sequential one, None for anything else."""
    sampler = loader.sampler
    if type(sampler) is SequentialSampler:
        return False
    if type(sampler) is RandomSampler and not sampler.replacement and getattr(sampler, "_num_samples", None) is None:
        return True
    return None


def _strided(loader: Iterable[Any], world: int, rank: int) -> Iterator[Any]:
    group: list[Any] = []
    for batch in loader:
        group.append(batch)
        if len(group) == world:
            yield group[rank]
            group = []
