"""The one contract between training and data: :class:`Batches`, and one way to move a batch.

Training (``fit``, the Lightning module, AggressiveSVI's inner steps) reads data only
through this protocol. :class:`pyro_lag.data.BatchSource` implements it (seeded shuffling,
resumable); :func:`as_batches` wraps a plain sequence of batches so that it does too.
A batch is a tuple of positional arguments for model and guide (a bare tensor is a
one-argument call), or an ``(args, kwargs)`` pair.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from pyro_lag.trace.sites import normalize_batch

__all__ = ["Batches", "SequenceBatches", "as_batches", "to_device", "examples_in", "validation_batches"]


@runtime_checkable
class Batches(Protocol):
    """Training batches by epoch and position, a random batch for inner steps, and a resumable state."""

    def __len__(self) -> int:
        """Batches per epoch."""
        ...

    def iter_from(self, epoch: int, position: int = 0) -> Iterator[Any]:
        """Batches ``position, position + 1, ...`` of ``epoch``."""
        ...

    def sample(self) -> Any:
        """One random training batch (the aggressive method's inner steps)."""
        ...

    def normalizer(self, batch: Any) -> float:
        """What a batch's loss is divided by in the inner loop's windows (tokens for text, examples otherwise)."""
        ...

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue the same random streams."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


class SequenceBatches:
    """A sequence of batches, or anything with ``len`` and ``iter_from(epoch, position)``, as
    :class:`Batches`. A sequence gives the same order in every epoch. ``sample()`` draws a
    uniform position from torch's global RNG (seeded by ``fit``, kept in its checkpoints)."""

    def __init__(self, batches: Any) -> None:
        self._by_epoch = callable(getattr(batches, "iter_from", None))
        if self._by_epoch or isinstance(batches, Sequence):
            self.batches = batches
        else:
            self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def iter_from(self, epoch: int, position: int = 0) -> Iterator[Any]:
        if self._by_epoch:
            return iter(self.batches.iter_from(epoch, position))
        return iter(self.batches[position:] if position else self.batches)

    def sample(self) -> Any:
        position = int(torch.randint(len(self), ()))
        if isinstance(self.batches, Sequence):
            return self.batches[position]
        return next(self.iter_from(0, position))

    def normalizer(self, batch: Any) -> float:
        args, kwargs = normalize_batch(batch)
        return examples_in(args, kwargs)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def as_batches(source: Any) -> Batches:
    """``source`` itself when it implements :class:`Batches`, else wrapped in :class:`SequenceBatches`."""
    if isinstance(source, Batches):
        return source
    if isinstance(source, (str, bytes)) or not (isinstance(source, Iterable) or hasattr(source, "iter_from")):
        raise ValueError(f"expected a batch source or a sequence of batches, got {type(source).__name__}")
    return SequenceBatches(source)


def validation_batches(source: Any) -> list[Any]:
    """The same batches at every validation: epoch 0 of a batch source, or the sequence itself."""
    return list(as_batches(source).iter_from(0, 0))


def to_device(batch: Any, device: torch.device | str | None) -> Any:
    """A batch with every tensor in it (in tuples, lists and dicts) on ``device`` (None: unchanged)."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def examples_in(args: tuple, kwargs: dict) -> float:
    """Examples in a batch: the leading size of its first tensor argument, else 1."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return float(value.shape[0])
    return 1.0
