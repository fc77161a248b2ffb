"""KL weights as a Pyro handler: annealing (the paper's), beta and cyclical schedules.

These work on any Pyro model/guide pair, not only the built-in ones, such as this one:

    >>> import pyro, torch
    >>> import pyro.distributions as dist
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> from pyro.optim import Adam
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
    >>> def guide(x):
    ...     loc = pyro.param("loc", torch.zeros(len(x)))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Normal(loc, 1.0))
    >>> x = torch.tensor([0.5, -1.0, 2.0])
    >>> pyro.clear_param_store()

A KL weight scales the latent sites of both model and guide:

    >>> schedule = linear_annealing(kl_start=0.1, warm_up_epochs=10, steps_per_epoch=100)
    >>> weight = KLWeight(schedule)              # reads schedule.value at every site
    >>> svi = SVI(weight(model), weight(guide), Adam({"lr": 0.01}), Trace_ELBO())
    >>> schedule.update(epoch=0, step=0)         # once per training step
    0.1009
    >>> loss = svi.step(x)
    >>> pyro.poutine.trace(weight(guide)).get_trace(x).nodes["z"]["scale"]
    0.1009
    >>> pyro.clear_param_store()
"""
from __future__ import annotations

import math
from typing import Callable, Union

from pyro.poutine.messenger import Messenger

from pyro_lag.trace.sites import is_latent

__all__ = [
    "KLWeight",
    "KLSchedule",
    "LinearAnnealing",
    "ConstantWeight",
    "Cyclical",
    "linear_annealing",
    "beta",
    "cyclical",
]

Weight = Union[float, Callable[[], float]]


class KLWeight(Messenger):
    """Multiply the scale of every non-observed sample site by a KL weight.

    Apply the same handler to both model and guide: Trace_ELBO's
    ``log p(z) - log q(z)`` is then weighted by ``w`` while ``log p(x|z)``
    (observed sites, factors) keeps weight 1. ``weight`` is a float or a
    zero-argument callable (e.g. a schedule) read afresh at every site, so a
    schedule updated in place changes the weight without rebuilding anything.
    """

    def __init__(self, weight: Weight) -> None:
        if not callable(weight):
            _check_weight(float(weight), "weight")
        super().__init__()
        self.weight = weight

    def current(self) -> float:
        """The weight that the next site will receive."""
        w = self.weight() if callable(self.weight) else self.weight
        _check_weight(float(w), "weight")
        return float(w)

    def _process_message(self, msg) -> None:
        if is_latent(msg):
            msg["scale"] = self.current() * msg["scale"]


def _check_weight(w: float, name: str) -> None:
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"KL {name} must be a finite number >= 0, got {w}")


class KLSchedule:
    """A KL weight that depends on the training position.

    ``weight(epoch, step)`` is the pure schedule (epoch 0-based, step the
    0-based index of the training step within the epoch); ``update(epoch,
    step)`` stores it in ``.value``, and calling the schedule returns
    ``.value``, so the schedule itself can be handed to :class:`KLWeight`.
    """

    def __init__(self, initial: float) -> None:
        self.value = float(initial)

    def weight(self, epoch: int, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, epoch: int, step: int) -> float:
        """Set ``.value`` to the weight of training step ``step`` of ``epoch``."""
        self.value = self.weight(epoch, step)
        return self.value

    def __call__(self) -> float:
        return self.value


class ConstantWeight(KLSchedule):
    """A fixed KL weight (beta-VAE when ``b != 1``)."""

    def __init__(self, b: float) -> None:
        _check_weight(float(b), "weight beta")
        super().__init__(b)
        self.b = float(b)

    def weight(self, epoch: int, step: int) -> float:
        return self.b

    def __repr__(self) -> str:
        return f"beta({self.b})"


class LinearAnnealing(KLSchedule):
    """KL annealing as in He et al.'s reference code.

    The weight starts at ``kl_start`` and grows by
    ``(1 - kl_start) / (warm_up_epochs * steps_per_epoch)`` before every
    training step, capped at 1, so step ``t`` (0-based, counted over epochs)
    trains with ``min(1, kl_start + (t + 1) * rate)``. ``warm_up_epochs == 0``
    means weight 1 throughout.
    """

    def __init__(self, kl_start: float, warm_up_epochs: float, steps_per_epoch: int) -> None:
        if not 0.0 <= kl_start <= 1.0:
            raise ValueError(f"kl_start must lie in [0, 1], got {kl_start}")
        if warm_up_epochs < 0:
            raise ValueError(f"warm_up_epochs must be >= 0, got {warm_up_epochs}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.kl_start = float(kl_start)
        self.warm_up_epochs = warm_up_epochs
        self.steps_per_epoch = int(steps_per_epoch)
        if warm_up_epochs == 0:
            self.rate = math.inf
        else:
            self.rate = (1.0 - self.kl_start) / (warm_up_epochs * self.steps_per_epoch)
        super().__init__(self.kl_start)

    def weight(self, epoch: int, step: int) -> float:
        if math.isinf(self.rate):
            return 1.0
        t = epoch * self.steps_per_epoch + step
        return min(1.0, self.kl_start + (t + 1) * self.rate)

    def __repr__(self) -> str:
        return (
            f"linear_annealing(kl_start={self.kl_start}, warm_up_epochs={self.warm_up_epochs}, "
            f"steps_per_epoch={self.steps_per_epoch})"
        )


class Cyclical(KLSchedule):
    """Cyclical KL annealing (Fu et al., 2019, ``frange_cycle_linear``).

    Training is cut into ``n_cycles`` equal periods of
    ``total_steps / n_cycles`` steps; within each, the weight rises linearly
    from 0 to 1 over the first ``ratio`` of the period and stays at 1 after.
    """

    def __init__(self, n_cycles: int, ratio: float, epochs: int, steps_per_epoch: int) -> None:
        if n_cycles < 1:
            raise ValueError(f"n_cycles must be >= 1, got {n_cycles}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"cyclical ratio must lie in (0, 1], got {ratio}")
        if epochs < 1 or steps_per_epoch < 1:
            raise ValueError(
                f"cyclical schedule needs epochs >= 1 and steps_per_epoch >= 1, got {epochs}, {steps_per_epoch}"
            )
        self.n_cycles = int(n_cycles)
        self.ratio = float(ratio)
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = int(epochs) * self.steps_per_epoch
        self.period = self.total_steps / self.n_cycles
        super().__init__(0.0)

    def weight(self, epoch: int, step: int) -> float:
        t = epoch * self.steps_per_epoch + step
        position = t - math.floor(t / self.period) * self.period
        return min(1.0, position / (self.period * self.ratio))

    def __repr__(self) -> str:
        return f"cyclical(n_cycles={self.n_cycles}, ratio={self.ratio}, total_steps={self.total_steps})"


def linear_annealing(kl_start: float, warm_up_epochs: float, steps_per_epoch: int) -> LinearAnnealing:
    """KL weight from ``kl_start`` to 1 linearly over ``warm_up_epochs`` (He et al.'s reference)."""
    return LinearAnnealing(kl_start, warm_up_epochs, steps_per_epoch)


def beta(b: float) -> ConstantWeight:
    """A constant KL weight ``b``."""
    return ConstantWeight(b)


def cyclical(n_cycles: int, ratio: float, epochs: int, steps_per_epoch: int) -> Cyclical:
    """Cyclical annealing: ``n_cycles`` linear ramps over the first ``ratio`` of each cycle."""
    return Cyclical(n_cycles, ratio, epochs, steps_per_epoch)
