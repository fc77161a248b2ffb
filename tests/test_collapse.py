"""Posterior collapse, fast: plain SVI lets an autoregressive decoder ignore z; AggressiveSVI keeps MI up."""
from __future__ import annotations

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_lag import AggressiveSVI, evaluate
from tests.collapse_setup import SequenceVAE, cluster_sequences

EPOCHS, BATCH = 8, 32


def train(aggressive: bool) -> dict:
    """Eight epochs on 1,000 sequences with fixed seeds; the validation figures at the end."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train_x, valid_x = cluster_sequences(1000, seed=0), cluster_sequences(500, seed=1)
    vae = SequenceVAE()
    fresh = torch.Generator().manual_seed(1)
    if aggressive:
        svi = AggressiveSVI(
            vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO(),
            guide_batches=lambda: train_x[torch.randint(len(train_x), (BATCH,), generator=fresh)],
            check_every=5, max_inner_steps=30, stop_rule="patience", patience=2,
        )
    else:
        svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO())
    for epoch in range(EPOCHS):
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(train_x), BATCH):
            svi.step(train_x[order[start:start + BATCH]])
        result = evaluate(vae.model, vae.guide, [valid_x])
        if aggressive:
            svi.observe_mi(result["mi"])
    return result


def test_plain_svi_collapses_and_aggressive_svi_does_not():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest and keeps runs repeatable
    try:
        plain = train(aggressive=False)
        aggressive = train(aggressive=True)
    finally:
        torch.set_num_threads(threads)
    assert plain["kl"] < 0.05 and plain["mi"] < 0.12, plain
    assert aggressive["kl"] > 0.2 and aggressive["mi"] > 0.2, aggressive
    assert aggressive["mi"] > plain["mi"] + 0.15
    assert aggressive["elbo"] > plain["elbo"] - 0.2  # no worse a fit for using the latent
