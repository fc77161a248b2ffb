"""The benchmarks' plain-PyTorch reference loop computes Pyro's ELBO and trains as the paper's code; every benchmark runs.

The reference loop is the baseline of the speed figures, so it must do the same work
as the Pyro programs it is timed against: the same loss, the same gradients, the same
parameter updates (encoder only in inner steps, after a full backward).
"""
from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro_lag.models.registry import build

from benchmarks import run_all
from benchmarks.reference_loop import (
    ReferenceAggressiveLoop,
    elbo_loss,
    elbo_terms,
    iw_log_likelihood_reference,
)
from pyro_lag import iw_log_likelihood
from pyro_lag.data import TextBatches, TextCorpus, Vocabulary, read_sentences

ROOT = Path(__file__).resolve().parents[1]
BATCH = 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a CPU shared with other processes, several threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ptb_sentences(shared_data: Path) -> TextCorpus:
    """Eighteen PTB validation sentences (six each of 7, 8 and 9 words), with their own small vocabulary."""
    path = shared_data / "ptb" / "ptb.valid.txt"
    if not path.is_file():
        pytest.skip(f"PTB not found: {path}")
    picked = []
    for words in (7, 8, 9):
        picked += [s for s in read_sentences(path) if len(s) == words][:BATCH]
    return TextCorpus.from_sentences(picked, Vocabulary.from_sentences(picked))


@pytest.fixture
def batches(ptb_sentences: TextCorpus) -> TextBatches:
    return TextBatches(ptb_sentences, BATCH, seed=0)


@pytest.fixture
def pair(ptb_sentences: TextCorpus):
    torch.manual_seed(0)
    return build("lstm-text", "small", vocab_size=len(ptb_sentences.vocab), latent_dim=3, ni=8, enc_nh=8, dec_nh=8)


def first(batches: TextBatches) -> torch.Tensor:
    return next(iter(batches.iter_from(0, 0)))[0]


def pyro_loss(elbo, pair, x: torch.Tensor, seed: int) -> float:
    torch.manual_seed(seed)
    return elbo.loss(pair.model, pair.guide, x)


def reference_loss(pair, x: torch.Tensor, seed: int, **options) -> torch.Tensor:
    torch.manual_seed(seed)
    return elbo_loss(pair, x, **options)


# ------------------------------------------------------------------ the ELBO


def test_mc_loss_equals_trace_elbo_on_the_same_noise(pair, batches):
    """Same seed, same z-noise and dropout masks: the hand-written loss is Trace_ELBO's, to float precision."""
    x = first(batches)
    for seed in (0, 1):
        expected = pyro_loss(Trace_ELBO(), pair, x, seed)
        got = reference_loss(pair, x, seed, kl="mc")
        assert got.sum().item() == pytest.approx(expected, rel=1e-5)
    assert pyro_loss(Trace_ELBO(), pair, x, 0) != pytest.approx(pyro_loss(Trace_ELBO(), pair, x, 1), rel=1e-7)


def test_batch_mean_equals_the_per_example_scaled_elbo(pair, batches):
    """fit scales log-densities by 1/B; the reference averages over the batch: the same number."""
    x = first(batches)

    def scaled(fn):
        return poutine.scale(fn, scale=1.0 / x.shape[0])

    torch.manual_seed(3)
    expected = Trace_ELBO().loss(scaled(pair.model), scaled(pair.guide), x)
    assert reference_loss(pair, x, 3, kl="mc").mean().item() == pytest.approx(expected, rel=1e-5)


def test_closed_form_kl_equals_trace_mean_field_elbo(pair, batches):
    x = first(batches)
    expected = pyro_loss(TraceMeanField_ELBO(), pair, x, 2)
    assert reference_loss(pair, x, 2, kl="closed").sum().item() == pytest.approx(expected, rel=1e-5)


def test_gradients_equal_trace_elbo_gradients(pair, batches):
    """A full backward of the reference loss gives Trace_ELBO's gradient for every encoder and decoder parameter."""
    x = first(batches)
    torch.manual_seed(5)
    Trace_ELBO().loss_and_grads(pair.model, pair.guide, x)
    expected = {name: p.grad.clone() for name, p in pair.named_parameters()}
    pair.zero_grad()
    reference_loss(pair, x, 5, kl="mc").sum().backward()
    for name, p in pair.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-4, atol=1e-6), name
    assert any(float(g.abs().sum()) > 0 for n, g in expected.items() if n.startswith("encoder."))


def test_cross_entropy_and_the_pairs_categorical_agree(pair, batches):
    x = first(batches)
    torch.manual_seed(7)
    ce, kl_ce = elbo_terms(pair, x, kl="mc", recon="cross_entropy")
    torch.manual_seed(7)
    cat, kl_cat = elbo_terms(pair, x, kl="mc", recon="pair")
    assert torch.allclose(ce, cat, rtol=1e-5)
    assert torch.equal(kl_ce, kl_cat)


def test_unknown_options_are_refused(pair, batches):
    with pytest.raises(ValueError, match="kl must be one of"):
        elbo_loss(pair, first(batches), kl="analytic")
    with pytest.raises(ValueError, match="recon must be one of"):
        elbo_loss(pair, first(batches), recon="bce")
    with pytest.raises(ValueError, match="max_inner_steps"):
        ReferenceAggressiveLoop(pair, lambda: first(batches), max_inner_steps=0)


# ------------------------------------------------------------------ the training loop


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))


def test_inner_step_backpropagates_everywhere_but_steps_the_encoder_only(pair, batches):
    x = first(batches)
    loop = ReferenceAggressiveLoop(pair, batches.sample, lr=0.5)
    encoder, decoder = snapshot(pair.encoder), snapshot(pair.decoder)
    loop.inner_step(x)
    assert changed(pair.encoder, encoder)
    assert not changed(pair.decoder, decoder)
    # the full backward of the reference: decoder gradients are computed, only not applied
    assert all(p.grad is not None for p in pair.decoder.parameters())
    assert float(pair.decoder.pred_linear.weight.grad.abs().sum()) > 0


def test_model_step_steps_the_decoder_only_while_aggressive(pair, batches):
    x = first(batches)
    loop = ReferenceAggressiveLoop(pair, batches.sample, lr=0.5)
    encoder, decoder = snapshot(pair.encoder), snapshot(pair.decoder)
    loop.model_step(x)
    assert changed(pair.decoder, decoder) and not changed(pair.encoder, encoder)
    loop.aggressive = False
    loop.model_step(x)
    assert changed(pair.encoder, encoder)


def test_gradients_are_clipped_over_all_parameters(pair, batches):
    loop = ReferenceAggressiveLoop(pair, batches.sample, clip_grad=0.01)
    loop.inner_step(first(batches))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pair.parameters()]))
    assert float(norm) <= 0.01 * (1 + 1e-4)


def test_fixed_inner_step_count_draws_fresh_batches(pair, batches):
    drawn = []

    def sample() -> torch.Tensor:
        drawn.append(1)
        return batches.sample()[0]

    loop = ReferenceAggressiveLoop(pair, sample, max_inner_steps=4, check_every=None)
    loop.step(first(batches))
    assert loop.last_inner_steps == 4
    assert len(drawn) == 3  # one for each inner step after the first


def test_inner_loop_stops_when_a_windows_loss_per_token_rises(pair, batches):
    """The reference's rule: windows of 15 steps; stop after the first window whose loss per token is higher."""
    x = first(batches)
    per_token = [3.0] * 15 + [2.0] * 15 + [2.5] * 15 + [1.0] * 15
    loop = ReferenceAggressiveLoop(pair, lambda: x, max_inner_steps=100, check_every=15)
    tokens = (x.shape[1] - 1) * x.shape[0]
    calls = iter(per_token)
    loop.inner_step = lambda batch: next(calls) * tokens  # summed loss over the batch, as inner_step returns
    assert loop.inner_loop(x) == 45
    loop_max = ReferenceAggressiveLoop(pair, lambda: x, max_inner_steps=20, check_every=15)
    loop_max.inner_step = lambda batch: 1.0
    assert loop_max.inner_loop(x) == 20


# ------------------------------------------------------------------ IW-NLL baseline


def test_reference_iw_nll_agrees_with_pyro_lags(pair, batches):
    """Both estimate the same log p(x) from 500 importance samples: their means agree within Monte Carlo error.

    The networks get weights large enough that q(z|x) is far from the prior and the
    decoder depends on z, so the importance weights vary and the bound is tighter than the ELBO.
    """
    with torch.no_grad():
        for p in pair.encoder.parameters():
            p.uniform_(-1, 1)
        for m in (pair.decoder.trans_linear, pair.decoder.pred_linear):
            m.weight.uniform_(-1, 1)
    x = first(batches)
    reference, pyro_lag = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        reference.append(iw_log_likelihood_reference(pair, x, num_samples=500, chunk_size=100))
        torch.manual_seed(100 + seed)
        pyro_lag.append(iw_log_likelihood(pair.model, pair.guide, x, num_samples=500, chunk_size=100))
    reference, pyro_lag = torch.stack(reference), torch.stack(pyro_lag)
    assert reference.shape == pyro_lag.shape == (3, x.shape[0])
    assert abs(float(reference.mean() - pyro_lag.mean())) < 0.25
    pair.eval()
    with torch.no_grad():
        elbo = torch.stack([-elbo_loss(pair, x, kl="closed") for _ in range(200)]).mean(0)
    gain = reference.mean(0) - elbo
    assert float(gain.mean()) > 0.1 and bool((gain > -0.1).all())  # a tighter bound than the ELBO


# ------------------------------------------------------------------ the scripts


TINY = ["--size", "tiny", "--batch-size", "4", "--seed", "0"]
SCRIPTS = {
    "reference_loop": ("bench_reference_loop",
                       ["--lengths", "10,11", "--per-length", "4", "--inner-steps", "2", "--repeats", "2", "--epochs", "1"]),
    "aggressive_vs_standard": ("bench_aggressive_vs_standard",
                               ["--lengths", "10,11", "--per-length", "4", "--valid-lengths", "10",
                                "--valid-per-length", "4", "--epochs", "2", "--max-inner-steps", "3"]),
    "pyro_overhead": ("bench_pyro_overhead", ["--length", "10", "--repeats", "3"]),
    "inner_vs_full_step": ("bench_inner_step", ["--length", "10", "--repeats", "3"]),
    "diagnostics": ("bench_diagnostics",
                    ["--lengths", "10,11", "--per-length", "8", "--valid-lengths", "10", "--valid-per-length", "4",
                     "--repeats", "2", "--iw-samples", "20", "--iw-chunk", "10", "--iw-batch", "2", "--iw-batches", "1"]),
}


HEADLINE = {
    "reference_loop": lambda r: r["epoch_ratio"]["median"],
    "aggressive_vs_standard": lambda r: r["total_ratio"],
    "pyro_overhead": lambda r: r["overhead"]["median"],
    "inner_vs_full_step": lambda r: r["inner_over_full"]["median"],
    "diagnostics": lambda r: r["mi_au_fraction_of_epoch"]["median"],
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_benchmark_runs_at_tiny_size(name, shared_data, tmp_path):
    """Each benchmark runs end to end on tiny sizes, writes its JSON, and the table quotes it with its target."""
    module, options = SCRIPTS[name]
    argv = [*TINY, "--out", str(tmp_path), "--data", str(shared_data / "ptb"), *options]
    returned = importlib.import_module(f"benchmarks.{module}").main(argv)
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["benchmark"] == name and result["threads"] == 1 and result["device"]
    assert returned["target_met"] == result["target_met"]
    figure = HEADLINE[name](result)
    assert math.isfinite(figure) and figure > 0
    assert isinstance(result["target_met"], bool)
    table = run_all.render_table(tmp_path)
    assert f"`{name}.json`" in table
    assert ("| yes |" in table) or ("| no |" in table)


def test_benchmark_runs_as_a_script(shared_data, tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_pyro_overhead.py"), *TINY, "--out", str(tmp_path),
               "--data", str(shared_data / "ptb"), "--length", "10", "--repeats", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Pyro SVI step" in run_all.render_table(tmp_path)


def test_benchmarks_refuse_a_missing_data_folder(tmp_path):
    from benchmarks import bench_pyro_overhead

    with pytest.raises(FileNotFoundError, match="PTB not found"):
        bench_pyro_overhead.main([*TINY, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_profile_names_each_kind_of_step(shared_data, tmp_path):
    """profile_steps writes, for each kind of step, operators whose shares lie in (0, 1] and sum to at most 1."""
    from benchmarks import profile_steps

    profile_steps.main([*TINY, "--out", str(tmp_path), "--data", str(shared_data / "ptb"), "--length", "10",
                        "--steps", "2", "--top", "5"])
    result = json.loads((tmp_path / "profile_steps.json").read_text())
    assert set(result["steps"]) == {"full SVI step", "AggressiveSVI inner step", "reference inner step"}
    for figures in result["steps"].values():
        shares = [op["share"] for op in figures["operators"]]
        assert len(shares) == 5 and all(0 < s <= 1 for s in shares) and sum(shares) <= 1 + 1e-9
        assert shares == sorted(shares, reverse=True) and figures["ms_per_step"] > 0
    markdown = (tmp_path / "profile_steps.md").read_text()
    assert "## AggressiveSVI inner step" in markdown and "aten::" in markdown
