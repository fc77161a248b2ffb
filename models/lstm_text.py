"""LSTM-VAE for sentences (He et al. 2019, text experiments), as a Pyro model/guide pair.

Encoder: embedding -> LSTM -> last hidden state -> linear map to (loc, log-variance), as the reference.
Decoder: LSTM language model whose initial state is c0 = W z, h0 = tanh(c0), with z
concatenated to every input embedding; dropout on the input embeddings and on the
LSTM output. Initialisation follows the paper's reference code: every weight
uniform(-0.01, 0.01), embeddings uniform(-0.1, 0.1).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution

from pyro_lag.distributions import NextTokenCategorical

from .base import LatentPair, expand_data, flatten_latent, rand

State = tuple[torch.Tensor, torch.Tensor]


def _init_uniform(module: nn.Module, weight_range: float, embed_range: float) -> None:
    """Reference initialisation: all parameters uniform(+-weight_range), embeddings uniform(+-embed_range)."""
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-weight_range, weight_range)
        for m in module.modules():
            if isinstance(m, nn.Embedding):
                m.weight.uniform_(-embed_range, embed_range)


class LSTMEncoder(nn.Module):
    """Embedding -> one-layer LSTM -> linear map of the last hidden state to (loc, log-variance)."""

    def __init__(self, vocab_size: int, ni: int, nh: int, latent_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, ni)
        self.lstm = nn.LSTM(ni, nh, num_layers=1, batch_first=True)
        self.linear = nn.Linear(nh, 2 * latent_dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, (h_last, _) = self.lstm(self.embed(x))
        loc, log_variance = self.linear(h_last[-1]).chunk(2, dim=-1)
        return loc, (0.5 * log_variance).exp()  # log-variance, as the paper's encoder


class LSTMDecoder(nn.Module):
    """LSTM language model conditioned on z through its initial state and every input (z optional)."""

    def __init__(self, vocab_size: int, ni: int, nh: int, latent_dim: int, dropout: float) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.nh = nh
        self.embed = nn.Embedding(vocab_size, ni)
        self.dropout_in = nn.Dropout(dropout)
        self.dropout_out = nn.Dropout(dropout)
        self.lstm = nn.LSTM(ni + latent_dim, nh, num_layers=1, batch_first=True)
        self.trans_linear = nn.Linear(latent_dim, nh, bias=False) if latent_dim > 0 else None
        self.pred_linear = nn.Linear(nh, vocab_size, bias=False)

    def init_state(self, z: torch.Tensor | None, n: int, device: torch.device) -> State:
        """(h0, c0) = (tanh(W z), W z); zeros when there is no latent."""
        if z is None:
            zeros = torch.zeros(1, n, self.nh, device=device)
            return zeros, zeros
        c0 = self.trans_linear(z).unsqueeze(0)
        return torch.tanh(c0), c0

    def forward(self, tokens: torch.Tensor, z: torch.Tensor | None, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits ``[N, L, V]`` for the next token after each of ``tokens`` ``[N, L]``; z is ``[N, D]`` or None."""
        n, length = tokens.shape
        emb = self.dropout_in(self.embed(tokens))
        if z is not None:
            emb = torch.cat([emb, z.unsqueeze(1).expand(n, length, z.shape[-1])], dim=-1)
        if state is None:
            state = self.init_state(z, n, tokens.device)
        out, state = self.lstm(emb, state)
        # A batch_first LSTM output is a transposed view; a frozen pred_linear (inner steps of losses
        # AggressiveSVI cannot take apart) on it takes a slow batched-matmul path on CPU: contiguous.
        return self.pred_linear(self.dropout_out(out.contiguous())), state


class LSTMTextVAE(LatentPair):
    """Sentence VAE with an LSTM encoder and an LSTM decoder (z in c0/h0 and in every input).

    ``x`` is a LongTensor ``[B, T]`` of token ids starting with ``<s>`` and ending with
    ``</s>``; the decoder predicts ``x[:, 1:]`` from ``x[:, :-1]``. ``bos_id``/``eos_id``
    are only used to generate text (sampling, reconstruction); their defaults are the
    ids of ``pyro_lag.data``'s vocabulary (``<s>`` = 1, ``</s>`` = 2).
    """

    kind = "text"

    def __init__(
        self,
        vocab_size: int,
        latent_dim: int = 32,
        ni: int = 512,
        enc_nh: int = 1024,
        dec_nh: int = 1024,
        dropout: float = 0.5,
        init_range: float = 0.01,
        embed_init_range: float = 0.1,
        bos_id: int | None = 1,
        eos_id: int | None = 2,
        name: str = "lstm-text",
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        if latent_dim < 0:
            raise ValueError(f"latent_dim must be >= 0, got {latent_dim}")
        self._config = dict(
            vocab_size=vocab_size, latent_dim=latent_dim, ni=ni, enc_nh=enc_nh, dec_nh=dec_nh,
            dropout=dropout, init_range=init_range, embed_init_range=embed_init_range,
            bos_id=bos_id, eos_id=eos_id, name=name,
        )
        self.name = name
        self.latent_dim = latent_dim
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.encoder = LSTMEncoder(vocab_size, ni, enc_nh, latent_dim) if latent_dim > 0 else None
        self.decoder = LSTMDecoder(vocab_size, ni, dec_nh, latent_dim, dropout)
        _init_uniform(self, init_range, embed_init_range)

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:]

    def logits(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits ``[*S, B, T-1, V]`` for z ``[*S, B, D]`` (``[B, T-1, V]`` without z)."""
        if x.dim() != 2 or x.shape[1] < 2:
            raise ValueError(f"text batch x must be [B, T] with T >= 2 (<s> ... </s>), got {tuple(x.shape)}")
        inputs = x[:, :-1]
        if z is None:
            return self.decoder(inputs, None)[0]
        z_flat, lead = flatten_latent(z, x.shape[0])
        logits, _ = self.decoder(expand_data(inputs, lead), z_flat)
        return logits.reshape(*lead, x.shape[0], *logits.shape[-2:])

    def likelihood(self, x: torch.Tensor, z: torch.Tensor | None) -> Distribution:
        return NextTokenCategorical(self.logits(x, z)).to_event(1)

    def decode(
        self,
        z: torch.Tensor | None,
        *,
        n: int | None = None,
        max_len: int = 50,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ) -> list[list[int]]:
        """Generate token ids from z ``[N, D]`` (or ``n`` sequences with no z), in eval mode.

        Starts from ``<s>``, samples (or takes the argmax when ``greedy``) until ``</s>``
        or ``max_len`` tokens; returns the ids between ``<s>`` and ``</s>`` (both excluded).
        """
        bos = self.bos_id if bos_id is None else bos_id
        eos = self.eos_id if eos_id is None else eos_id
        if bos is None:
            raise ValueError(f"model '{self.name}' needs bos_id (the <s> token id) to generate text")
        count = z.shape[0] if z is not None else n
        if count is None:
            raise ValueError("decode needs z or n")
        device = self.device
        out: list[list[int]] = [[] for _ in range(count)]
        with self.evaluating():
            tokens = torch.full((count, 1), bos, dtype=torch.long, device=device)
            state = self.decoder.init_state(z, count, device)
            done = torch.zeros(count, dtype=torch.bool, device=device)
            for _ in range(max_len):
                logits, state = self.decoder(tokens, z, state)
                probs = logits[:, -1].softmax(-1)
                if greedy:
                    nxt = probs.argmax(-1)
                else:
                    u = rand((count, 1), generator, device)
                    nxt = (probs.cumsum(-1) < u).sum(-1).clamp(max=self.vocab_size - 1)
                for i in (~done).nonzero().flatten().tolist():
                    if eos is not None and nxt[i].item() == eos:
                        continue
                    out[i].append(int(nxt[i]))
                if eos is not None:
                    done |= nxt == eos
                if bool(done.all()):
                    break
                tokens = nxt.unsqueeze(1)
        return out

    def sample_prior(self, n: int, generator: torch.Generator | None = None, **kwargs: Any) -> list[list[int]]:
        """``n`` sentences (lists of token ids without <s>/</s>) decoded from z ~ N(0, I).

        Keyword arguments go to :meth:`decode` (``max_len``, ``greedy``, ``bos_id``, ``eos_id``).
        """
        return self.decode(self._prior_z(n, generator), n=n, generator=generator, **kwargs)

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None, **kwargs: Any) -> list[list[int]]:
        """Sentences decoded from each posterior mean E_q[z | x] (greedy unless ``greedy=False``)."""
        kwargs.setdefault("greedy", True)
        kwargs.setdefault("bos_id", self.bos_id if self.bos_id is not None else int(x[0, 0]))
        kwargs.setdefault("max_len", 2 * x.shape[1])
        with self.evaluating():
            z = self.encode(x)[0] if self.latent_dim > 0 else None
        return self.decode(z, n=x.shape[0], generator=generator, **kwargs)
