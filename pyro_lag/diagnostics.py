"""Latent-usage diagnostics for any Pyro model/guide pair: KL, mutual information, active units, IW-NLL.

All estimators work per data point of the guide's data plate, with each site's raw
``fn.log_prob`` (trace log-probs carry subsample and annealing scales, which these
figures must not). Closed forms are used where torch has them, Monte Carlo otherwise.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import pyro
from pyro import poutine
from pyro.poutine.trace_struct import Trace

from .sites import (
    Batch,
    LocalSite,
    detach_trace,
    find_data_plate,
    is_delta,
    is_latent,
    local_latent_sites,
    max_plate_nesting,
    normalize_batch,
    point_log_prob,
    raw_log_prob,
    site_frame,
    sum_to_plate,
    _base_fn,
)

PARTICLE_PLATE = "_pyro_lag_particles"


# ------------------------------------------------------------------ helpers


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


def _plate_size(trace: Trace, plate: str) -> int:
    for site in trace.nodes.values():
        frame = site_frame(site, plate) if site["type"] == "sample" else None
        if frame is not None:
            return int(frame.size)
    raise ValueError(f"plate {plate!r} not found in the trace")


def _to_rows(tensor: torch.Tensor, position: int) -> torch.Tensor:
    """Move the data-plate axis to the front and flatten the rest: one row per data point."""
    moved = tensor.movedim(position, 0)
    return moved.reshape(moved.shape[0], -1)


def _negative_entropy(site: dict, dim: int) -> torch.Tensor:
    """E_q[log q(z|x)] per data point: closed-form entropy when torch has it, else log q at the sample."""
    fn = site["fn"]
    mask = site.get("mask")
    if mask is None or mask is True:
        try:
            entropy = fn.entropy()
            batch_shape = site["value"].shape[: site["value"].dim() - len(fn.event_shape)]
            return -sum_to_plate(entropy.expand(batch_shape), dim)
        except NotImplementedError:
            pass
    return sum_to_plate(raw_log_prob(site), dim)


def _pair_log_prob(site: dict, dim: int) -> torch.Tensor:
    """log q(z_i | x_j) for all pairs of the batch, [B_i, B_j], by broadcasting the site's distribution.

    The value's data-plate axis moves to a new leftmost dim, and a singleton takes its
    place, so ``fn.log_prob`` pairs every z_i with every x_j's distribution.
    """
    fn, value = site["fn"], site["value"]
    event_dim = len(fn.event_shape)
    batch_dims = value.dim() - event_dim
    position = batch_dims + dim
    pairs = value.movedim(position, 0).unsqueeze(position + 1)
    log_p = fn.log_prob(pairs)
    full = (pairs.shape[0],) + torch.broadcast_shapes(
        pairs.shape[1 : 1 + batch_dims], fn.batch_shape
    )
    log_p = log_p.expand(full)
    mask = site.get("mask")
    if mask is not None and mask is not True:
        log_p = log_p * torch.as_tensor(mask, dtype=log_p.dtype, device=log_p.device)
    keep = (0, position + 1)
    others = [d for d in range(log_p.dim()) if d not in keep]
    return log_p.sum(dim=others) if others else log_p


def _sites_depend_on_each_other(
    guide: Callable, trace: Trace, sites: list[LocalSite], args: tuple, kwargs: dict
) -> bool:
    """Whether a local site's distribution changes when other local sites take other values."""
    if len(sites) < 2:
        return False
    other = _trace_guide(guide, args, kwargs)
    mixed = trace.copy()
    for s in sites:
        node = dict(trace.nodes[s.name])
        node["value"] = other.nodes[s.name]["value"]
        mixed.nodes[s.name] = node
    replayed = poutine.trace(poutine.replay(guide, trace=mixed)).get_trace(*args, **kwargs)
    for s in sites:
        original = trace.nodes[s.name]
        moved_fn = replayed.nodes[s.name]["fn"]
        if not torch.allclose(
            moved_fn.log_prob(original["value"]), original["fn"].log_prob(original["value"]),
            equal_nan=True,
        ):
            return True
    return False


def _pair_log_prob_by_replay(
    guide: Callable, trace: Trace, sites: list[LocalSite], args: tuple, kwargs: dict, size: int
) -> torch.Tensor:
    """log q(z_i | x_j) for guides whose local sites depend on each other: one replay per i."""
    rows = []
    for i in range(size):
        fixed = trace.copy()
        for s in sites:
            node = dict(trace.nodes[s.name])
            value = node["value"]
            position = value.dim() - len(node["fn"].event_shape) + s.dim
            node["value"] = value.narrow(position, i, 1).expand_as(value)
            fixed.nodes[s.name] = node
        replayed = poutine.trace(poutine.replay(guide, trace=fixed)).get_trace(*args, **kwargs)
        rows.append(sum(point_log_prob(replayed.nodes[s.name], _plate_of(s, replayed)) for s in sites))
    return torch.stack(rows)


def _plate_of(site: LocalSite, trace: Trace) -> str:
    for frame in trace.nodes[site.name]["cond_indep_stack"]:
        if frame.vectorized and frame.dim == site.dim:
            return frame.name
    raise ValueError(f"site {site.name!r} lost its data plate on replay")


# ------------------------------------------------------------ per-batch pieces


@dataclass
class _GuideView:
    """A guide trace of one batch with its data plate and local latent sites."""

    trace: Trace
    plate: str
    sites: list[LocalSite]
    size: int


def _guide_view(guide: Callable, args: tuple, kwargs: dict, data_plate: str | None) -> _GuideView:
    trace = _trace_guide(guide, args, kwargs)
    plate = find_data_plate(trace, data_plate)
    sites = local_latent_sites(trace, plate)
    return _GuideView(trace, plate, sites, _plate_size(trace, plate))


def _batch_mi(guide: Callable, view: _GuideView, args: tuple, kwargs: dict) -> float:
    """The paper's MI estimate on one batch (one sample z_i ~ q(z|x_i) per point)."""
    nodes = view.trace.nodes
    neg_entropy = sum(_negative_entropy(nodes[s.name], s.dim) for s in view.sites)
    if _sites_depend_on_each_other(guide, view.trace, view.sites, args, kwargs):
        pairs = _pair_log_prob_by_replay(guide, view.trace, view.sites, args, kwargs, view.size)
    else:
        pairs = sum(_pair_log_prob(nodes[s.name], s.dim) for s in view.sites)
    log_aggregate = torch.logsumexp(pairs, dim=1) - math.log(view.size)
    return float(neg_entropy.mean() - log_aggregate.mean())


def _posterior_means(view: _GuideView, num_samples: int) -> torch.Tensor:
    """E_q[z|x] per data point and latent dimension, [B, D] (Monte Carlo where torch has no mean)."""
    columns = []
    for s in view.sites:
        site = view.trace.nodes[s.name]
        fn = site["fn"]
        try:
            mean = fn.mean
            if not torch.isfinite(mean).all():
                raise NotImplementedError
        except NotImplementedError:
            mean = fn.sample((num_samples,)).mean(0)
        batch_dims = mean.dim() - len(fn.event_shape)
        mean = mean.expand(site["value"].shape)
        columns.append(_to_rows(mean, batch_dims + s.dim))
    return torch.cat(columns, dim=1)


def _kl_and_recon(
    model: Callable, view: _GuideView, args: tuple, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-point KL(q(z|x) || p(z)) over local sites, E_q log p(x|z), and KL per latent dim if factorized."""
    guide_trace = view.trace
    model_trace = _trace_model(model, guide_trace, args, kwargs)
    plate = view.plate
    device = guide_trace.nodes[view.sites[0].name]["value"].device
    recon = torch.zeros(view.size, device=device)
    kl = torch.zeros(view.size, device=device)
    closed: set[str] = set()
    per_dim: list[torch.Tensor] | None = []
    local_names = {s.name: s for s in view.sites}
    for name, site in guide_trace.nodes.items():
        if not is_latent(site) or site_frame(site, plate) is None:
            continue
        frame = site_frame(site, plate)
        model_site = model_trace.nodes.get(name)
        pair_kl = None
        if (
            model_site is not None
            and is_latent(model_site)
            and not is_delta(site["fn"])
            and site.get("mask") is None
            and model_site.get("mask") is None
        ):
            try:
                pair_kl = torch.distributions.kl_divergence(site["fn"], model_site["fn"])
            except NotImplementedError:
                pair_kl = None
        if pair_kl is not None:
            batch_shape = site["value"].shape[: site["value"].dim() - len(site["fn"].event_shape)]
            kl = kl + sum_to_plate(pair_kl.expand(batch_shape), frame.dim)
            closed.add(name)
        else:
            kl = kl + sum_to_plate(raw_log_prob(site), frame.dim)
        if per_dim is not None and name in local_names:
            per_dim_site = _kl_per_dim(site, model_site, frame.dim)
            per_dim = None if per_dim_site is None else per_dim + [per_dim_site]
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        log_p = point_log_prob(site, plate)
        if log_p is None:
            continue
        if site["is_observed"]:
            recon = recon + log_p
        elif name not in closed:
            kl = kl - log_p
    dims = torch.cat(per_dim, dim=1) if per_dim else None
    return kl, recon, dims


def _kl_per_dim(guide_site: dict, model_site: dict | None, dim: int) -> torch.Tensor | None:
    """KL per data point and latent dimension, [B, D], for factorized sites; None otherwise."""
    if model_site is None or not is_latent(model_site) or is_delta(guide_site["fn"]):
        return None
    q, p = _base_fn(guide_site["fn"]), _base_fn(model_site["fn"])
    if len(q.event_shape) or len(p.event_shape):
        return None
    value = guide_site["value"]
    try:
        elementwise = torch.distributions.kl_divergence(q, p)
    except NotImplementedError:
        elementwise = q.log_prob(value) - p.log_prob(value)
    elementwise = elementwise.expand(value.shape)
    batch_dims = value.dim() - len(guide_site["fn"].event_shape)
    return _to_rows(elementwise, batch_dims + dim)


# ------------------------------------------------------------------ public API


def _batches(batches: Iterable[Batch] | Batch) -> Iterable[Batch]:
    if isinstance(batches, torch.Tensor):
        return [batches]
    return batches


def mutual_information(
    guide: Callable, batches: Iterable[Batch], *, data_plate: str | None = None
) -> float:
    """I_q(x; z) in nats, the paper's estimator, averaged over batches weighted by batch size.

    MI = mean_i E_q[log q(z|x_i)] - mean_i log((1/B) sum_j q(z_i|x_j)); it depends on the
    batch size B (the aggregate posterior is estimated within each batch).
    """
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(guide):
        for batch in _batches(batches):
            args, kwargs = normalize_batch(batch)
            view = _guide_view(guide, args, kwargs, data_plate)
            total += _batch_mi(guide, view, args, kwargs) * view.size
            count += view.size
    if count == 0:
        raise ValueError("mutual_information got no batch")
    return total / count


class _RunningVariance:
    """Streaming mean and unbiased variance of rows (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        n = rows.shape[0]
        mean = rows.mean(0)
        m2 = ((rows - mean) ** 2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count = total

    def variance(self) -> torch.Tensor:
        if self.m2 is None or self.count < 2:
            raise ValueError("active units need at least two data points")
        return (self.m2 / (self.count - 1)).float()


def active_units(
    guide: Callable,
    batches: Iterable[Batch],
    threshold: float = 0.01,
    *,
    data_plate: str | None = None,
    num_samples: int = 64,
) -> tuple[int, torch.Tensor]:
    """Active latent dimensions: those whose posterior mean E_q[z_d|x] varies across the data by >= threshold.

    Returns the count and the per-dimension variance (unbiased) of the posterior mean.
    """
    running = _RunningVariance()
    with torch.no_grad(), eval_mode(guide):
        for batch in _batches(batches):
            args, kwargs = normalize_batch(batch)
            view = _guide_view(guide, args, kwargs, data_plate)
            running.update(_posterior_means(view, num_samples))
    variance = running.variance()
    return int((variance >= threshold).sum()), variance


def _iw_log_weights(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, plate: str, particles: int, depth: int
) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k|x) per particle and data point, [particles, B], in one vectorized run."""
    with pyro.plate(PARTICLE_PLATE, particles, dim=-(depth + 1)):
        guide_trace = _trace_guide(guide, args, kwargs)
        model_trace = _trace_model(model, detach_trace(guide_trace), args, kwargs)
    return _sum_log_weights(model_trace, guide_trace, plate, keep_left=1)


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
        view = _guide_view(guide, args, kwargs, data_plate)
        model_trace = _trace_model(model, view.trace, args, kwargs)
        depth = max_plate_nesting(view.trace, model_trace)
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


def evaluate(
    model: Callable,
    guide: Callable,
    batches: Iterable[Batch],
    *,
    iw_samples: int = 0,
    iw_chunk_size: int = 100,
    threshold: float = 0.01,
    data_plate: str | None = None,
) -> dict[str, Any]:
    """Every latent-usage figure in one pass over the batches, per data point, in nats.

    Keys: ``elbo`` (recon - kl), ``recon`` (E_q log p(x|z)), ``kl`` (KL(q(z|x)||p(z)) over
    local latents), ``mi`` (batch-size dependent, see ``mi_batch_size``), ``au`` and
    ``au_var`` (active units and posterior-mean variance per dimension), ``kl_dim`` (KL per
    dimension, when the latents factorize), ``num_points``; ``iw_nll`` when ``iw_samples`` > 0.
    """
    sums = {"elbo": 0.0, "recon": 0.0, "kl": 0.0, "mi": 0.0, "iw_nll": 0.0}
    kl_dim_sum: torch.Tensor | None = None
    kl_dim_ok = True
    running = _RunningVariance()
    count = 0
    batch_count = 0
    with torch.no_grad(), eval_mode(model, guide):
        for batch in _batches(batches):
            args, kwargs = normalize_batch(batch)
            view = _guide_view(guide, args, kwargs, data_plate)
            kl, recon, kl_dim = _kl_and_recon(model, view, args, kwargs)
            sums["kl"] += float(kl.sum())
            sums["recon"] += float(recon.sum())
            sums["elbo"] += float((recon - kl).sum())
            sums["mi"] += _batch_mi(guide, view, args, kwargs) * view.size
            running.update(_posterior_means(view, 64))
            if kl_dim is None:
                kl_dim_ok = False
            elif kl_dim_ok:
                kl_dim_sum = kl_dim.sum(0) if kl_dim_sum is None else kl_dim_sum + kl_dim.sum(0)
            if iw_samples > 0:
                log_px = iw_log_likelihood(
                    model, guide, *args, num_samples=iw_samples, chunk_size=iw_chunk_size,
                    data_plate=view.plate, **kwargs,
                )
                sums["iw_nll"] -= float(log_px.sum())
            count += view.size
            batch_count += 1
    if count == 0:
        raise ValueError("evaluate got no batch")
    variance = running.variance()
    result: dict[str, Any] = {key: value / count for key, value in sums.items()}
    if iw_samples <= 0:
        del result["iw_nll"]
    result["au"] = int((variance >= threshold).sum())
    result["au_var"] = variance
    result["kl_dim"] = kl_dim_sum / count if (kl_dim_ok and kl_dim_sum is not None) else None
    result["num_points"] = count
    result["mi_batch_size"] = count / batch_count
    return result
