"""The synthetic experiment of He et al. (2019): the data generator, its corpus, and the true posterior mean.

The generator (``SyntheticGenerator``) is an LSTM language model driven by a 2-d
latent from an equal mixture of four unit-variance Gaussians at (+-2, +-2): one-layer
LSTM with 100-d inputs and state, c0 = W z, h0 = tanh(c0), z concatenated to the input
at every step, logits = W1 h + W2 z; every weight uniform(-1, 1) except W2
uniform(-5, 5); vocabulary 1,000; first token uniform; 10 tokens. The fitted VAE
(1-d latent, 50-d LSTMs) is the registry's ``synthetic`` entry.
"""
from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .base import LatentPair

MIXTURE_CENTRES = ((-2.0, -2.0), (2.0, 2.0), (-2.0, 2.0), (2.0, -2.0))


class SyntheticGenerator(nn.Module):
    """The paper's synthetic data generator as a Pyro model, its weights drawn from ``seed``."""

    def __init__(
        self, seed: int = 0, vocab_size: int = 1000, ni: int = 100, nh: int = 100, latent_dim: int = 2, length: int = 10
    ) -> None:
        super().__init__()
        self.vocab_size, self.length, self.latent_dim = vocab_size, length, latent_dim
        with torch.random.fork_rng(devices=[]):  # torch's default init must not move the global RNG
            self.embed = nn.Embedding(vocab_size, ni)
            self.lstm = nn.LSTM(ni + latent_dim, nh, num_layers=1, batch_first=True)
            self.trans_linear = nn.Linear(latent_dim, nh, bias=False)  # W: c0 = W z
            self.out_linear1 = nn.Linear(nh, vocab_size, bias=False)  # W1
            self.out_linear2 = nn.Linear(latent_dim, vocab_size, bias=False)  # W2
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-1.0, 1.0, generator=gen)
            self.out_linear2.weight.uniform_(-5.0, 5.0, generator=gen)
        self.requires_grad_(False)

    def prior(self) -> dist.Distribution:
        """Equal mixture of four unit-variance Gaussians centred at (+-2, +-2)."""
        device = self.trans_linear.weight.device
        centres = torch.tensor(MIXTURE_CENTRES, device=device)
        mix = dist.Categorical(logits=torch.zeros(len(MIXTURE_CENTRES), device=device))
        return dist.MixtureSameFamily(mix, dist.Normal(centres, torch.ones_like(centres)).to_event(1))

    def step(self, token: torch.Tensor, z: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One LSTM step on ``[emb(token); z]``: next-token logits W1 h + W2 z, and the new state."""
        inp = torch.cat([self.embed(token), z], dim=-1).unsqueeze(1)
        out, state = self.lstm(inp, state)
        return self.out_linear1(out.squeeze(1)) + self.out_linear2(z), state

    def model(self, n: int | None = None, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample (or score, when ``x`` ``[n, length]`` is given) n sentences; returns (z, tokens)."""
        if x is not None:
            n = x.shape[0]
        if n is None:
            raise ValueError("SyntheticGenerator.model needs n or x")
        device = self.trans_linear.weight.device
        with pyro.plate("data", n):
            z = pyro.sample("z", self.prior())
            c0 = self.trans_linear(z).unsqueeze(0)
            state = (torch.tanh(c0), c0)
            uniform = torch.zeros(self.vocab_size, device=device)
            token = pyro.sample("x_0", dist.Categorical(logits=uniform), obs=None if x is None else x[:, 0])
            tokens = [token]
            for t in range(1, self.length):
                logits, state = self.step(token, z, state)
                obs = None if x is None else x[:, t]
                token = pyro.sample(f"x_{t}", dist.Categorical(logits=logits), obs=obs)
                tokens.append(token)
        return z, torch.stack(tokens, dim=-1)


def sample_corpus(
    n: int = 20000, seed: int = 0, *, weights_seed: int = 0, return_latent: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The synthetic corpus: LongTensor ``[n, 10]`` of token ids in 0..999, identical for equal seeds.

    ``seed`` drives the sampling, ``weights_seed`` the generator's weights; the global
    RNG state is left untouched. With ``return_latent`` also returns the latents ``[n, 2]``.
    """
    if n < 1:
        raise ValueError(f"sample_corpus: n must be positive, got {n}")
    generator = SyntheticGenerator(seed=weights_seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        with poutine.block():
            z, tokens = generator.model(n)
    return (tokens, z) if return_latent else tokens


def write_corpus(path: str | Path, n: int = 20000, seed: int = 0, *, weights_seed: int = 0) -> Path:
    """Write :func:`sample_corpus` to ``path``, one sentence per line as space-separated token ids."""
    path = Path(path)
    tokens = sample_corpus(n, seed, weights_seed=weights_seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(" ".join(map(str, row)) + "\n" for row in tokens.tolist()))
    tmp.replace(path)
    return path


def true_posterior_mean(
    pair: LatentPair, x: torch.Tensor, grid: torch.Tensor | None = None, chunk_size: int = 50
) -> torch.Tensor:
    """E[z | x] under ``pair``'s model (1-d latent) by numerical integration on ``grid``, one value per data point.

    At every grid point computes log p(x | z) + log p(z); the softmax over the grid gives
    the posterior weights. The paper uses z in [-20, 20) with step 0.1 (the default).
    Runs in eval mode (no dropout), ``chunk_size`` grid points at a time.
    """
    if pair.latent_dim != 1:
        raise ValueError(f"true_posterior_mean needs a 1-d latent; model '{pair.name}' has latent_dim={pair.latent_dim}")
    if grid is None:
        grid = torch.arange(-20.0, 20.0, 0.1)
    grid = grid.to(device=x.device, dtype=torch.get_default_dtype()).flatten()
    batch = x.shape[0]
    log_joint = []
    with pair.evaluating():
        for chunk in grid.split(chunk_size):
            z = chunk.reshape(-1, 1, 1).expand(-1, batch, 1)  # [G, B, 1]
            log_joint.append(pair.log_likelihood(x, z) + pair.prior((), device=x.device).log_prob(chunk.unsqueeze(-1)).unsqueeze(-1))
    weights = torch.cat(log_joint).softmax(dim=0)  # [G, B]
    return (weights * grid.unsqueeze(-1)).sum(dim=0)
