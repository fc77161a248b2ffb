"""AggressiveSVI's fast paths: one-sided backward passes, validation on the first inner step of a
loop and on model steps only, no norm bookkeeping without clipping; the fused text likelihood."""
from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from pyro_lag import AggressiveSVI
from pyro_lag.distributions import NextTokenCategorical
from pyro_lag.engine.side_gradients import differentiable_loss_of

V, E, H, Z = 30, 8, 12, 3  # vocabulary, embedding, LSTM state, latent


class TextVAE(torch.nn.Module):
    """A user-written sentence VAE: the decoder's output layer reads a batch-first LSTM's output."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        self.enc_embed = torch.nn.Embedding(V, E)
        self.enc_lstm = torch.nn.LSTM(E, H, batch_first=True)
        self.enc_out = torch.nn.Linear(H, 2 * Z)
        self.decoder = torch.nn.ModuleDict({
            "embed": torch.nn.Embedding(V, E), "lstm": torch.nn.LSTM(E + Z, H, batch_first=True),
            "out": torch.nn.Linear(H, V),
        })

    def encoder_modules(self) -> torch.nn.ModuleList:
        return torch.nn.ModuleList([self.enc_embed, self.enc_lstm, self.enc_out])

    def model(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        dec = self.decoder
        with pyro.plate("sentences", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], Z), 1.0).to_event(1))
            tokens = x[:, :-1]
            inputs = torch.cat([dec["embed"](tokens), z.unsqueeze(1).expand(-1, tokens.shape[1], -1)], -1)
            logits = dec["out"](dec["lstm"](inputs)[0])
            likelihood = NextTokenCategorical(logits) if self.fused else dist.Categorical(logits=logits)
            pyro.sample("tokens", likelihood.mask(mask).to_event(1), obs=x[:, 1:])

    def guide(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder_modules())
        with pyro.plate("sentences", x.shape[0]):
            _, (h, _) = self.enc_lstm(self.enc_embed(x))
            loc, log_scale = self.enc_out(h[-1]).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def text_batches(count: int = 4, size: int = 6, length: int = 9) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(count):
        x = torch.randint(3, V, (size, length), generator=g)
        lengths = torch.randint(3, length, (size,), generator=g)
        batches.append((x, torch.arange(length - 1)[None, :] < lengths[:, None]))
    return batches


def make_svi(vae: TextVAE, batches, svi_class=AggressiveSVI, **options) -> AggressiveSVI:
    draws = iter(range(10**6))
    options = {"max_inner_steps": 4, "check_every": 5, "mi_every": None, **options}
    return svi_class(vae.model, vae.guide, Adam({"lr": 1e-2}), TraceMeanField_ELBO(),
                     guide_batches=lambda: batches[next(draws) % len(batches)], **options)


def train(svi_class=AggressiveSVI, steps: int = 3, fused: bool = False, **options) -> dict[str, torch.Tensor]:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    vae = TextVAE(fused)
    batches = text_batches()
    svi = make_svi(vae, batches, svi_class, **options)
    for i in range(steps):
        svi.step(*batches[i % len(batches)])
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


class FrozenSVI(AggressiveSVI):
    """The one-sided step as it was: the other side's parameters with ``requires_grad=False``."""

    def _loss_and_grads(self, args, kwargs, kind="joint", without=()):
        without = list(without)
        switched = [t for t in without if t.requires_grad]
        for t in switched:
            t.requires_grad_(False)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not registered in the param store")
                loss, params = super()._loss_and_grads(args, kwargs, kind)
        finally:
            for t in switched:
                t.requires_grad_(True)
        excluded = {id(t) for t in without}
        return loss, {n: p for n, p in params.items() if id(p) not in excluded}


# ------------------------------------------------------------------ one-sided backward passes


@pytest.mark.parametrize("options", [{}, {"clip_norm": 1.0, "clip_scope": "joint"},
                                     {"clip_norm": 1.0, "clip_scope": "separate"}],
                         ids=["no-clip", "joint", "separate"])
def test_one_sided_steps_update_as_with_frozen_parameters(options):
    """Selecting the backward pass's inputs gives bitwise the updates of freezing the other side."""
    ours, frozen = train(**options), train(FrozenSVI, **options)
    assert set(ours) == set(frozen)
    for name in ours:
        assert torch.equal(ours[name], frozen[name]), name


@pytest.mark.parametrize("side", ["guide", "model"])
def test_one_sided_gradients_equal_those_of_a_full_backward(side):
    vae = TextVAE()
    batches = text_batches()
    svi = make_svi(vae, batches)
    split = svi.split_params(*batches[0])
    stepped, other = (split.guide, split.model) if side == "guide" else (split.model, split.guide)

    pyro.set_rng_seed(3)
    svi._loss_and_grads(batches[0], {})
    full = {n: p.grad.clone() for n, p in stepped.items()}
    for p in list(stepped.values()) + list(other.values()):
        p.grad = None

    pyro.set_rng_seed(3)
    _, params = svi._loss_and_grads(batches[0], {}, "inner" if side == "guide" else "model", other.values())
    assert set(params) == set(stepped)
    for name, p in stepped.items():
        assert torch.equal(p.grad, full[name]), name
    for name, p in other.items():
        assert p.grad is None, f"{name} got a gradient"


@pytest.mark.parametrize("loss, separable", [
    (Trace_ELBO(), True), (TraceMeanField_ELBO(), True), (TraceEnum_ELBO(), True),
    (JitTrace_ELBO(), False), (TraceGraph_ELBO(), False),
], ids=["trace", "mean-field", "enum", "jit", "graph"])
def test_only_pyros_own_separable_losses_are_taken_apart(loss, separable):
    """Pyro's loss_and_grads that is differentiable_loss + backward is split; others freeze instead."""
    assert (differentiable_loss_of(loss) is not None) == separable
    assert differentiable_loss_of(loss, loss_and_grads=lambda *a, **k: 0.0) is None

    class Custom(TraceMeanField_ELBO):
        def loss_and_grads(self, model, guide, *args, **kwargs):
            return super().loss_and_grads(model, guide, *args, **kwargs)

    assert differentiable_loss_of(Custom()) is None


def test_loss_that_differentiates_by_itself_still_trains_one_side():
    """A custom loss_and_grads differentiates by itself: the other side is frozen for it, so it
    gets no gradient, and the updates are those of the default path."""

    def by_tensor_backward(model, guide, *args, **kwargs):
        loss = TraceMeanField_ELBO().differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()

    def by_autograd_backward(model, guide, *args, **kwargs):
        loss = TraceMeanField_ELBO().differentiable_loss(model, guide, *args, **kwargs)
        torch.autograd.backward(loss)
        return loss.item()

    results = [train(loss_and_grads=fn) for fn in (by_tensor_backward, by_autograd_backward)]
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name

    vae = TextVAE()
    batches = text_batches()
    svi = make_svi(vae, batches, loss_and_grads=by_autograd_backward)
    svi.split_params(*batches[0])
    svi.inner_step(*batches[0])
    assert all(p.grad is None for p in svi.param_split.model.values())


# ------------------------------------------------------------------ validation


def flags() -> tuple[bool, bool, bool]:
    return (pyro.infer.is_validation_enabled(), pyro.distributions.is_validation_enabled(),
            bool(torch.distributions.Distribution._validate_args))


def test_validation_runs_on_the_first_inner_step_of_a_loop_and_on_model_steps():
    vae = TextVAE()
    batches = text_batches()
    seen = []

    def model(x, mask):
        seen.append(flags())
        vae.model(x, mask)

    svi = make_svi(vae, batches)
    svi.model = model
    svi.split_params(*batches[0])
    with pyro.validation_enabled(True):
        seen.clear()
        svi.step(*batches[0])
        assert flags() == (True, True, True)
    assert [all(f) for f in seen] == [True, False, False, False, True]
    assert not any(any(f) for f in seen[1:4])


def test_validation_flags_are_restored_as_they_were():
    """Torch's own default is restored too, also when it differs from Pyro's and when a step fails."""
    vae = TextVAE()
    batches = text_batches()
    svi = make_svi(vae, batches)
    svi.split_params(*batches[0])
    torch_default = torch.distributions.Distribution._validate_args
    try:
        with pyro.validation_enabled(True):
            torch.distributions.Distribution.set_default_validate_args(False)
            svi.step(*batches[0])
            assert flags() == (True, True, False)

            calls = []
            inner_step = svi.inner_step

            def failing_second_step(*args, **kwargs):
                calls.append(flags())
                if len(calls) == 2:
                    raise RuntimeError("boom")
                return inner_step(*args, **kwargs)

            svi.inner_step = failing_second_step
            with pytest.raises(RuntimeError, match="boom"):
                svi.step(*batches[0])
            assert calls[1] == (False, False, False)
            assert flags() == (True, True, False)
    finally:
        torch.distributions.Distribution.set_default_validate_args(torch_default)


def bernoulli_pair(scale_sign: float = 1.0):
    encoder = torch.nn.Linear(4, 2)
    decoder = torch.nn.Linear(1, 4)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, scale_sign * log_scale.exp()).to_event(1))

    return model, guide


def test_invalid_values_still_fail_with_pyros_error():
    """Values outside a distribution's support fail at the program's first step and at any model step."""
    model, guide = bernoulli_pair()
    valid = torch.ones(8, 4)
    invalid = torch.full((8, 4), 0.5)  # not in Bernoulli's support
    with pyro.validation_enabled(True):
        svi = AggressiveSVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO(), guide_batches=[valid, invalid],
                            max_inner_steps=3, check_every=4, mi_every=None)
        with pytest.raises(ValueError, match="support"):
            svi.step(invalid)  # the first step: as under SVI
        svi.step(valid)  # inner steps after the first draw the invalid batch unchecked
        with pytest.raises(ValueError, match="support"):
            svi.step(invalid)  # the first inner step of the loop
        svi.inner_step = lambda *args, **kwargs: 0.0
        with pytest.raises(ValueError, match="support"):
            svi.step(invalid)  # the model step


def test_invalid_parameters_still_fail_at_the_first_step():
    model, guide = bernoulli_pair(scale_sign=-1.0)
    with pyro.validation_enabled(True):
        svi = AggressiveSVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO(), mi_every=None)
        with pytest.raises(ValueError, match="scale"):
            svi.step(torch.ones(8, 4))


def test_skipping_validation_changes_no_number():
    with pyro.validation_enabled(True):
        checked = train()
    with pyro.validation_enabled(False):
        unchecked = train()
    for name in checked:
        assert torch.equal(checked[name], unchecked[name]), name


def test_no_norms_are_kept_without_clipping():
    vae = TextVAE()
    batches = text_batches()
    svi = make_svi(vae, batches)
    svi.step(*batches[0])
    assert svi.state_dict()["clip_norms"] == {"guide": None, "model": None}
    clipped = make_svi(vae, batches, clip_norm=1.0, clip_scope="separate")
    clipped.step(*batches[0])
    assert all(v is not None for v in clipped.state_dict()["clip_norms"].values())


# ------------------------------------------------------------------ the fused text likelihood


def test_next_token_categorical_scores_as_categorical():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 6, 50, generator=g)  # particles, batch, length, vocabulary
    tokens = torch.randint(0, 50, (4, 6), generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    fused = NextTokenCategorical(logits, validate_args=True)
    reference = dist.Categorical(logits=logits)
    torch.testing.assert_close(fused.log_prob(tokens), reference.log_prob(tokens), rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.mask(mask).to_event(1).log_prob(tokens),
                               reference.mask(mask).to_event(1).log_prob(tokens), rtol=0, atol=1e-4)
    assert fused.expand((2, 3, 4, 6)).log_prob(tokens).shape == (2, 3, 4, 6)
    assert fused.sample((5,)).shape == (5, 3, 4, 6)
    with pytest.raises(ValueError):
        fused.log_prob(torch.full((4, 6), 50))  # outside the vocabulary


def test_next_token_categorical_gradients_as_categorical():
    logits = torch.randn(4, 6, 20, generator=torch.Generator().manual_seed(1), requires_grad=True)
    tokens = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(2))
    (g_fused,) = torch.autograd.grad(NextTokenCategorical(logits).log_prob(tokens).sum(), logits)
    (g_ref,) = torch.autograd.grad(dist.Categorical(logits=logits).log_prob(tokens).sum(), logits)
    torch.testing.assert_close(g_fused, g_ref, rtol=0, atol=1e-6)


def test_next_token_categorical_in_a_program_and_in_models():
    from pyro_lag.models import lstm_text

    assert lstm_text.NextTokenCategorical is NextTokenCategorical
    user, fused = train(steps=1), train(steps=1, fused=True)
    for name in user:
        torch.testing.assert_close(user[name], fused[name], rtol=0, atol=1e-4)
