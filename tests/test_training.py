"""The training loop: methods, determinism, exact resume, lr decay with best reload, NaN handling."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_lag.training.evaluation as evaluation
from pyro_lag import fit
from pyro_lag.io.checkpoint import load_checkpoint
from pyro_lag.training.faults import TrainingDivergedError


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on shared CPUs extra threads spin and make small models 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Decoder(nn.Module):
    def __init__(self, latent_dim: int, data_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(max(latent_dim, 1), data_dim)
        self.log_scale = nn.Parameter(torch.zeros(data_dim))

    def forward(self, z):
        return dist.Normal(self.linear(z), self.log_scale.exp()).to_event(1)


class TinyVAE(nn.Module):
    """A Gaussian VAE small enough to train in milliseconds (latent_dim 0: no latent at all)."""

    def __init__(self, data_dim: int = 6, latent_dim: int = 2, kind: str = "image") -> None:
        super().__init__()
        self.kind = kind
        self.latent_dim = latent_dim
        self.decoder = Decoder(latent_dim, data_dim)
        self.encoder = nn.Linear(data_dim, 2 * latent_dim) if latent_dim else None

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            if self.latent_dim:
                z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            else:
                z = x.new_zeros(x.shape[0], 1)
            pyro.sample("x", self.decoder(z), obs=x)

    def guide(self, x):
        if not self.latent_dim:
            return
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def make_data(n_batches: int = 5, batch: int = 8, dim: int = 6, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_batches * batch, 2, generator=g)
    w = torch.randn(2, dim, generator=g)
    x = z @ w + 0.3 * torch.randn(n_batches * batch, dim, generator=g)
    return [(x[i * batch : (i + 1) * batch],) for i in range(n_batches)]


TRAIN = make_data()
VALID = make_data(2, seed=8)
TEST = make_data(2, seed=9)


def build(seed: int = 0, **kwargs) -> TinyVAE:
    torch.manual_seed(seed)
    return TinyVAE(**kwargs)


def quick_fit(net, **kwargs):
    options = dict(epochs=2, lr=0.01, max_inner_steps=6, check_every=3, seed=0)
    options.update(kwargs)
    return fit(net.model, net.guide, TRAIN, VALID, **options)


HISTORY_KEYS = {
    "epoch", "train_loss", "val_loss", "elbo", "recon", "kl", "mi", "mi_se", "au", "aggressive", "aggressive_steps",
    "inner_steps", "kl_weight", "lr", "decayed", "wall_time", "mi_points", "ranks",
}


@pytest.mark.parametrize(
    "method, extra",
    [
        ("aggressive", {}),
        ("aggressive", {"anneal": True}),
        ("standard", {}),
        ("anneal", {"kl_start": 0.2, "warm_up": 1}),
        ("beta", {"beta": 0.4}),
        ("cyclical", {"cycles": 2}),
        ("free-bits", {"free_bits": 0.5}),
    ],
)
def test_every_method_trains_and_records_history(method, extra):
    net = build()
    result = quick_fit(net, method=method, **extra)
    assert len(result.history) == 2
    for row in result.history:
        assert set(row) == HISTORY_KEYS
        for key in ("train_loss", "val_loss", "elbo", "recon", "kl", "mi", "inner_steps", "wall_time"):
            assert math.isfinite(row[key]), key
        assert row["val_loss"] == pytest.approx(-row["elbo"])
        assert 0 <= row["au"] <= 2
    aggressive = method == "aggressive"
    assert result.history[0]["aggressive"] is aggressive
    assert (result.history[0]["inner_steps"] >= 3) is aggressive  # at least one stop-rule window
    # anneal reaches 1 after its 1 warm-up epoch; "+ anneal" uses the defaults kl_start 0.1 over
    # 10 epochs of 5 steps: 0.1 + 10 * 0.9 / 50 after 10 steps; cyclical ends a ramp at 1
    weights = {"anneal": 1.0, "beta": 0.4, "cyclical": 1.0}
    expected = 0.28 if extra.get("anneal") else weights.get(method, 1.0)
    assert result.history[-1]["kl_weight"] == pytest.approx(expected)
    assert not result.decoder_only and result.best_epoch in (1, 2)


def test_annealed_kl_weight_follows_the_schedule_per_step():
    net = build()
    seen = []

    class Progress:
        def on_batch_end(self, info):
            seen.append((info["epoch"], info["step"], info["kl_weight"]))

    quick_fit(net, method="anneal", kl_start=0.1, warm_up=1, callbacks=[Progress()])
    # 5 steps per epoch: the weight grows by 0.9 / 5 = 0.18 before each step, capped at 1
    assert [w for _, _, w in seen[:5]] == pytest.approx([0.28, 0.46, 0.64, 0.82, 1.0])
    assert [(e, s) for e, s, _ in seen[:6]] == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 1)]


def test_same_seed_gives_the_same_history_and_parameters():
    runs = []
    for _ in range(2):
        pyro.clear_param_store()
        net = build(seed=3)
        result = quick_fit(net, method="aggressive", epochs=2)
        history = [{k: v for k, v in row.items() if k != "wall_time"} for row in result.history]
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
        runs.append((history, params))
    assert runs[0][0] == runs[1][0]
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name])
    other = quick_fit(build(seed=3), method="aggressive", epochs=2, seed=1)
    assert [r["train_loss"] for r in other.history] != [r["train_loss"] for r in runs[0][0]]


class _Interrupt(Exception):
    pass


def _stop_at(epoch: int, step: int):
    class Stopper:
        def on_batch_end(self, info):
            if (info["epoch"], info["step"]) == (epoch, step):
                raise _Interrupt

    return Stopper()


def _final_state(run_dir):
    state = load_checkpoint(run_dir / "last.pt")
    return state["params"]["params"], state["meta"]["state"]["history"]


RESUME_SETTINGS = {
    # leaves aggressive mode after epoch 2
    "aggressive": dict(method="aggressive", optim="adam", max_aggressive_epochs=2),
    "annealed": dict(method="anneal", optim="sgd", kl_start=0.1, warm_up=2),
    # leaves aggressive mode after its seventh model step, inside epoch 2
    "step-budget": dict(method="aggressive", optim="adam", max_aggressive_steps=7),
    # the noise-aware inner rule with MI checked twice an epoch (checks fall mid-epoch)
    "noise-rule": dict(method="aggressive", optim="adam", inner_rule="noise", check_every=2, mi_checks_per_epoch=2,
                       stop_rule="paper"),
}


@pytest.mark.parametrize("setting", sorted(RESUME_SETTINGS))
@pytest.mark.parametrize("stop", [(2, 4), (3, 1), (1, 5)], ids=["mid-epoch", "after-epoch", "end-of-first-epoch"])
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, stop, setting):
    options = dict(epochs=3, checkpoint_every=2, **RESUME_SETTINGS[setting])
    quick_fit(build(seed=5), run_dir=tmp_path / "full", **options)
    expected_params, expected_history = _final_state(tmp_path / "full")
    if setting == "aggressive":  # both regimes are crossed
        assert [r["aggressive"] for r in expected_history] == [True, True, False]

    with pytest.raises(_Interrupt):
        quick_fit(build(seed=5), run_dir=tmp_path / "cut", callbacks=[_stop_at(*stop)], **options)
    pyro.clear_param_store()
    torch.manual_seed(999)  # a fresh process: other initial weights, other RNG state
    result = quick_fit(build(seed=11), run_dir=tmp_path / "cut", resume=True, **options)
    got_params, got_history = _final_state(tmp_path / "cut")
    assert got_params.keys() == expected_params.keys()
    for name in expected_params:
        assert torch.equal(got_params[name], expected_params[name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert strip(got_history) == strip(expected_history)
    assert len(result.history) == 3


def test_max_aggressive_steps_ends_aggressive_mode_after_that_many_model_steps():
    result = quick_fit(build(seed=5), epochs=3, optim="adam", max_aggressive_steps=7)
    assert [r["aggressive_steps"] for r in result.history] == [5, 2, 0]
    assert [r["aggressive"] for r in result.history] == [True, True, False]
    assert result.config["max_aggressive_steps"] == 7
    with pytest.raises(ValueError, match="max_aggressive_steps must be an integer >= 1"):
        quick_fit(build(), max_aggressive_steps=0)


def test_resume_of_a_finished_run_only_tests(tmp_path):
    quick_fit(build(), run_dir=tmp_path, epochs=1)
    before = load_checkpoint(tmp_path / "last.pt")["params"]["params"]
    seen = []
    result = quick_fit(build(seed=4), run_dir=tmp_path, epochs=1, resume=True, callbacks=[seen.append])
    assert seen == [] and len(result.history) == 1
    after = load_checkpoint(tmp_path / "last.pt")["params"]["params"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def _pair(net):
    return net.model, net.guide


def test_existing_run_directory_needs_resume_and_same_settings(tmp_path):
    quick_fit(build(), run_dir=tmp_path, epochs=1)
    with pytest.raises(ValueError, match="already holds a training checkpoint; pass resume=True"):
        quick_fit(build(), run_dir=tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"was trained with method='aggressive', not 'standard'"):
        quick_fit(build(), run_dir=tmp_path, epochs=2, resume=True, method="standard")


def _scripted_evaluate(losses):
    calls = iter(losses)

    def evaluate(model, guide, batches, **kwargs):
        loss = next(calls)
        return {"elbo": -loss, "recon": -loss, "kl": 0.0, "mi": 0.0, "au": 0, "au_var": torch.zeros(2)}

    return evaluate


def test_lr_decay_reloads_the_best_parameters(tmp_path, monkeypatch):
    # validation losses per epoch; the plateau rule of the reference decays at epochs 4 and 8
    losses = [10.0, 9.0, 9.5, 9.7, 9.8, 9.6, 9.65, 9.7, 9.0, 9.0]
    monkeypatch.setattr(evaluation, "evaluate", _scripted_evaluate(losses))
    snapshots = {}

    def snapshot(row):
        snapshots[row["epoch"]] = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}

    net = build()
    result = fit(
        net.model, net.guide, TRAIN, VALID, method="standard", kind="text", lr=0.01, epochs=10,
        decay_patience=2, decay_after=2, max_decays=2, run_dir=tmp_path, callbacks=[snapshot], seed=0,
    )
    assert [r["decayed"] for r in result.history] == [False, False, False, True, False, False, False, True]
    assert [r["lr"] for r in result.history] == [0.01] * 4 + [0.005] * 4
    assert result.stopped == "learning rate decayed 2 times"
    assert result.best_epoch == 2 and result.best_val_loss == 9.0
    assert load_checkpoint(tmp_path / "best.pt")["meta"]["epoch"] == 2
    for decay_epoch in (4, 8):  # right after a decay the parameters are the best epoch's
        for name, value in snapshots[2].items():
            assert torch.equal(snapshots[decay_epoch][name], value), (decay_epoch, name)
    assert not torch.equal(snapshots[3]["decoder$$$linear.weight"], snapshots[2]["decoder$$$linear.weight"])
    assert load_checkpoint(tmp_path / "last.pt")["meta"]["state"]["plateau"]["lr"] == 0.0025  # the next epoch's rate
    # the fresh SGD optimizers built at the decay step with the halved rate
    monkeypatch.setattr(evaluation, "evaluate", _scripted_evaluate(losses))
    fit(*_pair(build()), TRAIN, VALID, method="standard", kind="text", lr=0.01, epochs=5,
        decay_patience=2, decay_after=2, run_dir=tmp_path / "five", seed=0)
    optim_state = load_checkpoint(tmp_path / "five" / "last.pt")["optim"]
    for side in ("model", "guide"):
        assert {g["lr"] for s in optim_state[side].values() for g in s["param_groups"]} == {0.005}


def test_text_defaults_follow_the_reference():
    net = build(kind="text")
    result = fit(net.model, net.guide, TRAIN, VALID, epochs=1, lr=0.01, seed=0)
    assert result.config["optim"] == "sgd" and result.config["stop_rule"] == "drop"
    assert result.config["decay_patience"] == 2 and result.config["decay_after"] == 15
    image = fit(*_pair(build()), TRAIN, VALID, epochs=1, seed=0)
    assert image.config["optim"] == "adam" and image.config["lr"] == 1e-3
    assert image.config["stop_rule"] == "patience" and image.config["decay_patience"] == 20


class _PoisonedSource:
    """A batch source whose batch ``step`` of ``epoch`` has one entry set to ``value``."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        self.bad = (epoch, step)
        self.value = value

    def __len__(self):
        return len(TRAIN)

    def iter_from(self, epoch, position=0):
        for i in range(position, len(TRAIN)):
            (x,) = TRAIN[i]
            if (epoch, i) == self.bad:
                x = x.clone()
                x[0, 0] = self.value
            yield (x,)


class BoundedEncoder(TinyVAE):
    """Its guide reads tanh(x), so a huge observation reaches only the model."""

    def guide(self, x):
        super().guide(x.tanh())


def test_infinite_loss_stops_with_epoch_step_and_site_and_keeps_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = BoundedEncoder()
    # a finite but huge observation: its Gaussian log-density overflows to -inf
    with pytest.raises(TrainingDivergedError) as info:
        fit(net.model, net.guide, _PoisonedSource(1, 2, 1e30), VALID, epochs=3, lr=0.01, run_dir=tmp_path,
            method="standard", seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "non-finite loss (inf) at epoch 2, step 3 of 5: site 'x' in the model has a non-finite log-density"
    )
    assert message.endswith(f"last good checkpoint kept at {tmp_path / 'last.pt'}")
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["meta"]["state"]["epoch"] == 1  # written after epoch 1, never after the fault
    assert all(torch.isfinite(v).all() for v in state["params"]["params"].values())


def test_nan_in_the_data_is_reported_as_bad_input():
    net = build()
    with pytest.raises(ValueError, match=r"^training batch 2 of epoch 1 holds NaN or infinite values in argument 0$"):
        fit(net.model, net.guide, _PoisonedSource(0, 1, float("nan")), VALID, epochs=1, lr=0.01, seed=0,
            method="standard")


def test_nan_inside_the_guide_names_the_program_and_the_distribution():
    calls = {"n": 0}

    class Faulty(TinyVAE):
        def guide(self, x):
            calls["n"] += 1
            pyro.module("encoder", self.encoder)
            with pyro.plate("data", x.shape[0]):
                loc, log_scale = self.encoder(x).chunk(2, -1)
                if calls["n"] >= 5:  # the encoder "blows up" on the 5th guide run
                    loc = loc * float("nan")
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    torch.manual_seed(0)
    net = Faulty()
    # guide runs: 1 latent check, 1 closed-form KL check, 1 split probe, then 1 per standard step:
    # the 2nd step fails
    with pytest.raises(TrainingDivergedError) as info:
        fit(net.model, net.guide, TRAIN, VALID, method="standard", epochs=1, lr=0.01, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("invalid (NaN or out-of-support) values at epoch 1, step 2 of 5, in the guide")
    assert "Expected parameter loc" in message


def test_nan_gradient_with_finite_loss_names_the_parameter():
    class SqrtAtZero(TinyVAE):
        def model(self, x):
            w = pyro.param("w", torch.tensor(0.0))
            pyro.module("decoder", self)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
                loc = self.decoder.linear(z) + 0.0 * w.abs().sqrt()  # finite value, NaN gradient at w = 0
                pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    torch.manual_seed(0)
    net = SqrtAtZero()
    with pytest.raises(TrainingDivergedError, match=r"^non-finite gradient at epoch 1, step 1 of 5: parameter 'w'"):
        fit(net.model, net.guide, TRAIN, VALID, method="standard", epochs=1, lr=0.01, clip_norm=None, seed=0)


def test_decoder_only_pair_trains_and_reports_its_exact_likelihood():
    net = build(latent_dim=0)
    result = fit(net.model, net.guide, TRAIN, VALID, TEST, epochs=2, lr=0.05, seed=0, iw_samples=10)
    assert result.decoder_only
    assert all(r["mi"] is None and r["au"] is None and r["kl"] == 0.0 for r in result.history)
    assert result.history[-1]["aggressive"] is False
    # the test metrics are those of the best parameters, and IW-NLL is the exact NLL
    x = torch.cat([b[0] for b in TEST])
    with torch.no_grad():
        exact = net.decoder(x.new_zeros(len(x), 1)).log_prob(x)
    assert result.test["iw_nll"] == pytest.approx(-float(exact.mean()), rel=1e-5)
    assert result.test["elbo"] == pytest.approx(float(exact.mean()), rel=1e-5)


def test_final_test_pass_uses_the_best_parameters_and_iw_samples():
    net = build()
    result = fit(net.model, net.guide, TRAIN, VALID, TEST, epochs=2, lr=0.01, seed=0, iw_samples=20,
                 max_inner_steps=3, check_every=3)
    assert {"elbo", "kl", "mi", "au", "iw_nll"} <= set(result.test)
    # IW-NLL is at most the negative ELBO up to Monte Carlo noise
    assert result.test["iw_nll"] <= -result.test["elbo"] + 0.5
    assert isinstance(result.test["au_var"], list)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "vampire"}, "method must be one of"),
        ({"method": "beta"}, "method 'beta' needs the KL weight beta"),
        ({"method": "free-bits"}, "needs free_bits"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"method": "beta", "beta": 0.5, "anneal": True}, "anneal=True combines KL annealing with method aggressive"),
        ({"resume": True}, "resume=True needs run_dir"),
        ({"optim": "rmsprop"}, "optim must be"),
        ({"lr_decay": 2.0}, "lr_decay must lie in"),
        ({"kind": "audio"}, "kind must be"),
    ],
)
def test_bad_arguments_raise_one_clear_line(kwargs, match):
    net = build()
    with pytest.raises(ValueError, match=match) as info:
        fit(net.model, net.guide, TRAIN, VALID, **kwargs)
    assert "\n" not in str(info.value)


def test_guide_with_only_global_latents_is_refused():
    def guide(x):
        pyro.sample("g", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    net = build()
    with pytest.raises(ValueError, match="no local latent site"):
        fit(net.model, guide, TRAIN, VALID, epochs=1)


# --------------------------------------------------------------------------- real data, end to end


def _text_slice(path, vocab, lengths, count):
    from pyro_lag.data import TextCorpus

    corpus = TextCorpus.from_file(path, vocab)
    keep = [i for i, n in enumerate(corpus.lengths) if n in lengths][:count]
    return corpus.subset(keep)


def _check_run(result, epochs):
    assert len(result.history) == epochs
    for row in result.history:
        for key in ("train_loss", "val_loss", "kl", "mi", "inner_steps"):
            assert math.isfinite(row[key]), key
    assert result.test is not None and math.isfinite(result.test["iw_nll"])
    # an importance-weighted bound is at least as tight as the ELBO (up to Monte Carlo noise)
    assert result.test["iw_nll"] <= -result.test["elbo"] + 1.0


def test_fit_end_to_end_on_a_slice_of_ptb(shared_data):
    from pyro_lag.models.registry import build as build_model

    from pyro_lag.data import TextBatches, Vocabulary

    ptb = shared_data / "ptb"
    vocab = Vocabulary.from_file(ptb / "ptb.train.txt")
    train = TextBatches(_text_slice(ptb / "ptb.train.txt", vocab, {10, 11}, 64), 16, seed=1)
    valid = TextBatches(_text_slice(ptb / "ptb.valid.txt", vocab, {10, 11}, 32), 16, shuffle=False)
    test = TextBatches(_text_slice(ptb / "ptb.test.txt", vocab, {10, 11}, 32), 16, shuffle=False)
    torch.manual_seed(0)
    pair = build_model("lstm-text", "small", vocab_size=len(vocab), ni=16, enc_nh=32, dec_nh=32, latent_dim=4)
    result = fit(pair.model, pair.guide, train, valid, test, epochs=2, seed=0, max_inner_steps=6,
                 check_every=3, iw_samples=5)
    _check_run(result, 2)
    assert result.config["optim"] == "sgd" and result.history[0]["aggressive"]
    assert result.history[0]["inner_steps"] >= 3

    torch.manual_seed(0)
    lm = pair.decoder_only()
    baseline = fit(lm.model, lm.guide, train, valid, test, epochs=1, seed=0, iw_samples=5)
    assert baseline.decoder_only and baseline.history[0]["mi"] is None
    assert baseline.test["iw_nll"] == baseline.test["elbo"] * -1


def test_fit_end_to_end_on_a_slice_of_omniglot(shared_data):
    from pyro_lag.models.registry import build as build_model

    from pyro_lag.data import ImageBatches, load_images

    npz = shared_data / "omniglot28" / "omniglot28.npz"
    train_images, test_images = load_images(npz, "train"), load_images(npz, "test")
    train = ImageBatches(train_images[:48], 16, seed=2)
    valid = ImageBatches(train_images[-32:], 16, binarize="fixed", shuffle=False)
    test = ImageBatches(test_images[:32], 16, binarize="fixed", shuffle=False)
    torch.manual_seed(0)
    pair = build_model("pixelcnn-image", "small", enc_channels=(8, 8, 8), enc_hidden=32, hidden=8,
                       kernel_sizes=(5, 3), latent_dim=4)
    result = fit(pair.model, pair.guide, train, valid, test, epochs=1, seed=0, max_inner_steps=4,
                 check_every=2, iw_samples=4)
    _check_run(result, 1)
    assert result.config["optim"] == "adam" and result.config["stop_rule"] == "patience"


def test_fit_end_to_end_on_the_synthetic_corpus_with_exact_resume(shared_data, tmp_path):
    from pyro_lag.models.registry import build as build_model

    from pyro_lag.data import TextBatches, TextCorpus, Vocabulary, read_sentences

    path = shared_data / "synthetic-he2019" / "synthetic_data.txt"
    sentences = [s for _, s in zip(range(160), read_sentences(path))]
    vocab = Vocabulary.from_sentences(sentences)
    train = lambda: TextBatches(TextCorpus.from_sentences(sentences[:96], vocab), 16, seed=3)  # noqa: E731
    valid = TextBatches(TextCorpus.from_sentences(sentences[96:128], vocab), 16, shuffle=False)
    test = TextBatches(TextCorpus.from_sentences(sentences[128:], vocab), 16, shuffle=False)
    options = dict(epochs=2, seed=0, max_inner_steps=6, check_every=3, checkpoint_every=2, iw_samples=5)

    def pair():
        torch.manual_seed(0)
        return build_model("synthetic", "small", vocab_size=len(vocab), ni=8, enc_nh=16, dec_nh=16)

    net = pair()
    result = fit(net.model, net.guide, train(), valid, test, run_dir=tmp_path / "full", **options)
    _check_run(result, 2)
    # interrupted in epoch 2 (its shuffled order and the inner loop's own batch generator
    # must both come back), then resumed with fresh objects
    net = pair()
    with pytest.raises(_Interrupt):
        fit(net.model, net.guide, train(), valid, test, run_dir=tmp_path / "cut",
            callbacks=[_stop_at(2, 5)], **options)
    pyro.clear_param_store()
    net = pair()
    resumed = fit(net.model, net.guide, train(), valid, test, run_dir=tmp_path / "cut", resume=True, **options)
    expected, _ = _final_state(tmp_path / "full")
    got, _ = _final_state(tmp_path / "cut")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert resumed.test["elbo"] == result.test["elbo"]


# --------------------------------------------------------------------------- kill -9 and resume

_CHILD = r'''
"""Train the tiny VAE into a run directory; optionally stop dead at a chosen point and wait to be killed."""
import io, os, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import pyro_lag.io.checkpoint as checkpoint
import pyro_lag.engine.svi as svi
from test_training import TRAIN, VALID, build, quick_fit

run_dir, mode = sys.argv[2], sys.argv[3]


def freeze():
    print("READY", flush=True)
    time.sleep(300)


callbacks = []
if mode == "mid-epoch":  # between two steps, two steps after the last checkpoint
    class Freeze:
        def on_batch_end(self, info):
            if (info["epoch"], info["step"]) == (1, 4):
                freeze()
    callbacks.append(Freeze())
elif mode == "mid-inner-loop":  # inside a guide-only step of the aggressive inner loop
    inner_step = svi.AggressiveSVI.inner_step
    calls = {"n": 0}
    def frozen_inner_step(self, *args, **kwargs):
        loss = inner_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 14:
            freeze()
        return loss
    svi.AggressiveSVI.inner_step = frozen_inner_step
elif mode == "mid-write":  # half of a checkpoint's bytes are on disk in the temporary file
    real_save = torch.save
    def half_save(obj, handle):  # the first write of last.pt in this process is cut in half
        if "optim" not in obj:  # best.pt holds parameters only
            return real_save(obj, handle)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        freeze()
    checkpoint.torch.save = half_save

quick_fit(build(seed=5), run_dir=run_dir, resume=(mode != "full"), callbacks=callbacks, epochs=3,
          method="aggressive", optim="adam", checkpoint_every=2, max_aggressive_epochs=2)
print("DONE", flush=True)
'''


def _run_child(script, run_dir, mode, kill: bool):
    tests_dir = str(Path(__file__).resolve().parent)
    proc = subprocess.Popen(
        [sys.executable, str(script), tests_dir, str(run_dir), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        if kill:
            line = proc.stdout.readline()
            assert line.strip() == "READY", (line, proc.stderr.read() if proc.poll() is not None else "")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            assert proc.returncode == -signal.SIGKILL
        else:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and "DONE" in out, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_kill_9_at_several_points_then_resume_is_bitwise_exact(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    _run_child(script, tmp_path / "full", "full", kill=False)

    cut = tmp_path / "cut"
    _run_child(script, cut, "mid-epoch", kill=True)
    assert load_checkpoint(cut / "last.pt")["meta"]["state"]["step"] == 2
    _run_child(script, cut, "mid-inner-loop", kill=True)
    before_write = (cut / "last.pt").read_bytes()
    _run_child(script, cut, "mid-write", kill=True)
    # the killed write left a partial temporary file; the last checkpoint is untouched and whole
    partial = list(cut.glob(".last.pt.*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < len(before_write) * 0.6
    assert (cut / "last.pt").read_bytes() == before_write
    _run_child(script, cut, "resume", kill=False)

    expected, expected_history = _final_state(tmp_path / "full")
    got, got_history = _final_state(cut)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert [r["val_loss"] for r in got_history] == [r["val_loss"] for r in expected_history]
    assert not list(cut.glob(".*.tmp"))  # the next write cleaned the stale file
