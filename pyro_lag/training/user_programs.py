"""What every trainer does to the user's programs: find their torch modules, and average the loss.

The paper averages its loss over the batch; Pyro's ELBO sums over the data plate. With SGD
at lr 1.0 a summed loss would take steps batch-size times too long, so ``fit`` and the
Lightning module both run the programs under :func:`per_example`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine

from pyro_lag.data.batches import examples_in


def make_optim(optim: str | Callable[[float], Any] | None, lr: float) -> Any:
    """The PyroOptim a setting names (``"sgd"``, ``"adam"``) or builds (a callable ``lr -> PyroOptim``)."""
    if callable(optim):
        return optim(lr)
    import pyro.optim

    # Pyro generates its optimizer wrappers at import time, so type checkers cannot see them.
    factory = pyro.optim.SGD if optim == "sgd" else pyro.optim.Adam  # type: ignore[attr-defined]
    return factory({"lr": lr})

__all__ = ["modules_of", "per_example", "InnerUnits", "make_optim", "training_programs"]


def modules_of(*fns: Callable) -> list[torch.nn.Module]:
    """The torch modules behind callables (modules themselves or their bound methods), each once."""
    found: list[torch.nn.Module] = []
    for fn in fns:
        owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module) and all(owner is not m for m in found):
            found.append(owner)
    return found


def per_example(fn: Callable) -> Callable:
    """``fn`` with its log-densities scaled by 1/batch size, so its loss is a per-example mean."""

    def scaled(*args: Any, **kwargs: Any) -> Any:
        with poutine.scale(scale=1.0 / examples_in(args, kwargs)):
            return fn(*args, **kwargs)

    return scaled


def training_programs(model: Callable, guide: Callable, schedule: Any = None, free_bits: Any = None,
                      per_example_loss: bool = True) -> tuple[Callable, Callable]:
    """Model and guide as a trainer runs them: under the method's KL weight (a ``KLSchedule``)
    and free bits (a ``FreeBits``) where it has them, and scaled to a per-example loss."""
    if schedule is not None:
        from pyro_lag.handlers.kl_weight import KLWeight

        weight = KLWeight(schedule)
        model, guide = weight(model), weight(guide)
    if free_bits is not None:
        model, guide = free_bits.model(model), free_bits.guide(guide)
    if per_example_loss:
        model, guide = per_example(model), per_example(guide)
    return model, guide


class InnerUnits:
    """A batch's ``(weight, units)`` for the inner loop's windows.

    A window compares its summed loss over its summed units (tokens for a text source,
    examples otherwise), as the reference does; a per-example loss is weighted back up by
    the batch size. A picklable class, not a closure: Lightning may spawn processes.
    """

    def __init__(self, source: Any, per_example_loss: bool = True) -> None:
        self.source = source
        self.per_example_loss = per_example_loss

    def __call__(self, args: tuple, kwargs: dict) -> tuple[float, float]:
        points = examples_in(args, kwargs)
        return (points if self.per_example_loss else 1.0), float(self.source.normalizer(args))
