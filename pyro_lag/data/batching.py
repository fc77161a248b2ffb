"""The batch-source interface shared by text and image data, and its seeding helpers.

A batch source hands the training loop one epoch of batches at a time. Every random
choice (batch order, binarisation, the random batches of the aggressive inner loop)
comes from a generator seeded by ``(seed, purpose, epoch, position)``, never from the
global RNG, so a run can restart at any epoch and batch position and see the same data.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "DataFileError",
    "BatchSource",
    "derive_seed",
    "heldout_split",
]

# Purposes mixed into derived seeds, so each random stream is independent of the others.
SHUFFLE, BINARIZE, SAMPLE, FIXED = 0, 1, 2, 3


class DataFileError(ValueError):
    """A data file that exists but cannot be used; the message is one line naming the file."""


def check_seed(seed: int, name: str = "seed") -> int:
    """Return ``seed`` as an int, refusing negative or non-integer values."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_positive(value: int, name: str) -> int:
    """Return ``value`` as an int, refusing values that are not positive integers."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``keys`` (NumPy's SeedSequence)."""
    state = np.random.SeedSequence([check_seed(seed), *[int(k) for k in keys]]).generate_state(
        1, dtype=np.uint64
    )
    return int(state[0] >> np.uint64(1))


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` items in ``epoch``: same seed and epoch, same order."""
    rng = np.random.default_rng(derive_seed(seed, SHUFFLE, epoch))
    return rng.permutation(n)


def heldout_split(n: int, n_heldout: int, *, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, heldout)`` that hold out ``n_heldout`` of ``n`` items.

    Without a seed the held-out items are the last ``n_heldout`` (deterministic, the usual
    way to carve a validation set from a training array); with a seed they are a random
    subset, the same for the same seed. Both index arrays are sorted.
    """
    n = check_positive(n, "n")
    if isinstance(n_heldout, bool) or not isinstance(n_heldout, (int, np.integer)) or not 0 < n_heldout < n:
        raise ValueError(f"n_heldout must be an integer between 1 and {n - 1}, got {n_heldout!r}")
    if seed is None:
        return np.arange(n - n_heldout), np.arange(n - n_heldout, n)
    order = epoch_permutation(n, seed, 0)
    return np.sort(order[n_heldout:]), np.sort(order[:n_heldout])


def as_tuple(batch) -> tuple:
    """A batch as a tuple of positional arguments (a bare tensor is a one-argument call)."""
    return batch if isinstance(batch, tuple) else (batch,)


class BatchSource(ABC):
    """One epoch of batches per iteration, each a tuple of positional args for model/guide.

    ``len(source)`` is the number of batches per epoch. ``source.epoch`` picks the epoch
    whose shuffle (and binarisation) is used; iterating a whole epoch with ``for`` moves
    it on by one. ``iter_from(epoch, position)`` starts mid-epoch, for resuming.
    ``sample()`` returns one random training batch from its own seeded generator (the
    aggressive method's inner steps); its state is in ``state_dict()``.
    """

    def __init__(self, *, seed: int = 0, shuffle: bool = True, device: str | torch.device = "cpu"):
        self.seed = check_seed(seed)
        self.shuffle = bool(shuffle)
        self.device = torch.device(device)
        self.epoch = 0
        self._sample_generator = torch_generator(self.seed, SAMPLE)

    # -- what a concrete source provides -------------------------------------------------
    @abstractmethod
    def __len__(self) -> int:
        """Batches per epoch."""

    @property
    @abstractmethod
    def num_examples(self) -> int:
        """Examples (sentences or images) in one epoch."""

    @abstractmethod
    def _plan(self, epoch: int):
        """Whatever fixes the epoch's order (computed once per epoch)."""

    @abstractmethod
    def _batch(self, plan, epoch: int, position: int) -> tuple[torch.Tensor, ...]:
        """The CPU tensors of batch ``position`` of ``epoch``."""

    @abstractmethod
    def _sample(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """One random training batch (CPU tensors) drawn with ``generator``."""

    @abstractmethod
    def normalizer(self, batch) -> float:
        """What a batch's loss is divided by: tokens for text, examples for images."""

    # -- the common interface -------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {value!r}")
        self._epoch = int(value)

    def to(self, device: str | torch.device) -> "BatchSource":
        """Deliver later batches on ``device``; returns ``self``."""
        self.device = torch.device(device)
        return self

    def _move(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in tensors)

    def iter_from(self, epoch: int, position: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches ``position, position + 1, ...`` of ``epoch`` (does not change ``.epoch``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not 0 <= position <= len(self):
            raise ValueError(f"position must be an integer between 0 and {len(self)}, got {position!r}")
        return self._iterate(int(epoch), int(position))

    def _iterate(self, epoch: int, position: int) -> Iterator[tuple[torch.Tensor, ...]]:
        plan = self._plan(epoch)
        for p in range(position, len(self)):
            yield self._move(self._batch(plan, epoch, p))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch = self.epoch
        yield from self._iterate(epoch, 0)
        self.epoch = epoch + 1

    def sample(self) -> tuple[torch.Tensor, ...]:
        """One random training batch, from this source's own seeded generator."""
        return self._move(self._sample(self._sample_generator))

    def state_dict(self) -> dict:
        """The epoch and the ``sample()`` generator state (tensors and ints only)."""
        return {"epoch": self.epoch, "sample_rng": self._sample_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict()`` returned."""
        self.epoch = int(state["epoch"])
        self._sample_generator.set_state(state["sample_rng"])
