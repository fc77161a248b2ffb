"""How long the guide-only inner loop runs: the reference code's window rule, or a noise-aware one.

Both compare windows of consecutive inner steps by their loss per unit (token or example).
``"paper"``: windows of 15, stop at the first window whose loss is above the previous one's
(so at least 30 steps, about 50 on average). ``"noise"``: windows of 5, stop at the first
window whose improvement on the previous one is within the noise of the two windows' means
(so at least 10 steps): once the guide's improvement cannot be told from minibatch noise,
more guide steps buy little.
"""
from __future__ import annotations

import math
import statistics

INNER_RULES = ("paper", "noise")


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


class NoiseAwareStopper(InnerLoopStopper):
    """Windows of ``check_every`` steps; stop when a window's mean loss per unit is not below the
    previous window's by more than ``noise`` standard errors of their difference (or after
    ``max_steps``). The standard error comes from the spread of the per-step losses per unit."""

    def __init__(self, check_every: int = 5, max_steps: int = 100, noise: float = 1.0) -> None:
        super().__init__(check_every, max_steps)
        if not (noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"the inner loop's noise factor must be a non-negative number, got {noise!r}")
        self.noise = noise
        self._per_unit: list[float] = []
        self._previous_se = 0.0  # the first window never stops the loop (its predecessor is at +inf)

    def update(self, loss: float, count: float = 1.0) -> bool:
        self.steps += 1
        self._window_loss += loss
        self._window_count += count
        self._per_unit.append(loss / max(count, 1e-12))
        if self.steps % self.check_every == 0:
            current = self._window_loss / max(self._window_count, 1e-12)
            spread = statistics.stdev(self._per_unit) if len(self._per_unit) > 1 else 0.0
            se = spread / math.sqrt(len(self._per_unit))
            if self._previous - current <= self.noise * math.hypot(se, self._previous_se):
                return True
            self._previous, self._previous_se = current, se
            self._window_loss, self._window_count, self._per_unit = 0.0, 0.0, []
        return self.steps >= self.max_steps


def make_stopper(rule: str, check_every: int | None, max_steps: int) -> InnerLoopStopper:
    """A fresh stopper for one inner loop: ``rule`` is ``"paper"`` or ``"noise"``; ``check_every``
    None takes the rule's own window (15 or 5)."""
    if rule == "paper":
        return InnerLoopStopper(15 if check_every is None else check_every, max_steps)
    if rule == "noise":
        return NoiseAwareStopper(5 if check_every is None else check_every, max_steps)
    raise ValueError(f"inner_rule must be one of {', '.join(INNER_RULES)}, got {rule!r}")
