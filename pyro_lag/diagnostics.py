"""Latent-usage diagnostics for any Pyro model/guide pair: KL, mutual information, active units, IW-NLL.

All estimators work per data point of the data plate (the plate holding the observed
data and the local latents), with each site's raw density (trace log-probs carry
subsample and annealing scales, which these figures must not). Masked entries count
only for the data point they belong to. Closed forms are used where torch has them,
Monte Carlo otherwise.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from .densities import SiteDensity, posterior_mean
from .mutual_information import (
    POOL_SIZE,
    MIAccumulator,
    MutualInformation,
    terms_by_replay,
)
from .sites import (
    Batch,
    detach_trace,
    find_data_plate,
    is_latent,
    local_latent_sites,
    max_plate_nesting,
    normalize_batch,
    point_log_prob,
    site_frame,
)

__all__ = [
    "ACTIVE_THRESHOLD", "MutualInformation", "active_units", "estimate_mutual_information", "eval_mode",
    "evaluate", "iw_log_likelihood", "mutual_information",
]

ACTIVE_THRESHOLD = 0.01
"""Variance of the posterior mean across the data at or above which a latent unit is active."""
PARTICLE_PLATE = "_pyro_lag_particles"


@contextlib.contextmanager
def eval_mode(*fns: Callable) -> Iterator[None]:
    """Put the torch modules behind these callables (modules or their bound methods) in eval mode."""
    modules = []
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


def _trace_guide(guide: Callable, args: tuple, kwargs: dict) -> Trace:
    return poutine.trace(guide).get_trace(*args, **kwargs)


def _trace_model(model: Callable, guide_trace: Trace, args: tuple, kwargs: dict) -> Trace:
    return poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)


def _plate_dim_in(trace: Trace, name: str, plate: str) -> int:
    frame = site_frame(trace.nodes[name], plate)
    if frame is None:
        raise ValueError(f"site {name!r} lost the data plate {plate!r} on replay")
    return frame.dim


@dataclass
class _View:
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


def _view(guide: Callable, batch: Batch, data_plate: str | None, model: Callable | None = None) -> _View:
    args, kwargs = normalize_batch(batch)
    trace = _trace_guide(guide, args, kwargs)
    model_trace = _trace_model(model, trace, args, kwargs) if model is not None else None
    plate = find_data_plate(trace, data_plate, model_trace=model_trace, batch=(args, kwargs))
    densities = [
        SiteDensity.of(s.name, trace.nodes[s.name], s.dim) for s in local_latent_sites(trace, plate)
    ]
    sizes = {d.size for d in densities}
    if len(sizes) > 1:
        raise ValueError(f"the local sites of plate {plate!r} disagree on its size: {sorted(sizes)}")
    return _View(args, kwargs, trace, plate, densities, model_trace)


def _sites_depend_on_each_other(guide: Callable, view: _View) -> bool:
    """Whether a local site's distribution changes when the other local sites take other values."""
    if len(view.densities) < 2:
        return False
    other = _trace_guide(guide, view.args, view.kwargs)
    mixed = view.trace.copy()
    for d in view.densities:
        node = dict(view.trace.nodes[d.name])
        node["value"] = other.nodes[d.name]["value"]
        mixed.nodes[d.name] = node
    replayed = poutine.trace(poutine.replay(guide, trace=mixed)).get_trace(*view.args, **view.kwargs)
    for d in view.densities:
        moved = SiteDensity.of(d.name, replayed.nodes[d.name], _plate_dim_in(replayed, d.name, view.plate))
        if not torch.allclose(moved.elementwise(d.value), d.elementwise(), equal_nan=True):
            return True
    return False


def _add_mi(accumulator: MIAccumulator, guide: Callable, view: _View) -> None:
    if _sites_depend_on_each_other(guide, view):
        terms = terms_by_replay(
            guide, view.trace, view.densities, view.args, view.kwargs,
            lambda trace, name: _plate_dim_in(trace, name, view.plate),
        )
        accumulator.add_terms(terms, view.size**2)
    else:
        accumulator.add_independent(view.densities)


def _batches(batches: Iterable[Batch] | Batch) -> Iterable[Batch]:
    if isinstance(batches, torch.Tensor):
        return [batches]
    return batches


# ------------------------------------------------------------------ mutual information


def estimate_mutual_information(
    guide: Callable,
    batches: Iterable[Batch],
    *,
    model: Callable | None = None,
    data_plate: str | None = None,
    num_samples: int = 1,
    pool_size: int = POOL_SIZE,
) -> MutualInformation:
    """I_q(x; z) in nats with its standard error, over all pairs of up to ``pool_size`` points.

    MI = mean_i [log q(z_i|x_i) - log (1/N) sum_j q(z_i|x_j)], z_i ~ q(z|x_i), over the N
    points of the batches pooled (see :mod:`pyro_lag.mutual_information`); ``num_samples``
    draws per point are averaged. ``model`` helps find the data plate (the one holding
    the observations); guides whose local sites depend on each other are estimated batch
    by batch, by replay.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    batches = list(_batches(batches))
    accumulator = MIAccumulator(pool_size)
    with torch.no_grad(), eval_mode(guide):
        for _ in range(num_samples):
            for batch in batches:
                _add_mi(accumulator, guide, _view(guide, batch, data_plate, model))
            accumulator.flush()
    return accumulator.result(num_samples)


def mutual_information(
    guide: Callable,
    batches: Iterable[Batch],
    *,
    model: Callable | None = None,
    data_plate: str | None = None,
    num_samples: int = 1,
) -> float:
    """I_q(x; z) in nats (see :func:`estimate_mutual_information`, which also gives its standard error)."""
    return estimate_mutual_information(
        guide, batches, model=model, data_plate=data_plate, num_samples=num_samples
    ).value


# ------------------------------------------------------------------ active units


class _MaskedVariance:
    """Streaming mean and unbiased variance per unit over the data points where the unit is present.

    Chan et al.'s parallel update, column by column; one instance per latent site.
    """

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, rows: torch.Tensor, present: torch.Tensor | None) -> None:
        rows = rows.double()
        weight = torch.ones_like(rows) if present is None else present.to(rows.dtype)
        n = weight.sum(0)
        mean = (rows * weight).sum(0) / n.clamp(min=1)
        m2 = (((rows - mean) ** 2) * weight).sum(0)
        if self.count is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        self._grow(n.shape[0])
        n, mean, m2 = (_pad(t, self.count.shape[0]) for t in (n, mean, m2))
        total = self.count + n
        delta = mean - self.mean
        share = torch.where(total > 0, n / total.clamp(min=1), torch.zeros_like(n))
        self.m2 = self.m2 + m2 + delta**2 * self.count * share
        self.mean = self.mean + delta * share
        self.count = total

    def _grow(self, units: int) -> None:
        assert self.count is not None and self.mean is not None and self.m2 is not None
        if units > self.count.shape[0]:
            self.count, self.mean, self.m2 = (_pad(t, units) for t in (self.count, self.mean, self.m2))

    def variance(self) -> torch.Tensor:
        assert self.count is not None and self.m2 is not None
        return torch.where(self.count > 1, self.m2 / (self.count - 1).clamp(min=1), torch.zeros_like(self.m2)).float()


def _pad(values: torch.Tensor, units: int) -> torch.Tensor:
    return torch.nn.functional.pad(values, (0, units - values.shape[0]))


class _ActiveUnits:
    """Posterior-mean variance per latent unit, accumulated batch by batch, site by site."""

    def __init__(self, num_samples: int = 64) -> None:
        self.num_samples = num_samples
        self.sites: dict[str, _MaskedVariance] = {}
        self.points = 0

    def update(self, view: _View) -> None:
        for d in view.densities:
            rows, present = posterior_mean(d, self.num_samples)
            self.sites.setdefault(d.name, _MaskedVariance()).update(rows, present)
        self.points += view.size

    def variance(self) -> torch.Tensor:
        if self.points < 2:
            raise ValueError("active units need at least two data points")
        return torch.cat([v.variance() for v in self.sites.values()])


def active_units(
    guide: Callable,
    batches: Iterable[Batch],
    threshold: float = ACTIVE_THRESHOLD,
    *,
    model: Callable | None = None,
    data_plate: str | None = None,
    num_samples: int = 64,
) -> tuple[int, torch.Tensor]:
    """Active latent units: those whose posterior mean E_q[z_d|x] varies across the data by >= threshold.

    Returns the count and the per-unit variance (unbiased) of the posterior mean; units are
    the entries of each local site per data point, in site order, and a masked entry counts
    only for the points where it is present. A categorical latent has one unit per category
    (its probabilities).
    """
    units = _ActiveUnits(num_samples)
    with torch.no_grad(), eval_mode(guide):
        for batch in _batches(batches):
            units.update(_view(guide, batch, data_plate, model))
    variance = units.variance()
    return int((variance >= threshold).sum()), variance


# ------------------------------------------------------------------ KL and reconstruction


def _site_kl(model_site: dict | None, density: SiteDensity, plate: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KL(q || p) of one local site per data point [B] (closed form where torch has it, else at the
    guide's draw), and per data point and unit [B, units] when the KL is elementwise (else None)."""
    frame = site_frame(model_site, plate) if model_site is not None and is_latent(model_site) else None
    if frame is None:
        return density.per_point(), None  # the model does not score this site per data point
    prior = SiteDensity.of(density.name, model_site, frame.dim)
    if prior.base.event_shape != density.base.event_shape or prior.shape != density.shape:
        return density.per_point() - prior.per_point(prior.elementwise(density.value)), None
    try:
        elementwise = torch.distributions.kl_divergence(density.base, prior.base).expand(density.shape)
    except NotImplementedError:
        elementwise = density.elementwise() - prior.elementwise(density.value)
    per_point = density.per_point(elementwise)
    if len(density.base.event_shape):
        return per_point, None
    masked = elementwise if density.mask is None else elementwise.masked_fill(~density.mask, 0.0)
    return per_point, masked.movedim(density.position, 0).reshape(density.size, -1)


def _kl_and_recon(model: Callable, view: _View) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-point KL(q(z|x) || p(z)) over local sites, E_q log p(x|z), and KL per unit if elementwise."""
    model_trace = view.model_trace if view.model_trace is not None else _trace_model(model, view.trace, view.args, view.kwargs)
    plate = view.plate
    device = view.densities[0].value.device
    recon = torch.zeros(view.size, device=device)
    kl = torch.zeros(view.size, device=device)
    handled: set[str] = set()
    per_unit: list[torch.Tensor] | None = []
    local = {d.name: d for d in view.densities}
    for name, site in view.trace.nodes.items():
        if not is_latent(site) or site_frame(site, plate) is None:
            continue
        frame = site_frame(site, plate)
        density = local.get(name) or SiteDensity.of(name, site, frame.dim)
        model_site = model_trace.nodes.get(name)
        site_kl, site_units = _site_kl(model_site, density, plate)
        kl = kl + site_kl
        if model_site is not None and is_latent(model_site):
            handled.add(name)
        if per_unit is not None and name in local:
            per_unit = None if site_units is None else per_unit + [site_units]
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        log_p = point_log_prob(site, plate)
        if log_p is None:
            continue
        if site["is_observed"]:
            recon = recon + log_p
        elif name not in handled:
            kl = kl - log_p  # a model latent the guide does not sample: drawn from the prior
    return kl, recon, (torch.cat(per_unit, dim=1) if per_unit else None)


# ------------------------------------------------------------------ importance-weighted NLL


def _iw_log_weights(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, plate: str, particles: int, depth: int
) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k|x) per particle and data point, [particles, B], in one vectorized run."""
    with pyro.plate(PARTICLE_PLATE, particles, dim=-(depth + 1)):
        guide_trace = _trace_guide(guide, args, kwargs)
        model_trace = _trace_model(model, detach_trace(guide_trace), args, kwargs)
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
        batch_shape = site["fn"].batch_shape
        owned = {f.dim: f.size for f in site["cond_indep_stack"] if f.vectorized}
        for index, size in enumerate(batch_shape):
            dim = index - len(batch_shape)
            if size != 1 and (dim not in owned or owned[dim] not in (size, -1)):
                raise ValueError(f"site {name!r} has batch shape {tuple(batch_shape)} beyond its plates")


def _sum_log_weights(model_trace: Trace, guide_trace: Trace, plate: str, keep_left: int) -> torch.Tensor:
    log_w = 0.0
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
        view = _view(guide, (args, kwargs), data_plate, model)
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
                guide_trace = _trace_guide(guide, args, kwargs)
                model_trace = _trace_model(model, guide_trace, args, kwargs)
                chunks.append(_sum_log_weights(model_trace, guide_trace, view.plate, 0).unsqueeze(0))
            remaining -= size
        log_w = torch.cat(chunks, dim=0)
    return torch.logsumexp(log_w, dim=0) - math.log(num_samples)


# ------------------------------------------------------------------ everything at once


def evaluate(
    model: Callable,
    guide: Callable,
    batches: Iterable[Batch],
    *,
    iw_samples: int = 0,
    iw_chunk_size: int = 100,
    threshold: float = ACTIVE_THRESHOLD,
    data_plate: str | None = None,
    mi_samples: int = 1,
    mi_pool_size: int = POOL_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Every latent-usage figure in one pass over the batches, per data point, in nats.

    Keys: ``elbo`` (recon - kl), ``recon`` (E_q log p(x|z)), ``kl`` (KL(q(z|x)||p(z)) over
    local latents), ``mi`` and ``mi_se`` (MI over all pairs of up to ``mi_pool_size`` points
    and its standard error; ``mi_pairs`` pairs), ``au`` and ``au_var`` (active units and
    posterior-mean variance per unit), ``kl_dim`` (KL per unit, when elementwise),
    ``num_points``; ``iw_nll`` when ``iw_samples`` > 0. ``progress(done, total)`` is called
    before the first batch and after each one (long IW-NLL passes can take minutes).
    """
    sums = {"elbo": 0.0, "recon": 0.0, "kl": 0.0, "iw_nll": 0.0}
    kl_units: torch.Tensor | None = None
    kl_units_ok = True
    units = _ActiveUnits()
    accumulator = MIAccumulator(mi_pool_size)
    count = 0
    batches = list(_batches(batches))
    if progress is not None:
        progress(0, len(batches))
    with torch.no_grad(), eval_mode(model, guide):
        for done, batch in enumerate(batches, 1):
            view = _view(guide, batch, data_plate, model)
            kl, recon, kl_dim = _kl_and_recon(model, view)
            sums["kl"] += float(kl.sum())
            sums["recon"] += float(recon.sum())
            sums["elbo"] += float((recon - kl).sum())
            _add_mi(accumulator, guide, view)
            units.update(view)
            if kl_dim is None or (kl_units is not None and kl_units.shape != kl_dim.shape[1:]):
                kl_units_ok = False
            elif kl_units_ok:
                kl_units = kl_dim.sum(0) if kl_units is None else kl_units + kl_dim.sum(0)
            if iw_samples > 0:
                log_px = iw_log_likelihood(
                    model, guide, *view.args, num_samples=iw_samples, chunk_size=iw_chunk_size,
                    data_plate=view.plate, **view.kwargs,
                )
                sums["iw_nll"] -= float(log_px.sum())
            count += view.size
            if progress is not None:
                progress(done, len(batches))
        for _ in range(mi_samples - 1):
            accumulator.flush()
            for batch in batches:
                _add_mi(accumulator, guide, _view(guide, batch, data_plate, model))
        if count == 0:
            raise ValueError("evaluate got no batch")
        mi = accumulator.result(mi_samples)
    variance = units.variance()
    result: dict[str, Any] = {key: value / count for key, value in sums.items()}
    if iw_samples <= 0:
        del result["iw_nll"]
    result.update(
        mi=mi.value, mi_se=mi.se, mi_pairs=mi.pairs,
        au=int((variance >= threshold).sum()), au_var=variance,
        kl_dim=kl_units / count if (kl_units_ok and kl_units is not None) else None,
        num_points=count,
    )
    return result
