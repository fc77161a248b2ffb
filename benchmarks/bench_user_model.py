"""AggressiveSVI on a model written the way a Pyro user writes it, against plain PyTorch.

The network is an LSTM sentence VAE of the benchmarks' "small" size (embeddings 128,
LSTMs 256, latent 32; vocabulary 3,000), written as a user writes a Pyro program:
``pyro.module``, a ``pyro.plate`` over sentences, ``dist.Normal(...).to_event(1)`` for z,
``dist.Categorical(logits=...).mask(mask).to_event(1)`` for the tokens of padded
sentences (about 20 tokens each), Pyro's default validation on, ``pyro.optim.Adam``
and ``TraceMeanField_ELBO``. The data are random tokens in fixed-shape padded batches,
so every step does the same work. Rows, each timed interleaved in this process:

- per model step: the paper's aggressive loop in plain PyTorch (10 encoder-only steps,
  each a full ``loss.backward()`` and an encoder Adam step, then one decoder step; no
  clipping) against ``AggressiveSVI.step`` held at exactly 10 inner steps;
- AggressiveSVI's inner step (the mean over an inner loop of 10, on fresh batches, as
  ``step`` runs it) against its physical cost in plain PyTorch: encoder forward and
  backward, decoder forward, backward to the decoder's input only (the decoder's
  parameters do not require gradients), an encoder Adam step; the tokens scored by the
  fused cross-entropy or by the user's own ``Categorical``. A third physical variant keeps
  the decoder's ``requires_grad`` and passes the encoder's parameters as ``backward``'s
  ``inputs`` instead: the same gradients, without the slower kernels a frozen layer gets;
- AggressiveSVI's model-only step against the paper's decoder step;
- one ``pyro.infer.SVI`` step against the same joint step in plain PyTorch;
- the fused text likelihood ``pyro_lag.distributions.NextTokenCategorical`` in place of
  the user's ``Categorical``, per AggressiveSVI model step, inner step and SVI step.

    python benchmarks/bench_user_model.py [--threads 2] [--repeats 20]

With ``--baseline``, the ``AggressiveSVI`` of another version of the package (another
checkout's ``pyro_lag`` folder) is timed in the same rounds, per model step:

    git worktree add /tmp/pyro-lag-before <commit>
    python benchmarks/bench_user_model.py --baseline /tmp/pyro-lag-before/pyro_lag
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import random
import sys
from pathlib import Path
from typing import Callable

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn
from torch.distributions import Normal, kl_divergence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pyro_lag import AggressiveSVI  # noqa: E402
from pyro_lag.distributions import NextTokenCategorical  # noqa: E402

try:
    from benchmarks import bench_common as common
except ImportError:  # run as a script from the benchmarks folder
    import bench_common as common

Batch = tuple[torch.Tensor, torch.Tensor]
LR = 1e-3


# ----------------------------------------------------------------- the user's program


class Encoder(nn.Module):
    """Embedding -> LSTM -> (loc, scale) of q(z | x) from the last hidden state."""

    def __init__(self, vocab: int, ni: int, nh: int, latent: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, ni)
        self.lstm = nn.LSTM(ni, nh, batch_first=True)
        self.to_params = nn.Linear(nh, 2 * latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, (h, _) = self.lstm(self.embed(x))
        loc, log_scale = self.to_params(h[-1]).chunk(2, dim=-1)
        return loc, log_scale.exp()


class Decoder(nn.Module):
    """LSTM language model with z in its initial state and in every input; next-token logits."""

    def __init__(self, vocab: int, ni: int, nh: int, latent: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, ni)
        self.init = nn.Linear(latent, nh)
        self.lstm = nn.LSTM(ni + latent, nh, batch_first=True)
        self.out = nn.Linear(nh, vocab)

    def forward(self, tokens: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        emb = self.embed(tokens)
        emb = torch.cat([emb, z.unsqueeze(1).expand(-1, tokens.shape[1], -1)], dim=-1)
        c0 = self.init(z).unsqueeze(0)
        out, _ = self.lstm(emb, (torch.tanh(c0), c0))
        return self.out(out)


class SentenceVAE(nn.Module):
    """The Pyro program: ``model(x, mask)`` and ``guide(x, mask)`` on padded batches ``x`` ``[B, T]``
    (``<s>`` first), ``mask`` ``[B, T-1]`` marking the real next tokens. ``fused`` scores the tokens
    with ``NextTokenCategorical`` instead of ``dist.Categorical(logits=...)``; ``name`` prefixes the
    param-store names, so that several copies train side by side in one process."""

    def __init__(self, vocab: int, ni: int, nh: int, latent: int, fused: bool = False, name: str = "vae") -> None:
        super().__init__()
        self.latent = latent
        self.fused = fused
        self.name = name
        self.encoder = Encoder(vocab, ni, nh, latent)
        self.decoder = Decoder(vocab, ni, nh, latent)

    def model(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        pyro.module(f"{self.name}.decoder", self.decoder)
        with pyro.plate("sentences", x.shape[0]):
            prior = dist.Normal(x.new_zeros(x.shape[0], self.latent, dtype=torch.float), 1.0)
            z = pyro.sample("z", prior.to_event(1))
            logits = self.decoder(x[:, :-1], z)
            tokens = NextTokenCategorical(logits) if self.fused else dist.Categorical(logits=logits)
            pyro.sample("tokens", tokens.mask(mask).to_event(1), obs=x[:, 1:])

    def guide(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        pyro.module(f"{self.name}.encoder", self.encoder)
        with pyro.plate("sentences", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def random_batches(vocab: int, batch_size: int, count: int, max_tokens: int, seed: int) -> list[Batch]:
    """``count`` batches of random sentences of 12 to ``max_tokens`` tokens, padded to one shape."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        lengths = torch.randint(12, max_tokens + 1, (batch_size,), generator=generator)
        x = torch.randint(4, vocab, (batch_size, max_tokens + 2), generator=generator)
        x[:, 0] = 1  # <s>
        positions = torch.arange(max_tokens + 1)
        x[:, 1:][positions > lengths[:, None]] = 0  # padding after </s>
        x[:, 1:][positions == lengths[:, None]] = 2  # </s>
        batches.append((x, positions[None, :] <= lengths[:, None]))
    return batches


def sampler(batches: list[Batch], seed: int) -> Callable[[], Batch]:
    """Random batches from ``batches``, from a stream of its own (so two copies draw the same sequence)."""
    stream = random.Random(seed)
    return lambda: batches[stream.randrange(len(batches))]


# ----------------------------------------------------------------- plain PyTorch


def torch_loss(vae: SentenceVAE, x: torch.Tensor, mask: torch.Tensor, recon: str = "cross_entropy") -> torch.Tensor:
    """The negative ELBO summed over the batch, closed-form KL (what TraceMeanField_ELBO computes).

    ``recon="cross_entropy"`` scores the tokens with the fused cross-entropy, as the paper's
    code does; ``recon="user"`` with the user's ``torch`` Categorical, masked.
    """
    loc, scale = vae.encoder(x)
    posterior = Normal(loc, scale)
    z = posterior.rsample()
    logits = vae.decoder(x[:, :-1], z)
    target = x[:, 1:]
    if recon == "user":
        log_p = torch.distributions.Categorical(logits=logits).log_prob(target)
        nll = -(log_p * mask).sum()
    else:
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        nll = (ce.view(target.shape) * mask).sum()
    return nll + kl_divergence(posterior, Normal(torch.zeros_like(loc), torch.ones_like(scale))).sum()


class PaperLoop:
    """He et al.'s aggressive loop in plain PyTorch: encoder and decoder Adam optimizers, a full
    backward in every inner step, ``inner_steps`` encoder steps then one decoder step, no clipping."""

    def __init__(self, vae: SentenceVAE, sample: Callable[[], Batch], inner_steps: int) -> None:
        self.vae = vae
        self.sample = sample
        self.inner_steps = inner_steps
        self.encoder_optim = torch.optim.Adam(vae.encoder.parameters(), lr=LR)
        self.decoder_optim = torch.optim.Adam(vae.decoder.parameters(), lr=LR)

    def _backward(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        self.encoder_optim.zero_grad()
        self.decoder_optim.zero_grad()
        loss = torch_loss(self.vae, x, mask)
        loss.backward()
        return float(loss.detach())

    def inner_step(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        loss = self._backward(x, mask)
        self.encoder_optim.step()
        return loss

    def model_step(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        loss = self._backward(x, mask)
        self.decoder_optim.step()
        return loss

    def step(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        batch = (x, mask)
        for i in range(self.inner_steps):
            self.inner_step(*batch)
            if i + 1 < self.inner_steps:
                batch = self.sample()
        return self.model_step(x, mask)


def physical_inner_steps(
    vae: SentenceVAE, sample: Callable[[], Batch], count: int, recon: str, *, frozen: bool = True
) -> Callable[[], float]:
    """``count`` guide-only steps at their physical cost: encoder forward and backward, decoder
    forward, backward to the decoder's input only, an encoder Adam step. ``frozen``: the decoder's
    parameters do not require gradients (the definition); otherwise they do and the backward pass
    is told the encoder's parameters as its ``inputs`` (the forward then runs a joint step's kernels)."""
    encoder = list(vae.encoder.parameters())
    if frozen:
        for p in vae.decoder.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.Adam(encoder, lr=LR)

    def steps() -> float:
        for _ in range(count):
            optimizer.zero_grad()
            loss = torch_loss(vae, *sample(), recon=recon)
            loss.backward(inputs=None if frozen else encoder)
            optimizer.step()
        return float(loss.detach())

    return steps


def raw_joint_step(vae: SentenceVAE, x: torch.Tensor, mask: torch.Tensor) -> Callable[[], float]:
    """A plain-PyTorch joint step (Adam over every parameter): what one SVI step computes."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=LR)

    def step() -> float:
        optimizer.zero_grad()
        loss = torch_loss(vae, x, mask)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


# ----------------------------------------------------------------- the run


def baseline_class(folder: Path) -> type:
    """``AggressiveSVI`` from another copy of the ``pyro_lag`` package (another checkout's), loaded
    beside this one under the name ``pyro_lag_baseline``, to time two versions in one process."""
    spec = importlib.util.spec_from_file_location(
        "pyro_lag_baseline", folder / "__init__.py", submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no pyro_lag package in {folder}")
    package = importlib.util.module_from_spec(spec)
    sys.modules["pyro_lag_baseline"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("pyro_lag_baseline.svi").AggressiveSVI


def aggressive_svi(
    vae: SentenceVAE, sample: Callable[[], Batch], inner_steps: int, svi_class: type = AggressiveSVI
) -> AggressiveSVI:
    """AggressiveSVI as a user sets it up, held at exactly ``inner_steps`` inner steps (a window longer than the cap)."""
    return svi_class(
        vae.model, vae.guide, pyro.optim.Adam({"lr": LR}), TraceMeanField_ELBO(),
        guide_batches=sample, max_inner_steps=inner_steps, check_every=inner_steps + 1, mi_every=None,
    )


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.set_defaults(threads=2)
    p.add_argument("--vocab", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=20, help="longest sentence (tokens, with </s>); the shortest has 12")
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20, help="timed model steps per side; single steps: 3 x this")
    p.add_argument("--pool", type=int, default=16, help="distinct random batches the inner steps draw from")
    p.add_argument("--baseline", type=Path, default=None,
                   help="a pyro_lag package folder of another version (e.g. from `git worktree add`): "
                        "its AggressiveSVI is timed beside this one's")
    args: argparse.Namespace = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pyro.enable_validation(True)  # Pyro's default; said here so that the figures are with it on

    sizes = common.SIZES[args.size]
    batches = [(x.to(device), m.to(device)) for x, m in
               random_batches(args.vocab, args.batch_size, args.pool, args.max_tokens, args.seed)]
    x, mask = batches[0]
    draw = sampler(batches, args.seed + 100)  # model-step batches (all batches have one shape)
    torch.manual_seed(args.seed)
    base = SentenceVAE(args.vocab, sizes["ni"], sizes["enc_nh"], sizes["latent_dim"]).to(device)

    def copy_of(name: str, fused: bool = False) -> SentenceVAE:
        vae = copy.deepcopy(base)
        vae.fused, vae.name = fused, name
        return vae

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    paper = PaperLoop(copy_of("paper"), sampler(batches, args.seed), args.inner_steps)
    svi = aggressive_svi(copy_of("user"), sampler(batches, args.seed), args.inner_steps)
    fused_svi = aggressive_svi(copy_of("fused", fused=True), sampler(batches, args.seed), args.inner_steps)

    candidates = {
        "paper_loop": lambda: paper.step(*draw()),
        "aggressive_svi": lambda: svi.step(*draw()),
        "aggressive_svi_fused": lambda: fused_svi.step(*draw()),
    }
    if args.baseline is not None:
        older = baseline_class(args.baseline)
        base_svi = aggressive_svi(copy_of("baseline"), sampler(batches, args.seed), args.inner_steps, older)
        base_fused = aggressive_svi(copy_of("baseline_fused", fused=True), sampler(batches, args.seed),
                                    args.inner_steps, older)
        candidates["baseline_aggressive_svi"] = lambda: base_svi.step(*draw())
        candidates["baseline_aggressive_svi_fused"] = lambda: base_fused.step(*draw())

    # Per model step: the two aggressive loops, and AggressiveSVI on the fused likelihood.
    model_steps = common.interleaved(candidates, repeats=args.repeats, warmup=2, device=device)
    assert svi.last_inner_steps == fused_svi.last_inner_steps == args.inner_steps

    # Inner steps as users meet them: an inner loop of 10 (its first step on the given batch, the
    # later ones on fresh batches) against 10 physical guide-only steps and 10 of the paper's.
    n = args.inner_steps
    inner = common.interleaved({
        "aggressive_svi": lambda: svi._inner_loop(draw(), {}),
        "aggressive_svi_fused": lambda: fused_svi._inner_loop(draw(), {}),
        "physical": physical_inner_steps(copy_of("physical"), sampler(batches, 1), n, "cross_entropy"),
        "physical_user_densities": physical_inner_steps(copy_of("physical_user"), sampler(batches, 2), n, "user"),
        "physical_inputs_selected": physical_inner_steps(
            copy_of("physical_selected"), sampler(batches, 3), n, "cross_entropy", frozen=False),
        "paper": lambda: [paper.inner_step(*batch) for batch in (draw() for _ in range(n))],
    }, repeats=args.repeats, warmup=1, device=device)
    inner = {name: [t / n for t in times] for name, times in inner.items()}

    # Single steps on one batch: model-only steps, and plain SVI against plain PyTorch.
    plain_vae, plain_fused_vae = copy_of("plain"), copy_of("plain_fused", fused=True)
    plain_svi = SVI(plain_vae.model, plain_vae.guide, pyro.optim.Adam({"lr": LR}), TraceMeanField_ELBO())
    plain_fused_svi = SVI(plain_fused_vae.model, plain_fused_vae.guide, pyro.optim.Adam({"lr": LR}),
                          TraceMeanField_ELBO())
    single = common.interleaved({
        "svi_model_only_step": lambda: svi._model_step((x, mask), {}),
        "paper_model_step": lambda: paper.model_step(x, mask),
        "pyro_svi_step": lambda: plain_svi.step(x, mask),
        "pyro_svi_step_fused": lambda: plain_fused_svi.step(x, mask),
        "raw_step": raw_joint_step(copy_of("raw"), x, mask),
    }, repeats=3 * args.repeats, warmup=2, device=device)

    result = {
        "what": "AggressiveSVI on a user-written LSTM sentence VAE (pyro.module, plate, Normal.to_event, "
                "masked Categorical(logits), validation on, Adam, TraceMeanField_ELBO) against plain PyTorch",
        "torch_device": str(device),
        "vocab": args.vocab,
        "batch_shape": list(x.shape),
        "inner_steps_per_model_step": args.inner_steps,
        "per_model_step": {name: common.timing(t) for name, t in model_steps.items()},
        "per_inner_step": {name: common.timing(t) for name, t in inner.items()},
        "single_steps": {name: common.timing(t) for name, t in single.items()},
        "aggressive_over_paper_loop": common.ratio(model_steps["aggressive_svi"], model_steps["paper_loop"]),
        "aggressive_fused_over_paper_loop": common.ratio(model_steps["aggressive_svi_fused"], model_steps["paper_loop"]),
        "inner_over_physical": common.ratio(inner["aggressive_svi"], inner["physical"]),
        "inner_over_physical_user_densities": common.ratio(inner["aggressive_svi"], inner["physical_user_densities"]),
        "inner_over_physical_inputs_selected": common.ratio(inner["aggressive_svi"], inner["physical_inputs_selected"]),
        "fused_inner_over_physical": common.ratio(inner["aggressive_svi_fused"], inner["physical"]),
        "fused_inner_over_physical_inputs_selected": common.ratio(
            inner["aggressive_svi_fused"], inner["physical_inputs_selected"]),
        "inner_over_paper_inner": common.ratio(inner["aggressive_svi"], inner["paper"]),
        "physical_over_paper_inner": common.ratio(inner["physical"], inner["paper"]),
        "model_only_over_paper_model_step": common.ratio(single["svi_model_only_step"], single["paper_model_step"]),
        "svi_over_raw_step": common.ratio(single["pyro_svi_step"], single["raw_step"]),
        "fused_over_user_likelihood_model_step": common.ratio(
            model_steps["aggressive_svi_fused"], model_steps["aggressive_svi"]),
        "fused_over_user_likelihood_svi_step": common.ratio(single["pyro_svi_step_fused"], single["pyro_svi_step"]),
        "target": "AggressiveSVI per model step <= 0.8 x the paper's loop",
    }
    result["target_met"] = result["aggressive_over_paper_loop"]["median"] <= 0.8
    if args.baseline is not None:
        result["baseline"] = str(args.baseline)
        for kind in ("", "_fused"):
            result[f"baseline{kind}_over_paper_loop"] = common.ratio(
                model_steps[f"baseline_aggressive_svi{kind}"], model_steps["paper_loop"])
            result[f"current_over_baseline{kind}"] = common.ratio(
                model_steps[f"aggressive_svi{kind}"], model_steps[f"baseline_aggressive_svi{kind}"])
    path = common.save("user_model", result, args)
    for key in ("aggressive_over_paper_loop", "aggressive_fused_over_paper_loop", "inner_over_physical", "inner_over_physical_user_densities",
                "inner_over_physical_inputs_selected", "fused_inner_over_physical",
                "fused_inner_over_physical_inputs_selected", "inner_over_paper_inner", "physical_over_paper_inner",
                "model_only_over_paper_model_step", "svi_over_raw_step", "fused_over_user_likelihood_model_step",
                "fused_over_user_likelihood_svi_step"):
        r = result[key]
        print(f"{key:42s} {r['median']:.3f}  (IQR {r['q1']:.3f} - {r['q3']:.3f})")
    for key in ("baseline_over_paper_loop", "baseline_fused_over_paper_loop", "current_over_baseline",
                "current_over_baseline_fused"):
        if key in result:
            r = result[key]
            print(f"{key:42s} {r['median']:.3f}  (IQR {r['q1']:.3f} - {r['q3']:.3f})")
    print(f"written to {path}")
    return result




if __name__ == "__main__":
    main()
