"""Typed settings, training state, the batch protocol, the noise-aware inner rule and in-epoch MI checks."""
from __future__ import annotations

import math
import random

import pytest
import torch

from pyro_lag import FitSettings, fit
from pyro_lag.data import TextBatches, TextCorpus, Vocabulary
from pyro_lag.data.batches import Batches, SequenceBatches, as_batches, validation_batches
from pyro_lag.engine.inner_loop import InnerLoopStopper, NoiseAwareStopper, make_stopper
from pyro_lag.io.checkpoint import load_checkpoint
from pyro_lag.io.mean_space import mean_space_from_inference_data
from pyro_lag.lightning.settings import LightningSettings
from pyro_lag.training.lr_plateau import Plateau
from pyro_lag.training.state import TrainingState
from tests.test_training import TRAIN, VALID, build

# --------------------------------------------------------------------------- settings


def test_settings_validate_once_with_one_line_errors():
    with pytest.raises(ValueError, match="^method must be one of"):
        FitSettings(method="vampire")
    with pytest.raises(ValueError, match="inner_rule must be 'paper' or 'noise'"):
        FitSettings(inner_rule="fast")
    with pytest.raises(ValueError, match="mi_checks_per_epoch must be an integer >= 1"):
        FitSettings(mi_checks_per_epoch=0)
    with pytest.raises(ValueError, match="anneal=True combines KL annealing with method aggressive"):
        FitSettings(method="standard", anneal=True)
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        FitSettings(lr=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        fit(None, None, TRAIN, VALID, learning_rate=0.1)


def test_resolution_fills_the_per_kind_defaults_and_keeps_what_was_given():
    text = FitSettings().resolved("text")
    assert (text.optim, text.lr, text.stop_rule, text.patience, text.decay_patience, text.decay_after) == (
        "sgd", 1.0, "drop", 2, 2, 15)
    image = FitSettings(lr=3e-3, stop_rule="patience").resolved("image")
    assert (image.optim, image.lr, image.patience, image.decay_patience, image.decay_after) == ("adam", 3e-3, 5, 20, 0)
    assert FitSettings.from_record(text.record()) == text  # plain data round trip


def test_policies_fill_the_inner_and_aggressive_step_limits_by_name():
    paper = FitSettings(policy="paper").resolved("text")
    assert (paper.max_inner_steps, paper.max_aggressive_steps) == (100, None)
    budget = FitSettings(policy="budget").resolved("image")
    assert (budget.max_inner_steps, budget.max_aggressive_steps) == (30, 250)
    mixed = FitSettings(policy="budget", max_inner_steps=45).resolved("text")  # what is given is kept
    assert (mixed.max_inner_steps, mixed.max_aggressive_steps, mixed.inner_steps_limit) == (45, 250, 45)
    assert FitSettings(policy="budget").inner_steps_limit == 30  # before resolution too
    with pytest.raises(ValueError, match="policy must be one of paper, budget, got 'fast'"):
        FitSettings(policy="fast")
    with pytest.raises(ValueError, match="max_inner_steps must be an integer >= 1"):
        FitSettings(max_inner_steps=0)


def test_resume_rules_come_from_the_settings():
    stored = FitSettings(epochs=3, lr=0.1).record()
    FitSettings(epochs=9, lr=0.1, iw_samples=50).check_resumable(stored, "runs/x")  # resumable: epochs, iw
    with pytest.raises(ValueError, match=r"runs/x was trained with lr=0.1, not 0.2"):
        FitSettings(epochs=3, lr=0.2).check_resumable(stored, "runs/x")
    with pytest.raises(ValueError, match="steps_per_epoch=5, not 6"):
        FitSettings(epochs=3, lr=0.1).check_resumable({**stored, "steps_per_epoch": 5}, "runs/x", steps_per_epoch=6)
    assert set(FitSettings.resumable_names()) == {"epochs", "checkpoint_every", "iw_samples", "iw_chunk_size"}


def test_lightning_settings_are_fit_settings():
    settings = LightningSettings.from_fit(FitSettings(method="cyclical", epochs=4, inner_rule="noise"))
    assert isinstance(settings, FitSettings) and settings.inner_rule == "noise" and not settings.aggressive
    assert settings.kl_schedule(10) is not None  # the cyclical schedule, as fit builds it
    assert settings.replace(epochs=8).epochs == 8 and isinstance(settings.replace(epochs=8), LightningSettings)


def test_training_state_round_trips_through_plain_data():
    state = TrainingState.start(0.5)
    state.totals.add(2.0, 4, 7, True)
    state.history.append({"epoch": 1, "val_loss": 3.0})
    assert state.improves(3.0) and not state.improves(4.0)
    state.plateau.should_decay(FitSettings(lr_decay=0.5, decay_patience=1, decay_after=0), 0, 1e5)
    again = TrainingState(plateau=Plateau(lr=9.0))
    again.load_state_dict(state.state_dict())
    assert again == state and again.lr == 0.25


# --------------------------------------------------------------------------- batches


def test_sequences_and_batch_sources_meet_the_protocol():
    vocab = Vocabulary.from_sentences([["a", "b"], ["b", "c", "a"]])
    corpus = TextCorpus.from_sentences([["a", "b"], ["b", "c", "a"], ["c"]], vocab)
    source = TextBatches(corpus, 2, seed=0)
    assert isinstance(source, Batches) and as_batches(source) is source
    wrapped = as_batches(TRAIN)
    assert isinstance(wrapped, SequenceBatches) and isinstance(wrapped, Batches)
    assert len(wrapped) == len(TRAIN) and list(wrapped.iter_from(3, 2)) == TRAIN[2:]
    assert wrapped.normalizer(TRAIN[0]) == TRAIN[0][0].shape[0]
    torch.manual_seed(0)
    index = int(torch.randint(len(TRAIN), ()))
    torch.manual_seed(0)
    assert wrapped.sample() is TRAIN[index]  # the draw fit has always made
    assert validation_batches(VALID) == list(VALID)
    with pytest.raises(ValueError, match="expected a batch source or a sequence of batches, got int"):
        as_batches(3)


# --------------------------------------------------------------------------- inner rule


def _run(stopper: InnerLoopStopper, losses) -> int:
    for loss in losses:
        if stopper.update(loss * 10, 10):
            break
    return stopper.steps


def test_noise_rule_stops_once_improvement_is_within_noise():
    rng = random.Random(0)
    flat = [3.0 + rng.gauss(0, 0.5) for _ in range(200)]
    assert _run(make_stopper("noise", None, 100), flat) == 10  # two windows of 5: no real improvement
    steep = [10.0 - 0.1 * i + rng.gauss(0, 0.05) for i in range(200)]
    assert _run(make_stopper("noise", None, 100), steep) == 100  # a clear trend runs to the cap
    assert _run(make_stopper("paper", None, 100), steep) == 100
    assert _run(make_stopper("paper", None, 100), flat) in (30, 45, 60, 75, 90, 100)
    assert make_stopper("paper", None, 100).check_every == 15 and make_stopper("noise", 7, 100).check_every == 7
    with pytest.raises(ValueError, match="inner_rule must be one of paper, noise"):
        make_stopper("fast", None, 10)
    with pytest.raises(ValueError, match="noise factor"):
        NoiseAwareStopper(noise=-1.0)


def test_noise_rule_matches_its_definition_window_by_window():
    losses = [5.0, 4.0, 4.5, 3.5, 4.0, 3.9, 3.8, 4.1, 3.7, 3.6]
    first, second = losses[:5], losses[5:]
    se = [torch.tensor(w).std().item() / math.sqrt(5) for w in (first, second)]
    improvement = sum(first) / 5 - sum(second) / 5
    assert improvement > math.hypot(*se)  # these windows improve by more than their noise: go on
    for factor, goes_on in ((1.0, True), (improvement / math.hypot(*se) + 0.01, False)):
        stopper = NoiseAwareStopper(check_every=5, max_steps=100, noise=factor)
        decisions = [stopper.update(loss * 10, 10) for loss in losses]
        assert decisions[:9] == [False] * 9 and decisions[9] is not goes_on


# --------------------------------------------------------------------------- MI checks within an epoch


def test_mi_checks_within_the_epoch_can_end_aggressive_mode_mid_epoch(tmp_path):
    def checks(run_dir, per_epoch):
        net = build(seed=3)
        fit(net.model, net.guide, TRAIN, VALID, epochs=2, lr=0.01, max_inner_steps=6, seed=0, run_dir=run_dir,
            stop_rule="paper", mi_checks_per_epoch=per_epoch, inner_rule="noise", check_every=2)
        meta = load_checkpoint(run_dir / "last.pt")["meta"]
        aggressive_epochs = sum(bool(row["aggressive"]) for row in meta["state"]["history"])
        return meta["svi"], aggressive_epochs

    once, epochs = checks(tmp_path / "once", 1)
    assert len(once["mi_history"]) == epochs  # one check at the end of each aggressive epoch
    often, epochs = checks(tmp_path / "often", 5)  # 5 batches an epoch: a check after each step
    assert len(often["mi_history"]) > epochs  # checks inside the epochs
    if not often["aggressive"]:  # the paper's rule ended it at its last check
        assert f"after MI check {len(often['mi_history'])}:" in often["stop_reason"]


def test_fit_result_carries_the_posterior_mean_space_into_inference_data():
    net = build(seed=1)
    result = fit(net.model, net.guide, TRAIN, VALID, VALID, epochs=1, lr=0.01, max_inner_steps=4, seed=0)
    snapshots = {"epoch 1 (aggressive)": ([0.1, -0.2, 0.3], [0.0, -0.1, 0.2]), "end": ([0.5, 0.1], [0.4, 0.2])}
    idata = result.to_inference_data(net.guide, VALID[0], model=net.model, posterior_mean_space=snapshots)
    assert {"posterior", "latent_usage", "training", "posterior_mean_space"} <= set(idata.groups())
    back = mean_space_from_inference_data(idata)
    assert list(back) == list(snapshots)
    for label, (model_means, guide_means) in snapshots.items():
        assert back[label][0].tolist() == pytest.approx(model_means)
        assert back[label][1].tolist() == pytest.approx(guide_means)
    assert idata.attrs["kl"] == pytest.approx(result.test["kl"])


def test_aggressive_svi_draws_inner_batches_from_a_batch_source():
    from pyro_lag.engine.guide_batches import GuideBatches

    vocab = Vocabulary.from_sentences([["a", "b"], ["b", "c", "a"]])
    corpus = TextCorpus.from_sentences([["a", "b"], ["b", "c", "a"], ["c", "a"], ["b"]], vocab)
    source = TextBatches(corpus, 2, seed=4)
    twin = TextBatches(corpus, 2, seed=4)
    batches = GuideBatches(source)
    for _ in range(3):
        args, kwargs = batches.next()
        expected = twin.sample()
        assert kwargs == {} and all(torch.equal(a, b) for a, b in zip(args, expected))
