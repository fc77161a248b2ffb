"""Which parameters are the guide's (phi) and which the model's (theta), decided by gradients.

Many real Pyro programs register one module in both model and guide (Pyro's deep Markov
model calls ``pyro.module`` on the whole network in both), so ownership is read from the
autograd graph: phi feeds log q(z|x), theta feeds log p(x, z) with z held fixed.
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from pyro_lag.compat import first_elbo_traces
from pyro_lag.trace.rng import preserved_rng
from pyro_lag.trace.sites import NoLocalLatentError, is_latent, require_local_latent, site_fn, site_value

Override = Sequence[Any]  # parameter names (glob patterns allowed) and/or nn.Modules


@dataclass
class ParamSplit:
    """Which unconstrained parameter tensors are the guide's (phi), the model's (theta), or neither.

    Keys are Pyro param-store names; values the unconstrained leaf tensors that optimizers step.
    """

    guide: dict[str, torch.Tensor] = field(default_factory=dict)
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    has_local_latent: bool = True  # whether the guide samples a latent inside a data plate

    def side_of(self, name: str) -> str | None:
        for side in ("guide", "model", "other"):
            if name in getattr(self, side):
                return side
        return None

    def known(self, names: Iterable[str]) -> bool:
        return all(self.side_of(n) is not None for n in names)

    def nothing_to_lag(self) -> str | None:
        """Why a program has no inference network that can lag behind its model, or None if it has one."""
        if not self.has_local_latent:
            return "the guide has no local latent (no latent site inside a vectorized plate)"
        if not self.model:
            return "the model has no parameters of its own: there is no generator for the guide to lag behind"
        if not self.guide:
            return "the guide has no parameters apart from the model's: inner steps would have nothing to train"
        return None


def _matches(name: str, tensor: torch.Tensor, override: Override) -> bool:
    """Whether a parameter is named by an override entry (name, glob, or module holding it)."""
    for entry in override:
        if isinstance(entry, str):
            if fnmatch.fnmatchcase(name, entry) or name == entry:
                return True
        elif isinstance(entry, torch.nn.Module):
            if any(p is tensor for p in entry.parameters()):
                return True
        elif isinstance(entry, torch.Tensor):
            if entry is tensor:
                return True
    return False


def _connected(output: torch.Tensor | None, params: dict[str, torch.Tensor]) -> set[str]:
    """Names of the parameters that ``output`` depends on through the autograd graph."""
    names = [n for n, p in params.items() if p.requires_grad]
    if not names or not isinstance(output, torch.Tensor) or not output.requires_grad:
        return set()
    grads = torch.autograd.grad(
        output, [params[n] for n in names], allow_unused=True, retain_graph=True
    )
    return {n for n, g in zip(names, grads) if g is not None}


class _DetachedReplay(Messenger):
    """Hand the model the guide's draws detached, and leave the guide's own trace untouched.

    Entered outside a loss's own handlers, it sees each site last when the site is
    processed and first once it has been sampled. A value already set when it is
    processed was replayed from the guide trace: the model gets it detached, so its
    log-density depends on its own parameters only. The guide keeps its draws as they
    are (some distributions, such as rejection samplers, score only the very tensor they
    drew). A messenger guide (AutoNormalMessenger) draws while the model runs, so its
    draws are detached as they are made, before any trace records them.
    """

    def __init__(self, messenger_guide: bool) -> None:
        super().__init__()
        self.messenger_guide = messenger_guide
        self.draws: dict[str, torch.Tensor] = {}

    @staticmethod
    def _carries_gradient(msg: dict) -> bool:
        value = msg["value"]
        return not msg["is_observed"] and isinstance(value, torch.Tensor) and value.requires_grad

    def _pyro_sample(self, msg: dict) -> None:
        if not self.messenger_guide and self._carries_gradient(msg):
            msg["value"] = msg["value"].detach()

    def _pyro_post_sample(self, msg: dict) -> None:
        if self.messenger_guide and self._carries_gradient(msg):
            self.draws[msg["name"]] = msg["value"]
            msg["value"] = msg["value"].detach()


def _loss_traces(loss: Any, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    """One (model, guide) trace pair built the way ``loss`` builds it.

    An ELBO's own trace machinery applies its particle plate, enumeration and checks, so
    the program runs exactly as under SVI; any other loss gets the guide traced and the
    model replayed against it.
    """
    if isinstance(loss, ELBO):
        return first_elbo_traces(loss, model, guide, args, kwargs)
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def _log_density(trace: Trace, latent_only: bool) -> torch.Tensor | None:
    """Sum of the unscaled log-densities of a trace's sample sites that carry a gradient."""
    total = None
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if latent_only and site["is_observed"]:
            continue
        log_p = site.get("unscaled_log_prob")
        if log_p is None:
            try:
                log_p = site_fn(site).log_prob(site["value"], *site["args"], **site["kwargs"])
            except NotImplementedError:  # a density the loss never evaluates (EnergyDistance)
                continue
        if isinstance(log_p, torch.Tensor) and log_p.requires_grad:
            total = log_p.sum() if total is None else total + log_p.sum()
    return total


def probe_param_split(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    guide_params: Override = (),
    model_params: Override = (),
    loss: Any = None,
) -> ParamSplit:
    """Split the parameters by gradient: phi feeds log q(z|x), theta feeds log p(x, z) at fixed z.

    Model and guide run once, through ``loss``'s own trace machinery when it is an ELBO,
    the model seeing every guide draw detached (see :class:`_DetachedReplay`). A parameter
    in both is the model's; one in neither (TraceGraph_ELBO baselines) is ``other``.
    Overrides force parameters to a side by name (glob) or module. The probe leaves the
    random streams as it found them and emits no warning: the step that follows warns as
    SVI would.
    """
    detached = _DetachedReplay(messenger_guide=isinstance(poutine.unwrap(guide), Messenger))
    with preserved_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with poutine.trace(param_only=True) as capture, detached:
            model_trace, guide_trace = _loss_traces(loss, model, guide, args, kwargs)
    params = {
        name: site_value(site).unconstrained() for name, site in capture.trace.nodes.items()
    }
    # A guide parameter may reach the loss only through a reparameterized draw (a point mass).
    draws = dict(detached.draws)
    for name, site in guide_trace.nodes.items():
        if is_latent(site) and isinstance(site["value"], torch.Tensor) and site["value"].requires_grad:
            draws.setdefault(name, site["value"])
    guide_out = _log_density(guide_trace, latent_only=True)
    for name, draw in draws.items():
        if name in guide_trace.nodes and draw.is_floating_point():
            guide_out = draw.sum() if guide_out is None else guide_out + draw.sum()
    phi = _connected(guide_out, params)
    theta = _connected(_log_density(model_trace, latent_only=False), params)

    try:
        require_local_latent(guide_trace)
        split = ParamSplit(has_local_latent=True)
    except NoLocalLatentError:
        split = ParamSplit(has_local_latent=False)
    for name, tensor in params.items():
        if _matches(name, tensor, model_params):
            split.model[name] = tensor
        elif _matches(name, tensor, guide_params):
            split.guide[name] = tensor
        elif name in theta:
            split.model[name] = tensor
        elif name in phi:
            split.guide[name] = tensor
        else:
            split.other[name] = tensor
    return split


@contextlib.contextmanager
def frozen(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Turn off gradients of these leaf tensors for the block, so autograd never computes them.

    ``pyro.module`` skips frozen parameters and warns about it; that warning is ours to
    silence, since freezing them is the point.
    """
    switched = [t for t in tensors if t.requires_grad]
    for t in switched:
        t.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*not registered in the param store because requires_grad=False"
            )
            yield
    finally:
        for t in switched:
            t.requires_grad_(True)


def drop_grads(params: Iterable[torch.Tensor]) -> None:
    """Set gradients to None after an inner or model step (``zero_grad(set_to_none=True)``, as the
    reference's optimizers do): no zero tensors to allocate and fill, and the next backward writes
    its gradients instead of adding them to zeros. Joint steps keep SVI's ``zero_grads``."""
    for p in params:
        p.grad = None
