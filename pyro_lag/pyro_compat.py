"""Every use of Pyro internals, in one place: what to check when Pyro is upgraded.

Each function wraps one private attribute or method; each was checked against the Pyro
version named in its docstring. Nothing else in pyro_lag reaches behind Pyro's public API.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from pyro.infer import ELBO
from pyro.ops.jit import CompiledFunction
from pyro.optim import PyroOptim
from pyro.poutine.trace_struct import Trace


def first_elbo_traces(loss: ELBO, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    """The first (model, guide) trace pair an ELBO builds for its loss, with its particle plate,
    enumeration and checks: ``ELBO._get_traces`` (private; checked against Pyro 1.9.2)."""
    traces = loss._get_traces(model, guide, args, kwargs)
    try:
        return next(iter(traces))
    finally:
        if inspect.isgenerator(traces):
            traces.close()


def without_compiled_functions(elbo: ELBO) -> None:
    """Drop the compiled functions a JIT ELBO caches on itself, so a copy compiles its own
    (the attributes holding ``pyro.ops.jit.CompiledFunction`` objects; checked against Pyro 1.9.2)."""
    for name, value in list(vars(elbo).items()):
        if isinstance(value, CompiledFunction):
            delattr(elbo, name)


def pending_optim_state(optim: PyroOptim) -> dict[str, Any]:
    """Optimizer states restored into a PyroOptim but not yet given to a parameter
    (``PyroOptim._state_waiting_to_be_consumed``, private; checked against Pyro 1.9.2)."""
    return dict(optim._state_waiting_to_be_consumed)
