"""How a run trains: :class:`FitSettings`, validated once, shared by ``fit``, the CLI and Lightning.

Every knob of :func:`pyro_lag.fit` is a field here. Construction checks each value (one-line
``ValueError`` naming the field); :meth:`FitSettings.resolved` fills in the paper's per-kind
defaults (text: SGD lr 1.0, the ``drop`` stop rule, lr decay from epoch 16; images: Adam lr
1e-3, the ``patience`` rule). The CLI builds the same object from flags and its config
file's ``[fit]`` table, and :class:`pyro_lag.lightning.LightningSettings` extends it.

    >>> settings = FitSettings(method="standard", epochs=3).resolved("text")
    >>> settings.optim, settings.lr, settings.stop_rule
    ('sgd', 1.0, 'drop')
    >>> FitSettings(method="beta")
    Traceback (most recent call last):
    ...
    ValueError: method 'beta' needs the KL weight beta
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:  # torch and Pyro load only when a schedule is built: the CLI reads settings first
    from pyro_lag.handlers.free_bits import FreeBits
    from pyro_lag.handlers.kl_weight import KLSchedule

__all__ = ["FitSettings", "METHODS", "KINDS", "POLICIES", "describe"]

METHODS = ("aggressive", "standard", "anneal", "beta", "cyclical", "free-bits")
KINDS = ("text", "image")
OPTIMS = ("sgd", "adam")
# Aggressive-training policies by name: (max_inner_steps, max_aggressive_steps), None for no limit.
POLICIES: dict[str, tuple[int, int | None]] = {
    "paper": (100, None),  # the reference's: about 50 inner steps, aggressive until MI stops rising
    "budget": (30, 250),  # two of the reference's 15-step windows, 250 aggressive model steps at most
}
DEFAULT_POLICY = "paper"


@dataclass(frozen=True)
class FitSettings:
    """Every setting of a training run.

    - ``method``: ``aggressive``, ``standard``, ``anneal`` (KL weight from ``kl_start`` to 1
      over ``warm_up`` epochs), ``beta`` (constant KL weight ``beta``), ``cyclical``
      (``cycles`` ramps over ``cycle_ratio`` of each cycle) or ``free-bits`` (floor
      ``free_bits`` nats per latent dimension); ``anneal=True`` adds annealing to
      ``aggressive`` (the paper's "+ anneal" rows).
    - ``kind``: ``text`` or ``image`` (``fit`` takes the model owner's ``.kind``); picks the
      defaults of ``optim`` (SGD / Adam), ``lr`` (1.0 / 1e-3), ``stop_rule`` (``drop`` /
      ``patience``) and the lr decay (after 2 epochs without improvement from epoch 16 / after 20).
    - ``loss``: ``"exact"`` (closed-form KL, TraceMeanField_ELBO), ``"sampled"`` or an ELBO.
    - ``policy``: how much aggressive training a run buys, by name: ``"paper"`` (the reference's:
      up to 100 inner steps per model step, aggressive until validation MI stops rising) or
      ``"budget"`` (the same rules within two budgets: at most 30 inner steps per model step and
      250 aggressive model steps). It fills in ``max_inner_steps`` and ``max_aggressive_steps``
      where they are left None; see :data:`POLICIES`.
    - ``clip_norm``, ``clip_scope``, ``stop_rule``, ``patience``, ``mi_noise``,
      ``max_inner_steps``, ``inner_rule``, ``check_every``: as :class:`~pyro_lag.AggressiveSVI`'s.
    - ``mi_checks_per_epoch``: validation MI checks (and stop-rule decisions) per epoch while
      aggressive; more end aggressive mode sooner. ``max_aggressive_epochs`` ends it at the latest
      after that many epochs, ``max_aggressive_steps`` after that many model steps (whichever first).
    - ``mi_samples``: latent draws per validation point for the MI estimate.
    - ``lr_decay``: on a plateau, multiply lr by this and reload the best parameters, at most
      ``max_decays`` times, then stop (None: never).
    - ``seed``: seeds every RNG at the start (None leaves them alone).
    - ``checkpoint_every``: also write ``last.pt`` every this many steps within an epoch.
    - ``iw_samples``, ``iw_chunk_size``: the final test pass's IW-NLL (0: none).

    Fields left None take the per-kind defaults in :meth:`resolved`. Settings marked
    ``resumable`` may differ when a run is resumed (more epochs, another evaluation); all
    others must match the run that wrote the checkpoint.
    """

    method: str = "aggressive"
    epochs: int = dataclasses.field(default=10, metadata={"resumable": True})
    kind: str | None = None
    optim: str | Callable[[float], Any] | None = None
    lr: float | None = None
    loss: Any = "exact"
    clip_norm: float | None = 5.0
    clip_scope: str = "joint-exact"
    anneal: bool = False
    kl_start: float = 0.1
    warm_up: float = 10
    beta: float | None = None
    cycles: int = 4
    cycle_ratio: float = 0.5
    free_bits: float | None = None
    stop_rule: str | None = None
    patience: int | None = None
    mi_noise: float = 2.0
    mi_samples: int = 4
    policy: str = DEFAULT_POLICY
    max_inner_steps: int | None = None
    inner_rule: str = "paper"
    check_every: int | None = None
    max_aggressive_epochs: int | None = None
    max_aggressive_steps: int | None = None
    mi_checks_per_epoch: int = 1
    lr_decay: float | None = 0.5
    decay_patience: int | None = None
    decay_after: int | None = None
    max_decays: int = 5
    seed: int | None = 0
    checkpoint_every: int | None = dataclasses.field(default=None, metadata={"resumable": True})
    iw_samples: int = dataclasses.field(default=0, metadata={"resumable": True})
    iw_chunk_size: int = dataclasses.field(default=100, metadata={"resumable": True})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _check_number("epochs", self.epochs, minimum=1, integer=True)
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"kind must be 'text' or 'image', got {self.kind!r}")
        if isinstance(self.optim, str) and self.optim not in OPTIMS:
            raise ValueError(f"optim must be 'sgd', 'adam' or a callable lr -> PyroOptim, got {self.optim!r}")
        if self.lr is not None:
            _check_number("lr", self.lr, strict=True)
        if self.anneal and self.method != "aggressive":
            raise ValueError(f"anneal=True combines KL annealing with method aggressive, not {self.method!r} "
                             "(method 'anneal' is annealing alone)")
        if self.method == "beta" and self.beta is None:
            raise ValueError("method 'beta' needs the KL weight beta")
        if self.method == "free-bits" and self.free_bits is None:
            raise ValueError("method 'free-bits' needs free_bits (nats per latent dimension)")
        for name in ("beta", "free_bits", "kl_start", "warm_up", "mi_noise"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name))
        for name in ("iw_samples", "max_decays"):
            _check_number(name, getattr(self, name), integer=True)
        if self.inner_rule not in ("paper", "noise"):
            raise ValueError(f"inner_rule must be 'paper' or 'noise', got {self.inner_rule!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("mi_samples", "cycles", "iw_chunk_size", "mi_checks_per_epoch"):
            _check_number(name, getattr(self, name), minimum=1, integer=True)
        for name in ("max_inner_steps", "max_aggressive_epochs", "max_aggressive_steps", "checkpoint_every",
                     "check_every"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), minimum=1, integer=True)
        for name in ("decay_patience", "decay_after", "seed"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), integer=True)
        if self.clip_norm is not None:
            _check_number("clip_norm", self.clip_norm, strict=True)
        if self.lr_decay is not None and not (isinstance(self.lr_decay, (int, float)) and 0.0 < self.lr_decay < 1.0):
            raise ValueError(f"lr_decay must lie in (0, 1) or be None, got {self.lr_decay!r}")
        if not 0.0 < self.cycle_ratio <= 1.0:
            raise ValueError(f"cycle_ratio must lie in (0, 1], got {self.cycle_ratio!r}")

    # ------------------------------------------------------------------ resolution

    def resolved(self, kind: str | None = None) -> Self:
        """These settings with every None default filled in for ``kind`` (default: ``self.kind``)."""
        kind = kind if kind is not None else self.kind
        text = kind == "text"
        optim = self.optim or ("sgd" if text else "adam")
        stop_rule = self.stop_rule or ("drop" if text else "patience")
        max_inner_steps, max_aggressive_steps = POLICIES[self.policy]
        return dataclasses.replace(
            self,
            kind=kind,
            optim=optim,
            lr=float(self.lr) if self.lr is not None else (1.0 if optim == "sgd" else 1e-3),
            stop_rule=stop_rule,
            patience=self.patience if self.patience is not None else (5 if stop_rule == "patience" else 2),
            decay_patience=self.decay_patience if self.decay_patience is not None else (2 if text else 20),
            decay_after=self.decay_after if self.decay_after is not None else (15 if text else 0),
            max_inner_steps=self.max_inner_steps if self.max_inner_steps is not None else max_inner_steps,
            max_aggressive_steps=(self.max_aggressive_steps if self.max_aggressive_steps is not None
                                  else max_aggressive_steps),
        )

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (checked like any construction)."""
        return dataclasses.replace(self, **changes)

    @property
    def inner_steps_limit(self) -> int:
        """``max_inner_steps``, or the policy's where it is left None."""
        return self.max_inner_steps if self.max_inner_steps is not None else POLICIES[self.policy][0]

    @property
    def aggressive(self) -> bool:
        """Whether training starts in aggressive mode."""
        return self.method == "aggressive"

    def kl_handlers(self, steps_per_epoch: int) -> tuple[KLSchedule | None, FreeBits | None]:
        """The KL-weight schedule and free-bits handler the method asks for (None where unused)."""
        from pyro_lag.handlers.free_bits import FreeBits
        from pyro_lag.handlers.kl_weight import beta, cyclical, linear_annealing

        if self.method == "anneal" or self.anneal:
            return linear_annealing(self.kl_start, self.warm_up, steps_per_epoch), None
        if self.method == "beta":
            return beta(float(self.beta or 0.0)), None
        if self.method == "cyclical":
            return cyclical(self.cycles, self.cycle_ratio, int(self.epochs), steps_per_epoch), None
        if self.method == "free-bits":
            return None, FreeBits(float(self.free_bits or 0.0))
        return None, None

    # ------------------------------------------------------------------ records

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names: what a config file's ``[fit]`` table and ``fit``'s keywords may set."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def resumable_names(cls) -> tuple[str, ...]:
        """Settings that may change when a run is resumed."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FitSettings:
        """Settings from :meth:`record`'s plain data (keys that are not fields are ignored)."""
        return cls(**{k: v for k, v in record.items() if k in cls.names()})

    def record(self) -> dict[str, Any]:
        """The settings as plain data (callables and ELBO objects by name), for checkpoints and results."""
        return {f.name: describe(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def check_resumable(self, stored: Mapping[str, Any], run_path: str | Path, **facts: Any) -> None:
        """Refuse to resume a run stored with other settings (those that are not resumable) or
        other ``facts`` about it (``steps_per_epoch=...``)."""
        mine = {**self.record(), **facts}
        for key, old in stored.items():
            if key in mine and key not in self.resumable_names() and old != mine[key]:
                raise ValueError(
                    f"run directory {run_path} was trained with {key}={old!r}, not {mine[key]!r}; "
                    "resume with the same settings or use another run directory"
                )


def describe(value: Any) -> Any:
    """A setting as plain data that is the same in every run: no memory addresses."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, functools.partial):
        return f"{describe(value.func)}{value.args!r}{value.keywords or ''}"
    if hasattr(value, "__qualname__"):  # a function or class
        return f"{value.__module__}.{value.__qualname__}"
    if type(value).__repr__ is not object.__repr__:  # e.g. KL schedules: linear_annealing(...)
        return repr(value)
    return type(value).__name__  # e.g. an ELBO instance


def _check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        kind = "an integer" if integer else "a number"
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {kind} {relation} {minimum}, got {value!r}")
