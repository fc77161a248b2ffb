"""One local latent site's density, element by element, with its mask kept apart from it.

The estimators need log q(z_i | x_j) for pairs of data points. A site's own mask
(``.mask(...)`` inside its distribution, or ``poutine.mask`` around it) belongs to the
data point that was sampled: point i's padded time steps must not count when z_i is
scored under x_j's distribution. So the density is taken apart into its innermost
distribution (scored element by element), the masks on the way (combined into one
tensor), and the data plate's position; the event sums are done here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro.poutine.runtime import Message
from torch.distributions import Distribution, Independent

from pyro_lag.compat import distribution_mask


class UnsupportedSiteError(ValueError):
    """A local latent site whose shape or distribution the estimators cannot handle."""


def _unwrap(fn: Distribution) -> tuple[Distribution, list[tuple[torch.Tensor | bool, int]]]:
    """Strip Independent / Masked / Expanded wrappers; return the innermost distribution and the masks.

    Each mask comes with the number of dims that Independent wrappers inside it
    reinterpret: how far right it must be padded to line up with the innermost batch shape.
    """
    found: list[tuple[torch.Tensor | bool, int]] = []  # (mask, reinterpreted dims outside it)
    outside = 0
    while True:
        if isinstance(fn, Independent):
            outside += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, dist.MaskedDistribution):
            found.append((distribution_mask(fn), outside))
            fn = fn.base_dist
        elif isinstance(fn, dist.ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn, [(mask, outside - before) for mask, before in found]


@dataclass
class SiteDensity:
    """A site's innermost distribution, its value, its combined mask and the data plate's position.

    ``shape`` is the batch shape of the innermost distribution as the site uses it
    (the site's batch shape followed by the dims its Independent wrappers reinterpret);
    ``mask`` is None or a boolean tensor of that shape; ``position`` is the data plate's
    index in ``shape``.
    """

    name: str
    base: Distribution
    value: torch.Tensor
    mask: torch.Tensor | None
    position: int
    shape: torch.Size

    @classmethod
    def of(cls, name: str, site: Message, plate_dim: int) -> "SiteDensity":
        """Take a traced sample site apart; ``plate_dim`` is the data plate's negative batch dim."""
        fn: Any = site["fn"]  # Pyro types a site's fn as a bare callable and its value as optional
        value: Any = site["value"]
        base, masks = _unwrap(fn)
        base_event = len(base.event_shape)
        shape = value.shape[: value.dim() - base_event]
        outer_event = len(fn.event_shape) - base_event
        position = len(shape) - outer_event + plate_dim
        if position < 0:
            raise UnsupportedSiteError(f"site '{name}': its value has no axis for the data plate")
        site_mask = site.get("mask")
        if site_mask is not None:
            masks.append((site_mask, outer_event))
        combined: torch.Tensor | None = None
        for mask, pad in masks:
            if mask is True:
                continue
            if mask is False:
                mask = torch.zeros((), dtype=torch.bool, device=value.device)
            mask = torch.as_tensor(mask, device=value.device).bool()
            mask = mask.reshape(mask.shape + (1,) * pad)
            combined = mask if combined is None else combined & mask
        if combined is not None:
            combined = combined.expand(shape)
        return cls(name, base, value, combined, position, shape)

    @property
    def size(self) -> int:
        return int(self.shape[self.position])

    def elementwise(self, value: torch.Tensor | None = None) -> torch.Tensor:
        """log q of ``value`` (default: the site's own) element by element, unmasked, over ``shape``."""
        value = self.value if value is None else value
        log_q = self.base.log_prob(value)
        return log_q.expand(torch.broadcast_shapes(log_q.shape, value.shape[: value.dim() - len(self.base.event_shape)]))

    def per_point(self, log_q: torch.Tensor | None = None) -> torch.Tensor:
        """The site's own masked log-density summed to one value per data point, [B]."""
        log_q = self.elementwise() if log_q is None else log_q
        if self.mask is not None:
            log_q = log_q.masked_fill(~self.mask, 0.0)
        return _sum_except(log_q.movedim(self.position, 0), keep=(0,))

    def rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Values and mask with the data plate moved in front and a singleton left in its place."""
        event = len(self.base.event_shape)
        values = self.value.movedim(self.position, 0).unsqueeze(self.position + 1)
        mask = None
        if self.mask is not None:
            mask = self.mask.movedim(self.position, 0).unsqueeze(self.position + 1)
        assert values.dim() == len(self.shape) + 1 + event
        return values, mask

    def pair_log_prob(self, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """log q(z_i | x_j), [N_i, B_j]: rows of ``values`` (from :meth:`rows`) scored under every
        data point of this site's distribution, each row's own ``mask`` deciding which entries count."""
        try:
            log_q = self.base.log_prob(values)
        except (RuntimeError, ValueError) as error:
            raise UnsupportedSiteError(
                f"site '{self.name}': its distribution {type(self.base).__name__} cannot score the values of "
                f"other data points by broadcasting over the data plate ({error})"
            ) from None
        target = (values.shape[0],) + tuple(self.shape)
        log_q = log_q.expand(target)
        if mask is not None:
            log_q = log_q.masked_fill(~mask, 0.0)
        return _sum_except(log_q, keep=(0, self.position + 1))

    def signature(self) -> tuple:
        """What must agree for values of two batches to be scored under each other's distributions."""
        rest = list(self.shape)
        del rest[self.position]
        return (self.name, tuple(rest), tuple(self.value.shape[len(self.shape):]), type(self.base))


def _sum_except(values: torch.Tensor, keep: tuple[int, ...]) -> torch.Tensor:
    dims = [d for d in range(values.dim()) if d not in keep]
    return values.sum(dim=dims) if dims else values


def posterior_mean(density: SiteDensity, num_samples: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """E_q[z | x] per data point, rows [B, ...] flattened to [B, units], and the per-unit mask rows.

    A categorical latent's mean is its probability vector (one unit per category);
    distributions without a mean in torch are averaged over ``num_samples`` draws.
    """
    base = density.base
    extra = 0
    if isinstance(base, torch.distributions.Categorical):
        mean = base.probs
        extra = 1
    else:
        try:
            mean = base.mean
            if not torch.isfinite(mean).all():
                raise NotImplementedError
        except NotImplementedError:
            mean = base.sample((num_samples,)).mean(0)
    event = len(base.event_shape) + extra
    full = tuple(density.shape) + tuple(mean.shape[mean.dim() - event:])
    mean = mean.expand(full)
    rows = mean.movedim(density.position, 0).reshape(density.size, -1)
    if density.mask is None:
        return rows, None
    mask = density.mask.reshape(density.mask.shape + (1,) * event).expand(full)
    return rows, mask.movedim(density.position, 0).reshape(density.size, -1)
