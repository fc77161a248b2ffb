"""Free bits (Kingma et al., 2016) as a pair of Pyro handlers, for any model/guide pair.

They work on any Pyro model/guide pair, such as this one:

    >>> import pyro, torch
    >>> import pyro.distributions as dist
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> from pyro.optim import Adam
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
    >>> def guide(x):
    ...     loc = pyro.param("loc", torch.zeros(len(x)))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Normal(loc, 1.0))
    >>> x = torch.tensor([0.5, -1.0, 2.0])
    >>> pyro.clear_param_store()

Free bits replace the KL weight; ``last_kl`` holds each dimension's batch-averaged KL:

    >>> fb = FreeBits(0.5)
    >>> svi = SVI(fb.model(model), fb.guide(guide), Adam({"lr": 0.01}), Trace_ELBO())
    >>> loss = svi.step(x)
    >>> fb.last_kl["z"]                          # q = N(0, 1) = p at the first step
    tensor(0.)
    >>> pyro.clear_param_store()
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch.distributions import Distribution, Independent, kl_divergence

from pyro_lag.trace.sites import is_latent

__all__ = ["FreeBits"]


def _elementwise(fn: Distribution, site: str) -> Tuple[Distribution, int]:
    """Strip ``Independent`` wrappers: the distribution whose ``log_prob`` is per latent dimension."""
    event_dims = 0
    while isinstance(fn, Independent):
        event_dims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if len(fn.event_shape) != 0:
        raise ValueError(
            f"FreeBits: site '{site}' has a {type(fn).__name__} distribution with joint event shape "
            f"{tuple(fn.event_shape)}; free bits needs independent dimensions (e.g. Normal(...).to_event(1))"
        )
    return fn, event_dims


class _FreeBitsGuide(Messenger):
    """Guide side of :class:`FreeBits`: remembers each latent site's distribution and sample."""

    def __init__(self, owner: "FreeBits") -> None:
        super().__init__()
        self.owner = owner

    def _postprocess_message(self, msg) -> None:
        if not is_latent(msg) or not self.owner._selected(msg["name"]):
            return
        self.owner._guide_sites[msg["name"]] = (msg["fn"], msg["value"])


class _FreeBitsModel(Messenger):
    """Model side of :class:`FreeBits`: adds the correction factor after each matching latent site."""

    def __init__(self, owner: "FreeBits") -> None:
        super().__init__()
        self.owner = owner

    def _postprocess_message(self, msg) -> None:
        if not is_latent(msg):
            return
        record = self.owner._guide_sites.pop(msg["name"], None)
        if record is None:
            return
        q_fn, q_value = record
        if msg["value"] is not q_value:
            return  # the model was not run on this guide's sample: nothing to correct
        correction = self.owner._correction(msg["name"], q_fn, msg["fn"], q_value)
        pyro.factor(f"{msg['name']}_free_bits", correction, has_rsample=True)


class FreeBits:
    """Free bits (Kingma et al., 2016) for Trace_ELBO, as a pair of handlers.

    For every latent dimension ``d`` of a local site, the KL term becomes
    ``max(lam, KL_d)`` per data point, where ``KL_d`` is the closed-form
    ``KL(q(z_d|x) || p(z_d))`` averaged over the minibatch (all batch dims).
    A dimension under the floor therefore contributes the constant ``lam``
    to the loss and no gradient; dimensions above it are untouched.

    How: ``guide`` records the guide's distribution and sample at each site;
    ``model``, right after the model's matching site, adds a factor
    ``sum_{d under} [log q_d(z_d) - log p_d(z_d) - lam]``. It cancels, on the
    very same sample, the Monte Carlo KL term of those dimensions that
    Trace_ELBO computes, so their gradient is exactly zero (also through the
    reparameterised ``z``), while the reconstruction term still reaches
    them. With an analytic-KL loss (TraceMeanField_ELBO) the cancellation
    holds in expectation. Use instead of, not together with, :class:`KLWeight`
    (a KL weight would no longer match the factor's scale).

    ``sites`` restricts free bits to the named sample sites (default: every
    latent site present in both guide and model). ``last_kl`` holds the
    batch-averaged per-dimension KL of the last step, per site.
    """

    def __init__(self, lam: float, sites: Optional[Sequence[str]] = None) -> None:
        lam = float(lam)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"free bits lambda must be a finite number >= 0, got {lam}")
        self.lam = lam
        self.sites = None if sites is None else frozenset(sites)
        self._guide_sites: Dict[str, tuple] = {}
        self.last_kl: Dict[str, torch.Tensor] = {}
        self.guide = _FreeBitsGuide(self)
        self.model = _FreeBitsModel(self)

    def _selected(self, name: str) -> bool:
        return self.sites is None or name in self.sites

    def _correction(self, name: str, q_fn: Distribution, p_fn: Distribution, z: torch.Tensor) -> torch.Tensor:
        q, event_dims = _elementwise(q_fn, name)
        p, p_event_dims = _elementwise(p_fn, name)
        if p_event_dims != event_dims:
            raise ValueError(
                f"FreeBits: site '{name}' has {event_dims} event dims in the guide but {p_event_dims} in the model"
            )
        with torch.no_grad():
            try:
                kl = kl_divergence(q, p)
            except NotImplementedError:  # no closed form: one-sample estimate
                kl = q.log_prob(z) - p.log_prob(z)
            kl = kl.expand(z.shape)
            event_shape = z.shape[z.dim() - event_dims:]
            kl_bar = kl.reshape((-1,) + tuple(event_shape)).mean(0)
            under = (kl_bar < self.lam).to(z.dtype)
        self.last_kl[name] = kl_bar
        per_dim = (q.log_prob(z) - p.log_prob(z) - self.lam) * under
        return per_dim.reshape(z.shape[: z.dim() - event_dims] + (-1,)).sum(-1)

    def __repr__(self) -> str:
        return f"FreeBits({self.lam})"
