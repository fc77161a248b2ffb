"""The reference's learning-rate decay on a validation plateau, as one small state machine.

After ``decay_patience`` epochs whose validation loss is above the plateau's (from epoch
``decay_after`` on), the lr is multiplied by ``lr_decay`` and the plateau restarts at that
loss; the caller then reloads the best parameters and builds fresh optimizers, as the
paper's code does. ``fit`` and the Lightning module both keep one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Plateau", "PlateauSettings"]


class PlateauSettings(Protocol):
    """The settings the rule reads (:class:`pyro_lag.training.settings.FitSettings` has them)."""

    @property
    def lr_decay(self) -> float | None: ...

    @property
    def decay_patience(self) -> int | None: ...

    @property
    def decay_after(self) -> int | None: ...

    @property
    def max_decays(self) -> int: ...


@dataclass
class Plateau:
    """Where the decay stands: the current lr, the plateau's loss, epochs above it, decays so far.

    >>> plateau = Plateau(lr=1.0)
    >>> from pyro_lag.training.settings import FitSettings
    >>> rule = FitSettings(lr_decay=0.5, decay_patience=2, decay_after=0)
    >>> [plateau.should_decay(rule, epoch, loss) for epoch, loss in enumerate([5, 4, 6, 7])]
    [False, False, False, True]
    >>> plateau.lr, plateau.decays
    (0.5, 1)
    """

    lr: float
    plateau_loss: float = 1e4
    not_improved: int = 0
    decays: int = 0

    def should_decay(self, settings: PlateauSettings, epoch: int, val_loss: float) -> bool:
        """Record epoch ``epoch``'s (0-based) validation loss; True when lr decays now (then the
        plateau restarts at this loss and the lr is already scaled)."""
        if settings.lr_decay is None:
            return False
        if val_loss <= self.plateau_loss:
            self.not_improved = 0
            self.plateau_loss = val_loss
            return False
        self.not_improved += 1
        if self.not_improved < (settings.decay_patience or 0) or epoch < (settings.decay_after or 0):
            return False
        self.plateau_loss = val_loss
        self.not_improved = 0
        self.decays += 1
        self.lr = self.lr * settings.lr_decay
        return True

    def exhausted(self, settings: PlateauSettings) -> bool:
        """Whether training should stop: the lr has decayed ``max_decays`` times."""
        return settings.lr_decay is not None and self.decays >= settings.max_decays

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
