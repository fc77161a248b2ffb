"""When aggressive mode ends: rules that read a series of mutual-information estimates.

The paper leaves aggressive mode at the first validation MI below the previous one
(text) or after five checks without a new best (images). An MI estimate is noisy, so
the paper's text rule ends aggressive mode on noise as often as on a real drop; the
default ``drop`` rule here counts a change only when it exceeds the estimate's noise.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

STOP_RULES = ("drop", "paper", "patience")
"""``drop``: noise-aware (the default); ``paper``: the reference's text rule; ``patience``: its image rule."""


@dataclass
class MIStopRule:
    """Decides, one MI estimate at a time, whether aggressive mode goes on.

    ``drop``: stop when MI falls below its best by more than ``noise`` standard errors
    (of the difference), or has not risen above its best by that margin (and by at
    least ``min_rise`` of the best, relative) for ``patience`` checks in a row; while MI
    has not yet risen beyond its noise at all (the guide has not caught on), three
    times ``patience`` checks.
    ``paper``: stop at the first value below the previous one, the first compared with 0
    (the reference's text rule, noise ignored).
    ``patience``: stop after ``patience`` checks in a row without a new best (the
    reference's image rule). Without a standard error a value's noise counts as 0.
    """

    rule: str = "drop"
    patience: int = 2
    noise: float = 2.0
    min_rise: float = 0.05
    best: float = 0.0
    best_se: float = 0.0
    previous: float = 0.0
    checks_without_rise: int = 0
    has_risen: bool = False

    def __post_init__(self) -> None:
        if self.rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {', '.join(STOP_RULES)}, got {self.rule!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be a positive integer, got {self.patience!r}")
        if not math.isfinite(self.noise) or self.noise < 0:
            raise ValueError(f"the MI noise margin must be a finite number >= 0, got {self.noise!r}")
        if not math.isfinite(self.min_rise) or self.min_rise < 0:
            raise ValueError(f"the minimum relative MI rise must be a finite number >= 0, got {self.min_rise!r}")

    def keeps_going(self, value: float, se: float | None = None) -> bool:
        """Take one MI estimate (nats) and its standard error; return False when aggressive mode should end."""
        value = float(value)
        se = 0.0 if se is None else float(se)
        if not math.isfinite(value):
            raise ValueError(f"mutual information must be a finite number, got {value}")
        if not math.isfinite(se) or se < 0:
            raise ValueError(f"the standard error of the MI must be a finite number >= 0, got {se}")
        if self.rule == "paper":
            dropped = value < self.previous
            self.previous = value
            return not dropped
        if self.rule == "patience":
            return self._count(rose=value > self.best, value=value, se=se)
        margin = self.noise * math.hypot(se, self.best_se)
        if value < self.best - margin:
            return False
        rise = max(margin, self.min_rise * abs(self.best))
        return self._count(rose=value > self.best + rise, value=value, se=se)

    def _count(self, rose: bool, value: float, se: float) -> bool:
        if rose:
            self.best, self.best_se = value, se
            self.checks_without_rise = 0
            self.has_risen = True
            return True
        self.checks_without_rise += 1
        allowed = self.patience if self.has_risen or self.rule == "patience" else 3 * self.patience
        return self.checks_without_rise < allowed

    def state_dict(self) -> dict:
        """Plain data to resume the rule exactly."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
