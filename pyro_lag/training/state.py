"""Where a single-process training run stands: plain data that goes into every checkpoint."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pyro_lag.io.checkpoint import plain_data
from pyro_lag.training.lr_plateau import Plateau

__all__ = ["EpochTotals", "TrainingState"]


@dataclass
class EpochTotals:
    """Running sums over the current epoch's training steps."""

    loss: float = 0.0  # summed per-example loss times examples
    points: int = 0
    inner: int = 0  # guide-only steps
    steps: int = 0  # model steps
    aggressive_steps: int = 0  # model steps taken in aggressive mode (an inner loop before each)
    time: float = 0.0  # seconds spent training so far

    def add(self, loss: float, points: int, inner_steps: int, aggressive: bool) -> None:
        self.loss += loss * points
        self.points += points
        self.inner += inner_steps
        self.steps += 1
        self.aggressive_steps += int(aggressive)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.points, 1)

    @property
    def inner_per_step(self) -> float:
        return self.inner / max(self.steps, 1)


@dataclass
class TrainingState:
    """The position (epoch, step), the history, the best epoch, the lr plateau and the epoch's totals."""

    plateau: Plateau
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_epoch: int | None = None
    stopped: str | None = None
    totals: EpochTotals = field(default_factory=EpochTotals)

    @classmethod
    def start(cls, lr: float) -> TrainingState:
        return cls(plateau=Plateau(lr=lr))

    @property
    def lr(self) -> float:
        return self.plateau.lr

    @property
    def aggressive_steps(self) -> int:
        """Model steps taken in aggressive mode so far, over every epoch."""
        return sum(int(row.get("aggressive_steps", 0)) for row in self.history) + self.totals.aggressive_steps

    def next_epoch(self) -> None:
        self.epoch, self.step, self.totals = self.epoch + 1, 0, EpochTotals()

    def improves(self, val_loss: float) -> bool:
        """Record ``val_loss`` of the epoch just ended; True when it is the best so far."""
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch = val_loss, self.epoch + 1
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return plain_data(dataclasses.asdict(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau.load_state_dict(state["plateau"])
        self.totals = EpochTotals(**state["totals"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = [dict(row) for row in state["history"]]
        self.best_val_loss, self.best_epoch = float(state["best_val_loss"]), state["best_epoch"]
        self.stopped = state["stopped"]
