"""A bounded, uniform sample of the batches a training loop has passed to ``step``.

AggressiveSVI used as a literal drop-in gets no source of fresh batches and no
validation data; it draws both from here. Batches of different structure (a
supervised ``(x, y)`` and an unsupervised ``(x,)`` step on one SVI) are kept apart,
so an inner step always gets a batch of the kind its own step had.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Hashable, Iterable, Iterator

import torch

from pyro_lag.data.batches import Batches
from pyro_lag.trace.sites import normalize_batch

BatchCall = tuple[tuple, dict]


def batch_kind(args: tuple, kwargs: dict) -> Hashable:
    """The structure of a call: for each argument its type (tensors: dtype and rank), and the keyword names."""

    def describe(value: Any) -> Hashable:
        if isinstance(value, torch.Tensor):
            return ("tensor", value.dtype, value.dim())
        return type(value).__name__

    return tuple(describe(a) for a in args), tuple(sorted((k, describe(v)) for k, v in kwargs.items()))


def batch_points(args: tuple, kwargs: dict) -> int:
    """Data points in a call: the leading size of its first tensor argument (1 if none)."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


class SeenBatches:
    """Reservoir samples (Vitter's algorithm R) of the calls seen, one reservoir per kind of call.

    Holds references, not copies: at most ``capacity`` batches per kind. Its own
    random stream keeps the training run's streams untouched.
    """

    def __init__(self, capacity: int = 64, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("the capacity of the seen-batch reservoir must be a positive integer")
        self.capacity = capacity
        self._random = random.Random(seed)
        self._kept: dict[Hashable, list[BatchCall]] = {}
        self._seen: dict[Hashable, int] = {}
        self._points: dict[Hashable, int] = {}

    def add(self, args: tuple, kwargs: dict) -> None:
        """Offer one call to the reservoir of its kind."""
        kind = batch_kind(args, kwargs)
        kept = self._kept.setdefault(kind, [])
        seen = self._seen.get(kind, 0) + 1
        self._seen[kind] = seen
        self._points[kind] = self._points.get(kind, 0) + batch_points(args, kwargs)
        if len(kept) < self.capacity:
            kept.append((args, kwargs))
            return
        slot = self._random.randrange(seen)
        if slot < self.capacity:
            kept[slot] = (args, kwargs)

    def draw(self, args: tuple, kwargs: dict) -> BatchCall:
        """A random kept call of the same kind as ``(args, kwargs)`` (that call itself when none is kept)."""
        kept = self._kept.get(batch_kind(args, kwargs))
        if not kept:
            return args, kwargs
        return kept[self._random.randrange(len(kept))]

    def most_seen(self) -> list[BatchCall]:
        """The kept calls of the kind that has brought the most data points."""
        if not self._points:
            return []
        kind = max(self._points, key=lambda k: self._points[k])
        return list(self._kept[kind])

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._kept.values())


class GuideBatches:
    """Fresh minibatches for inner steps: a batch source's ``sample()`` (:class:`pyro_lag.data.batches.Batches`,
    e.g. ``pyro_lag.data``'s), a zero-argument callable, or a (re-iterable) iterable, cycled."""

    def __init__(self, source: Callable[[], Any] | Iterable[Any]) -> None:
        self._source = source.sample if isinstance(source, Batches) else source
        self._iterator: Iterator[Any] | None = None

    def next(self) -> tuple[tuple, dict]:
        if callable(self._source) and not hasattr(self._source, "__iter__"):
            return normalize_batch(self._source())
        if self._iterator is None:
            self._iterator = iter(self._source)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self._source)
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError("guide_batches yielded no batch") from None
        return normalize_batch(batch)
