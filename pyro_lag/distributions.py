"""Distributions for the likelihoods of text models, usable in any Pyro program.

``NextTokenCategorical`` is a drop-in for ``dist.Categorical(logits=...)`` over a
vocabulary: the same ``log_prob`` in one fused ``cross_entropy`` pass, which matters
when the logits are ``[batch, length, vocabulary]`` and the vocabulary has thousands
of words.

>>> import torch
>>> logits = torch.randn(2, 5, 30)
>>> tokens = torch.randint(0, 30, (2, 5))
>>> fused = NextTokenCategorical(logits).log_prob(tokens)
>>> torch.allclose(fused, torch.distributions.Categorical(logits=logits).log_prob(tokens), atol=1e-5)
True
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions import constraints

from pyro_lag.compat import validate_sample

__all__ = ["NextTokenCategorical"]


class NextTokenCategorical(dist.TorchDistribution):
    """Categorical over the vocabulary scored with one fused ``cross_entropy`` call.

    ``dist.Categorical(logits=...)`` normalises all ``[.., V]`` logits when built and then
    gathers; for a large vocabulary that is a large share of a training step. This
    distribution keeps the raw logits and computes ``log_prob`` as ``-cross_entropy``,
    which gives the same values (to rounding) in one pass. Sampling goes through
    ``torch.distributions.Categorical``. Use it as Categorical: ``.mask(m).to_event(1)``
    for padded sentences.
    """

    # The logits are not validated: checking a [B, T, V] tensor for NaN costs as much as a
    # tenth of a training step, and a NaN there surfaces as a NaN loss, which fit reports.
    # Observed tokens are still checked against the vocabulary when validation is on.
    arg_constraints: dict = {}
    has_enumerate_support = False

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        if logits.dim() < 1:
            raise ValueError("logits must have at least one dimension (the vocabulary)")
        self.logits = logits
        super().__init__(batch_shape=logits.shape[:-1], validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.logits.shape[-1] - 1)

    def expand(self, batch_shape, _instance=None) -> "NextTokenCategorical":
        batch_shape = torch.Size(batch_shape)
        return NextTokenCategorical(self.logits.expand(batch_shape + self.logits.shape[-1:]))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        validate_sample(self, value)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        logits = self.logits.expand(shape + self.logits.shape[-1:]).reshape(-1, self.logits.shape[-1])
        nll = F.cross_entropy(logits, value.expand(shape).reshape(-1), reduction="none")
        return -nll.reshape(shape)

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        return torch.distributions.Categorical(logits=self.logits).sample(torch.Size(sample_shape))
