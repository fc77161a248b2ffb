"""Every use of Pyro's (and Lightning's) internals, in one place: what to check on an upgrade.

Each function wraps one private attribute, method or name; each was checked against the
version named in its docstring. Nothing else in pyro_lag reaches behind a library's public
API (``tests/test_layout.py`` checks it).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import pyro
import pyro.distributions
import pyro.infer
import pyro.poutine
import torch
from pyro.infer import ELBO
from pyro.ops.jit import CompiledFunction
from pyro.optim import PyroOptim
from pyro.poutine.trace_struct import Trace

ELBO_PARTICLE_PLATE = "num_particles_vectorized"
"""The plate Pyro's ELBOs put around a program for ``vectorize_particles=True`` (a literal in
``pyro.infer.elbo.ELBO._vectorized_num_particles``; checked against Pyro 1.9.2)."""


def distribution_mask(fn: Any) -> Any:
    """The mask of a ``MaskedDistribution`` (``fn._mask``, private: a bool tensor or a bool;
    checked against Pyro 1.9.2)."""
    return fn._mask


def lightning_start_method(strategy: Any) -> str | None:
    """How a Lightning DDP strategy starts its processes (``"spawn"``, ``"fork"``, ``"popen"``):
    ``strategy._start_method`` (private; checked against Lightning 2.6), None for other strategies."""
    return getattr(strategy, "_start_method", None)


def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None (``module._trainer``, private:
    the public ``trainer`` property raises when there is none; checked against Lightning 2.6)."""
    return module._trainer


def validate_sample(fn: Any, value: Any) -> None:
    """A distribution subclass's own check of a value in ``log_prob``, as torch's distributions
    do it: ``fn._validate_sample`` when ``fn._validate_args`` (private; checked against torch 2.13)."""
    if fn._validate_args:
        fn._validate_sample(value)


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


def _validation_flags() -> tuple[bool, bool, bool, bool]:
    """Pyro's three validation flags (distributions, inference, poutine) and torch's default for
    distribution arguments (``Distribution._validate_args``, private; checked against torch 2.13)."""
    return (
        pyro.distributions.is_validation_enabled(),
        pyro.infer.is_validation_enabled(),
        pyro.poutine.is_validation_enabled(),
        bool(torch.distributions.Distribution._validate_args),
    )


def validation_is_enabled() -> bool:
    """Whether any of Pyro's or torch's validation checks would run now."""
    return any(_validation_flags())


@contextlib.contextmanager
def validation_disabled() -> Iterator[None]:
    """Pyro's validation and torch's distribution argument checks off for the block, then each
    flag restored as it was (``pyro.validation_enabled`` would restore torch's default from
    Pyro's own flag, which can differ from torch's)."""
    dist_flag, infer_flag, poutine_flag, torch_flag = _validation_flags()
    pyro.enable_validation(False)
    try:
        yield
    finally:
        pyro.distributions.enable_validation(dist_flag)
        pyro.infer.enable_validation(infer_flag)
        pyro.poutine.enable_validation(poutine_flag)
        torch.distributions.Distribution.set_default_validate_args(torch_flag)
