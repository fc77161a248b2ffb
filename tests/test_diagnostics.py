"""Estimators against closed forms: ELBO, IW-NLL, MI and active units on a linear Gaussian model."""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

from benchmarks.linear_gaussian import make_linear_gaussian
from pyro_lag import NoLocalLatentError, active_units, evaluate, iw_log_likelihood, mutual_information


def brute_force_mi(q_of_x, x: torch.Tensor, z: torch.Tensor) -> float:
    """The MI estimator written as a plain double loop over data points: log q(z_i|x_i) at the same draw."""
    B = x.shape[0]
    first = sum(q_of_x(x[i]).log_prob(z[i]) for i in range(B)) / B
    second = 0.0
    for i in range(B):
        terms = torch.stack([q_of_x(x[j]).log_prob(z[i]) for j in range(B)])
        second += torch.logsumexp(terms, 0) - math.log(B)
    return float(first - second / B)


class _Capture(pyro.poutine.messenger.Messenger):
    """Record the value of one site at its first run (estimators may replay the guide later)."""

    def __init__(self, name):
        super().__init__()
        self.name, self.value = name, None

    def _pyro_post_sample(self, msg):
        if msg["name"] == self.name and self.value is None:
            self.value = msg["value"]


def test_elbo_and_iw_equal_log_marginal_for_exact_posterior():
    lg = make_linear_gaussian()
    x = lg.sample(64, torch.Generator().manual_seed(1))
    truth = lg.log_marginal(x)
    result = evaluate(lg.model, lg.exact_guide, [x])
    assert result["elbo"] == pytest.approx(float(truth.mean()), abs=1e-4)
    assert result["recon"] - result["kl"] == pytest.approx(result["elbo"], abs=1e-9)
    iw = iw_log_likelihood(lg.model, lg.exact_guide, x, num_samples=50, chunk_size=20)
    assert iw.shape == (64,)
    assert torch.allclose(iw, truth, atol=1e-4)


def test_iw_with_poor_guide_rises_towards_truth_and_stays_below():
    lg = make_linear_gaussian()
    x = lg.sample(200, torch.Generator().manual_seed(2))
    truth = float(lg.log_marginal(x).mean())
    estimates = {}
    for k in (1, 10, 100, 1000):
        pyro.set_rng_seed(k)
        estimates[k] = float(iw_log_likelihood(lg.model, lg.poor_guide, x, num_samples=k, chunk_size=250).mean())
    assert estimates[1] < estimates[10] < estimates[100] < estimates[1000]
    assert truth - estimates[1] > 0.5  # the poor guide really is poor
    assert estimates[1000] <= truth + 0.01
    assert truth - estimates[1000] < 0.25 * (truth - estimates[1])


def test_iw_sequential_fallback_matches_vectorized_distribution():
    """A program that cannot broadcast over the particle plate still gets an estimate, one particle at a time."""
    lg = make_linear_gaussian()
    x = lg.sample(16, torch.Generator().manual_seed(3))

    def rigid_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(lg.d, dtype=x.dtype), 1.0).to_event(1))
            loc = z.reshape(x.shape[0], lg.d) @ lg.W.T + lg.b  # breaks with an extra particle dim
            pyro.sample("x", dist.Normal(loc, lg.s).to_event(1), obs=x)

    iw = iw_log_likelihood(rigid_model, lg.exact_guide, x, num_samples=5, chunk_size=5)
    assert torch.allclose(iw, lg.log_marginal(x), atol=1e-4)


def test_mi_matches_double_loop_on_small_batch():
    lg = make_linear_gaussian()
    x = lg.sample(12, torch.Generator().manual_seed(4))
    capture = _Capture("z")
    pyro.set_rng_seed(5)
    guide = capture(lg.exact_guide)
    estimate = mutual_information(guide, [x])
    def q(xi):
        return dist.MultivariateNormal(lg.post_mean(xi), scale_tril=lg.post_scale_tril)
    assert estimate == pytest.approx(brute_force_mi(q, x, capture.value), abs=1e-5)


def test_mi_of_exact_posterior_near_analytic_value():
    lg = make_linear_gaussian(D=4, d=2, s=0.8)
    x = lg.sample(2000, torch.Generator().manual_seed(6))
    estimate = mutual_information(lg.exact_guide, [x])
    assert lg.true_mi > 1.0
    assert abs(estimate - lg.true_mi) / lg.true_mi < 0.05


def test_mi_pools_the_points_of_all_batches():
    """Batches are pooled: the estimate over two batches equals the one over the same points in one."""
    lg = make_linear_gaussian()
    x = lg.sample(30, torch.Generator().manual_seed(7))
    draws = []

    def guide(x):
        with pyro.poutine.trace() as tracer:
            lg.exact_guide(x)
        draws.append(tracer.trace.nodes["z"]["value"])

    estimate = mutual_information(guide, [x[:10], x[10:]])
    def q(xi):
        return dist.MultivariateNormal(lg.post_mean(xi), scale_tril=lg.post_scale_tril)
    assert estimate == pytest.approx(brute_force_mi(q, x, torch.cat(draws[:2])), abs=1e-5)


def lognormal_guide(x):
    with pyro.plate("data", x.shape[0]):
        loc = 0.3 * x.sum(-1, keepdim=True).expand(-1, 2) + torch.tensor([0.1, -0.2], dtype=x.dtype)
        pyro.sample("z", dist.LogNormal(loc, torch.tensor([0.5, 0.8], dtype=x.dtype)).to_event(1))


def gamma_guide(x):
    with pyro.plate("data", x.shape[0]):
        rate = torch.nn.functional.softplus(x[:, :2]) + 0.5
        pyro.sample("z", dist.Gamma(torch.full_like(rate, 2.0), rate).to_event(1))


@pytest.mark.parametrize(
    "guide, q",
    [
        (lognormal_guide, lambda xi: dist.LogNormal(
            0.3 * xi.sum().expand(2) + torch.tensor([0.1, -0.2], dtype=xi.dtype),
            torch.tensor([0.5, 0.8], dtype=xi.dtype)).to_event(1)),
        (gamma_guide, lambda xi: dist.Gamma(
            torch.full((2,), 2.0, dtype=xi.dtype),
            torch.nn.functional.softplus(xi[:2]) + 0.5).to_event(1)),
    ],
    ids=["lognormal", "gamma"],
)
def test_mi_non_gaussian_guide_matches_double_loop(guide, q):
    x = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    capture = _Capture("z")
    estimate = mutual_information(capture(guide), [x])
    assert estimate == pytest.approx(brute_force_mi(q, x, capture.value), abs=1e-5)


def test_mi_for_dependent_local_sites_uses_replay():
    """z2 depends on z1: log q(z_i|x_j) needs q(z2_i | z1_i, x_j), which only a replay gives."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x[:, 0], 1.0))
            pyro.sample("z2", dist.Normal(0.5 * x[:, 1] + z1, 0.7))

    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    c1, c2 = _Capture("z1"), _Capture("z2")
    estimate = mutual_information(c1(c2(guide)), [x])
    z1, z2 = c1.value, c2.value
    B = x.shape[0]
    first = float(
        sum(dist.Normal(x[i, 0], 1.0).log_prob(z1[i]) + dist.Normal(0.5 * x[i, 1] + z1[i], 0.7).log_prob(z2[i])
            for i in range(B)) / B
    )
    second = 0.0
    for i in range(B):
        terms = torch.stack([
            dist.Normal(x[j, 0], 1.0).log_prob(z1[i]) + dist.Normal(0.5 * x[j, 1] + z1[i], 0.7).log_prob(z2[i])
            for j in range(B)
        ])
        second += float(torch.logsumexp(terms, 0)) - math.log(B)
    assert estimate == pytest.approx(first - second / B, abs=1e-5)


def test_active_units_count_dimensions_that_carry_data():
    lg = make_linear_gaussian(D=6, d=5, active=2)
    x = lg.sample(500, torch.Generator().manual_seed(11))
    count, variance = active_units(lg.exact_guide, [x[:250], x[250:]])
    assert count == 2
    assert variance.shape == (5,)
    assert (variance[:2] > 0.1).all() and (variance[2:] < 1e-12).all()
    expected = lg.post_mean(x).var(0, unbiased=True)
    assert torch.allclose(variance.double(), expected, rtol=1e-4, atol=1e-10)


def test_evaluate_reports_all_keys_and_closed_form_kl():
    lg = make_linear_gaussian()
    x = lg.sample(100, torch.Generator().manual_seed(12))
    result = evaluate(lg.model, lg.exact_guide, [x[:50], x[50:]], iw_samples=20)
    for key in ("elbo", "recon", "kl", "mi", "au", "au_var", "iw_nll", "num_points"):
        assert key in result
    q = dist.MultivariateNormal(lg.post_mean(x), scale_tril=lg.post_scale_tril)
    p = dist.MultivariateNormal(torch.zeros(lg.d, dtype=x.dtype), torch.eye(lg.d, dtype=x.dtype))
    kl_true = float(torch.distributions.kl_divergence(q, p).mean())
    # torch has no KL(MultivariateNormal || Independent Normal): this one is Monte Carlo.
    assert result["kl"] == pytest.approx(kl_true, abs=0.25)
    assert result["iw_nll"] == pytest.approx(-float(lg.log_marginal(x).mean()), abs=1e-4)
    assert result["num_points"] == 100
    assert result["au"] == 2


class AmortizedNormal(torch.nn.Module):
    """A diagonal Normal guide with a linear encoder, registered through pyro.module."""

    def __init__(self, D: int, d: int):
        super().__init__()
        self.loc = torch.nn.Linear(D, d).double()
        self.log_scale = torch.nn.Linear(D, d).double()

    def forward(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc(x), self.log_scale(x).exp()).to_event(1))


def test_per_dimension_kl_sums_to_total_for_diagonal_guide():
    lg = make_linear_gaussian()
    x = lg.sample(40, torch.Generator().manual_seed(13))
    guide = AmortizedNormal(lg.D, lg.d)
    result = evaluate(lg.model, guide, [x])
    with torch.no_grad():
        q = dist.Normal(guide.loc(x), guide.log_scale(x).exp())
        closed = torch.distributions.kl_divergence(q, dist.Normal(0.0, 1.0)).sum(-1).mean()
    assert result["kl"] == pytest.approx(float(closed), abs=1e-9)
    assert result["kl_dim"].shape == (lg.d,)
    assert float(result["kl_dim"].sum()) == pytest.approx(result["kl"], abs=1e-6)


def test_autonormal_local_latents_are_its_unconstrained_sites():
    lg = make_linear_gaussian()
    x = lg.sample(20, torch.Generator().manual_seed(14))
    guide = AutoNormal(lg.model)
    guide(x)  # create its parameters
    capture = _Capture("z_unconstrained")
    estimate = mutual_information(capture(guide), [x])
    locs = pyro.param("AutoNormal.locs.z").detach()
    scales = pyro.param("AutoNormal.scales.z").detach()
    def q(i):
        return dist.Normal(locs[i], scales[i]).to_event(1)
    B = x.shape[0]
    first = sum(q(i).log_prob(capture.value[i]) for i in range(B)) / B
    second = sum(
        torch.logsumexp(torch.stack([q(j).log_prob(capture.value[i]) for j in range(B)]), 0) - math.log(B)
        for i in range(B)
    ) / B
    assert estimate == pytest.approx(float(first - second), abs=1e-5)
    count, variance = active_units(guide, [x])
    assert variance.shape == (lg.d,)
    result = evaluate(lg.model, guide, [x], iw_samples=10)
    assert math.isfinite(result["kl"]) and math.isfinite(result["iw_nll"])


def test_guide_without_local_latent_is_a_clear_error():
    lg = make_linear_gaussian()
    x = lg.sample(10, torch.Generator().manual_seed(15))

    def global_model(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(lg.D, dtype=x.dtype), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    guide = AutoDiagonalNormal(global_model)
    with pytest.raises(NoLocalLatentError, match="no local latent site"):
        mutual_information(guide, [x])
    with pytest.raises(NoLocalLatentError, match="no local latent site"):
        evaluate(global_model, guide, [x])


def test_mi_of_a_guide_that_ignores_x_is_zero_within_noise_target():
    """True MI 0: on 1,000 points with a 32-d latent the estimate is within 0.02 nats of 0, its SE tiny."""
    x = torch.randn(1000, 5, generator=torch.Generator().manual_seed(21))
    loc = torch.linspace(-1.0, 1.0, 32)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 0.7).expand([x.shape[0], 32]).to_event(1))

    from pyro_lag.estimators.diagnostics import estimate_mutual_information

    estimate = estimate_mutual_information(guide, x.split(50))
    assert abs(estimate.value) < 0.02 and estimate.se < 0.02
    assert estimate.points == 1000 and estimate.pairs == 1000 * 1000  # pooled, not per batch of 50


def test_mi_of_exact_posterior_within_two_percent_on_1000_points():
    """On sets of 1,000 points the estimate is within 2% of the closed form on average, and each
    within three of its standard errors (the error left is the spread of the 1,000 points drawn)."""
    lg = make_linear_gaussian(D=4, d=2, s=0.8)
    from pyro_lag.estimators.diagnostics import estimate_mutual_information

    errors = []
    for seed in range(5):
        x = lg.sample(1000, torch.Generator().manual_seed(100 + seed))
        estimate = estimate_mutual_information(lg.exact_guide, x.split(32), num_samples=4)
        assert abs(estimate.value - lg.true_mi) < 3 * estimate.se
        errors.append(estimate.value - lg.true_mi)
    assert abs(sum(errors) / len(errors)) / lg.true_mi < 0.02


def test_mi_is_not_capped_by_the_batch_size():
    """Batches of 16 would cap the per-batch estimator at log 16 = 2.77 nats; pooled points do not."""
    lg = make_linear_gaussian(D=6, d=3, s=0.3)
    x = lg.sample(1000, torch.Generator().manual_seed(23))
    assert lg.true_mi > math.log(16) + 0.5
    estimate = mutual_information(lg.exact_guide, x.split(16))
    assert estimate > math.log(16) + 0.5
    assert abs(estimate - lg.true_mi) / lg.true_mi < 0.05
