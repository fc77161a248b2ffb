"""AggressiveSVI: parameter split, frozen model during inner steps, stop rules, ELBO classes, drop-in use."""
from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam
from pyro.optim import SGD, Adam, ClippedAdam

from pyro_lag import AggressiveSVI, InnerLoopStopper

D, d, N = 6, 2, 64


def data(n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    W = torch.randn(D, d, generator=torch.Generator().manual_seed(99))
    return z @ W.T + 0.3 * torch.randn(n, D, generator=g)


class VAE(torch.nn.Module):
    """A plain VAE: encoder registered in the guide, decoder in the model."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2 * d))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, D))

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc, log_scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


class SharedVAE(VAE):
    """One module registered whole in both model and guide, as Pyro's deep Markov model example does."""

    def model(self, x):
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("vae", self)
        loc, log_scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def param_model(x):
    """A linear decoder held in pyro.param statements only."""
    w = pyro.param("w", torch.full((d, D), 0.1))
    noise = pyro.param("noise", torch.tensor(0.5), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ w, noise).to_event(1), obs=x)


def param_guide(x):
    """An amortized linear encoder held in pyro.param statements only."""
    a = pyro.param("enc_a", torch.full((D, d), 0.05))
    s = pyro.param("enc_s", torch.ones(d), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ a, s).to_event(1))


def module_names(prefix, module):
    return {f"{prefix}$$${n}" for n, _ in module.named_parameters()}


def snapshot(names):
    store = pyro.get_param_store()
    return {n: store.get_param(n).detach().clone() for n in names}


def same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def moved(a, b):
    return all(not torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------ parameter split


def test_split_plain_vae():
    vae = VAE()
    svi = AggressiveSVI(vae.model, vae.guide, Adam({"lr": 1e-2}), Trace_ELBO())
    split = svi.split_params(data())
    assert set(split.guide) == module_names("encoder", vae.encoder)
    assert set(split.model) == module_names("decoder", vae.decoder)
    assert not split.other


def test_split_one_module_registered_in_model_and_guide():
    vae = SharedVAE()
    svi = AggressiveSVI(vae.model, vae.guide, Adam({"lr": 1e-2}), Trace_ELBO())
    split = svi.split_params(data())
    assert set(split.guide) == {f"vae$$$encoder.{n}" for n, _ in vae.encoder.named_parameters()}
    assert set(split.model) == {f"vae$$$decoder.{n}" for n, _ in vae.decoder.named_parameters()}


def test_split_autonormal_guide():
    vae = VAE()
    guide = AutoNormal(vae.model)
    svi = AggressiveSVI(vae.model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    split = svi.split_params(data())
    assert set(split.guide) == {"AutoNormal.locs.z", "AutoNormal.scales.z"}
    assert set(split.model) == module_names("decoder", vae.decoder)


def test_split_pyro_param_only():
    svi = AggressiveSVI(param_model, param_guide, Adam({"lr": 1e-2}), Trace_ELBO())
    split = svi.split_params(data())
    assert set(split.guide) == {"enc_a", "enc_s"}
    assert set(split.model) == {"w", "noise"}


def test_split_pyromodule_parameters():
    class Decoder(PyroModule):
        def __init__(self):
            super().__init__()
            self.w = PyroParam(torch.full((d, D), 0.1))

        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z @ self.w, 0.5).to_event(1), obs=x)

    model = Decoder()
    svi = AggressiveSVI(model, param_guide, Adam({"lr": 1e-2}), Trace_ELBO())
    split = svi.split_params(data())
    assert set(split.model) == {"w"}
    assert set(split.guide) == {"enc_a", "enc_s"}


def test_split_override_by_name_and_module():
    vae = VAE()
    svi = AggressiveSVI(
        vae.model, vae.guide, Adam({"lr": 1e-2}), Trace_ELBO(),
        model_params=[vae.encoder[0]], guide_params=["decoder$$$2.*"],
    )
    split = svi.split_params(data())
    assert {"encoder$$$0.weight", "encoder$$$0.bias"} <= set(split.model)
    assert {"decoder$$$2.weight", "decoder$$$2.bias"} <= set(split.guide)
    assert "decoder$$$0.weight" in split.model


# ------------------------------------------------------------ frozen parameters


@pytest.mark.parametrize("pair", ["plain", "shared", "autonormal", "param"])
def test_inner_steps_freeze_model_and_outer_step_freezes_guide(pair):
    x = data()
    if pair == "param":
        model, guide = param_model, param_guide
    else:
        vae = SharedVAE() if pair == "shared" else VAE()
        model = vae.model
        guide = AutoNormal(vae.model) if pair == "autonormal" else vae.guide
    svi = AggressiveSVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO(), max_inner_steps=5)
    split = svi.split_params(x)
    model_names, guide_names = list(split.model), list(split.guide)
    assert model_names and guide_names

    store = pyro.get_param_store()
    touched = []
    for name in model_names:
        store.get_param(name).unconstrained().register_hook(lambda g, n=name: touched.append(n))
    before = snapshot(model_names + guide_names)
    for _ in range(5):
        svi.inner_step(x)
    after_inner = snapshot(model_names + guide_names)
    assert touched == [], "an inner step computed a gradient for a model parameter"
    assert same({n: before[n] for n in model_names}, {n: after_inner[n] for n in model_names})
    assert moved({n: before[n] for n in guide_names}, {n: after_inner[n] for n in guide_names})
    for name in model_names + guide_names:  # dropped, not zero-filled: nothing to allocate next step
        assert store.get_param(name).unconstrained().grad is None, f"gradient left on {name}"

    # An aggressive step whose inner loop does nothing: the outer step moves the model only.
    svi.inner_step = lambda *a, **k: 0.0
    svi.max_inner_steps = 1
    svi.step(x)
    after_outer = snapshot(model_names + guide_names)
    assert same({n: after_inner[n] for n in guide_names}, {n: after_outer[n] for n in guide_names})
    assert moved({n: after_inner[n] for n in model_names}, {n: after_outer[n] for n in model_names})

    svi.stop_aggressive()
    svi.step(x)
    after_joint = snapshot(model_names + guide_names)
    assert moved(after_outer, after_joint)
    assert svi.last_inner_steps == 0


def test_full_aggressive_step_runs_inner_loop_then_model_step():
    vae = VAE()
    x = data()
    svi = AggressiveSVI(vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO(),
                        guide_batches=[data(16, s) for s in range(3)], check_every=3, max_inner_steps=12)
    loss = svi.step(x)
    assert isinstance(loss, float)
    assert 3 <= svi.last_inner_steps <= 12


def test_separate_guide_optimizer_and_clipping():
    vae = VAE()
    x = data()
    guide_optim = SGD({"lr": 0.1})
    model_optim = Adam({"lr": 1e-2})
    svi = AggressiveSVI(vae.model, vae.guide, model_optim, Trace_ELBO(),
                        guide_optim=guide_optim, clip_norm=1.0, max_inner_steps=3, check_every=3)
    svi.step(x)
    guide_tensors = set(guide_optim.optim_objs)
    model_tensors = set(model_optim.optim_objs)
    split = svi.param_split
    assert guide_tensors == {p for p in split.guide.values()}
    assert model_tensors == {p for p in split.model.values()}
    svi.stop_aggressive()
    svi.step(x)  # joint step keeps the two optimizers apart
    assert set(guide_optim.optim_objs) == guide_tensors
    assert set(model_optim.optim_objs) == model_tensors


def test_separate_clip_norm_bounds_the_update():
    """With SGD lr 1 and each side clipped alone, one guide update's norm equals the clip norm."""
    x = data()
    svi = AggressiveSVI(param_model, param_guide, SGD({"lr": 1.0}), Trace_ELBO(),
                        clip_norm=1e-3, clip_scope="separate", max_inner_steps=1)
    svi.split_params(x)
    tensors = svi.param_split.guide
    before = {n: t.detach().clone() for n, t in tensors.items()}
    svi.inner_step(x)
    change = torch.sqrt(sum(((tensors[n].detach() - before[n]) ** 2).sum() for n in tensors))
    assert float(change) == pytest.approx(1e-3, rel=1e-3)


# ------------------------------------------------------------------ stop rules


def test_inner_loop_stopper_on_scripted_losses():
    stopper = InnerLoopStopper(check_every=3, max_steps=100)
    losses = [9, 9, 9, 6, 6, 6, 5, 5, 5, 7, 7, 7, 1, 1, 1]
    for loss in losses:
        if stopper.update(loss, count=2.0):
            break
    assert stopper.steps == 12  # the 4th window (3.5 per unit) is worse than the 3rd (2.5)


def test_inner_loop_stopper_equal_window_continues_and_max_steps_stops():
    stopper = InnerLoopStopper(check_every=2, max_steps=7)
    results = [stopper.update(1.0) for _ in range(7)]
    assert results == [False] * 6 + [True]


def test_inner_loop_uses_fresh_batches_and_scripted_losses():
    vae = VAE()
    x = data(8)
    fresh = [data(8, s) for s in range(100, 140)]
    seen = []
    script = iter([5.0, 5.0, 4.0, 4.0, 4.5, 4.5, 3.0, 3.0])
    svi = AggressiveSVI(vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO(),
                        guide_batches=lambda: fresh[len(seen) % len(fresh)], check_every=2)

    def scripted_inner_step(batch):
        seen.append(batch)
        return next(script)

    svi.split_params(x)
    svi.inner_step = scripted_inner_step
    svi.step(x)
    assert svi.last_inner_steps == 6  # windows of 16 examples: 0.625, 0.5, then 0.5625 is worse: stop
    assert seen[0] is x  # the first inner step uses the current batch
    assert all(b.shape[0] == 8 for b in seen[1:])


def test_observe_mi_paper_rule():
    svi = AggressiveSVI(param_model, param_guide, Adam({"lr": 1e-2}), Trace_ELBO(), stop_rule="paper")
    assert svi.observe_mi(0.5) is True
    assert svi.observe_mi(0.9) is True
    assert svi.observe_mi(0.8) is False
    assert svi.aggressive is False
    assert svi.observe_mi(2.0) is False  # once off, for good


def test_observe_mi_paper_rule_first_value_against_zero():
    svi = AggressiveSVI(param_model, param_guide, Adam({"lr": 1e-2}), Trace_ELBO(), stop_rule="paper")
    assert svi.observe_mi(-0.01) is False


def test_observe_mi_patience_rule():
    svi = AggressiveSVI(param_model, param_guide, Adam({"lr": 1e-2}), Trace_ELBO(),
                        stop_rule="patience", patience=3)
    assert [svi.observe_mi(v) for v in [0.1, 0.3, 0.2, 0.25, 0.4, 0.3, 0.3]] == [True] * 7
    assert svi.observe_mi(0.35) is False


def test_state_dict_round_trip():
    svi = AggressiveSVI(param_model, param_guide, Adam({"lr": 1e-2}), Trace_ELBO(), stop_rule="patience")
    for v in (0.1, 0.3, 0.2):
        svi.observe_mi(v)
    other = AggressiveSVI(param_model, param_guide, Adam({"lr": 1e-2}), Trace_ELBO(), stop_rule="patience")
    other.load_state_dict(svi.state_dict())
    assert other.state_dict() == svi.state_dict()


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="stop_rule"):
        AggressiveSVI(param_model, param_guide, Adam({}), Trace_ELBO(), stop_rule="sometimes")
    with pytest.raises(ValueError, match="guide_optim"):
        AggressiveSVI(param_model, param_guide, Adam({}), Trace_ELBO(), guide_optim=torch.optim.SGD)
    with pytest.raises(ValueError, match="check_every"):
        AggressiveSVI(param_model, param_guide, Adam({}), Trace_ELBO(), check_every=0)


# ----------------------------------------------------------------- ELBO classes


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: Trace_ELBO(),
        lambda: TraceMeanField_ELBO(),
        lambda: TraceGraph_ELBO(),
        lambda: JitTrace_ELBO(ignore_jit_warnings=True),
        lambda: Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
        lambda: TraceMeanField_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1),
    ],
    ids=["trace", "meanfield", "tracegraph", "jit", "vectorized", "meanfield-vectorized"],
)
def test_elbo_classes_run_without_warnings(make_loss):
    vae = VAE()
    x = data(32)
    svi = AggressiveSVI(vae.model, vae.guide, Adam({"lr": 1e-3}), make_loss(),
                        guide_batches=[data(32, s) for s in range(1, 4)], check_every=2, max_inner_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Pyro's JitTrace_ELBO itself calls torch.jit.trace, which this torch deprecates; plain SVI warns too.
        warnings.filterwarnings("ignore", message=".*torch.jit.trace. is deprecated", category=DeprecationWarning)
        for _ in range(3):
            loss = svi.step(x)
        assert torch.isfinite(torch.tensor(loss))
        svi.stop_aggressive()
        svi.step(x)
        svi.evaluate_loss(x)


def test_tracegraph_baseline_parameters_are_left_to_the_loss():
    baseline = torch.nn.Sequential(torch.nn.Linear(D, 1), torch.nn.Flatten(0))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c.unsqueeze(-1) * pyro.param("m", torch.ones(D)), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("baseline", baseline)
        p = pyro.param("p", torch.full((x.shape[0],), 0.5), constraint=dist.constraints.unit_interval)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(p),
                        infer=dict(baseline={"nn_baseline": baseline, "nn_baseline_input": x}))

    svi = AggressiveSVI(model, guide, Adam({"lr": 1e-2}), TraceGraph_ELBO(), max_inner_steps=2, check_every=1)
    x = data(8)
    split = svi.split_params(x)
    assert set(split.other) == {"baseline$$$0.weight", "baseline$$$0.bias"}
    before = baseline[0].weight.detach().clone()
    svi.step(x)
    assert not torch.equal(before, baseline[0].weight.detach())


# ---------------------------------------------------------------------- drop-in


def hierarchical_model(x):
    noise = pyro.param("noise", torch.tensor(1.0), constraint=dist.constraints.positive)
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0], subsample_size=16) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, noise), obs=x[idx])


def hierarchical_guide(x):
    mu_loc = pyro.param("mu_loc", torch.tensor(0.0))
    mu_scale = pyro.param("mu_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    mu = pyro.sample("mu", dist.Normal(mu_loc, mu_scale))
    a = pyro.param("a", torch.tensor(0.5))
    s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0], subsample_size=16) as idx:
        pyro.sample("z", dist.Normal(a * x[idx] + (1 - a) * mu, s))


def train(svi_class, x, steps=1500):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = svi_class(hierarchical_model, hierarchical_guide, ClippedAdam({"lr": 0.02, "lrd": 0.999}), Trace_ELBO())
    inner = 0
    for _ in range(steps):
        svi.step(x)
        inner += getattr(svi, "last_inner_steps", 0)
    if isinstance(svi, AggressiveSVI):
        assert svi.plain_reason is None and inner >= 30  # it really trained aggressively (first step at least)
    return {n: float(pyro.param(n).detach()) for n in ("mu_loc", "mu_scale", "a", "s", "noise")}


def test_drop_in_reaches_the_same_optimum_as_svi():
    """Swapping SVI for AggressiveSVI in a program with global and local latents keeps it working."""
    g = torch.Generator().manual_seed(3)
    x = 2.0 + torch.randn(200, generator=g) * 1.1
    plain = train(SVI, x)
    aggressive = train(lambda *a: AggressiveSVI(*a, max_inner_steps=5, check_every=5), x)
    # The data's spread is 1.1; the model splits it between z (scale 1) and the noise.
    assert plain["noise"] == pytest.approx(0.45, abs=0.2)
    for name in plain:
        assert aggressive[name] == pytest.approx(plain[name], abs=0.08), name


def test_guide_without_local_latent_trains_as_plain_svi():
    """Global latents only: nothing amortized can lag, so the first step leaves aggressive mode."""
    x = data(16)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("mu_loc", torch.zeros(D)), 0.1).to_event(1))

    svi = AggressiveSVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(x)
    assert svi.aggressive is False and svi.last_inner_steps == 0
    assert svi.param_split.has_local_latent is False


def test_jit_tracer_warnings_appear_once_as_under_svi():
    """A JIT loss compiles once per kind of step; its tracer warnings must not repeat for each copy."""

    def noisy_guide(x):
        pyro.module("encoder", vae_for_jit.encoder)
        loc, log_scale = vae_for_jit.encoder(x).chunk(2, -1)
        if bool(loc.sum() > -1e9):  # a Python bool on a traced tensor: a TracerWarning when compiled
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def count(svi_class):
        pyro.clear_param_store()
        svi = svi_class(vae_for_jit.model, noisy_guide, Adam({"lr": 1e-3}), JitTrace_ELBO(), **(
            {"max_inner_steps": 2, "check_every": 1, "mi_every": None} if svi_class is AggressiveSVI else {}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                svi.step(x)
        return sum(issubclass(w.category, torch.jit.TracerWarning) for w in caught)

    vae_for_jit = VAE()
    x = data(16)
    plain = count(SVI)
    assert plain >= 1
    assert count(AggressiveSVI) == plain
