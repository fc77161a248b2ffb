"""KL-weight schedules, the KLWeight handler and free bits, checked against hand-computed numbers."""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from pyro_lag.handlers.free_bits import FreeBits
from pyro_lag.handlers.kl_weight import KLWeight, beta, cyclical, linear_annealing

# --------------------------------------------------------------------------- schedules


def test_linear_annealing_matches_reference_increments():
    # kl_start 0.1, 2 warm-up epochs of 3 steps: rate = 0.9 / 6 = 0.15, added before every step
    s = linear_annealing(kl_start=0.1, warm_up_epochs=2, steps_per_epoch=3)
    assert s.value == pytest.approx(0.1)
    assert s.weight(0, 0) == pytest.approx(0.25)
    assert s.weight(0, 2) == pytest.approx(0.55)
    assert s.weight(1, 0) == pytest.approx(0.70)
    assert s.weight(1, 1) == pytest.approx(0.85)
    assert s.weight(1, 2) == pytest.approx(1.0)
    assert s.weight(5, 2) == 1.0  # capped
    # the reference accumulates kl_weight += rate; the closed form agrees with it
    w = 0.1
    for t in range(10):
        w = min(1.0, w + 0.15)
        assert s.weight(t // 3, t % 3) == pytest.approx(w)


def test_linear_annealing_update_and_call():
    s = linear_annealing(0.0, 1, 4)
    assert s.update(0, 1) == pytest.approx(0.5)
    assert s() == pytest.approx(0.5)
    assert linear_annealing(0.3, 0, 10).weight(0, 0) == 1.0  # no warm-up: full weight


def test_beta_is_constant():
    s = beta(0.2)
    assert s() == 0.2
    assert s.weight(0, 0) == s.weight(7, 123) == 0.2


def test_cyclical_ramps_in_each_cycle():
    # 2 epochs x 4 steps = 8 steps, 2 cycles of 4 steps, ramp over the first half: 0, 0.5, 1, 1
    s = cyclical(n_cycles=2, ratio=0.5, epochs=2, steps_per_epoch=4)
    values = [s.weight(e, k) for e in range(2) for k in range(4)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0])
    # 4 cycles of 25 steps, ratio 0.5: step size 1/12.5 = 0.08
    s = cyclical(4, 0.5, epochs=10, steps_per_epoch=10)
    assert s.weight(0, 5) == pytest.approx(0.4)
    assert s.weight(2, 7) == pytest.approx(0.16)  # t = 27, position 2 in cycle 2
    assert s.weight(4, 0) == pytest.approx(1.0)  # t = 40, position 15 >= 12.5


@pytest.mark.parametrize(
    "make",
    [
        lambda: linear_annealing(1.5, 1, 1),
        lambda: linear_annealing(0.1, -1, 1),
        lambda: beta(-1.0),
        lambda: cyclical(0, 0.5, 1, 1),
        lambda: cyclical(2, 0.0, 1, 1),
        lambda: FreeBits(-0.1),
        lambda: KLWeight(float("nan")),
    ],
)
def test_bad_schedule_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


# --------------------------------------------------------------------------- KLWeight


def _model(x):
    loc = pyro.param("dec", torch.tensor([0.5, -1.0]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal((z * loc).sum(-1), 1.0), obs=x)


def _guide(x):
    w = pyro.param("enc", torch.tensor([0.3, 0.7]))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.unsqueeze(-1) * w, 0.8).to_event(1))


def test_kl_weight_scales_latent_sites_only():
    x = torch.tensor([0.2, -0.4, 1.0])
    handler = KLWeight(0.3)
    guide_tr = poutine.trace(handler(_guide)).get_trace(x)
    model_tr = poutine.trace(poutine.replay(handler(_model), trace=guide_tr)).get_trace(x)
    assert guide_tr.nodes["z"]["scale"] == pytest.approx(0.3)
    assert model_tr.nodes["z"]["scale"] == pytest.approx(0.3)
    assert model_tr.nodes["x"]["scale"] == 1.0
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    z = guide_tr.nodes["z"]["value"]
    raw_q = guide_tr.nodes["z"]["fn"].log_prob(z)
    assert torch.allclose(guide_tr.nodes["z"]["log_prob"], 0.3 * raw_q)
    assert torch.allclose(model_tr.nodes["x"]["log_prob"], model_tr.nodes["x"]["fn"].log_prob(x))


def test_kl_weight_in_trace_elbo_weights_only_the_kl_term():
    x = torch.tensor([0.2, -0.4, 1.0])
    w = 0.25
    pyro.set_rng_seed(1)
    guide_tr = poutine.trace(_guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(_model, trace=guide_tr)).get_trace(x)
    z = guide_tr.nodes["z"]["value"]
    recon = model_tr.nodes["x"]["fn"].log_prob(x).sum().detach()
    kl_mc = (guide_tr.nodes["z"]["fn"].log_prob(z) - model_tr.nodes["z"]["fn"].log_prob(z)).sum().detach()
    pyro.set_rng_seed(1)
    loss = Trace_ELBO().loss(KLWeight(w)(_model), KLWeight(w)(_guide), x)
    assert loss == pytest.approx((-recon + w * kl_mc).item(), rel=1e-5)


def test_kl_weight_reads_a_schedule_in_place():
    x = torch.tensor([0.2, -0.4])
    schedule = linear_annealing(0.0, 1, 4)
    handler = KLWeight(schedule)
    schedule.update(0, 0)
    assert poutine.trace(handler(_guide)).get_trace(x).nodes["z"]["scale"] == pytest.approx(0.25)
    schedule.update(0, 2)
    assert poutine.trace(handler(_guide)).get_trace(x).nodes["z"]["scale"] == pytest.approx(0.75)


def test_kl_weight_composes_with_subsampling_scale():
    x = torch.tensor([0.2, -0.4])

    def guide(x):
        w = pyro.param("enc", torch.tensor([0.3, 0.7]))
        with pyro.plate("data", 10, subsample=torch.arange(2)):
            pyro.sample("z", dist.Normal(x.unsqueeze(-1) * w, 0.8).to_event(1))

    tr = poutine.trace(KLWeight(0.5)(guide)).get_trace(x)
    assert tr.nodes["z"]["scale"] == pytest.approx(0.5 * 10 / 2)


# --------------------------------------------------------------------------- free bits


def _fb_pair():
    """A 2-d Normal VAE whose decoder reads only dimension 0; dimension 1 has a small KL."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1))
            pyro.sample("x", dist.Normal(2.0 * z[..., 0], 0.5), obs=x)

    def guide(x):
        a = pyro.param("a", torch.tensor([0.9, 0.1]))  # per-dim slope of the mean
        s = pyro.param("s", torch.tensor([0.3, 0.9]), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.unsqueeze(-1) * a, s).to_event(1))

    return model, guide


def _grads(model, guide, x, seed, loss=None):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss_fn = loss or Trace_ELBO()
    with poutine.trace(param_only=True) as tr:
        value = loss_fn.differentiable_loss(model, guide, x)
    params = {name: site["value"].unconstrained() for name, site in tr.trace.nodes.items()}
    grads = torch.autograd.grad(value, list(params.values()))
    return value.item(), dict(zip(params, grads))


def test_free_bits_zeroes_kl_gradient_under_the_floor_only():
    model, guide = _fb_pair()
    x = torch.tensor([0.5, -1.0, 1.5, 0.2])
    with torch.no_grad():
        q = dist.Normal(x.unsqueeze(-1) * torch.tensor([0.9, 0.1]), torch.tensor([0.3, 0.9]))
        kl_bar = kl_divergence(q, dist.Normal(0.0, 1.0)).mean(0)
    lam = 0.5
    assert kl_bar[0] > lam > kl_bar[1]  # dim 0 above the floor, dim 1 under it

    fb = FreeBits(lam)
    _, plain = _grads(model, guide, x, seed=3)
    _, floored = _grads(fb.model(model), fb.guide(guide), x, seed=3)
    # dim 1 is read by nobody but the KL term: with free bits its gradient vanishes exactly
    assert plain["a"][1].abs() > 1e-3 and plain["s"][1].abs() > 1e-3
    assert floored["a"][1].abs() < 1e-6
    assert floored["s"][1].abs() < 1e-6
    # dim 0, above the floor, keeps exactly the plain gradient on the same sample
    assert torch.allclose(floored["a"][0], plain["a"][0], atol=1e-6)
    assert torch.allclose(floored["s"][0], plain["s"][0], atol=1e-6)
    assert torch.allclose(fb.last_kl["z"], kl_bar, atol=1e-6)


def test_free_bits_loss_replaces_kl_of_floored_dims_by_lambda():
    model, guide = _fb_pair()
    x = torch.tensor([0.5, -1.0, 1.5, 0.2])
    lam = 0.5
    fb = FreeBits(lam)
    pyro.set_rng_seed(5)
    guide_tr = poutine.trace(guide).get_trace(x)
    z = guide_tr.nodes["z"]["value"]
    q = guide_tr.nodes["z"]["fn"].base_dist
    mc_kl_dim1 = (q.log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z))[:, 1].sum().item()
    plain, _ = _grads(model, guide, x, seed=5)
    floored, _ = _grads(fb.model(model), fb.guide(guide), x, seed=5)
    assert floored == pytest.approx(plain - mc_kl_dim1 + x.shape[0] * lam, rel=1e-5)


def test_free_bits_below_every_kl_changes_nothing():
    model, guide = _fb_pair()
    x = torch.tensor([0.5, -1.0, 1.5, 0.2])
    fb = FreeBits(0.0)
    plain_loss, plain = _grads(model, guide, x, seed=2)
    loss, grads = _grads(fb.model(model), fb.guide(guide), x, seed=2)
    assert loss == pytest.approx(plain_loss)
    for name in plain:
        assert torch.allclose(grads[name], plain[name])


def test_free_bits_with_analytic_kl_zeroes_gradient_in_expectation():
    # TraceMeanField_ELBO uses the closed-form KL; the factor cancels its gradient on average.
    model, guide = _fb_pair()
    x = torch.tensor([0.5, -1.0, 1.5, 0.2])
    fb = FreeBits(0.5)
    elbo = TraceMeanField_ELBO(num_particles=100_000, vectorize_particles=True, max_plate_nesting=1)
    _, grads = _grads(fb.model(model), fb.guide(guide), x, seed=0, loss=elbo)
    _, plain = _grads(model, guide, x, seed=0, loss=elbo)
    # Monte Carlo std of that gradient is about 0.006 at 1e5 particles: 0.1 x plain is > 5 sigma
    assert abs(float(grads["a"][1])) < 0.1 * abs(float(plain["a"][1]))
    assert torch.allclose(grads["a"][0], plain["a"][0], rtol=0.05)


def test_free_bits_rejects_joint_distributions():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))

    fb = FreeBits(0.1)
    with pytest.raises(ValueError, match="site 'z'"):
        Trace_ELBO().loss(fb.model(model), fb.guide(guide), torch.zeros(3))


def test_free_bits_in_svi_training_step_runs():
    model, guide = _fb_pair()
    x = torch.randn(8)
    fb = FreeBits(0.3)
    svi = pyro.infer.SVI(fb.model(model), fb.guide(guide), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
