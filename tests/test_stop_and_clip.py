"""The MI stop rules, the clipping scopes, and a drop-in that leaves aggressive mode by itself."""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import SGD

from pyro_lag import AggressiveSVI
from pyro_lag.engine.clipping import GradientClipper
from pyro_lag.engine.stop_rules import MIStopRule

# ------------------------------------------------------------------ stop rules


def run_rule(rule: MIStopRule, values, se=None) -> int | None:
    """The 1-based check at which the rule ends aggressive mode (None if it never does)."""
    for i, value in enumerate(values, 1):
        if not rule.keeps_going(value, se):
            return i
    return None


def test_paper_rule_stops_at_the_first_value_below_the_previous():
    assert run_rule(MIStopRule("paper"), [0.1, 0.5, 0.49, 0.8]) == 3
    assert run_rule(MIStopRule("paper"), [-0.01]) == 1  # the first value is compared with 0


def test_drop_rule_ignores_a_drop_within_the_noise():
    """A fall of 0.013 nats with a standard error of 0.02 is noise: the paper's rule stops, ``drop`` does not."""
    values = [0.110, 0.097, 0.30, 0.55]
    assert run_rule(MIStopRule("paper"), values) == 2
    assert run_rule(MIStopRule("drop", patience=2), values, se=0.02) is None


def test_drop_rule_stops_on_a_drop_beyond_the_noise():
    assert run_rule(MIStopRule("drop", patience=5), [0.5, 1.0, 1.2, 0.9], se=0.02) == 4


def test_drop_rule_stops_when_mi_has_stopped_rising():
    """A plateau ends aggressive mode after ``patience`` checks without a rise beyond the noise."""
    plateau = [0.5, 1.0, 1.01, 1.0, 1.02, 0.99]
    assert run_rule(MIStopRule("drop", patience=2), plateau, se=0.02) == 4


def test_patience_rule_is_the_reference_image_rule():
    assert run_rule(MIStopRule("patience", patience=2), [1.0, 2.0, 1.9, 2.5, 2.4, 2.3]) == 6


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_mi_is_refused(value):
    svi = AggressiveSVI(lambda: None, lambda: None, SGD({"lr": 0.1}), Trace_ELBO())
    with pytest.raises(ValueError, match="finite"):
        svi.observe_mi(value)
    assert svi.aggressive and svi.mi_history == []


def test_stop_rule_state_round_trips():
    rule = MIStopRule("drop", patience=3)
    run_rule(rule, [0.2, 0.8, 0.79], se=0.01)
    copy = MIStopRule("drop", patience=3)
    copy.load_state_dict(rule.state_dict())
    assert copy == rule


# ------------------------------------------------------------------ clipping

D, K = 6, 3


def linear_pair():
    """A small amortized linear-Gaussian VAE with separate encoder and decoder weights."""

    def model(x):
        w = pyro.param("w", torch.full((K, D), 0.3))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(K), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w, 0.5).to_event(1), obs=x)

    def guide(x):
        a = pyro.param("a", torch.full((D, K), 0.1))
        log_s = pyro.param("log_s", torch.zeros(K))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ a, log_s.exp()).to_event(1))

    return model, guide


def reference_inner_step(model, guide, x, clip):
    """The paper's inner step: full backward, one norm over all gradients, step the encoder only."""
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x)
    store = pyro.get_param_store()
    params = {n: store.get_param(n).unconstrained() for n in ("w", "a", "log_s")}
    grads = torch.autograd.grad(loss, list(params.values()))
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    scale = min(1.0, clip / (float(total) + 1e-6))
    return {n: (p - 0.1 * scale * g).detach() for (n, p), g in zip(params.items(), grads) if n != "w"}


@pytest.mark.parametrize("scope", ["joint", "joint-exact"])
def test_first_inner_step_clips_by_the_joint_norm_as_the_reference(scope):
    """Before any model step the model's norm is unknown: the first guide step computes it, as the reference."""
    model, guide = linear_pair()
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(0)) * 3
    svi = AggressiveSVI(model, guide, SGD({"lr": 0.1}), TraceMeanField_ELBO(), clip_norm=0.5, clip_scope=scope)
    svi.split_params(x)
    pyro.set_rng_seed(1)
    expected = reference_inner_step(model, guide, x, 0.5)
    pyro.set_rng_seed(1)
    svi.inner_step(x)
    for name, value in expected.items():
        assert torch.allclose(pyro.param(name).detach(), value, atol=1e-6), name
    assert svi.clipper.last_norm["model"] is not None


def test_joint_scope_uses_the_model_norm_of_the_last_model_step():
    clipper = GradientClipper(1.0, "joint")
    guide_p = torch.zeros(3, requires_grad=True)
    model_p = torch.zeros(4, requires_grad=True)
    model_p.grad = torch.full((4,), 2.0)  # norm 4
    clipper.clip_side("model", [model_p], [])
    assert not clipper.needs_other_side("guide")
    guide_p.grad = torch.full((3,), 1.0)  # norm sqrt(3)
    clipper.clip_side("guide", [guide_p], [])
    joint = math.sqrt(16 + 3)
    assert torch.allclose(guide_p.grad, torch.full((3,), 1.0 / (joint + 1e-6)))


def test_separate_scope_clips_each_side_alone():
    clipper = GradientClipper(1.0, "separate")
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.full((4,), 2.0)
    clipper.clip_side("guide", [p], [])
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    assert not clipper.needs_other_side("guide")


def test_unknown_clip_scope_is_refused():
    with pytest.raises(ValueError, match="clip_scope must be one of"):
        GradientClipper(5.0, "sideways")


# ------------------------------------------------------------------ a drop-in that controls itself


def image_vae(train: torch.Tensor, latent: int = 8, hidden: int = 200):
    """A small VAE on binary images, written as a Pyro user writes it."""
    pixels = train.shape[1]
    encoder = torch.nn.Sequential(torch.nn.Linear(pixels, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2 * latent))
    decoder = torch.nn.Sequential(torch.nn.Linear(latent, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, pixels))

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        loc, log_var = encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, (0.5 * log_var).exp()).to_event(1))

    return model, guide


def omniglot_images(shared_data, n: int) -> torch.Tensor:
    import numpy as np

    images = np.load(shared_data / "omniglot28" / "omniglot28.npz")["train"][:n]
    return torch.from_numpy(images.reshape(n, -1) >= 128).float()


def test_literal_drop_in_ends_aggressive_mode_by_itself(shared_data):
    """Only the class name changed: no observe_mi, no guide_batches. MI is estimated every 25 steps on
    batches seen, and aggressive mode ends by the stop rule once MI stops rising."""
    train = omniglot_images(shared_data, 512)
    model, guide = image_vae(train, latent=4, hidden=100)
    svi = AggressiveSVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    steps = 0
    while svi.aggressive and steps < 800:
        for batch in train.split(32):
            svi.step(batch)
            steps += 1
    assert not svi.aggressive, f"still aggressive after {steps} steps; MI checks {svi.mi_history}"
    assert "stop rule 'drop'" in svi.stop_reason
    assert len(svi.mi_history) >= 3 and all(math.isfinite(v) for v in svi.mi_history)
    assert max(svi.mi_history) > 1.0  # the latent carries information before aggressive mode ends
    best = max(range(len(svi.mi_history)), key=svi.mi_history.__getitem__)
    assert len(svi.mi_history) - 1 - best <= svi.patience + 1  # it ends within a few checks of the best


def test_drop_in_inner_steps_draw_fresh_batches_of_the_steps_kind():
    """Without guide_batches, inner steps use seen batches of the same structure, not the step's own."""
    model, guide = linear_pair()
    seen = []

    def recording_guide(x, y=None):
        seen.append((x.shape[0], y is None))
        guide(x)

    def model_xy(x, y=None):
        model(x)

    svi = AggressiveSVI(model_xy, recording_guide, SGD({"lr": 0.01}), Trace_ELBO(), mi_every=None,
                        max_inner_steps=6, check_every=2)
    gen = torch.Generator().manual_seed(0)
    for size in (5, 7, 9):
        svi.step(torch.randn(size, D, generator=gen))
    svi.step(torch.randn(4, D, generator=gen), torch.zeros(4))
    sizes_after_supervised = {n for n, unlabelled in seen[-10:] if not unlabelled}
    assert sizes_after_supervised == {4}  # the only supervised batch seen so far
    assert {n for n, unlabelled in seen if unlabelled} >= {5, 7}
