"""Active units: latent units whose posterior mean varies across the data (the paper's AU)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from pyro_lag.trace.densities import posterior_mean
from pyro_lag.trace.guide_view import View, as_batches, eval_mode, view_of
from pyro_lag.trace.sites import Batch

ACTIVE_THRESHOLD = 0.01
"""Variance of the posterior mean across the data at or above which a latent unit is active."""


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
        self.merge(n, mean, m2)

    def merge(self, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Fold in another part of the data's count, mean and sum of squared deviations per unit."""
        if self.count is None or self.mean is None or self.m2 is None:  # the first batch: all three unset
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


class ActiveUnits:
    """Posterior-mean variance per latent unit, accumulated batch by batch, site by site."""

    def __init__(self, num_samples: int = 64) -> None:
        self.num_samples = num_samples
        self.sites: dict[str, _MaskedVariance] = {}
        self.points = 0

    def update(self, view: View) -> None:
        for d in view.densities:
            rows, present = posterior_mean(d, self.num_samples)
            self.sites.setdefault(d.name, _MaskedVariance()).update(rows, present)
        self.points += view.size

    def state(self) -> dict[str, Any]:
        """Count, mean and squared deviations per site: what ranks exchange to reduce the variance."""
        return {"points": self.points, "sites": {name: (v.count, v.mean, v.m2) for name, v in self.sites.items()}}

    def merge(self, state: dict[str, Any]) -> None:
        """Fold in another accumulator's :meth:`state` (another rank's shard of the data)."""
        for name, (count, mean, m2) in state["sites"].items():
            if count is not None:
                self.sites.setdefault(name, _MaskedVariance()).merge(count, mean, m2)
        self.points += state["points"]

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
    units = ActiveUnits(num_samples)
    with torch.no_grad(), eval_mode(guide):
        for batch in as_batches(batches):
            units.update(view_of(guide, batch, data_plate, model))
    variance = units.variance()
    return int((variance >= threshold).sum()), variance
