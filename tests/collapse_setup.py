"""A small sequence VAE with an autoregressive decoder, on data whose cluster a decoder can half-guess.

Used by the fast collapse test: plain SVI lets the decoder ignore z; aggressive training does not.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

V, T, CLUSTERS = 12, 10, 4


def cluster_sequences(n: int, seed: int = 0) -> torch.Tensor:
    """Sequences from one of four Markov chains with sharp, cluster-specific transitions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(CLUSTERS, V, V, generator=torch.Generator().manual_seed(1234)) * 3.0
    start = torch.randn(CLUSTERS, V, generator=torch.Generator().manual_seed(4321)) * 3.0
    c = torch.randint(CLUSTERS, (n,), generator=g)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.multinomial(start[c].softmax(-1), 1, generator=g).squeeze(-1)
    for t in range(1, T):
        probs = logits[c, x[:, t - 1]].softmax(-1)
        x[:, t] = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    return x


class SequenceVAE(torch.nn.Module):
    """GRU encoder, GRU decoder fed with z at every step (a decoder strong enough to ignore z)."""

    def __init__(self, latent: int = 2, hidden: int = 64):
        super().__init__()
        self.latent = latent
        self.embed_enc = torch.nn.Embedding(V, 16)
        self.enc = torch.nn.GRU(16, hidden, batch_first=True)
        self.to_stats = torch.nn.Linear(hidden, 2 * latent)
        self.embed_dec = torch.nn.Embedding(V + 1, 16)
        self.dec = torch.nn.GRU(16 + latent, hidden, batch_first=True)
        self.z_to_h = torch.nn.Linear(latent, hidden)
        self.out = torch.nn.Linear(hidden, V)
        self.encoder = torch.nn.ModuleList([self.embed_enc, self.enc, self.to_stats])
        self.decoder = torch.nn.ModuleList([self.embed_dec, self.dec, self.z_to_h, self.out])

    def logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-2]
        B = x.shape[0]
        z = z.reshape(-1, self.latent)
        xs = x.expand(*lead, *x.shape).reshape(-1, T)
        inputs = torch.cat([torch.full_like(xs[:, :1], V), xs[:, :-1]], dim=1)
        emb = self.embed_dec(inputs)
        emb = torch.cat([emb, z.unsqueeze(1).expand(-1, T, -1)], dim=-1)
        h0 = torch.tanh(self.z_to_h(z)).unsqueeze(0)
        out, _ = self.dec(emb, h0)
        return self.out(out).reshape(*lead, B, T, V)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent, dtype=torch.float), 1.0).to_event(1))
            pyro.sample("x", dist.Categorical(logits=self.logits(x, z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        _, h = self.enc(self.embed_enc(x))
        loc, log_scale = self.to_stats(h[-1]).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
