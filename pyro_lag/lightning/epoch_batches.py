"""The data side of Lightning training: batches by ``(epoch, position)`` and each rank's shard of them."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from pyro_lag.data.batches import Batches, as_batches

__all__ = ["EpochBatches", "EpochShardSampler"]


def _unchanged(batch: Any) -> Any:
    """The DataLoader's collate function: batches come ready-made."""
    return batch


class EpochBatches(Dataset):
    """The training batches, addressed by ``(epoch, position)``.

    A :class:`pyro_lag.data.BatchSource` (shuffled and binarised per epoch) gives batch
    ``position`` of ``epoch``; a sequence of batches gives its item ``position`` in
    every epoch (as :func:`pyro_lag.fit` iterates it).
    """

    def __init__(self, source: Any) -> None:
        self.source: Batches = as_batches(source)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, position = key
        return next(iter(self.source.iter_from(epoch, position)))


class EpochShardSampler(DistributedSampler):
    """Rank ``rank``'s share of each epoch's batches, as ``(epoch, position)`` keys.

    Positions ``rank, rank + R, rank + 2R, ...`` of the epoch, wrapping around so that
    every rank gets ``ceil(batches / R)``: equal step counts, so no rank waits in a
    collective that another rank never enters. Lightning calls ``set_epoch`` before each
    epoch; ``first_epoch`` shifts it when a run resumes. Being a ``DistributedSampler``,
    it is never wrapped by Lightning's own.
    """

    def __init__(self, dataset: EpochBatches, num_replicas: int, rank: int, first_epoch: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.first_epoch = first_epoch
        self.batches = dataset

    def positions(self) -> list[int]:
        n = len(self.batches)
        return [(self.rank + k * self.num_replicas) % n for k in range(self.num_samples)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.first_epoch + self.epoch
        return iter([(epoch, p) for p in self.positions()])

    def __len__(self) -> int:
        return self.num_samples
