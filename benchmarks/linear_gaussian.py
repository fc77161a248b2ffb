"""A linear Gaussian latent-variable model with its exact posterior, marginal likelihood and MI.

z ~ N(0, I_d), x | z ~ N(W z + b, s^2 I_D). Then x ~ N(b, W W^T + s^2 I),
q*(z|x) = N(S W^T (x - b) / s^2, S) with S = (I + W^T W / s^2)^-1, and
I(x; z) = 1/2 log det(I + W^T W / s^2).
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch


class LinearGaussian:
    """The model, the exact-posterior guide, a deliberately poor guide, and the closed forms."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, s: float) -> None:
        self.W, self.b, self.s = W, b, s
        D, d = W.shape
        self.D, self.d = D, d
        precision = torch.eye(d, dtype=W.dtype) + W.T @ W / s**2
        self.post_cov = torch.linalg.inv(precision)
        self.post_scale_tril = torch.linalg.cholesky(self.post_cov)
        self.marginal = dist.MultivariateNormal(b, W @ W.T + s**2 * torch.eye(D, dtype=W.dtype))
        self.true_mi = 0.5 * torch.logdet(precision).item()

    def post_mean(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b) @ (self.W / self.s**2) @ self.post_cov.T

    def model(self, x: torch.Tensor) -> None:
        zeros = torch.zeros(self.d, dtype=x.dtype)
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            loc = z @ self.W.T + self.b
            pyro.sample("x", dist.Normal(loc, self.s).to_event(1), obs=x)

    def exact_guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.MultivariateNormal(self.post_mean(x), scale_tril=self.post_scale_tril))

    def poor_guide(self, x: torch.Tensor) -> None:
        """Right mean shrunk by half, scale three times too wide: a valid but loose proposal."""
        with pyro.plate("data", x.shape[-2]):
            pyro.sample(
                "z",
                dist.MultivariateNormal(0.5 * self.post_mean(x), scale_tril=3.0 * self.post_scale_tril),
            )

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, self.d, generator=generator, dtype=self.W.dtype)
        noise = torch.randn(n, self.D, generator=generator, dtype=self.W.dtype)
        return z @ self.W.T + self.b + self.s * noise

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        return self.marginal.log_prob(x)


def make_linear_gaussian(D: int = 4, d: int = 2, s: float = 0.8, active: int | None = None, seed: int = 0):
    """A reproducible instance; with ``active`` = k only the first k latent dims reach x."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, d, generator=g, dtype=torch.float64) * 0.7
    if active is not None:
        W[:, active:] = 0.0
    b = torch.randn(D, generator=g, dtype=torch.float64)
    return LinearGaussian(W, b, s)
