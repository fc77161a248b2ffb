"""The interface every built-in model/guide pair follows, and the Pyro programs they share.

A pair is a ``torch.nn.Module`` holding an ``encoder`` (the guide's network, absent for
decoder-only baselines) and a ``decoder`` (the model's network). Subclasses supply the
networks and the observation distribution; this module writes ``model`` and ``guide``
once, so every family has the same sites: a local latent ``"z"`` and an observed ``"x"``
inside a ``pyro.plate("data", B)``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import Distribution


class LatentPair(nn.Module, ABC):
    """A Pyro model/guide pair with a Gaussian local latent ``z`` (or none, when decoder-only).

    Subclasses set ``kind`` ("text" or "image"), ``latent_dim`` and ``name``, build
    ``self.decoder`` (and ``self.encoder`` when ``latent_dim > 0``), and implement
    :meth:`likelihood`, :meth:`observed`, :meth:`encode`, :meth:`sample_prior`,
    :meth:`reconstruct`. The decoder must accept ``z`` of shape ``(*S, B, D)`` and give
    an observation distribution with batch shape ``(*S, B)``, so importance-weighted
    estimators can run the program inside an extra particle plate.
    """

    kind: str = ""
    name: str = ""
    latent_dim: int = 0

    encoder: nn.Module | None
    decoder: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self._config: dict[str, Any] = {}

    # ----- what subclasses provide -------------------------------------------------------
    @abstractmethod
    def likelihood(self, x: torch.Tensor, z: torch.Tensor | None) -> Distribution:
        """p(x | z) as a distribution whose ``log_prob(self.observed(x))`` has shape ``(*S, B)``.

        ``z`` has shape ``(*S, B, D)`` (any number of leading sample dims) or is None for
        a decoder-only pair.
        """

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the batch that the observation site scores: all of it (text overrides: ``x[:, 1:]``)."""
        return x

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder forward pass: posterior location and scale, each ``[B, D]``."""
        return self.encoder(x)

    @abstractmethod
    def sample_prior(self, n: int, generator: torch.Generator | None = None, **kwargs: Any) -> Any:
        """Draw ``n`` outputs by sampling z from the prior and decoding it."""

    @abstractmethod
    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None, **kwargs: Any) -> Any:
        """Decode each data point from its posterior mean."""

    # ----- shared behaviour --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the pair's parameters (CPU for a pair without any)."""
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild an identical (untrained) pair."""
        return dict(self._config)

    def prior(self, batch_shape: tuple[int, ...], device: torch.device | None = None) -> Distribution:
        """The standard normal prior N(0, I) over z, one per element of ``batch_shape``."""
        zeros = torch.zeros(*batch_shape, self.latent_dim, device=device)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (loc, scale) of q(z | x), each ``[B, latent_dim]``."""
        if self.encoder is None:
            raise ValueError(f"model '{self.name}' is decoder-only (latent_dim=0): it has no encoder")
        return self._encode(x)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x | z) per data point: shape ``z.shape[:-1]`` (``[B]`` when decoder-only)."""
        return self.likelihood(x, z).log_prob(self.observed(x))

    def model(self, x: torch.Tensor) -> None:
        """p(x, z) = N(z; 0, I) p(x | z), summed (not averaged) over the batch."""
        pyro.module("decoder", self.decoder)
        batch = x.shape[0]
        with pyro.plate("data", batch):
            z = None
            if self.latent_dim > 0:
                z = pyro.sample("z", self.prior((batch,), device=x.device))
            pyro.sample("x", self.likelihood(x, z), obs=self.observed(x))

    def guide(self, x: torch.Tensor) -> None:
        """q(z | x) = N(loc(x), diag(scale(x)^2)); samples nothing for a decoder-only pair."""
        if self.latent_dim == 0:
            return
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def decoder_only(self) -> "LatentPair":
        """A fresh pair of the same family and sizes whose decoder takes no latent (LM / PixelCNN baseline)."""
        pair = type(self)(**{**self._config, "latent_dim": 0})
        pair.name = f"{self.name}-decoder-only"
        return pair

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode (no dropout) and no gradients for the duration; restores the mode after."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def _prior_z(self, n: int, generator: torch.Generator | None) -> torch.Tensor | None:
        """``n`` draws of z from the prior on this pair's device (None when decoder-only)."""
        if self.latent_dim == 0:
            return None
        return randn((n, self.latent_dim), generator, self.device)


def flatten_latent(z: torch.Tensor, batch: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Broadcast ``z`` of shape ``(*S, B or 1, D)`` to ``(*S, B, D)`` and flatten it to ``[prod(S)*B, D]``.

    Returns the flat tensor and the leading shape ``S``; decoders use it to run all
    particles as one big batch.
    """
    if z.dim() < 2:
        raise ValueError(f"latent z must have shape (*S, B, D), got {tuple(z.shape)}")
    lead = tuple(z.shape[:-2])
    z = z.expand(*lead, batch, z.shape[-1])
    return z.reshape(-1, z.shape[-1]), lead


def expand_data(x: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """Repeat the batch ``x`` (``[B, ...]``) for every leading sample index: ``[prod(lead)*B, ...]``."""
    return x.expand(*lead, *x.shape).reshape(-1, *x.shape[1:])


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal draws from ``generator`` (on its own device), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform(0, 1) draws from ``generator`` (on its own device), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)
