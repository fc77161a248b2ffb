"""How :func:`pyro_lag.lightning.fit_lightning` trains: :class:`LightningSettings`.

Plain data, no Lightning import: the CLI builds these settings before it decides how
many processes to start.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["LightningSettings"]


@dataclass
class LightningSettings:
    """How to train: the same knobs as :func:`pyro_lag.fit` where they exist there.

    :param optim: ``"adam"``, ``"sgd"`` or ``lr -> PyroOptim`` (a module-level function
        when processes are spawned: it is pickled).
    :param separate_guide_optim: guide and model get optimizers of their own (the paper).
    :param loss: ``"exact"`` (closed-form KL, TraceMeanField_ELBO), ``"sampled"`` or an ELBO.
    :param kl_weight: None, a constant, a :class:`~pyro_lag.handlers.KLSchedule`, or a
        factory ``steps_per_epoch -> KLSchedule`` such as
        ``functools.partial(pyro_lag.handlers.linear_annealing, 0.1, 10)``; steps per epoch
        are those of one rank.
    :param free_bits: nats per latent dimension below which the KL is not penalised (None: off).
    :param aggressive: train aggressively until the stop rule ends it (False: plain SVI).
    :param mi_samples: latent draws per validation point for the MI estimate.
    :param per_example_loss: scale the loss by 1/batch size, as :func:`pyro_lag.fit` does.
    :param seed: parameters are initialised with ``seed`` on every rank; rank r then draws
        its samples with ``seed + r``.
    :param lr_decay: the reference's decay on a plateau, as :func:`pyro_lag.fit` applies it
        (None: off, the default here): after ``decay_patience`` epochs whose validation loss
        is above the plateau's (from epoch ``decay_after`` on), every rank reloads the best
        parameters and continues with new optimizers at ``lr * lr_decay``; training stops
        after ``max_decays`` decays. The validation loss is reduced over ranks, so all
        ranks decay at the same epoch.
    """

    optim: str | Callable[[float], Any] = "adam"
    lr: float = 1e-3
    separate_guide_optim: bool = True
    loss: Any = "exact"
    clip_norm: float | None = 5.0
    clip_scope: str = "joint-exact"
    stop_rule: str = "patience"
    patience: int = 5
    mi_noise: float = 2.0
    mi_samples: int = 4
    max_inner_steps: int = 100
    check_every: int = 15
    max_aggressive_epochs: int | None = None
    aggressive: bool = True
    kl_weight: Any = None
    free_bits: float | None = None
    per_example_loss: bool = True
    seed: int = 0
    lr_decay: float | None = None
    decay_patience: int = 2
    decay_after: int = 0
    max_decays: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.optim, str) and self.optim not in ("adam", "sgd"):
            raise ValueError(f"optim must be 'adam', 'sgd' or a callable lr -> PyroOptim, got {self.optim!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.mi_samples < 1:
            raise ValueError(f"mi_samples must be a positive integer, got {self.mi_samples!r}")
        if self.max_aggressive_epochs is not None and self.max_aggressive_epochs < 1:
            raise ValueError(f"max_aggressive_epochs must be a positive integer or None, got {self.max_aggressive_epochs!r}")
        if self.lr_decay is not None and not 0.0 < self.lr_decay < 1.0:
            raise ValueError(f"lr_decay must lie in (0, 1) or be None, got {self.lr_decay!r}")
        for name in ("decay_patience", "decay_after", "max_decays"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")

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
        return cls(**{**defaults, **overrides})

    def record(self) -> dict[str, Any]:
        """The settings as plain data (callables by name), for checkpoints and resume checks."""
        return {
            f.name: _describe(getattr(self, f.name)) for f in dataclasses.fields(self)
        }


def _describe(value: Any) -> Any:
    """A setting as plain data that is the same in every run: no memory addresses."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, functools.partial):
        return f"{_describe(value.func)}{value.args!r}{value.keywords or ''}"
    if hasattr(value, "__qualname__"):  # a function or class
        return f"{value.__module__}.{value.__qualname__}"
    if type(value).__repr__ is not object.__repr__:  # e.g. KL schedules: linear_annealing(...)
        return repr(value)
    return type(value).__name__  # e.g. an ELBO instance
