"""``fit``-style callbacks, called the same way by ``fit`` and by the Lightning module's rank 0.

A callback is an object with ``on_batch_end(info)`` (after every model step: epoch, step,
steps, loss, inner_steps, aggressive, kl_weight) and/or ``on_epoch_end(row)`` (the epoch's
history row), or a plain callable called with each epoch's row. Each gets its own copy.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Callbacks"]


class Callbacks:
    """A list of callbacks, each told only what it listens for."""

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        self.items = list(callbacks)

    def __bool__(self) -> bool:
        return bool(self.items)

    def batch_end(self, info: Mapping[str, Any]) -> None:
        for callback in self.items:
            if hasattr(callback, "on_batch_end"):
                callback.on_batch_end(dict(info))

    def epoch_end(self, row: Mapping[str, Any]) -> None:
        for callback in self.items:
            if hasattr(callback, "on_epoch_end"):
                callback.on_epoch_end(dict(row))
            elif callable(callback) and not hasattr(callback, "on_batch_end"):
                callback(dict(row))
