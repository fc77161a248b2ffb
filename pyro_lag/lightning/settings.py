"""How :func:`pyro_lag.lightning.fit_lightning` trains: :class:`~pyro_lag.lightning.settings.LightningSettings`.

The same settings as :func:`pyro_lag.fit` (it extends :class:`~pyro_lag.training.settings.FitSettings`,
validated the same way), with the Lightning path's defaults and three knobs of its own.
Plain data, no Lightning import: the CLI builds these settings before it decides how many
processes to start.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyro_lag.handlers.kl_weight import KLSchedule, beta
from pyro_lag.training.settings import FitSettings

__all__ = ["LightningSettings"]


@dataclass(frozen=True)
class LightningSettings(FitSettings):
    """:class:`~pyro_lag.training.settings.FitSettings` for multi-process training.

    Defaults differ from ``fit``'s: Adam at lr 1e-3, the ``patience`` stop rule and no
    learning-rate decay (``lr_decay=None``); :meth:`for_kind` gives the paper's per-kind
    choices and :meth:`from_fit` takes a ``fit`` run's resolved settings unchanged.

    :param separate_guide_optim: guide and model get optimizers of their own (the paper).
    :param per_example_loss: scale the loss by 1/batch size, as :func:`pyro_lag.fit` does.
    :param kl_weight: overrides the method's KL weight: a constant, a
        :class:`~pyro_lag.handlers.kl_weight.KLSchedule`, or a factory ``steps_per_epoch -> KLSchedule``
        such as ``functools.partial(pyro_lag.handlers.kl_weight.linear_annealing, 0.1, 10)``; steps
        per epoch are those of one rank.

    With ``optim`` a callable ``lr -> PyroOptim``, make it a module-level function when
    processes are spawned (it is pickled). Parameters are initialised with ``seed`` on every
    rank; rank r then draws its samples with ``seed + r``. Validation losses are reduced over
    ranks, so every rank decays its learning rate at the same epoch.
    """

    optim: str | Callable[[float], Any] | None = "adam"
    lr: float | None = 1e-3
    stop_rule: str | None = "patience"
    patience: int | None = 5
    lr_decay: float | None = None
    decay_patience: int | None = 2
    decay_after: int | None = 0
    separate_guide_optim: bool = True
    per_example_loss: bool = True
    kl_weight: Any = None

    @classmethod
    def for_kind(cls, kind: str | None, **overrides: Any) -> LightningSettings:
        """The reference's defaults for ``kind`` (as :func:`pyro_lag.fit` picks them), then ``overrides``.

        ``"text"``: SGD at lr 1.0 and the noise-aware ``drop`` stop rule (patience 2);
        ``"image"`` or None: Adam at lr 1e-3 and the ``patience`` rule (patience 5).
        Learning-rate decay stays off unless ``lr_decay`` is among the overrides.
        """
        if kind not in (None, "text", "image"):
            raise ValueError(f"kind must be 'text' or 'image', got {kind!r}")
        if kind == "text":
            defaults: dict[str, Any] = {"optim": "sgd", "lr": 1.0, "stop_rule": "drop", "patience": 2}
        else:
            defaults = {"optim": "adam", "lr": 1e-3, "stop_rule": "patience", "patience": 5}
        return cls(**{"kind": kind, **defaults, **overrides})

    @classmethod
    def from_fit(cls, settings: FitSettings, **extra: Any) -> LightningSettings:
        """``settings`` (resolved as ``fit`` resolves them) for the Lightning path, plus ``extra`` knobs."""
        resolved = settings.resolved()
        values = {f.name: getattr(resolved, f.name) for f in dataclasses.fields(FitSettings)}
        return cls(**{**values, **extra})

    def kl_schedule(self, steps_per_epoch: int) -> KLSchedule | None:
        """``kl_weight`` when given, else the method's schedule (as ``fit`` builds it)."""
        weight = self.kl_weight
        if weight is None:
            return self.kl_handlers(steps_per_epoch)[0]
        if isinstance(weight, KLSchedule):
            return weight
        if isinstance(weight, (int, float)):
            return beta(float(weight))
        return weight(steps_per_epoch)
