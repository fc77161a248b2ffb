"""A plain Bernoulli MLP VAE for 28x28 binary images (the weak-decoder image baseline)."""
from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import Distribution

from .base import LatentPair, flatten_latent

IMAGE_SHAPE = (1, 28, 28)
NUM_PIXELS = 28 * 28


def check_images(x: torch.Tensor) -> None:
    """Raise a one-line ValueError unless x is a float batch ``[B, 1, 28, 28]``."""
    if x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"image batch x must be [B, 1, 28, 28], got {tuple(x.shape)}")


class MLPEncoder(nn.Module):
    """Flattened image -> two tanh layers -> (loc, scale)."""

    def __init__(self, hidden: int, latent_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(NUM_PIXELS, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, 2 * latent_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_variance = self.net(x).chunk(2, dim=-1)
        return loc, (0.5 * log_variance).exp()  # log-variance, as the paper's encoder


class MLPDecoder(nn.Module):
    """z -> two tanh layers -> 784 Bernoulli logits; with no latent, one learned logit per pixel."""

    def __init__(self, hidden: int, latent_dim: int) -> None:
        super().__init__()
        if latent_dim > 0:
            self.net = nn.Sequential(
                nn.Linear(latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                nn.Linear(hidden, NUM_PIXELS),
            )
            self.pixel_logits = None
        else:
            self.net = None
            self.pixel_logits = nn.Parameter(torch.zeros(NUM_PIXELS))

    def forward(self, z: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[N, 784]`` for z ``[N, D]``; ``[784]`` when there is no latent."""
        return self.pixel_logits if z is None else self.net(z)


class MLPImageVAE(LatentPair):
    """Bernoulli VAE with MLP encoder and decoder on 28x28 binary images ``[B, 1, 28, 28]``."""

    kind = "image"

    def __init__(self, latent_dim: int = 32, hidden: int = 256, name: str = "mlp-image") -> None:
        super().__init__()
        if latent_dim < 0:
            raise ValueError(f"latent_dim must be >= 0, got {latent_dim}")
        self._config = dict(latent_dim=latent_dim, hidden=hidden, name=name)
        self.name = name
        self.latent_dim = latent_dim
        self.encoder = MLPEncoder(hidden, latent_dim) if latent_dim > 0 else None
        self.decoder = MLPDecoder(hidden, latent_dim)

    def logits(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Pixel logits ``[*S, B, 1, 28, 28]`` for z ``[*S, B, D]`` (``[B, 1, 28, 28]`` without z)."""
        check_images(x)
        if z is None:
            return self.decoder(None).reshape(IMAGE_SHAPE).expand(x.shape[0], *IMAGE_SHAPE)
        z_flat, lead = flatten_latent(z, x.shape[0])
        return self.decoder(z_flat).reshape(*lead, x.shape[0], *IMAGE_SHAPE)

    def likelihood(self, x: torch.Tensor, z: torch.Tensor | None) -> Distribution:
        return dist.Bernoulli(logits=self.logits(x, z)).to_event(3)

    def decode(self, z: torch.Tensor | None, n: int | None = None) -> torch.Tensor:
        """Bernoulli mean images ``[N, 1, 28, 28]`` for z ``[N, D]`` (or ``n`` copies without z)."""
        with self.evaluating():
            if z is None:
                return self.decoder(None).sigmoid().reshape(IMAGE_SHAPE).expand(n, *IMAGE_SHAPE).clone()
            return self.decoder(z).sigmoid().reshape(z.shape[0], *IMAGE_SHAPE)

    def sample_prior(self, n: int, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """Mean images ``[n, 1, 28, 28]`` of p(x | z) for z ~ N(0, I)."""
        return self.decode(self._prior_z(n, generator), n=n)

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """Mean images of p(x | E_q[z | x])."""
        check_images(x)
        with self.evaluating():
            z = self.encode(x)[0] if self.latent_dim > 0 else None
        return self.decode(z, n=x.shape[0])

