"""One-sided steps: the gradients of one side's parameters only (the guide's, or the model's).

A guide-only step needs no gradient for the model's parameters. Where the ELBO's
``loss_and_grads`` is Pyro's own (Trace_ELBO with its mean-field and tail-adaptive variants,
TraceEnum_ELBO), it is ``differentiable_loss`` and a backward pass; taking the two apart
lets the backward pass name the stepped side's parameters as its ``inputs``, so autograd
skips every part of the graph that leads only to the other side, while the forward pass
runs exactly the kernels of a joint step. Every other loss (JIT variants, TraceGraph_ELBO,
a custom ``loss_and_grads``) gets the other side frozen (``requires_grad=False``) instead.
Both give the same gradients, bitwise.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO

from pyro_lag.engine.param_split import frozen
from pyro_lag.trace.sites import site_value

__all__ = ["differentiable_loss_of", "loss_and_grads_without"]

# Pyro's loss_and_grads methods that are exactly differentiable_loss followed by backward().
_SEPARABLE = (Trace_ELBO.loss_and_grads, TraceEnum_ELBO.loss_and_grads)


def differentiable_loss_of(loss: Any, loss_and_grads: Callable | None = None) -> Callable | None:
    """``loss.differentiable_loss`` when ``loss.loss_and_grads`` is Pyro's own differentiable loss
    and backward pass (so the two can be taken apart); None otherwise."""
    if loss_and_grads is not None or not isinstance(loss, ELBO):
        return None
    own = getattr(type(loss), "loss_and_grads", None)
    separable = any(own is method for method in _SEPARABLE)
    return getattr(loss, "differentiable_loss") if separable else None


def loss_and_grads_without(
    without: Iterable[torch.Tensor],
    differentiable_loss: Callable | None,
    loss_and_grads: Callable,
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """The loss, with gradients in the ``.grad`` of every parameter the program read except
    ``without``; returns it and those parameters by name, as if ``without`` were not read.

    With ``differentiable_loss`` the backward pass is restricted to the other parameters;
    without it (``loss_and_grads`` differentiates by itself) ``without`` is frozen for the pass.
    """
    without = list(without)
    excluded = {id(t) for t in without}
    with poutine.trace(param_only=True) as capture, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shown at the joint step
        if differentiable_loss is None:
            with frozen(without):
                loss = loss_and_grads(model, guide, *args, **kwargs)
        else:
            loss = differentiable_loss(model, guide, *args, **kwargs)
    params: dict[str, torch.Tensor] = {}
    for name, site in capture.trace.nodes.items():
        tensor = site_value(site).unconstrained()
        if id(tensor) not in excluded:
            params[name] = tensor
    if differentiable_loss is not None:
        inputs = list({id(t): t for t in params.values() if t.requires_grad}.values())
        if inputs and torch.is_tensor(loss) and loss.requires_grad:
            elbo = getattr(differentiable_loss, "__self__", None)  # its retain_graph, as its loss_and_grads
            torch.autograd.backward(loss, inputs=inputs, retain_graph=getattr(elbo, "retain_graph", None))
    return loss, params
