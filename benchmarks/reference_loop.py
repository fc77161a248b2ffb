"""The paper's aggressive training loop (text.py of He et al.'s reference code) in plain PyTorch.

It trains the encoder and decoder modules of a pyro-lag ``LSTMTextVAE`` without Pyro,
as the reference does: one SGD optimizer for the encoder and one for the decoder, a
full backward pass (encoder and decoder gradients) in every inner step, gradient
clipping to global norm 5.0 over all parameters, and the loss averaged over the batch.
It is the baseline the benchmarks time ``AggressiveSVI`` against.

The ELBO is written by hand with torch: a reparameterized z ~ q(z|x), the decoder's
token log-likelihood through the pair's ``logits``, and the KL either in closed form
(``kl="closed"``, as the reference computes it; Pyro's ``TraceMeanField_ELBO`` does the
same) or as the one-sample Monte Carlo estimate log q(z|x) - log p(z) (``kl="mc"``, what
Pyro's ``Trace_ELBO`` computes).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

KL_KINDS = ("closed", "mc")
RECON_KINDS = ("cross_entropy", "pair")


def elbo_terms(
    pair: torch.nn.Module, x: torch.Tensor, *, kl: str = "closed", recon: str = "cross_entropy"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sentence reconstruction loss -log p(x|z) and KL term, each ``[B]``, for one draw z ~ q(z|x).

    ``pair`` is an ``LSTMTextVAE`` (its ``encoder`` and ``logits``); ``x`` a ``[B, T]`` batch of
    token ids starting with ``<s>``. ``recon="cross_entropy"`` scores the next tokens with the
    reference's fused cross-entropy; ``recon="pair"`` with the pair's own likelihood (the
    distribution its Pyro model scores), to separate density cost from Pyro's.
    """
    if kl not in KL_KINDS:
        raise ValueError(f"kl must be one of {KL_KINDS}, got {kl!r}")
    if recon not in RECON_KINDS:
        raise ValueError(f"recon must be one of {RECON_KINDS}, got {recon!r}")
    loc, scale = pair.encoder(x)
    posterior = Normal(loc, scale)
    z = posterior.rsample()
    if recon == "pair":
        recon_term = -pair.log_likelihood(x, z)
    else:
        logits = pair.logits(x, z)
        target = x[:, 1:]
        recon_term = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        recon_term = recon_term.view(target.shape).sum(-1)
    prior = Normal(torch.zeros_like(loc), torch.ones_like(scale))
    if kl == "closed":
        kl_term = kl_divergence(posterior, prior).sum(-1)
    else:
        kl_term = (posterior.log_prob(z) - prior.log_prob(z)).sum(-1)
    return recon_term, kl_term


def elbo_loss(
    pair: torch.nn.Module, x: torch.Tensor, *, kl: str = "closed", recon: str = "cross_entropy", kl_weight: float = 1.0
) -> torch.Tensor:
    """Negative ELBO per sentence, ``[B]`` (the reference's ``vae.loss``)."""
    recon_term, kl_term = elbo_terms(pair, x, kl=kl, recon=recon)
    return recon_term + kl_weight * kl_term


class ReferenceAggressiveLoop:
    """The reference's training step: guide-only inner steps with a full backward, then a decoder step.

    :param pair: an ``LSTMTextVAE`` (``encoder`` and ``decoder`` modules, ``logits``).
    :param sample_batch: returns a random training batch ``[B, T]`` for the inner steps after the first.
    :param lr: SGD learning rate of both optimizers (reference: 1.0).
    :param clip_grad: global gradient-norm clip over all parameters (reference: 5.0).
    :param max_inner_steps: most inner steps per model step. The reference allows 99
        (``sub_iter`` from 1 while ``< 100``); 100 here, like ``AggressiveSVI``.
    :param check_every: window of the stop rule: stop when a window's loss per token is
        above the previous window's; ``None`` runs exactly ``max_inner_steps`` steps.
    :param kl: ``"closed"`` or ``"mc"`` (see :func:`elbo_terms`).
    """

    def __init__(
        self,
        pair: torch.nn.Module,
        sample_batch: Callable[[], torch.Tensor],
        *,
        lr: float = 1.0,
        clip_grad: float = 5.0,
        max_inner_steps: int = 100,
        check_every: int | None = 15,
        kl: str = "closed",
    ) -> None:
        if max_inner_steps < 1:
            raise ValueError(f"max_inner_steps must be a positive integer, got {max_inner_steps}")
        if check_every is not None and check_every < 1:
            raise ValueError(f"check_every must be a positive integer or None, got {check_every}")
        if kl not in KL_KINDS:
            raise ValueError(f"kl must be one of {KL_KINDS}, got {kl!r}")
        self.pair = pair
        self.sample_batch = sample_batch
        self.clip_grad = clip_grad
        self.max_inner_steps = max_inner_steps
        self.check_every = check_every
        self.kl = kl
        self.enc_optimizer = torch.optim.SGD(pair.encoder.parameters(), lr=lr)
        self.dec_optimizer = torch.optim.SGD(pair.decoder.parameters(), lr=lr)
        self.aggressive = True
        self.last_inner_steps = 0

    def _backward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero both optimizers, back-propagate the batch-mean loss into every parameter, clip; return [B] losses."""
        self.enc_optimizer.zero_grad()
        self.dec_optimizer.zero_grad()
        loss = elbo_loss(self.pair, x, kl=self.kl)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(self.pair.parameters(), self.clip_grad)
        return loss.detach()

    def inner_step(self, x: torch.Tensor) -> float:
        """One encoder-only update; the backward still computes the decoder's gradients, as the reference does."""
        loss = self._backward(x)
        self.enc_optimizer.step()
        return float(loss.sum())

    def model_step(self, x: torch.Tensor) -> float:
        """The decoder update (and the encoder's too once aggressive mode is over); mean loss of the batch."""
        loss = self._backward(x)
        if not self.aggressive:
            self.enc_optimizer.step()
        self.dec_optimizer.step()
        return float(loss.mean())

    def inner_loop(self, x: torch.Tensor) -> int:
        """Encoder steps until the windowed loss per token stops falling; returns how many were taken.

        The first step uses ``x``, each later one a fresh random batch. (The reference draws
        the next batch at the end of every step, the last one's unused; drawing it only when
        it is used gives the same batches and matches AggressiveSVI's sequence of draws.)
        """
        batch = x
        window_loss, window_words, previous = 0.0, 0, math.inf
        steps = 0
        while True:
            window_words += (batch.shape[1] - 1) * batch.shape[0]
            window_loss += self.inner_step(batch)
            steps += 1
            if self.check_every is not None and steps % self.check_every == 0:
                current = window_loss / window_words
                if current > previous:
                    return steps
                previous = current
                window_loss, window_words = 0.0, 0
            if steps >= self.max_inner_steps:
                return steps
            batch = self.sample_batch()

    def step(self, x: torch.Tensor) -> float:
        """One training step of the reference: the inner loop while aggressive, then the model step."""
        self.last_inner_steps = self.inner_loop(x) if self.aggressive else 0
        return self.model_step(x)


def iw_log_likelihood_reference(
    pair: torch.nn.Module, x: torch.Tensor, *, num_samples: int = 500, chunk_size: int = 100
) -> torch.Tensor:
    """Importance-weighted log p(x) per sentence, ``[B]``, as the reference's ``nll_iw`` computes it.

    Draws ``chunk_size`` z per sentence at a time from q(z|x), decodes them as one batch,
    and takes log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x). Runs in eval mode without gradients.
    """
    was_training = pair.training
    pair.eval()
    try:
        with torch.no_grad():
            loc, scale = pair.encoder(x)
            posterior = Normal(loc, scale)
            prior = Normal(torch.zeros_like(loc), torch.ones_like(scale))
            target = x[:, 1:]
            chunks = []
            remaining = num_samples
            while remaining > 0:
                k = min(chunk_size, remaining)
                z = posterior.sample((k,))  # [k, B, D]
                logits = pair.logits(x, z)  # [k, B, T-1, V]
                log_px_z = -F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.expand(k, *target.shape).reshape(-1),
                    reduction="none",
                ).view(k, *target.shape).sum(-1)
                chunks.append(log_px_z + prior.log_prob(z).sum(-1) - posterior.log_prob(z).sum(-1))
                remaining -= k
            log_w = torch.cat(chunks, dim=0)
        return torch.logsumexp(log_w, dim=0) - math.log(num_samples)
    finally:
        pair.train(was_training)
