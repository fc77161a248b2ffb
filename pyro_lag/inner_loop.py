"""How long the guide-only inner loop runs: the reference code's window rule."""
from __future__ import annotations

import math

import torch


class InnerLoopStopper:
    """The reference code's stop rule for the guide-only inner loop.

    Losses are summed over windows of ``check_every`` steps and normalised (per token
    for text, per example for images); the loop stops when a window's normalised loss
    is above the previous window's, or after ``max_steps`` steps.
    """

    def __init__(self, check_every: int = 15, max_steps: int = 100) -> None:
        if check_every < 1 or max_steps < 1:
            raise ValueError("check_every and max_inner_steps must be positive integers")
        self.check_every = check_every
        self.max_steps = max_steps
        self.steps = 0
        self._previous = math.inf
        self._window_loss = 0.0
        self._window_count = 0.0

    def update(self, loss: float, count: float = 1.0) -> bool:
        """Record one inner step's summed loss over ``count`` units; return True to stop."""
        self.steps += 1
        self._window_loss += loss
        self._window_count += count
        if self.steps % self.check_every == 0:
            current = self._window_loss / max(self._window_count, 1e-12)
            if current > self._previous:
                return True
            self._previous = current
            self._window_loss = 0.0
            self._window_count = 0.0
        return self.steps >= self.max_steps


def examples_in(args: tuple, kwargs: dict) -> float:
    """Examples in a batch: the leading size of its first tensor argument, else 1."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return float(value.shape[0])
    return 1.0
