"""Five styles of Pyro program a user writes, small enough to train and diagnose in seconds.

Each builder returns a :class:`Program` (model, guide, loss and batches), written the way
Pyro's own examples write them: a plain VAE, a deep Markov model (examples/dmm.py), a
semi-supervised VAE M2 (examples/vae/ss_vae_M2.py), an amortized LDA (examples/lda.py) and
a conditional VAE (examples/cvae). The brute-force references the tests compare the
estimators with live here too, written as plain loops. Nothing here imports pyro_lag: these
are user programs, and the references must not share code with what they check.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

Batch = Any
"""A batch: a tuple of positional args, a bare tensor, or an ``(args, kwargs)`` pair."""

STYLES = ("vae", "dmm", "ss_vae", "lda", "cvae")


# ------------------------------------------------------------------ shared pieces


@dataclass
class Program:
    """A model/guide pair as a user writes it, with its loss and its batches."""

    name: str
    model: Callable[..., Any]
    guide: Callable[..., Any]
    make_loss: Callable[[], ELBO]  # a fresh loss for each SVI object
    train_batches: list[Batch]  # ss_vae: supervised and unsupervised batches alternate
    guide_batches: list[Batch]  # fresh minibatches for AggressiveSVI's inner steps
    eval_batches: list[Batch]
    data_plate: str
    local_sites: tuple[str, ...]  # the guide's local latents on eval_batches
    latent_dims: int  # posterior-mean dimensions of those sites, all concatenated
    lags: bool = True  # the model has parameters of its own, so AggressiveSVI takes inner steps
    point_axis: int = 0  # the axis of the first argument that indexes data points (LDA: documents are columns)
    net: nn.Module | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_eval_points(self) -> int:
        return sum(batch_size(self, b) for b in self.eval_batches)


def split_batch(batch: Batch) -> tuple[tuple, dict]:
    """A batch as ``(args, kwargs)``: a bare tensor is a one-argument call."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if len(batch) == 2 and isinstance(batch[0], tuple) and isinstance(batch[1], dict):
        return batch[0], batch[1]
    return tuple(batch), {}


def batch_size(program: Program, batch: Batch) -> int:
    """How many data points of the data plate a batch holds."""
    args, _ = split_batch(batch)
    return args[0].shape[program.point_axis]


def cat_broadcast(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dim after broadcasting the batch dims (enumeration and particles add dims)."""
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(shape + t.shape[-1:]) for t in tensors], dim=-1)


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """One hidden tanh layer."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))


class GaussianNet(nn.Module):
    """An MLP from its (concatenated) inputs to the loc and scale of a diagonal Normal."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
        self.loc = nn.Linear(hidden, out_dim)
        self.scale = nn.Linear(hidden, out_dim)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(cat_broadcast(*inputs))
        return self.loc(hidden), nn.functional.softplus(self.scale(hidden)) + 1e-3


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class RecordDraws(Messenger):
    """Wrap a guide to keep the latent values of each of its runs: ``runs[-1]`` is the latest."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[dict[str, torch.Tensor]] = []

    def __enter__(self) -> "RecordDraws":
        self.runs.append({})
        return super().__enter__()

    def _pyro_post_sample(self, msg: dict) -> None:
        if not msg["is_observed"] and not site_is_subsample(msg):
            self.runs[-1][msg["name"]] = msg["value"]


def unmasked(fn: dist.Distribution) -> dist.Distribution:
    """The distribution under Independent and mask wrappers: its log_prob is per element, mask ignored."""
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def unbiased_variance(values: list[float]) -> float:
    """Sample variance with n - 1 in the denominator, as a plain loop."""
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


# ------------------------------------------------------------------ 1. plain VAE on images

OMNIGLOT = Path("omniglot28") / "omniglot28.npz"


@functools.lru_cache(maxsize=2)
def load_omniglot(data_dir: Path, count: int = 256, seed: int = 0) -> torch.Tensor:
    """``count`` random OMNIGLOT training images, binarised at 128 and flattened: [count, 784] floats."""
    with np.load(data_dir / OMNIGLOT) as archive:
        images = archive["train"]
    pick = torch.randperm(len(images), generator=generator(seed))[:count].numpy()
    return torch.from_numpy(images[pick] >= 128).reshape(count, -1).float()


class ImageVAE(nn.Module):
    """A plain VAE on binary images: MLP encoder q(z|x), MLP decoder p(x|z) with Bernoulli pixels."""

    def __init__(self, x_dim: int = 784, z_dim: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.encoder = GaussianNet(x_dim, hidden, z_dim)
        self.decoder = mlp(z_dim, hidden, x_dim)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def vae(data_dir: Path, batch: int = 32) -> Program:
    """A VAE on 256 OMNIGLOT images: training batches are bare tensors."""
    torch.manual_seed(0)
    net = ImageVAE()
    images = load_omniglot(data_dir)
    chunks = list(images.split(batch))
    return Program(
        name="vae", model=net.model, guide=net.guide, make_loss=Trace_ELBO,
        train_batches=chunks[:4], guide_batches=chunks[4:6], eval_batches=chunks[6:8],
        data_plate="data", local_sites=("z",), latent_dims=net.z_dim, net=net,
    )


# ------------------------------------------------------------------ 2. deep Markov model


class Combiner(nn.Module):
    """q(z_t | z_{t-1}, h_t) as in dmm.py: the RNN state h_t averaged with a transform of z_{t-1}."""

    def __init__(self, z_dim: int, rnn_dim: int) -> None:
        super().__init__()
        self.z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.to_loc = nn.Linear(rnn_dim, z_dim)
        self.to_scale = nn.Linear(rnn_dim, z_dim)

    def forward(self, z_prev: torch.Tensor, h_rnn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        combined = 0.5 * (torch.tanh(self.z_to_hidden(z_prev)) + h_rnn)
        return self.to_loc(combined), nn.functional.softplus(self.to_scale(combined)) + 1e-3


class DMM(nn.Module):
    """A small deep Markov model: one module registered whole by model and guide, as in dmm.py.

    Sequences are padded to T_max; ``mask`` [B, T_max] marks the present steps. Each z_t is
    its own site ``z_t`` inside plate ``z_minibatch``, masked so padded steps do not count:
    by the distribution's ``.mask`` as dmm.py does, or by ``poutine.mask`` when
    ``mask_handler``. The guide is a filter (a forward GRU over x; dmm.py runs its RNN
    backwards), and q(z_t) depends on z_{t-1}, as does the model's transition.
    """

    def __init__(self, x_dim: int = 2, z_dim: int = 2, rnn_dim: int = 8, mask_handler: bool = False) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.mask_handler = mask_handler
        self.trans = GaussianNet(z_dim, rnn_dim, z_dim)
        self.emit = nn.Linear(z_dim, x_dim)
        self.rnn = nn.GRU(x_dim, rnn_dim, batch_first=True)
        self.combine = Combiner(z_dim, rnn_dim)
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))

    def masked_sample(self, name: str, fn: dist.Normal, step_mask: torch.Tensor, obs: Any = None) -> torch.Tensor:
        """Sample one time step, counting only the sequences in which the step is present."""
        if self.mask_handler:
            with poutine.mask(mask=step_mask):
                return pyro.sample(name, fn.to_event(1), obs=obs)
        return pyro.sample(name, fn.mask(step_mask.unsqueeze(-1)).to_event(1), obs=obs)

    def model(self, seq: torch.Tensor, mask: torch.Tensor, annealing_factor: float = 1.0) -> None:
        pyro.module("dmm", self)
        batch, t_max = mask.shape
        z_prev = self.z_0.expand(batch, self.z_dim)
        with pyro.plate("z_minibatch", batch):
            for t in pyro.markov(range(1, t_max + 1)):
                loc, scale = self.trans(z_prev)
                with poutine.scale(scale=annealing_factor):
                    z_t = self.masked_sample(f"z_{t}", dist.Normal(loc, scale), mask[:, t - 1])
                self.masked_sample(f"obs_x_{t}", dist.Normal(self.emit(z_t), 0.5), mask[:, t - 1],
                                   obs=seq[:, t - 1])
                z_prev = z_t

    def guide(self, seq: torch.Tensor, mask: torch.Tensor, annealing_factor: float = 1.0) -> None:
        pyro.module("dmm", self)
        batch, t_max = mask.shape
        rnn_out, _ = self.rnn(seq)
        z_prev = self.z_q_0.expand(batch, self.z_dim)
        with pyro.plate("z_minibatch", batch):
            for t in pyro.markov(range(1, t_max + 1)):
                loc, scale = self.combine(z_prev, rnn_out[:, t - 1])
                with poutine.scale(scale=annealing_factor):
                    z_prev = self.masked_sample(f"z_{t}", dist.Normal(loc, scale), mask[:, t - 1])

    # -- one sequence at a time, for the brute-force references

    def step_posteriors(self, seq_i: torch.Tensor, draws_i: list[torch.Tensor]) -> list[dist.Normal]:
        """q(z_t | z_{t-1}, x) for each step of one sequence [T, x_dim], z_{t-1} taken from ``draws_i``."""
        rnn_out = self.rnn(seq_i.unsqueeze(0))[0][0]
        z_prev, steps = self.z_q_0, []
        for t in range(seq_i.shape[0]):
            steps.append(dist.Normal(*self.combine(z_prev, rnn_out[t])))
            z_prev = draws_i[t]
        return steps

    def step_priors(self, draws_i: list[torch.Tensor]) -> list[dist.Normal]:
        """p(z_t | z_{t-1}) for each step of one sequence, z_{t-1} taken from ``draws_i``."""
        z_prev, steps = self.z_0, []
        for z_t in draws_i:
            steps.append(dist.Normal(*self.trans(z_prev)))
            z_prev = z_t
        return steps


def random_walks(count: int, t_max: int, x_dim: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian random walks of lengths cycling through 2..t_max, zero-padded to t_max, and their mask [count, t_max]."""
    g = generator(seed)
    lengths = 2 + torch.arange(count) % (t_max - 1)  # 2, 3, ..., t_max, 2, ...: each batch of 8 has all
    steps = torch.randn(count, t_max, x_dim, generator=g) * 0.5
    steps[:, 0] = torch.randn(count, x_dim, generator=g)
    mask = torch.arange(t_max) < lengths.unsqueeze(-1)
    return steps.cumsum(1) * mask.unsqueeze(-1), mask


def dmm(t_max: int = 5, mask_handler: bool = False, batch: int = 8) -> Program:
    """A DMM on 48 ragged random walks: batches are ``(seq, mask)`` tuples."""
    torch.manual_seed(0)
    net = DMM(mask_handler=mask_handler)
    seq, mask = random_walks(48, t_max)
    chunks = list(zip(seq.split(batch), mask.split(batch)))
    return Program(
        name="dmm", model=net.model, guide=net.guide, make_loss=Trace_ELBO,
        train_batches=chunks[:3], guide_batches=chunks[3:4], eval_batches=chunks[4:6],
        data_plate="z_minibatch", local_sites=tuple(f"z_{t}" for t in range(1, t_max + 1)),
        latent_dims=t_max * net.z_dim, net=net,
    )


def brute_force_dmm_kl(net: DMM, seq: torch.Tensor, mask: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per sequence, the sum over its present steps of KL(q(z_t | z_{t-1}, x) || p(z_t | z_{t-1})), [B].

    z_{t-1} is the guide's draw in ``draws`` ({"z_t": [B, z_dim]}), the same in q and p.
    """
    totals = []
    for i in range(seq.shape[0]):
        draws_i = [draws[f"z_{t}"][i] for t in range(1, seq.shape[1] + 1)]
        posteriors, priors = net.step_posteriors(seq[i], draws_i), net.step_priors(draws_i)
        total = torch.zeros(())
        for t in range(seq.shape[1]):
            if mask[i, t]:
                total = total + torch.distributions.kl_divergence(posteriors[t], priors[t]).sum()
        totals.append(total)
    return torch.stack(totals)


def brute_force_dmm_mean_variance(
    net: DMM, seq: torch.Tensor, mask: torch.Tensor, draws: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Per unit (step t, dim d; index (t-1) * z_dim + d), the variance of q's mean over the sequences where t is present."""
    locs = []  # locs[i][t] is q's loc at step t of sequence i
    for i in range(seq.shape[0]):
        draws_i = [draws[f"z_{t}"][i] for t in range(1, seq.shape[1] + 1)]
        locs.append([q.loc for q in net.step_posteriors(seq[i], draws_i)])
    variances = []
    for t in range(seq.shape[1]):
        for d in range(net.z_dim):
            present = [float(locs[i][t][d]) for i in range(seq.shape[0]) if mask[i, t]]
            variances.append(unbiased_variance(present))
    return torch.tensor(variances)


def _guide_log_prob(
    guide: Callable, point: tuple[torch.Tensor, torch.Tensor], values: dict[str, torch.Tensor], keep: torch.Tensor
) -> torch.Tensor:
    """log q(values | x_j) for one data point ``point``: the guide run on it with ``values`` fixed,
    the unmasked log-densities summed over the steps that ``keep`` [T] marks present."""
    trace = poutine.trace(poutine.condition(guide, data=values)).get_trace(*point)
    total = torch.zeros(())
    for t in range(1, keep.shape[0] + 1):
        if keep[t - 1]:
            site = trace.nodes[f"z_{t}"]
            total = total + unmasked(site["fn"]).log_prob(site["value"]).sum()
    return total


@torch.no_grad()
def brute_force_mi(guide: Callable, batch: tuple[torch.Tensor, torch.Tensor], draws: dict[str, torch.Tensor]) -> float:
    """The MI estimate mean_i [log q(z_i|x_i) - log (1/B sum_j q(z_i|x_j))] for the DMM, as a double loop.

    ``batch`` is ``(seq, mask)`` of B sequences and ``draws`` the guide's values on it,
    ``{"z_t": [B, z_dim]}``, z_i the values of point i at all steps. Each log q(z_i | x_j) is
    the guide run on sequence j alone with z_i's values fixed in it, summed over the steps
    present in point i's own mask (padded steps of point i never count, whatever x_j's length).
    """
    seq, mask = batch
    size = seq.shape[0]
    total = 0.0
    for i in range(size):
        z_i = {name: value[i : i + 1] for name, value in draws.items()}
        log_q = torch.stack([
            _guide_log_prob(guide, (seq[j : j + 1], mask[j : j + 1]), z_i, mask[i]) for j in range(size)
        ])
        total += float(log_q[i] - (torch.logsumexp(log_q, 0) - math.log(size)))
    return total / size


# ------------------------------------------------------------------ 3. semi-supervised VAE (M2)


class SSVAE(nn.Module):
    """The M2 model of ss_vae_M2.py: class y (observed when labelled) and style z; the data plate has no size.

    As in the example, only the model registers the module; the guide uses its networks.
    """

    def __init__(self, x_dim: int = 10, y_dim: int = 3, z_dim: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.y_dim, self.z_dim = y_dim, z_dim
        self.encoder_y = mlp(x_dim, hidden, y_dim)
        self.encoder_z = GaussianNet(x_dim + y_dim, hidden, z_dim)
        self.decoder = mlp(z_dim + y_dim, hidden, x_dim)

    def model(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        pyro.module("ss_vae", self)
        batch = xs.shape[0]
        with pyro.plate("data"):
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(batch, self.z_dim), 1.0).to_event(1))
            alpha_prior = xs.new_ones(batch, self.y_dim) / self.y_dim
            ys = pyro.sample("y", dist.OneHotCategorical(alpha_prior), obs=ys)
            pyro.sample("x", dist.Normal(self.decoder(cat_broadcast(zs, ys)), 0.5).to_event(1), obs=xs)

    def guide(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        with pyro.plate("data"):
            if ys is None:
                alpha = torch.softmax(self.encoder_y(xs), dim=-1)
                ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            loc, scale = self.encoder_z(xs, ys)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def gaussian_clusters(count: int, x_dim: int = 10, classes: int = 3, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of ``classes`` 2-d Gaussian clusters lifted to ``x_dim`` by a fixed linear map, and one-hot labels."""
    g = generator(seed)
    labels = torch.randint(classes, (count,), generator=g)
    centres = 3.0 * torch.randn(classes, 2, generator=g)
    points = centres[labels] + torch.randn(count, 2, generator=g)
    lift = torch.randn(2, x_dim, generator=g)
    xs = points @ lift + 0.1 * torch.randn(count, x_dim, generator=g)
    return xs, nn.functional.one_hot(labels, classes).float()


def ss_vae(batch: int = 10) -> Program:
    """An M2 SS-VAE: supervised ``(xs, ys)`` and unsupervised ``(xs,)`` batches alternate; TraceEnum_ELBO."""
    torch.manual_seed(0)
    net = SSVAE()
    xs, ys = gaussian_clusters(60)
    x_chunks, y_chunks = xs.split(batch), ys.split(batch)
    train = [(x_chunks[0], y_chunks[0]), (x_chunks[1],), (x_chunks[2], y_chunks[2]), (x_chunks[3],)]
    return Program(
        name="ss_vae", model=net.model, guide=config_enumerate(net.guide, "parallel", expand=True),
        make_loss=lambda: TraceEnum_ELBO(max_plate_nesting=1),
        train_batches=train, guide_batches=[(x_chunks[1],), (x_chunks[3],)],
        eval_batches=[(x_chunks[4],), (x_chunks[5], None)],
        data_plate="data", local_sites=("y", "z"), latent_dims=net.y_dim + net.z_dim, net=net,
        extras={"supervised": (x_chunks[4], y_chunks[4])},
    )


# ------------------------------------------------------------------ 4. amortized LDA


class AmortizedLDA(nn.Module):
    """LDA as in lda.py: global topics (plate ``topics``, declared first), local topic proportions per document.

    ``data`` is [words per document, documents] of word ids, as in lda.py. lda.py enumerates
    each word's topic; here it is summed out in closed form, so the likelihood is
    p(words | doc_topics, topic_words) = prod_w (doc_topics @ topic_words)[word]. The guide's
    doc_topics is a Dirichlet from an encoder of the word counts (lda.py uses a point mass).
    The model has no parameter: under AggressiveSVI it trains as plain SVI.

    The model writes ``dist.Dirichlet(topic_weights)`` as lda.py does. Under a particle plate
    left of its plates, topic_weights is [P, 1, K], that prior's batch shape [P, 1], and Pyro
    broadcasts it to [P, P, D]: each particle's doc_topics scored under every particle's
    weights. A vectorized IW estimate must notice and draw one particle at a time.
    """

    def __init__(self, num_topics: int = 4, num_words: int = 20, hidden: int = 16) -> None:
        super().__init__()
        self.num_topics, self.num_words = num_topics, num_words
        self.predictor = nn.Sequential(mlp(num_words, hidden, num_topics), nn.Softplus())

    def model(self, data: torch.Tensor) -> None:
        with pyro.plate("topics", self.num_topics):
            topic_weights = pyro.sample("topic_weights", dist.Gamma(1.0 / self.num_topics, 1.0))
            topic_words = pyro.sample("topic_words", dist.Dirichlet(torch.ones(self.num_words) / self.num_words))
        with pyro.plate("documents", data.shape[1]):
            doc_topics = pyro.sample("doc_topics", dist.Dirichlet(topic_weights))
            with pyro.plate("words", data.shape[0]):
                pyro.sample("doc_words", dist.Categorical(doc_topics @ topic_words), obs=data)

    def concentration(self, data: torch.Tensor) -> torch.Tensor:
        """The guide's Dirichlet concentration of each document's topics, [documents, topics]."""
        counts = torch.zeros(self.num_words, data.shape[1]).scatter_add(0, data, torch.ones(data.shape))
        return self.predictor(counts.T) + 0.3

    def guide(self, data: torch.Tensor) -> None:
        weights_posterior = pyro.param(
            "topic_weights_posterior", lambda: torch.ones(self.num_topics), constraint=constraints.positive
        )
        words_posterior = pyro.param(
            "topic_words_posterior", lambda: torch.ones(self.num_topics, self.num_words),
            constraint=constraints.greater_than(0.5),
        )
        with pyro.plate("topics", self.num_topics):
            pyro.sample("topic_weights", dist.Gamma(weights_posterior, 1.0))
            pyro.sample("topic_words", dist.Dirichlet(words_posterior))
        pyro.module("predictor", self.predictor)
        with pyro.plate("documents", data.shape[1]):
            pyro.sample("doc_topics", dist.Dirichlet(self.concentration(data)))

    # -- one document at a time, for the brute-force references

    def words_log_likelihood(self, data: torch.Tensor, doc_topics: torch.Tensor, topic_words: torch.Tensor) -> torch.Tensor:
        """log p(words of each document | its doc_topics [D, K], topic_words [K, V]), [D], a loop over documents."""
        result = []
        for d in range(data.shape[1]):
            probs = doc_topics[d] @ topic_words
            result.append(sum(torch.log(probs[word]) for word in data[:, d]))
        return torch.stack(result)

    def log_weight(self, data: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per document, log p(words_d, doc_topics_d | globals) - log q(doc_topics_d | words_d) at one draw, [D]."""
        likelihood = self.words_log_likelihood(data, draws["doc_topics"], draws["topic_words"])
        result = []
        for d in range(data.shape[1]):
            theta = draws["doc_topics"][d]
            prior = dist.Dirichlet(draws["topic_weights"]).log_prob(theta)
            posterior = dist.Dirichlet(self.concentration(data[:, d : d + 1])[0]).log_prob(theta)
            result.append(likelihood[d] + prior - posterior)
        return torch.stack(result)


def lda_corpus(num_docs: int = 30, words_per_doc: int = 10, num_topics: int = 4, num_words: int = 20,
               seed: int = 3) -> torch.Tensor:
    """Documents drawn from LDA with topics concentrated on 5 words each: [words_per_doc, num_docs] word ids."""
    g = generator(seed)
    topics = torch.full((num_topics, num_words), 0.1)
    for k in range(num_topics):
        topics[k, 5 * k : 5 * k + 5] = 2.0
    topics = topics / topics.sum(-1, keepdim=True)
    doc_topics = torch.softmax(2.0 * torch.randn(num_docs, num_topics, generator=g), dim=-1)
    probs = doc_topics @ topics
    return torch.multinomial(probs, words_per_doc, replacement=True, generator=g).T


def lda(batch: int = 10, words_per_doc: int = 10) -> Program:
    """An amortized LDA with 4 topics on 30 documents; batches are ``(data,)`` with documents as columns.

    ``words_per_doc=4`` gives the topics plate the size of a batch dim, a trap for plate finding.
    """
    torch.manual_seed(0)
    net = AmortizedLDA()
    data = lda_corpus(words_per_doc=words_per_doc)
    chunks = [(part,) for part in data.split(batch, dim=1)]
    return Program(
        name="lda", model=net.model, guide=net.guide, make_loss=Trace_ELBO,
        train_batches=chunks * 2, guide_batches=chunks[:1], eval_batches=chunks,
        data_plate="documents", local_sites=("doc_topics",), latent_dims=net.num_topics,
        lags=False, point_axis=1, net=net, extras={"data": data},
    )


def lda_particle_draws(recorder: RecordDraws, num_samples: int, net: AmortizedLDA, num_docs: int) -> list[dict[str, torch.Tensor]]:
    """The guide's draws behind an IW estimate of ``num_samples`` particles: one dict per particle.

    A vectorized estimate draws all particles in its last guide run (each value then holds
    ``num_samples`` times its own size, wherever the particle dim sits); a sequential one
    draws one particle in each of its last runs.
    """
    shapes = {
        "topic_weights": (net.num_topics,),
        "topic_words": (net.num_topics, net.num_words),
        "doc_topics": (num_docs, net.num_topics),
    }
    last = recorder.runs[-1]
    if last["doc_topics"].numel() == num_samples * num_docs * net.num_topics:
        return [
            {name: last[name].reshape((num_samples,) + shape)[k] for name, shape in shapes.items()}
            for k in range(num_samples)
        ]
    return [{name: run[name].reshape(shape) for name, shape in shapes.items()} for run in recorder.runs[-num_samples:]]


# ------------------------------------------------------------------ 5. conditional VAE


class CVAE(nn.Module):
    """x given a condition c, as in Pyro's cvae example: prior network p(z|c), p(x|z, c), q(z|x, c).

    As in the example, only the model registers the module; without x the guide falls
    back to the prior network (prediction).
    """

    def __init__(self, c_dim: int = 3, x_dim: int = 6, z_dim: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.prior_net = GaussianNet(c_dim, hidden, z_dim)
        self.generation_net = mlp(z_dim + c_dim, hidden, x_dim)
        self.recognition_net = GaussianNet(c_dim + x_dim, hidden, z_dim)

    def model(self, c: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        pyro.module("cvae", self)
        with pyro.plate("data", c.shape[0]):
            loc, scale = self.prior_net(c)
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            x_loc = self.generation_net(cat_broadcast(z, c))
            if x is None:
                return pyro.deterministic("x", x_loc, event_dim=1)
            pyro.sample("x", dist.Normal(x_loc, 0.3).to_event(1), obs=x)
            return x_loc

    def guide(self, c: torch.Tensor, x: torch.Tensor | None = None) -> None:
        with pyro.plate("data", c.shape[0]):
            loc, scale = self.prior_net(c) if x is None else self.recognition_net(c, x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def labelled_styles(count: int, x_dim: int = 6, classes: int = 3, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot labels c and points x = class mean + a 2-d style through a fixed linear map + noise."""
    g = generator(seed)
    c = nn.functional.one_hot(torch.randint(classes, (count,), generator=g), classes).float()
    means = 2.0 * torch.randn(classes, x_dim, generator=g)
    style = torch.randn(count, 2, generator=g) @ torch.randn(2, x_dim, generator=g)
    return c, c @ means + style + 0.1 * torch.randn(count, x_dim, generator=g)


def cvae(batch: int = 12) -> Program:
    """A CVAE on 48 labelled points: batches are ``((c,), {"x": x})`` pairs."""
    torch.manual_seed(0)
    net = CVAE()
    c, x = labelled_styles(48)
    chunks = [((cs,), {"x": xs}) for cs, xs in zip(c.split(batch), x.split(batch))]
    return Program(
        name="cvae", model=net.model, guide=net.guide, make_loss=Trace_ELBO,
        train_batches=chunks[:2], guide_batches=chunks[2:3], eval_batches=chunks[2:4],
        data_plate="data", local_sites=("z",), latent_dims=net.z_dim, net=net,
    )


# ------------------------------------------------------------------ programs that must be refused


def sequential_plate_program() -> tuple[Callable, Callable, torch.Tensor]:
    """A guide whose only plate is sequential (``for i in pyro.plate``): no vectorized data plate."""

    def model(x: torch.Tensor) -> None:
        weight = pyro.param("weight", torch.tensor(1.0))
        for i in pyro.plate("points", x.shape[0]):
            z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
            pyro.sample(f"x_{i}", dist.Normal(weight * z, 1.0), obs=x[i])

    def guide(x: torch.Tensor) -> None:
        slope = pyro.param("slope", torch.tensor(0.5))
        for i in pyro.plate("points", x.shape[0]):
            pyro.sample(f"z_{i}", dist.Normal(slope * x[i], 1.0))

    return model, guide, torch.randn(6, generator=generator(5))


def global_only_program() -> tuple[Callable, Callable, torch.Tensor]:
    """A guide with a global latent only (``global_shift``), outside the data plate."""

    def model(x: torch.Tensor) -> None:
        noise = pyro.param("noise", torch.tensor(1.0), constraint=constraints.positive)
        shift = pyro.sample("global_shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(shift, noise), obs=x)

    def guide(x: torch.Tensor) -> None:
        loc = pyro.param("shift_loc", torch.tensor(0.0))
        pyro.sample("global_shift", dist.Normal(loc, 0.5))

    return model, guide, torch.randn(6, generator=generator(6))
