"""Latent-usage diagnostics for any Pyro model/guide pair: KL, mutual information, active units, IW-NLL.

All estimators work per data point of the data plate (the plate holding the observed
data and the local latents), with each site's raw density (trace log-probs carry
subsample and annealing scales, which these figures must not). Masked entries count
only for the data point they belong to. Closed forms are used where torch has them,
Monte Carlo otherwise.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from pyro import poutine

from pyro_lag.estimators.active_units import ACTIVE_THRESHOLD, ActiveUnits
from pyro_lag.estimators.iw_nll import iw_log_likelihood
from pyro_lag.estimators.mutual_info import (
    POOL_SIZE,
    MIAccumulator,
    MutualInformation,
    terms_by_replay,
)
from pyro_lag.trace.densities import SiteDensity
from pyro_lag.trace.guide_view import (
    View,
    as_batches,
    eval_mode,
    plate_dim_in,
    trace_guide,
    trace_model,
    view_of,
)
from pyro_lag.trace.rng import preserved_rng
from pyro_lag.trace.sites import Batch, Site, is_latent, point_log_prob, site_frame

__all__ = ["estimate_mutual_information", "evaluate", "mutual_information", "usage_totals"]


def _sites_depend_on_each_other(guide: Callable, view: View) -> bool:
    """Whether a local site's distribution changes when the other local sites take other values."""
    if len(view.densities) < 2:
        return False
    other = trace_guide(guide, view.args, view.kwargs)
    mixed = view.trace.copy()
    for d in view.densities:
        node = view.trace.nodes[d.name].copy()
        node["value"] = other.nodes[d.name]["value"]
        mixed.nodes[d.name] = node
    replayed = poutine.trace(poutine.replay(guide, trace=mixed)).get_trace(*view.args, **view.kwargs)
    for d in view.densities:
        moved = SiteDensity.of(d.name, replayed.nodes[d.name], plate_dim_in(replayed, d.name, view.plate))
        if not torch.allclose(moved.elementwise(d.value), d.elementwise(), equal_nan=True):
            return True
    return False


def _add_mi(accumulator: MIAccumulator, guide: Callable, view: View) -> None:
    if _sites_depend_on_each_other(guide, view):
        terms = terms_by_replay(
            guide, view.trace, view.densities, view.args, view.kwargs,
            lambda trace, name: plate_dim_in(trace, name, view.plate),
        )
        accumulator.add_terms(terms, view.size**2)
    else:
        accumulator.add_independent(view.densities)


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
    batches = list(as_batches(batches))
    accumulator = MIAccumulator(pool_size)
    with torch.no_grad(), eval_mode(guide):
        for _ in range(num_samples):
            for batch in batches:
                _add_mi(accumulator, guide, view_of(guide, batch, data_plate, model))
            accumulator.flush()
    return accumulator.result(num_samples)


def quiet_mi_estimate(
    guide: Callable, batches: Iterable[Batch], *, model: Callable | None = None, data_plate: str | None = None,
    num_samples: int = 4,
) -> MutualInformation:
    """MI as a training loop checks it between steps: no draw from the training's random streams, no warning."""
    with preserved_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate_mutual_information(guide, batches, model=model, data_plate=data_plate, num_samples=num_samples)


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


# ------------------------------------------------------------------ KL and reconstruction


def _site_kl(model_site: Site | None, density: SiteDensity, plate: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KL(q || p) of one local site per data point [B] (closed form where torch has it, else at the
    guide's draw), and per data point and unit [B, units] when the KL is elementwise (else None)."""
    frame = site_frame(model_site, plate) if model_site is not None and is_latent(model_site) else None
    if model_site is None or frame is None:
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


def _kl_and_recon(model: Callable, view: View) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-point KL(q(z|x) || p(z)) over local sites, E_q log p(x|z), and KL per unit if elementwise."""
    model_trace = view.model_trace if view.model_trace is not None else trace_model(model, view.trace, view.args, view.kwargs)
    plate = view.plate
    device = view.densities[0].value.device
    recon = torch.zeros(view.size, device=device)
    kl = torch.zeros(view.size, device=device)
    handled: set[str] = set()
    per_unit: list[torch.Tensor] | None = []
    local = {d.name: d for d in view.densities}
    for name, site in view.trace.nodes.items():
        frame = site_frame(site, plate) if is_latent(site) else None
        if frame is None:
            continue
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


def usage_totals(
    model: Callable, guide: Callable, batches: Iterable[Batch], *, data_plate: str | None = None
) -> tuple[dict[str, float], ActiveUnits]:
    """Sums over the data points of ``recon`` and ``kl`` (and ``points``), and the active-unit
    accumulator: the parts of :func:`evaluate` that shards of the data (ranks) add up exactly."""
    sums = {"recon": 0.0, "kl": 0.0, "points": 0.0}
    units = ActiveUnits()
    with torch.no_grad(), eval_mode(model, guide):
        for batch in as_batches(batches):
            view = view_of(guide, batch, data_plate, model)
            kl, recon, _ = _kl_and_recon(model, view)
            sums["kl"] += float(kl.sum())
            sums["recon"] += float(recon.sum())
            sums["points"] += view.size
            units.update(view)
    return sums, units


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
    units = ActiveUnits()
    accumulator = MIAccumulator(mi_pool_size)
    count = 0
    batches = list(as_batches(batches))
    if progress is not None:
        progress(0, len(batches))
    with torch.no_grad(), eval_mode(model, guide):
        for done, batch in enumerate(batches, 1):
            view = view_of(guide, batch, data_plate, model)
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
                _add_mi(accumulator, guide, view_of(guide, batch, data_plate, model))
        if count == 0:
            raise ValueError("evaluate got no batch")
        mi = accumulator.result(mi_samples)
    variance = units.variance()
    result: dict[str, Any] = {key: value / count for key, value in sums.items()}
    if iw_samples <= 0:
        del result["iw_nll"]
    result.update(
        mi=mi.value, mi_se=mi.se, mi_pairs=mi.pairs, mi_points=mi.points,
        au=int((variance >= threshold).sum()), au_var=variance,
        kl_dim=kl_units / count if (kl_units_ok and kl_units is not None) else None,
        num_points=count,
    )
    return result
