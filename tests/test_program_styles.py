"""Five program styles users write (tests/program_styles.py) under AggressiveSVI and every estimator.

Each style trains with AggressiveSVI swapped in for pyro.infer.SVI, every estimator runs
on it, and where a figure is deterministic or has a closed form it is checked against a
brute-force loop: per-point IW shapes, active units over present steps only, the DMM's KL
over present steps only, LDA's likelihood term, the data plate, and clear errors.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import pyro
import pytest
import torch
from pyro import poutine
from pyro.optim import Adam

from benchmarks import program_catalog as styles
from benchmarks.program_catalog import Batch, Program, batch_size, split_batch
from pyro_lag import AggressiveSVI, active_units, evaluate, iw_log_likelihood, mutual_information, to_inference_data
from pyro_lag.trace.sites import AmbiguousDataPlateError

EVALUATE_KEYS = ("elbo", "recon", "kl", "mi", "mi_se", "au", "au_var", "num_points", "iw_nll")


@pytest.fixture(params=styles.STYLES)
def program(request: pytest.FixtureRequest) -> Program:
    """Each program style, freshly built (the VAE skips without the shared OMNIGLOT data)."""
    if request.param == "vae":
        return styles.vae(request.getfixturevalue("shared_data"))
    return getattr(styles, request.param)()


def snapshot() -> dict[str, torch.Tensor]:
    """A copy of every parameter in Pyro's param store."""
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in store.keys()}


def register_params(program: Program) -> None:
    """Run guide and model once, so every parameter is in the param store before training starts."""
    args, kwargs = split_batch(program.train_batches[0])
    guide_trace = poutine.trace(program.guide).get_trace(*args, **kwargs)
    poutine.replay(program.model, trace=guide_trace)(*args, **kwargs)


def frozen_dmm_guide(program: Program, seq: torch.Tensor, mask: torch.Tensor) -> tuple[Callable, dict[str, torch.Tensor]]:
    """The DMM guide replayed on one fixed draw of every z_t, and those draws ({"z_t": [B, z_dim]}).

    Replaying makes the guide deterministic, so an estimator and a brute force see the same
    z_{t-1} in q(z_t | z_{t-1}, x) and p(z_t | z_{t-1}), whatever random numbers either draws.
    """
    with torch.no_grad():
        fixed = poutine.trace(program.guide).get_trace(seq, mask)
    draws = {name: fixed.nodes[name]["value"] for name in program.local_sites}
    return poutine.replay(program.guide, trace=fixed), draws


# ------------------------------------------------------------------ training as a drop-in


@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites")  # ss_vae's labelled batches, as under SVI
@pytest.mark.parametrize("with_guide_batches", [False, True], ids=["own-batches", "guide-batches"])
def test_trains_as_drop_in_for_svi(program: Program, with_guide_batches: bool) -> None:
    """Same model, guide and loss as under pyro.infer.SVI; the ss_vae alternates supervised and unsupervised batches."""
    register_params(program)
    before = snapshot()
    svi = AggressiveSVI(
        program.model, program.guide, Adam({"lr": 0.01}), program.make_loss(),
        guide_batches=program.guide_batches if with_guide_batches else None,
        max_inner_steps=4, check_every=2,
    )
    losses = []
    for batch in program.train_batches[:3]:
        args, kwargs = split_batch(batch)
        losses.append(svi.step(*args, **kwargs))
    assert all(math.isfinite(loss) for loss in losses), losses
    after = snapshot()
    assert set(after) == set(before)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters not trained: {unchanged}"
    assert svi.aggressive is program.lags, svi.plain_reason
    if program.lags:
        assert svi.last_inner_steps > 0


# ------------------------------------------------------------------ every estimator runs


def test_evaluate_reports_every_key(program: Program) -> None:
    result = evaluate(program.model, program.guide, program.eval_batches, iw_samples=20)
    assert result["num_points"] == program.num_eval_points
    for key in ("elbo", "recon", "kl", "mi", "iw_nll"):
        assert math.isfinite(result[key]), key
    assert result["recon"] != 0.0
    assert result["elbo"] == pytest.approx(result["recon"] - result["kl"], abs=1e-4)
    assert result["au_var"].shape == (program.latent_dims,)
    missing = [key for key in EVALUATE_KEYS if key not in result]
    assert not missing, f"evaluate lacks {missing}"
    assert math.isfinite(result["mi_se"]) and result["mi_se"] >= 0


def test_mutual_information_and_active_units_run(program: Program) -> None:
    mi = mutual_information(program.guide, program.eval_batches)
    assert math.isfinite(mi) and mi <= math.log(program.num_eval_points) + 1e-6
    count, variance = active_units(program.guide, program.eval_batches)
    assert variance.shape == (program.latent_dims,)
    assert torch.isfinite(variance).all() and (variance >= 0).all()
    assert count == int((variance >= 0.01).sum())


def test_iw_gives_one_value_per_data_point(program: Program) -> None:
    """One log p(x) per point of the data plate: per document for LDA (never per topic), per row otherwise."""
    batch = program.eval_batches[0]
    args, kwargs = split_batch(batch)
    log_px = iw_log_likelihood(program.model, program.guide, *args, num_samples=20, **kwargs)
    assert log_px.shape == (batch_size(program, batch),)
    assert torch.isfinite(log_px).all()


def test_to_inference_data_holds_the_local_latents(program: Program) -> None:
    batch = program.eval_batches[0]
    idata = to_inference_data(guide=program.guide, batch=batch, num_draws=4, max_obs=3)
    assert set(idata.posterior.data_vars) == set(program.local_sites)
    for name in program.local_sites:
        sizes = idata.posterior[name].sizes
        assert sizes["draw"] == 4 and sizes["obs"] == min(3, batch_size(program, batch))


def test_ss_vae_supervised_batch_has_z_as_its_only_local_latent() -> None:
    """With labels given, y is observed: the guide samples z alone."""
    program = styles.ss_vae()
    xs, ys = program.extras["supervised"]
    result = evaluate(program.model, program.guide, [(xs, ys)], iw_samples=10)
    assert result["num_points"] == xs.shape[0]
    assert result["au_var"].shape == (program.net.z_dim,)
    assert math.isfinite(result["iw_nll"])


# ------------------------------------------------------------------ batch forms


def _comparable(result: dict[str, Any]) -> dict[str, float]:
    return {key: result[key] for key in ("elbo", "recon", "kl", "mi", "iw_nll")}


def test_tuple_and_args_kwargs_pair_are_the_same_call() -> None:
    """``(c, x)``, ``((c,), {"x": x})`` and ``((c, x), {})`` call the CVAE the same way: same draws, same figures."""
    program = styles.cvae()
    (c,), kwargs = program.eval_batches[0]
    forms = [(c, kwargs["x"]), ((c,), {"x": kwargs["x"]}), ((c, kwargs["x"]), {})]
    results = []
    for batch in forms:
        pyro.set_rng_seed(7)
        results.append(_comparable(evaluate(program.model, program.guide, [batch], iw_samples=5)))
    assert results[1] == results[0] and results[2] == results[0]


def test_bare_tensor_is_a_one_argument_call() -> None:
    """A bare tensor batch is the call ``model(data)``, like ``(data,)``."""
    program = styles.lda()
    (data,) = program.eval_batches[0]
    results = []
    for batch in (data, (data,), ((data,), {})):
        pyro.set_rng_seed(7)
        results.append(_comparable(evaluate(program.model, program.guide, [batch], iw_samples=5,
                                            data_plate="documents")))
    assert results[1] == results[0] and results[2] == results[0]


# ------------------------------------------------------------------ brute force: active units


def test_vae_active_units_are_the_variance_of_the_encoder_loc(shared_data) -> None:
    program = styles.vae(shared_data)
    count, variance = active_units(program.guide, program.eval_batches)
    with torch.no_grad():
        locs = torch.cat([program.net.encoder(x)[0] for x in program.eval_batches])
    expected = torch.tensor(
        [styles.unbiased_variance(locs[:, d].tolist()) for d in range(program.net.z_dim)], dtype=torch.float64
    )
    assert torch.allclose(variance.double(), expected, rtol=1e-4, atol=1e-9)
    assert count == int((expected >= 0.01).sum())


@pytest.mark.parametrize("mask_handler", [False, True], ids=["distribution-mask", "poutine-mask"])
def test_dmm_active_units_count_present_steps_only(mask_handler: bool) -> None:
    """Unit (t, d) is the variance of q's mean of z_t[d] over the sequences where step t is present.

    Exact: the guide is replayed on fixed draws (see ``frozen_dmm_guide``), so q's mean at
    step t, conditional on z_{t-1}, is the same number for the estimator and the loop.
    """
    program = styles.dmm(mask_handler=mask_handler)
    seq, mask = program.eval_batches[0]
    assert not mask.all() and (mask.sum(0) >= 2).all()  # padded steps exist; each step has a variance
    guide, draws = frozen_dmm_guide(program, seq, mask)
    _, variance = active_units(guide, [(seq, mask)])
    with torch.no_grad():
        expected = styles.brute_force_dmm_mean_variance(program.net, seq, mask, draws)
        everywhere = styles.brute_force_dmm_mean_variance(program.net, seq, torch.ones_like(mask), draws)
    assert not torch.allclose(expected, everywhere, rtol=1e-3)  # the padded steps would change the answer
    assert variance.shape == expected.shape
    assert torch.allclose(variance.double(), expected.double(), rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------ brute force: the DMM's KL


@pytest.mark.parametrize("mask_handler", [False, True], ids=["distribution-mask", "poutine-mask"])
def test_dmm_kl_sums_present_steps_only(mask_handler: bool) -> None:
    """evaluate's KL per sequence is sum over present t of KL(q(z_t | z_{t-1}, x) || p(z_t | z_{t-1})).

    Exact: the guide is replayed on fixed draws (see ``frozen_dmm_guide``), and the brute
    force takes torch's closed-form Normal KL per step at those draws, one sequence at a time.
    KL annealing (``annealing_factor``, a poutine.scale) must not change it.
    """
    program = styles.dmm(mask_handler=mask_handler)
    seq, mask = program.eval_batches[0]
    guide, draws = frozen_dmm_guide(program, seq, mask)
    with torch.no_grad():
        expected = float(styles.brute_force_dmm_kl(program.net, seq, mask, draws).mean())
        everywhere = float(styles.brute_force_dmm_kl(program.net, seq, torch.ones_like(mask), draws).mean())
    assert abs(everywhere - expected) > 0.05  # the padded steps would change the answer
    for batch in [(seq, mask), ((seq, mask), {"annealing_factor": 0.1})]:
        assert evaluate(program.model, guide, [batch])["kl"] == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------ brute force: the MI helper itself


def test_brute_force_mi_is_zero_when_all_points_are_the_same() -> None:
    """The reference MI helper: identical data points make every q(z_i | x_j) equal, so MI is 0."""
    program = styles.dmm()
    seq, mask = program.eval_batches[0]
    same = (seq[:1].expand(5, -1, -1), mask[:1].expand(5, -1))
    assert not same[1].all()
    with torch.no_grad():
        trace = poutine.trace(program.guide).get_trace(*same)
    draws = {name: trace.nodes[name]["value"] for name in program.local_sites}
    assert styles.brute_force_mi(program.guide, same, draws) == pytest.approx(0.0, abs=1e-5)


def test_brute_force_mi_ignores_the_padded_steps_of_each_point() -> None:
    """The reference MI helper: moving point i's draws at steps absent from its mask changes nothing."""
    program = styles.dmm()
    seq, mask = program.eval_batches[0]
    with torch.no_grad():
        trace = poutine.trace(program.guide).get_trace(seq, mask)
    draws = {name: trace.nodes[name]["value"] for name in program.local_sites}
    reference = styles.brute_force_mi(program.guide, (seq, mask), draws)
    moved = {name: value.clone() for name, value in draws.items()}
    for t, name in enumerate(program.local_sites):
        moved[name][~mask[:, t]] += 3.0
    assert styles.brute_force_mi(program.guide, (seq, mask), moved) == pytest.approx(reference, abs=1e-5)
    moved["z_1"] += 3.0  # step 1 is present in every sequence
    assert styles.brute_force_mi(program.guide, (seq, mask), moved) != pytest.approx(reference, abs=1e-3)


# ------------------------------------------------------------------ LDA: the data plate and its likelihood


def test_lda_data_plate_is_documents_not_topics() -> None:
    """The global plate "topics" comes first and holds more guide sites; the data plate is "documents"."""
    program = styles.lda()
    data = program.extras["data"]
    assert evaluate(program.model, program.guide, [(data,)])["num_points"] == data.shape[1]
    assert iw_log_likelihood(program.model, program.guide, data, num_samples=5).shape == (data.shape[1],)
    idata = to_inference_data(guide=program.guide, batch=(data,), num_draws=3)
    assert set(idata.posterior.data_vars) == {"doc_topics"}


def test_lda_topics_matching_a_batch_size_need_the_model_or_a_name() -> None:
    """As many topics as words per document: from the guide alone the topics plate could be the data
    plate, so guide-only estimators refuse with a clear error; given the model, the plate holding its
    observations decides."""
    program = styles.lda(words_per_doc=4)
    (data,) = program.eval_batches[0]
    assert data.shape[0] == program.net.num_topics
    with pytest.raises(AmbiguousDataPlateError, match="'documents', 'topics'"):
        active_units(program.guide, program.eval_batches)
    _, variance = active_units(program.guide, program.eval_batches, model=program.model)
    assert variance.shape == (program.net.num_topics,)  # doc_topics; the topics plate would give 1 + vocabulary
    idata = to_inference_data(guide=program.guide, model=program.model, batch=(data,), num_draws=3)
    assert set(idata.posterior.data_vars) == {"doc_topics"}
    assert evaluate(program.model, program.guide, program.eval_batches)["num_points"] == program.num_eval_points


def test_lda_named_data_plate_is_used() -> None:
    program = styles.lda()
    data = program.extras["data"]
    batches = program.eval_batches
    result = evaluate(program.model, program.guide, batches, iw_samples=5, data_plate="documents")
    assert result["num_points"] == data.shape[1] and result["recon"] != 0.0
    mi = mutual_information(program.guide, batches, data_plate="documents")
    assert math.isfinite(mi) and mi <= math.log(data.shape[1]) + 1e-6
    _, variance = active_units(program.guide, batches, data_plate="documents")
    assert variance.shape == (program.net.num_topics,)
    log_px = iw_log_likelihood(program.model, program.guide, data, num_samples=5, data_plate="documents")
    assert log_px.shape == (data.shape[1],)


def test_to_inference_data_takes_a_data_plate() -> None:
    program = styles.lda()
    idata = to_inference_data(guide=program.guide, batch=program.eval_batches[0], num_draws=3,
                              data_plate="documents")
    assert set(idata.posterior.data_vars) == {"doc_topics"}


def _run_estimator(name: str, model: Callable, guide: Callable, batches: list[Batch], data_plate: str | None) -> Any:
    """Call one estimator by name on ``batches`` (iw_log_likelihood on the first), with a data plate override."""
    if name == "iw_log_likelihood":
        args, kwargs = split_batch(batches[0])
        return iw_log_likelihood(model, guide, *args, num_samples=5, data_plate=data_plate, **kwargs)
    if name == "evaluate":
        return evaluate(model, guide, batches, data_plate=data_plate)
    estimator = {"mutual_information": mutual_information, "active_units": active_units}[name]
    return estimator(guide, batches, data_plate=data_plate)


ESTIMATORS = ("evaluate", "mutual_information", "active_units", "iw_log_likelihood")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_unknown_data_plate_is_named_in_the_error(estimator: str) -> None:
    program = styles.lda()
    with pytest.raises(ValueError, match="nope"):
        _run_estimator(estimator, program.model, program.guide, program.eval_batches, "nope")


def test_lda_recon_is_the_words_log_likelihood() -> None:
    """recon = E_q log p(words | doc_topics, topic_words), per document.

    evaluate draws once per batch, so the corpus repeated R times averages R draws; the brute
    force averages S guide draws, a loop over documents. They agree within 4 standard errors.
    """
    program = styles.lda()
    data = program.extras["data"]
    repeats, draws = 8, 64
    recon = evaluate(program.model, program.guide, [(data,)] * repeats)["recon"]
    per_draw = []
    with torch.no_grad():
        for _ in range(draws):
            trace = poutine.trace(program.guide).get_trace(data)
            doc_topics, topic_words = trace.nodes["doc_topics"]["value"], trace.nodes["topic_words"]["value"]
            per_draw.append(float(program.net.words_log_likelihood(data, doc_topics, topic_words).mean()))
    mean = sum(per_draw) / draws
    se = math.sqrt(styles.unbiased_variance(per_draw) * (1 / draws + 1 / repeats))
    assert recon != 0.0
    assert abs(recon - mean) < 4 * se + 1e-3, (recon, mean, se)


def test_lda_iw_matches_brute_force_on_the_same_draws() -> None:
    """Per document, log (1/K) sum_k p(words_d, doc_topics_dk | globals_k) / q(doc_topics_dk | words_d).

    Exact: the guide's draws during the estimate are recorded (``RecordDraws``), and the brute
    force recomputes every term from them, one document and one particle at a time. With
    K = 3 particles, mixing one particle's globals with another's documents shows.
    """
    program = styles.lda()
    (data,) = program.eval_batches[0]
    recorder = styles.RecordDraws()
    samples = 3
    log_px = iw_log_likelihood(program.model, recorder(program.guide), data, num_samples=samples,
                               chunk_size=samples, data_plate="documents")
    particles = styles.lda_particle_draws(recorder, samples, program.net, data.shape[1])
    with torch.no_grad():
        weights = torch.stack([program.net.log_weight(data, draws) for draws in particles])
    expected = torch.logsumexp(weights, 0) - math.log(samples)
    assert log_px.shape == expected.shape
    assert torch.allclose(log_px, expected, rtol=1e-4, atol=1e-3), (log_px, expected)


# ------------------------------------------------------------------ programs that must be refused clearly


REFUSED = {
    "sequential-plate": (styles.sequential_plate_program, ("points", "z_0")),
    "global-only": (styles.global_only_program, ("global_shift",)),
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", REFUSED)
def test_program_without_a_vectorized_local_latent_is_refused_by_name(case: str, estimator: str) -> None:
    """One clear ValueError that names the offending site or plate."""
    build, names = REFUSED[case]
    model, guide, x = build()
    with pytest.raises(ValueError) as error:
        _run_estimator(estimator, model, guide, [(x,)], None)
    assert any(name in str(error.value) for name in names), str(error.value)
