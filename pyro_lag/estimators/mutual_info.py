"""The mutual information I_q(x; z) between data and latent, estimated over all pairs of many points.

For N points with one draw z_i ~ q(z | x_i) each:

    MI = mean_i [ log q(z_i | x_i) - log (1/N) sum_j q(z_i | x_j) ].

Its expectation is the paper's estimator (whose first term is the analytic
E_q log q(z|x)); taking the first term at the same draw z_i cancels most of the
sampling noise: a guide that ignores x gets exactly 0. Points of all batches are
pooled (up to ``pool_size``) so the estimate is not capped at log(batch size), and a
standard error comes with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace

from pyro_lag.trace.densities import SiteDensity
from pyro_lag.trace.sites import site_value

POOL_SIZE = 4096
"""Points pooled into one estimate: the MI is capped at log of it (8.3 nats)."""
_CHUNK_ELEMENTS = 1 << 24  # pair log-densities computed at once, to bound memory


@dataclass
class MutualInformation:
    """An MI estimate in nats, its standard error, and how many points and pairs it used."""

    value: float
    se: float
    points: int
    pairs: int

    def __float__(self) -> float:
        return self.value


@dataclass
class _Pool:
    """Sites of several batches whose values can be scored under each other's distributions."""

    signature: tuple = ()
    batches: list[list[SiteDensity]] = field(default_factory=list)
    points: int = 0


class MIAccumulator:
    """Collects the per-point MI terms, batch by batch, pooling batches whose sites agree in shape."""

    def __init__(self, pool_size: int = POOL_SIZE) -> None:
        self.pool_size = pool_size
        self.terms: list[torch.Tensor] = []
        self.pairs = 0
        self._pool = _Pool()

    def add_independent(self, densities: list[SiteDensity]) -> None:
        """One batch whose local sites do not depend on each other: pooled with the batches before it."""
        signature = tuple(d.signature() for d in densities)
        if self._pool.batches and (signature != self._pool.signature or self._pool.points >= self.pool_size):
            self.flush()
        self._pool.signature = signature
        self._pool.batches.append(densities)
        self._pool.points += densities[0].size

    def add_terms(self, terms: torch.Tensor, pairs: int) -> None:
        """Per-point terms computed elsewhere (guides whose local sites depend on each other)."""
        self.terms.append(terms.detach().double().cpu())
        self.pairs += pairs

    def flush(self) -> None:
        pool, self._pool = self._pool, _Pool()
        if not pool.batches:
            return
        own = torch.cat([_sum(d.per_point() for d in batch) for batch in pool.batches])
        rows = [[d.rows() for d in batch] for batch in pool.batches]
        n = own.shape[0]
        values = [torch.cat([r[k][0] for r in rows]) for k in range(len(rows[0]))]
        events = [len(d.base.event_shape) for d in pool.batches[0]]
        masks = [_cat_masks([r[k] for r in rows], events[k]) for k in range(len(rows[0]))]
        per_row = max(1, sum(int(math.prod(d.shape)) // max(d.size, 1) for d in pool.batches[0]))
        chunk = max(1, _CHUNK_ELEMENTS // (n * per_row))
        aggregate = []
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            chunk_masks = [None if mask is None else mask[start:stop] for mask in masks]
            columns = [
                _sum(d.pair_log_prob(values[k][start:stop], chunk_masks[k]) for k, d in enumerate(batch))
                for batch in pool.batches
            ]
            aggregate.append(torch.logsumexp(torch.cat(columns, dim=1), dim=1) - math.log(n))
        self.terms.append((own - torch.cat(aggregate)).detach().double().cpu())
        self.pairs += n * n

    def result(self, samples: int = 1) -> MutualInformation:
        """The estimate over everything added; ``samples`` draws per point were added in turn."""
        self.flush()
        if not self.terms:
            raise ValueError("mutual information got no batch")
        terms = torch.cat(self.terms)
        per_point = terms.reshape(samples, -1).mean(0) if samples > 1 else terms
        n = per_point.numel()
        se = float(per_point.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.inf
        return MutualInformation(float(per_point.mean()), se, n, self.pairs)


def _sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(tensors)``, typed: the builtin's start value 0 makes its result ``int | Tensor`` to mypy."""
    total: Any = 0
    for tensor in tensors:
        total = total + tensor
    return total


def _cat_masks(rows: list[tuple[torch.Tensor, torch.Tensor | None]], event_dims: int) -> torch.Tensor | None:
    """The rows' masks joined (a batch without a mask counts every entry), or None when none has one."""
    if all(mask is None for _, mask in rows):
        return None
    joined = []
    for values, mask in rows:
        if mask is None:
            mask = torch.ones(values.shape[: values.dim() - event_dims], dtype=torch.bool, device=values.device)
        joined.append(mask)
    return torch.cat(joined)


def terms_by_replay(
    guide: Callable, trace: Trace, densities: list[SiteDensity], args: tuple, kwargs: dict, plate_of: Callable
) -> torch.Tensor:
    """Per-point MI terms of one batch for guides whose local sites depend on each other.

    For each point i the guide is replayed on the whole batch with every local site
    fixed at z_i, which gives q(z_i | x_j) for all j at once; point i's own mask decides
    which entries count.
    """
    size = densities[0].size
    own = _sum(d.per_point() for d in densities)
    rows = []
    for i in range(size):
        fixed = trace.copy()
        for d in densities:
            node = trace.nodes[d.name].copy()
            value = site_value(node)
            position = d.position
            node["value"] = value.narrow(position, i, 1).expand_as(value)
            fixed.nodes[d.name] = node
        replayed = poutine.trace(poutine.replay(guide, trace=fixed)).get_trace(*args, **kwargs)
        row_parts = []
        for d in densities:
            moved = SiteDensity.of(d.name, replayed.nodes[d.name], plate_of(replayed, d.name))
            log_q = moved.elementwise(d.value.narrow(d.position, i, 1).expand_as(d.value))
            if d.mask is not None:
                own_mask = d.mask.narrow(d.position, i, 1).expand_as(d.mask)
                log_q = log_q.masked_fill(~own_mask, 0.0)
            dims = [k for k in range(log_q.dim()) if k != d.position]
            row_parts.append(log_q.sum(dim=dims) if dims else log_q)
        rows.append(_sum(row_parts))
    pairs = torch.stack(rows)
    return own - (torch.logsumexp(pairs, dim=1) - math.log(size))
