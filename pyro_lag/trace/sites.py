"""Trace introspection: batches, the data plate, local latent sites, and the guide/model parameter split.

Everything here works on plain Pyro traces, so it applies to any model/guide pair:
hand-written guides, ``pyro.module`` or ``PyroModule`` parameters, and AutoGuides.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from pyro_lag.compat import ELBO_PARTICLE_PLATE

Batch = Any
"""A batch: a tuple of positional args, a bare tensor (one-argument call), or an (args, kwargs) pair."""

Site = Message
"""A traced site: a node of ``Trace.nodes``."""

class NoLocalLatentError(ValueError):
    """The guide samples no local latent variable inside a data plate, so latent usage is undefined."""


class AmbiguousDataPlateError(ValueError):
    """Several unrelated plates hold latents and nothing tells which one holds the data."""


def normalize_batch(batch: Batch) -> tuple[tuple, dict]:
    """Turn a batch into ``(args, kwargs)``: a bare tensor is a one-argument call."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[0], (tuple, list))
        and isinstance(batch[1], dict)
    ):
        return tuple(batch[0]), dict(batch[1])
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    return (batch,), {}


# --------------------------------------------------------------------------- sites


def _base_fn(fn: Any) -> Any:
    """Strip Independent / Masked / Expanded wrappers to reach the distribution that defines the density."""
    while True:
        if isinstance(fn, (dist.Independent, torch.distributions.Independent)):
            fn = fn.base_dist
        elif isinstance(fn, dist.MaskedDistribution):
            fn = fn.base_dist
        elif isinstance(fn, dist.ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn


def is_delta(fn: Any) -> bool:
    """Whether a site's distribution is a point mass (a deterministic function of other sites)."""
    return isinstance(_base_fn(fn), dist.Delta)


def site_fn(site: Site) -> Any:
    """A sample site's distribution (Pyro types ``site["fn"]`` as a bare callable)."""
    return site["fn"]


def site_value(site: Site) -> Any:
    """A sample or param site's value (Pyro types ``site["value"]`` as optional; traced sites have one)."""
    return site["value"]


def is_latent(site: Site) -> bool:
    """A non-observed sample site that is a random variable (not a plate's subsample indices)."""
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def site_frame(site: Site, plate: str) -> Any | None:
    """The vectorized plate frame called ``plate`` in a site's stack, if any."""
    for frame in site["cond_indep_stack"]:
        if frame.name == plate and frame.vectorized:
            return frame
    return None


def _sequential_latent(trace: Trace) -> str | None:
    """A latent site inside a sequential (non-vectorized) plate, described for an error message."""
    for name, site in trace.nodes.items():
        if is_latent(site) and not is_delta(site["fn"]):
            for frame in site["cond_indep_stack"]:
                if not frame.vectorized:
                    return f"site '{name}' is inside plate '{frame.name}' iterated sequentially"
    return None


def observed_plates(model_trace: Trace) -> set[str]:
    """Names of the vectorized plates that hold an observed sample site of a model trace."""
    names: set[str] = set()
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
            names.update(f.name for f in site["cond_indep_stack"] if f.vectorized and f.name != ELBO_PARTICLE_PLATE)
    return names


def _batch_sizes(batch: tuple[tuple, dict] | None) -> set[int]:
    """Every dim size of every tensor in a batch: a data plate's size is one of them."""
    sizes: set[int] = set()
    if batch is None:
        return sizes
    args, kwargs = batch
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            sizes.update(int(n) for n in value.shape)
    return sizes


def find_data_plate(
    trace: Trace,
    data_plate: str | None = None,
    *,
    model_trace: Trace | None = None,
    batch: tuple[tuple, dict] | None = None,
) -> str:
    """Name of the data plate of a guide trace: the plate that holds the local latents and the data.

    With the model's trace, the data plate is the outermost plate holding both a latent
    site of the guide and an observed site of the model (a global plate such as LDA's
    ``topics`` holds no observation). With the guide alone, plates whose size is one of
    the batch's tensor sizes come first; then the plate with the most latent sites, a
    subsampled one, the outermost one. ``data_plate`` overrides.
    """
    counts: Counter = Counter()
    subsampled: set[str] = set()
    outer_rank: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for site in trace.nodes.values():
        if not is_latent(site) or is_delta(site["fn"]):
            continue
        # cond_indep_stack lists the outermost plate first.
        for rank, frame in enumerate(site["cond_indep_stack"]):
            if not frame.vectorized or frame.name == ELBO_PARTICLE_PLATE:
                continue
            counts[frame.name] += 1
            outer_rank.setdefault(frame.name, rank)
            value = site_value(site)
            axis = value.dim() - len(site_fn(site).event_shape) + frame.dim
            sizes.setdefault(frame.name, int(value.shape[axis]) if 0 <= axis < value.dim() else -1)
            if frame.full_size is not None and frame.full_size != frame.size:
                subsampled.add(frame.name)
    if data_plate is not None:
        if data_plate not in counts:
            raise NoLocalLatentError(
                f"the guide samples no latent variable inside a vectorized plate named {data_plate!r}"
                + (f" (plates with latents: {', '.join(sorted(counts))})" if counts else "")
            )
        return data_plate
    if not counts:
        sequential = _sequential_latent(trace)
        if sequential is not None:
            raise NoLocalLatentError(
                f"{sequential}: the estimators need the data plate vectorized (with pyro.plate(...) as ...)"
            )
        names = [n for n, site in trace.nodes.items() if is_latent(site) and not is_delta(site["fn"])]
        found = f" (its latent sites {', '.join(repr(n) for n in names)} are global)" if names else ""
        raise NoLocalLatentError(
            "the guide has no local latent site: no latent sample statement inside a "
            f"vectorized pyro.plate{found}; a guide such as AutoDiagonalNormal has only global latents"
        )
    candidates = list(counts)
    if model_trace is not None:
        holding_data = [n for n in candidates if n in observed_plates(model_trace)]
        if holding_data:
            return min(holding_data, key=lambda n: (outer_rank[n], -counts[n]))
    matching = [n for n in candidates if sizes[n] in _batch_sizes(batch)]
    if matching:
        candidates = matching
    chosen = max(candidates, key=lambda n: (counts[n], n in subsampled, -outer_rank[n]))
    outside = _latents_outside(trace, chosen, candidates)
    if outside:
        raise AmbiguousDataPlateError(
            f"cannot tell the data plate from the guide alone: plates {', '.join(repr(n) for n in sorted(counts))} "
            f"hold latents ({outside}); pass model= (its observed sites mark the data plate) or data_plate="
        )
    return chosen


def require_local_latent(trace: Trace) -> None:
    """Raise :class:`NoLocalLatentError` (naming the sites) when a guide trace has no local latent site."""
    try:
        find_data_plate(trace)
    except AmbiguousDataPlateError:
        pass  # several plates hold latents: there are local ones


def _latents_outside(trace: Trace, chosen: str, candidates: list[str]) -> str:
    """A latent site in another candidate plate but not in ``chosen``, described (empty when none)."""
    for name, site in trace.nodes.items():
        if not is_latent(site) or is_delta(site["fn"]) or site_frame(site, chosen) is not None:
            continue
        plates = [f.name for f in site["cond_indep_stack"] if f.vectorized and f.name in candidates]
        if plates:
            return f"site '{name}' is in plate '{plates[0]}' but not in '{chosen}'"
    return ""


@dataclass
class LocalSite:
    """A local latent site of a guide trace: its name and the batch dim of the data plate."""

    name: str
    dim: int  # negative index of the data plate in the site's batch shape


def local_latent_sites(trace: Trace, data_plate: str, *, include_delta: bool = False) -> list[LocalSite]:
    """Latent sites inside the data plate, point masses excluded unless asked for.

    AutoNormal's local latents are its auxiliary ``*_unconstrained`` sites; its Delta
    sites only map them to the constrained space.
    """
    found = []
    for name, site in trace.nodes.items():
        if not is_latent(site):
            continue
        if is_delta(site["fn"]) and not include_delta:
            continue
        frame = site_frame(site, data_plate)
        if frame is not None:
            found.append(LocalSite(name, frame.dim))
    return found


def raw_log_prob(site: Site) -> torch.Tensor:
    """A site's log-density without the subsample or annealing scale, with its mask applied.

    The result has the site's full batch shape, so the data plate's dim is always present.
    """
    fn, value = site_fn(site), site_value(site)
    log_p = fn.log_prob(value)
    event_dim = len(fn.event_shape)
    batch_shape = value.shape[: value.dim() - event_dim]
    log_p = log_p.expand(torch.broadcast_shapes(log_p.shape, batch_shape))
    mask = site.get("mask")
    if mask is not None and mask is not True:
        if mask is False:
            return torch.zeros_like(log_p)
        log_p = torch.where(mask, log_p, torch.zeros_like(log_p))
    return log_p


def sum_to_plate(values: torch.Tensor, plate_dim: int, keep_left: int = 0) -> torch.Tensor:
    """Sum a batch-shaped tensor over all dims but the data plate's (and ``keep_left`` leading dims).

    ``plate_dim`` is the plate's negative batch dim; dims further left than the
    program's plates (such as a particle plate) are kept when ``keep_left`` says so.
    """
    position = values.dim() + plate_dim
    if position < keep_left:
        raise ValueError("the data plate dim overlaps the kept leading dims")
    dims = [d for d in range(keep_left, values.dim()) if d != position]
    return values.sum(dim=dims) if dims else values


def point_log_prob(site: Site, data_plate: str, keep_left: int = 0) -> torch.Tensor | None:
    """A site's unscaled log-density summed to one value per data point, or None outside the plate."""
    if site_is_subsample(site):
        return None
    frame = site_frame(site, data_plate)
    if frame is None:
        return None
    return sum_to_plate(raw_log_prob(site), frame.dim, keep_left)


def detach_trace(trace: Trace) -> Trace:
    """A copy of a trace whose sample values are cut from the graph, for replaying into the model."""
    detached = trace.copy()
    for name, site in trace.nodes.items():
        if site["type"] == "sample":
            node = site.copy()
            node["value"] = site_value(site).detach()
            detached.nodes[name] = node
    return detached


def max_plate_nesting(*traces: Trace) -> int:
    """How many batch dims the program's plates use (the leftmost plate's ``-dim``)."""
    depth = 0
    for trace in traces:
        for site in trace.nodes.values():
            for frame in site.get("cond_indep_stack", ()):
                if frame.dim is not None:  # the frame is vectorized
                    depth = max(depth, -frame.dim)
    return depth
