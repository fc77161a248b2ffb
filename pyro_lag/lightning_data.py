"""The data side of Lightning training: batches by ``(epoch, position)``, each rank's shard of them,
and the small wrappers every rank applies to the programs and batches."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from pyro import poutine
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from .inner_loop import examples_in

__all__ = ["EpochBatches", "EpochShardSampler"]


def _unchanged(batch: Any) -> Any:
    """The DataLoader's collate function: batches come ready-made."""
    return batch


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class EpochBatches(Dataset):
    """The training batches, addressed by ``(epoch, position)``.

    A :class:`pyro_lag.data.BatchSource` (shuffled and binarised per epoch) gives batch
    ``position`` of ``epoch``; a sequence of batches gives its item ``position`` in
    every epoch (as :func:`pyro_lag.fit` iterates it).
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self._by_epoch = hasattr(source, "iter_from")
        self._items = None if self._by_epoch or hasattr(source, "__getitem__") else list(source)

    def __len__(self) -> int:
        return len(self.source) if self._items is None else len(self._items)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, position = key
        if self._by_epoch:
            return next(iter(self.source.iter_from(epoch, position)))
        items = self.source if self._items is None else self._items
        return items[position]


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

    def positions(self) -> list[int]:
        n = len(self.dataset)
        return [(self.rank + k * self.num_replicas) % n for k in range(self.num_samples)]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.first_epoch + self.epoch
        return iter([(epoch, p) for p in self.positions()])

    def __len__(self) -> int:
        return self.num_samples


def _eval_batches(source: Any) -> list[Any]:
    """The validation batches, the same at every epoch (epoch 0 of a batch source)."""
    if hasattr(source, "iter_from"):
        return list(source.iter_from(0, 0))
    return list(source)


def _per_example(fn: Callable) -> Callable:
    """Scale a program's log-densities by 1/batch size (the reference averages its loss over the batch)."""

    def scaled(*args: Any, **kwargs: Any) -> Any:
        with poutine.scale(scale=1.0 / examples_in(args, kwargs)):
            return fn(*args, **kwargs)

    return scaled


def _modules_of(*fns: Callable) -> list[torch.nn.Module]:
    """The torch modules behind callables (modules themselves or their bound methods)."""
    found: list[torch.nn.Module] = []
    for fn in fns:
        owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module) and all(owner is not m for m in found):
            found.append(owner)
    return found


class _InnerUnits:
    """A batch's ``(weight, units)`` for the inner loop's windows, as :func:`pyro_lag.fit` gives them.

    A window compares its summed loss over its summed units (tokens for a text source,
    examples otherwise), as the reference does; a per-example loss is weighted back up by
    the batch size. The distributed SVI sums both over ranks.
    """

    def __init__(self, source: Any, per_example_loss: bool) -> None:
        self.source = source
        self.per_example_loss = per_example_loss

    def __call__(self, args: tuple, kwargs: dict) -> tuple[float, float]:
        points = examples_in(args, kwargs)
        units = float(self.source.normalizer(args)) if hasattr(self.source, "normalizer") else points
        return (points if self.per_example_loss else 1.0), units
