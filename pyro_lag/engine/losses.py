"""The training loss as a setting: the ELBO with its KL in closed form (as the paper) or sampled.

With a one-sample KL (Trace_ELBO) the guide's gradient at initialisation is hundreds
of times noisier than with the closed form, and that noise pushes the posterior off
the prior without making it depend on x: KL rises, no unit becomes active. The
paper's code computes the Gaussian KL exactly; ``exact`` does the same through
TraceMeanField_ELBO, and refuses a program where a closed form does not exist.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_lag.trace.sites import is_latent, site_fn

LOSSES = ("exact", "sampled")
"""``exact``: KL in closed form (TraceMeanField_ELBO); ``sampled``: one-sample KL (Trace_ELBO)."""


class ClosedFormKLError(ValueError):
    """The loss ``exact`` was asked for, but a latent site has no closed-form KL to its prior."""


def check_closed_form_kl(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> None:
    """Raise :class:`ClosedFormKLError` naming the first latent site whose KL torch cannot compute exactly."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    for name, site in model_trace.nodes.items():
        if not is_latent(site):
            continue
        guide_site = guide_trace.nodes.get(name)
        if guide_site is None or not is_latent(guide_site):
            raise ClosedFormKLError(
                f"loss 'exact': the model's latent site '{name}' is not sampled by the guide; use loss 'sampled'"
            )
        try:
            torch.distributions.kl_divergence(site_fn(guide_site), site_fn(site))
        except NotImplementedError:
            raise ClosedFormKLError(
                f"loss 'exact': site '{name}' has no closed-form KL from the guide's "
                f"{type(guide_site['fn']).__name__} to the model's {type(site['fn']).__name__}; use loss 'sampled'"
            ) from None


def make_loss(loss: str | ELBO | None, model: Callable, guide: Callable, batch: tuple[tuple, dict]) -> Any:
    """The ELBO object for a loss setting (a name from :data:`LOSSES`, or an ELBO used as it is)."""
    if isinstance(loss, ELBO):
        return loss
    loss = "exact" if loss is None else loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)} or a pyro.infer.ELBO, got {loss!r}")
    if loss == "sampled":
        return Trace_ELBO()
    check_closed_form_kl(model, guide, *batch)
    return TraceMeanField_ELBO()


def loss_item(loss: Any) -> Any:
    """A loss (or a tuple of losses) as Python floats, as ``SVI.step`` returns it."""
    from pyro.infer.util import torch_item

    if isinstance(loss, tuple):
        return type(loss)(map(torch_item, loss))
    return torch_item(loss)
