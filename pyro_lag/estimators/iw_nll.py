"""Importance-weighted log-likelihood per data point: log (1/K) sum_k p(x, z_k) / q(z_k | x)."""
from __future__ import annotations

import math
from typing import Any, Callable

import pyro
import torch
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from pyro_lag.trace.guide_view import eval_mode, trace_guide, trace_model, view_of
from pyro_lag.trace.sites import detach_trace, is_latent, max_plate_nesting, point_log_prob, site_fn

IW_PLATE = "_pyro_lag_particles"
"""The plate importance samples are drawn in, outside every plate of the program."""


def _iw_log_weights(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, plate: str, particles: int, depth: int
) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k|x) per particle and data point, [particles, B], in one vectorized run."""
    with pyro.plate(IW_PLATE, particles, dim=-(depth + 1)):
        guide_trace = trace_guide(guide, args, kwargs)
        model_trace = trace_model(model, detach_trace(guide_trace), args, kwargs)
    for trace in (guide_trace, model_trace):
        _check_plate_shapes(trace)
    return _sum_log_weights(model_trace, guide_trace, plate, keep_left=1)


def _check_plate_shapes(trace: Trace) -> None:
    """Refuse a vectorized run where a site's batch shape spans dims that none of its plates own.

    A distribution built from a global draw (LDA's ``Dirichlet(topic_weights)``) can broadcast
    against the particle plate into an extra dim, scoring each particle's local draw under every
    particle's globals; summing that would be silently wrong, so such programs run one particle
    at a time instead.
    """
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        batch_shape = site_fn(site).batch_shape
        owned = {f.dim: f.size for f in site["cond_indep_stack"] if f.vectorized}
        for index, size in enumerate(batch_shape):
            dim = index - len(batch_shape)
            if size != 1 and (dim not in owned or owned[dim] not in (size, -1)):
                raise ValueError(f"site {name!r} has batch shape {tuple(batch_shape)} beyond its plates")


def _sum_log_weights(model_trace: Trace, guide_trace: Trace, plate: str, keep_left: int) -> torch.Tensor:
    log_w: torch.Tensor | float = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            lp = point_log_prob(site, plate, keep_left)
            if lp is not None:
                log_w = log_w + lp
    for site in guide_trace.nodes.values():
        if is_latent(site):
            lp = point_log_prob(site, plate, keep_left)
            if lp is not None:
                log_w = log_w - lp
    if not isinstance(log_w, torch.Tensor):  # the view found a local latent in the plate: not reached
        raise ValueError(f"no site of the program is scored per data point of plate {plate!r}")
    return log_w


def iw_log_likelihood(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 500,
    chunk_size: int = 100,
    data_plate: str | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Importance-weighted estimate of log p(x) for each data point of one batch, [B].

    log (1/K) sum_k p(x, z_k) / q(z_k|x) with K = ``num_samples``, drawn ``chunk_size`` at a
    time inside a particle plate to the left of every plate of the program. It is a
    lower bound in expectation that tightens as K grows. Programs that cannot broadcast
    over the particle plate are run one particle at a time.
    """
    if num_samples < 1 or chunk_size < 1:
        raise ValueError("num_samples and chunk_size must be positive")
    with torch.no_grad(), eval_mode(model, guide):
        view = view_of(guide, (args, kwargs), data_plate, model)
        assert view.model_trace is not None
        depth = max_plate_nesting(view.trace, view.model_trace)
        chunks = []
        remaining = num_samples
        vectorized = True
        while remaining > 0:
            size = min(chunk_size, remaining)
            if vectorized:
                try:
                    chunks.append(_iw_log_weights(model, guide, args, kwargs, view.plate, size, depth))
                    remaining -= size
                    continue
                except (RuntimeError, ValueError, IndexError):
                    vectorized = False
            for _ in range(size):
                guide_trace = trace_guide(guide, args, kwargs)
                model_trace = trace_model(model, guide_trace, args, kwargs)
                chunks.append(_sum_log_weights(model_trace, guide_trace, view.plate, 0).unsqueeze(0))
            remaining -= size
        log_w = torch.cat(chunks, dim=0)
    return torch.logsumexp(log_w, dim=0) - math.log(num_samples)
