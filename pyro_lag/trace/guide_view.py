"""A batch seen through the guide: its trace, data plate and local sites, shared by every estimator."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace

from pyro_lag.trace.densities import SiteDensity
from pyro_lag.trace.sites import (
    Batch,
    find_data_plate,
    local_latent_sites,
    normalize_batch,
    site_frame,
)


@contextlib.contextmanager
def eval_mode(*fns: Callable) -> Iterator[None]:
    """Put the torch modules behind these callables (modules or their bound methods) in eval mode."""
    modules: list[tuple[torch.nn.Module, bool]] = []
    for fn in fns:
        owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module) and all(owner is not m for m, _ in modules):
            modules.append((owner, owner.training))
    for module, _ in modules:
        module.eval()
    try:
        yield
    finally:
        for module, was_training in modules:
            module.train(was_training)


def trace_guide(guide: Callable, args: tuple, kwargs: dict) -> Trace:
    return poutine.trace(guide).get_trace(*args, **kwargs)


def trace_model(model: Callable, guide_trace: Trace, args: tuple, kwargs: dict) -> Trace:
    return poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)


def plate_dim_in(trace: Trace, name: str, plate: str) -> int:
    frame = site_frame(trace.nodes[name], plate)
    if frame is None:
        raise ValueError(f"site {name!r} lost the data plate {plate!r} on replay")
    return frame.dim


@dataclass
class View:
    """One batch seen through the guide: its trace, data plate and local sites (and the model's trace)."""

    args: tuple
    kwargs: dict
    trace: Trace
    plate: str
    densities: list[SiteDensity]
    model_trace: Trace | None = None

    @property
    def size(self) -> int:
        return self.densities[0].size


def view_of(guide: Callable, batch: Batch, data_plate: str | None, model: Callable | None = None) -> View:
    args, kwargs = normalize_batch(batch)
    trace = trace_guide(guide, args, kwargs)
    model_trace = trace_model(model, trace, args, kwargs) if model is not None else None
    plate = find_data_plate(trace, data_plate, model_trace=model_trace, batch=(args, kwargs))
    densities = [
        SiteDensity.of(s.name, trace.nodes[s.name], s.dim) for s in local_latent_sites(trace, plate)
    ]
    sizes = {d.size for d in densities}
    if len(sizes) > 1:
        raise ValueError(f"the local sites of plate {plate!r} disagree on its size: {sorted(sizes)}")
    return View(args, kwargs, trace, plate, densities, model_trace)


def as_batches(batches: Iterable[Batch] | Batch) -> Iterable[Batch]:
    if isinstance(batches, torch.Tensor):
        return [batches]
    return batches
