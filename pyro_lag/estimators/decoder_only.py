"""Programs whose guide samples no latent (a decoder-only language model, a PixelCNN).

Their ELBO is log p(x) exactly, so they train as plain likelihood models and are evaluated
by :func:`exact_metrics`; :func:`latent_sites` is how ``fit`` and the CLI tell them apart.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyro_lag.data.batches import examples_in
from pyro_lag.trace.guide_view import eval_mode
from pyro_lag.trace.sites import is_latent, normalize_batch, raw_log_prob, require_local_latent

__all__ = ["latent_sites", "exact_metrics"]


def latent_sites(guide: Callable, batch: Any) -> list[str]:
    """The guide's latent sites on ``batch`` (empty: no latent at all).

    :raises NoLocalLatentError: when it has latents but none is local to the data plate.
    """
    args, kwargs = normalize_batch(batch)
    trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(*args, **kwargs)
    if not any(is_latent(site) for site in trace.nodes.values()):
        return []
    require_local_latent(trace)
    return [name for name, site in trace.nodes.items() if is_latent(site)]


def exact_metrics(
    model: Callable, batches: Iterable[Any], progress: Callable[[int, int], None] | None = None, *,
    with_iw_nll: bool = False,
) -> dict[str, Any]:
    """Per-data-point log-likelihood of a model without latents (``elbo`` = ``recon`` = log p(x));
    ``with_iw_nll`` adds ``iw_nll`` = -log p(x), which needs no importance sampling here."""
    total, count = 0.0, 0.0
    batches = list(batches)
    if progress is not None:
        progress(0, len(batches))
    with torch.no_grad(), eval_mode(model):
        for done, batch in enumerate(batches, 1):
            args, kwargs = normalize_batch(batch)
            trace = poutine.trace(model).get_trace(*args, **kwargs)
            for site in trace.nodes.values():
                if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
                    total += float(raw_log_prob(site).sum())
            count += examples_in(args, kwargs)
            if progress is not None:
                progress(done, len(batches))
    if count == 0:
        raise ValueError("evaluation got no batch")
    ll = total / count
    metrics = {"elbo": ll, "recon": ll, "kl": 0.0, "mi": None, "au": None, "au_var": None, "num_points": int(count)}
    if with_iw_nll:
        metrics["iw_nll"] = -ll
    return metrics
