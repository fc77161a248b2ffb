"""Real Pyro program shapes run unchanged under AggressiveSVI: each case is a program that once broke it.

The probe that splits parameters must run the program the way its loss does (particle plates,
enumeration, messenger guides), a program with nothing that can lag must train exactly as under
``pyro.infer.SVI``, and an invalid program must fail with Pyro's own error, not ours.
"""
from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.testing.rejection_gamma import ShapeAugmentedGamma
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, config_enumerate
from pyro.infer.autoguide import AutoNormal, AutoNormalMessenger
from pyro.optim import Adam, ClippedAdam

from pyro_lag import AggressiveSVI

D, K = 4, 3  # observation size, latent size


def data(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def fit(svi_class, model, guide, loss, *args, steps: int = 3, seed: int = 0, **svi_kwargs):
    """Train from a fixed seed; return the instance and a copy of every parameter."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = svi_class(model, guide, Adam({"lr": 0.05}), loss, **svi_kwargs)
    for _ in range(steps):
        svi.step(*args)
    store = pyro.get_param_store()
    return svi, {name: store[name].detach().clone() for name in store.keys()}


# --------------------------------------------------------------- programs with nothing to lag


def hierarchical_model(x):
    """Global and local latents, but no parameter in the model: its posterior never moves."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(D), 10.0).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=6) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x[idx])


def hierarchical_guide(x):
    mu_loc = pyro.param("mu_loc", torch.zeros(D))
    mu = pyro.sample("mu", dist.Normal(mu_loc, 1.0).to_event(1))
    a = pyro.param("a", torch.tensor(0.5))
    with pyro.plate("data", x.shape[0], subsample_size=6) as idx:
        pyro.sample("z", dist.Normal(a * x[idx] + (1 - a) * mu, 0.7).to_event(1))


def test_model_without_parameters_trains_exactly_as_svi():
    """Nothing can lag behind a model without parameters: no inner loop, and the probe draws no random number."""
    x = data()
    plain_svi, plain = fit(SVI, hierarchical_model, hierarchical_guide, Trace_ELBO(), x, steps=4)
    svi, ours = fit(AggressiveSVI, hierarchical_model, hierarchical_guide, Trace_ELBO(), x, steps=4)
    assert svi.aggressive is False and svi.last_inner_steps == 0
    assert "model has no parameters" in svi.plain_reason
    assert set(ours) == set(plain)
    for name in plain:
        assert torch.equal(ours[name], plain[name]), name


def test_guide_whose_parameters_are_all_the_models_trains_as_svi():
    """A parameter read by model and guide is the model's; with no other, inner steps have nothing to train."""

    def model(x):
        w = pyro.param("w", torch.ones(K, D))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(K), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w, 1.0).to_event(1), obs=x)

    def guide(x):
        w = pyro.param("w", torch.ones(K, D))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ w.T / D, 1.0).to_event(1))

    x = data()
    _, plain = fit(SVI, model, guide, Trace_ELBO(), x)
    svi, ours = fit(AggressiveSVI, model, guide, Trace_ELBO(), x)
    assert svi.aggressive is False and "guide has no parameters" in svi.plain_reason
    assert torch.equal(ours["w"], plain["w"])


def test_particle_plate_is_not_a_data_plate():
    """vectorize_particles wraps every site in a plate; a global-latent guide must still count as global."""

    def model(x):
        loc = pyro.param("loc", torch.zeros(D))
        mu = pyro.sample("mu", dist.Normal(loc, 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("mu_loc", torch.zeros(D)), 0.5).to_event(1))

    elbo = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    svi, _ = fit(AggressiveSVI, model, guide, elbo, data(), steps=1)
    assert svi.param_split.has_local_latent is False and svi.aggressive is False


# ------------------------------------------------------------ invalid programs: Pyro's own errors


def mismatched_guide(x):
    """The model's z has event shape (K,); this guide's has (K, 1)."""
    enc = pyro.param("enc", torch.ones(D, K) / D)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal((x @ enc).unsqueeze(-1), 1.0).to_event(2))


def decoder_model(x):
    w = pyro.param("w", torch.ones(K, D))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(K), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ w, 1.0).to_event(1), obs=x)


def shape_checked_model(x):
    """Valid on its own; the model/guide shape check is what must fail."""
    w = pyro.param("w", torch.ones(D))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(K), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(w * x.mean(), 1.0).to_event(1), obs=x)


def clashing_model(x):
    decoder_model(x)
    pyro.sample("z", dist.Normal(0.0, 1.0))


def encoder_guide(x):
    enc = pyro.param("enc", torch.ones(D, K) / D)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ enc, 1.0).to_event(1))


@pytest.mark.parametrize(
    "model,guide,error,match",
    [
        (shape_checked_model, mismatched_guide, ValueError, "event_dims disagree"),
        (clashing_model, encoder_guide, RuntimeError, "Multiple sample sites named"),
    ],
    ids=["shape-mismatch", "name-clash"],
)
def test_invalid_program_fails_with_pyros_own_error(model, guide, error, match):
    x = data()
    pyro.clear_param_store()
    with pytest.raises(error, match=match) as under_svi:
        SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO()).step(x)
    pyro.clear_param_store()
    svi = AggressiveSVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    with pytest.raises(error, match=match) as under_ours:
        svi.step(x)
    assert str(under_ours.value) == str(under_svi.value)


def test_program_the_probe_cannot_run_trains_as_svi():
    """A custom loss callable that feeds model and guide an extra argument: the probe, calling them as
    SVI's step is called, fails; the program must still train, exactly as under SVI."""

    def model(x, noise):
        w = pyro.param("w", torch.ones(K, D))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(K), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w, noise).to_event(1), obs=x)

    def guide(x, noise):
        enc = pyro.param("enc", torch.ones(D, K) / D)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ enc, noise).to_event(1))

    def loss(model, guide, x):
        return Trace_ELBO().differentiable_loss(model, guide, x, 0.5)

    x = data()
    _, plain = fit(SVI, model, guide, loss, x)
    svi, ours = fit(AggressiveSVI, model, guide, loss, x)
    assert svi.aggressive is False and "probe failed (TypeError" in svi.plain_reason
    for name in plain:
        assert torch.equal(ours[name], plain[name]), name


def test_lazily_initialized_autoguide_trains_exactly_as_svi():
    """An AutoGuide draws its initial values on its first call: the first step must draw them as SVI does."""

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    x = data()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model, init_loc_fn=pyro.infer.autoguide.init_to_sample)
    _, plain = fit(SVI, model, guide, Trace_ELBO(), x, steps=3)
    guide = AutoNormal(model, init_loc_fn=pyro.infer.autoguide.init_to_sample)
    svi, ours = fit(AggressiveSVI, model, guide, Trace_ELBO(), x, steps=3)
    assert svi.aggressive is False
    for name in plain:
        assert torch.equal(ours[name], plain[name]), name


def test_loss_warnings_reach_the_caller_as_under_svi():
    """The probe is silent; the step itself warns exactly where Pyro warns (TraceEnum without enumeration)."""
    x = data()
    for svi_class in (SVI, AggressiveSVI):
        pyro.clear_param_store()
        svi = svi_class(decoder_model, encoder_guide, Adam({"lr": 0.01}), TraceEnum_ELBO(max_plate_nesting=1),
                        **({"max_inner_steps": 2, "check_every": 1} if svi_class is AggressiveSVI else {}))
        with pytest.warns(UserWarning, match="found no sample sites configured for enumeration"):
            svi.step(x)


# ----------------------------------------- programs that train aggressively: the probe runs them as the loss does


class Encoder(torch.nn.Module):
    def __init__(self, out: int):
        super().__init__()
        self.net = torch.nn.Linear(D, out)

    def forward(self, x):
        return self.net(x)


def test_model_asserting_particle_shapes_probes_inside_the_particle_plate():
    """A model that checks the particle plate's shape (Pyro's test_vectorized_num_particles) must be probed inside it."""
    encoder = Encoder(K)
    num_particles = 4

    def model(x):
        w = pyro.param("w", torch.ones(K, D))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(K), 1.0).to_event(1))
            assert z.shape == (num_particles, x.shape[0], K)
            pyro.sample("x", dist.Normal(z @ w, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(encoder(x), 1.0).to_event(1))

    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    svi, _ = fit(AggressiveSVI, model, guide, elbo, data(), steps=2, max_inner_steps=3, check_every=1)
    assert svi.aggressive and svi.plain_reason is None and svi.last_inner_steps > 0
    assert set(svi.param_split.model) == {"w"}
    assert set(svi.param_split.guide) == {"encoder$$$net.weight", "encoder$$$net.bias"}


def test_enumerated_discrete_local_latent_trains_aggressively():
    """A semi-supervised-VAE shape: parallel-enumerated class y and continuous z per data point, TraceEnum_ELBO."""
    classifier, encoder = Encoder(2), Encoder(K)
    decoder = torch.nn.Linear(K + 2, D)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.OneHotCategorical(logits=torch.zeros(2)))
            z = pyro.sample("z", dist.Normal(torch.zeros(K), 1.0).to_event(1))
            batch = torch.broadcast_shapes(y.shape[:-1], z.shape[:-1])
            hidden = torch.cat([z.expand(batch + (K,)), y.expand(batch + (2,))], -1)
            pyro.sample("x", dist.Normal(decoder(hidden), 1.0).to_event(1), obs=x)

    @config_enumerate
    def guide(x):
        pyro.module("classifier", classifier)
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.OneHotCategorical(logits=classifier(x)))
            assert y.shape == (2, 1, 2)  # enumerated, as the loss runs the guide
            pyro.sample("z", dist.Normal(encoder(x), 1.0).to_event(1))

    svi, _ = fit(AggressiveSVI, model, guide, TraceEnum_ELBO(max_plate_nesting=1), data(), steps=2,
                 max_inner_steps=3, check_every=1)
    assert svi.aggressive and svi.last_inner_steps > 0
    assert {n.split("$$$")[0] for n in svi.param_split.model} == {"decoder"}
    assert {n.split("$$$")[0] for n in svi.param_split.guide} == {"classifier", "encoder"}


def test_messenger_autoguide_split():
    """AutoNormalMessenger runs the model inside the guide; model pyro.params stay the model's."""

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("batch", x.shape[0]):
            sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(loc, sigma), obs=x[:, 0])

    guide = AutoNormalMessenger(model)
    svi, _ = fit(AggressiveSVI, model, guide, Trace_ELBO(), data(), steps=2, max_inner_steps=3, check_every=1)
    assert svi.aggressive and set(svi.param_split.model) == {"loc"}
    assert set(svi.param_split.guide) == {"locs.sigma", "scales.sigma"}


def test_deep_markov_model_shape():
    """Pyro's DMM example: one module registered whole in model and guide, KL annealing by poutine.scale
    passed as a keyword, pyro.markov over time, a mask on padded steps, TraceGraph-free Trace_ELBO, ClippedAdam."""
    T = 3

    class DMM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trans = torch.nn.Linear(K, K)
            self.emit = torch.nn.Linear(K, D)
            self.combine = torch.nn.Linear(K + D, 2 * K)

        def model(self, seq, mask, annealing_factor=1.0):
            pyro.module("dmm", self)
            z = torch.zeros(seq.shape[0], K)
            with pyro.plate("z_minibatch", seq.shape[0]):
                for t in pyro.markov(range(T)):
                    with poutine.scale(scale=annealing_factor):
                        z = pyro.sample(f"z_{t}", dist.Normal(self.trans(z), 1.0).mask(mask[:, t:t + 1]).to_event(1))
                    pyro.sample(f"x_{t}", dist.Normal(self.emit(z), 1.0).mask(mask[:, t:t + 1]).to_event(1),
                                obs=seq[:, t])

        def guide(self, seq, mask, annealing_factor=1.0):
            pyro.module("dmm", self)
            z = torch.zeros(seq.shape[0], K)
            with pyro.plate("z_minibatch", seq.shape[0]):
                for t in pyro.markov(range(T)):
                    loc, log_scale = self.combine(torch.cat([z, seq[:, t]], -1)).chunk(2, -1)
                    with poutine.scale(scale=annealing_factor):
                        z = pyro.sample(f"z_{t}", dist.Normal(loc, log_scale.exp()).mask(mask[:, t:t + 1]).to_event(1))

    dmm = DMM()
    seq = torch.randn(5, T, D, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(5, T, dtype=torch.bool)
    mask[0, -1] = False
    pyro.clear_param_store()
    svi = AggressiveSVI(dmm.model, dmm.guide, ClippedAdam({"lr": 0.01, "clip_norm": 10.0}), Trace_ELBO(),
                        max_inner_steps=3, check_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for factor in (0.2, 0.4):
            loss = svi.step(seq, mask, annealing_factor=factor)
    assert svi.aggressive and svi.last_inner_steps > 0 and torch.isfinite(torch.tensor(loss))
    assert {n.split(".")[0] for n in svi.param_split.model} == {"dmm$$$trans", "dmm$$$emit"}
    assert {n.split(".")[0] for n in svi.param_split.guide} == {"dmm$$$combine"}


def test_tracegraph_program_with_autonormal_local_latents():
    """AutoNormal with a local latent and a model parameter, under TraceGraph_ELBO: trains aggressively."""

    def model(x):
        scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, scale).to_event(1), obs=x)

    guide = AutoNormal(model)
    svi, _ = fit(AggressiveSVI, model, guide, TraceGraph_ELBO(), data(), steps=2, max_inner_steps=3, check_every=1)
    assert svi.aggressive and set(svi.param_split.model) == {"scale"}
    assert set(svi.param_split.guide) == {"AutoNormal.locs.z", "AutoNormal.scales.z"}


def test_rejection_sampled_local_latent_trains_aggressively():
    """A rejection sampler scores only the very tensor it drew: the probe must leave the guide's draws alone."""

    def model(x):
        rate = pyro.param("rate", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            lam = pyro.sample("lam", dist.Gamma(2.0, rate))
            pyro.sample("x", dist.Exponential(lam), obs=x)

    def guide(x):
        alpha = pyro.param("alpha", torch.full((x.shape[0],), 2.0), constraint=dist.constraints.positive)
        beta = pyro.param("beta", torch.full((x.shape[0],), 1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("lam", ShapeAugmentedGamma(alpha, beta))

    x = torch.rand(8, generator=torch.Generator().manual_seed(2)) + 0.1
    svi, _ = fit(AggressiveSVI, model, guide, Trace_ELBO(), x, steps=2, max_inner_steps=3, check_every=1)
    assert svi.aggressive and svi.plain_reason is None
    assert set(svi.param_split.model) == {"rate"} and set(svi.param_split.guide) == {"alpha", "beta"}
