"""Model/guide pairs of pyro_lag.models: trace shapes, log-densities, vectorisation, sampling, registry."""
from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from pyro_lag.models import (
    LatentPair,
    SyntheticGenerator,
    build,
    list_models,
    sample_corpus,
    true_posterior_mean,
    write_corpus,
)
from pyro_lag.models.registry import MODELS

BOS, EOS = 1000, 1001  # ids appended after the synthetic corpus' 0..999 (vocabulary 1002)


# ----- real inputs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_batch(request) -> torch.Tensor:
    """Four sentences of the shared synthetic corpus, wrapped in <s> ... </s>: LongTensor [4, 12]."""
    data = request.getfixturevalue("shared_data") / "synthetic-he2019" / "synthetic_data.txt"
    rows = [[int(t) for t in line.split()] for line in data.read_text().splitlines()[:4]]
    body = torch.tensor(rows, dtype=torch.long)
    bos = torch.full((4, 1), BOS, dtype=torch.long)
    eos = torch.full((4, 1), EOS, dtype=torch.long)
    return torch.cat([bos, body, eos], dim=1)


@pytest.fixture(scope="module")
def image_batch(request) -> torch.Tensor:
    """Three OMNIGLOT characters, binarised with a fixed seed: FloatTensor [3, 1, 28, 28] of 0/1."""
    path = request.getfixturevalue("shared_data") / "omniglot28" / "omniglot28.npz"
    with np.load(path) as npz:
        pixels = torch.from_numpy(npz["train"][:3].astype(np.float32) / 255.0)
    gen = torch.Generator().manual_seed(0)
    return torch.bernoulli(pixels.unsqueeze(1), generator=gen)


def tiny(name: str) -> LatentPair:
    """The smallest instance of each family that still exercises every component."""
    if name == "lstm-text":
        return build("lstm-text", vocab_size=1002, latent_dim=3, ni=8, enc_nh=6, dec_nh=5, bos_id=BOS, eos_id=EOS)
    if name == "synthetic":
        return build("synthetic", vocab_size=1002, bos_id=BOS, eos_id=EOS)
    if name == "mlp-image":
        return build("mlp-image", latent_dim=3, hidden=7)
    if name == "pixelcnn-image":
        return build("pixelcnn-image", latent_dim=3, enc_channels=(4, 4, 4), enc_hidden=8, hidden=6,
                     kernel_sizes=(5, 3), latent_feature_maps=2)
    raise AssertionError(name)


FAMILIES = [name for name in ("lstm-text", "synthetic", "mlp-image", "pixelcnn-image") if name in MODELS]


@pytest.fixture
def batch_for(request):
    """Return the real batch matching a pair's kind."""
    def get(pair: LatentPair) -> torch.Tensor:
        return request.getfixturevalue("text_batch" if pair.kind == "text" else "image_batch")
    return get


def traces(pair: LatentPair, x: torch.Tensor, particles: int | None = None):
    """Guide trace and model trace replayed on it, optionally inside a particle plate at dim -2."""
    def run():
        guide_tr = poutine.trace(pair.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(pair.model, trace=guide_tr)).get_trace(x)
        return guide_tr, model_tr

    if particles is None:
        guide_tr, model_tr = run()
    else:
        with pyro.plate("particles", particles, dim=-2):
            guide_tr, model_tr = run()
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    return guide_tr, model_tr


# ----- every family ------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_trace_shapes(name, batch_for):
    pair = tiny(name)
    x = batch_for(pair)
    b, d = x.shape[0], pair.latent_dim
    guide_tr, model_tr = traces(pair, x)
    assert guide_tr.nodes["z"]["value"].shape == (b, d)
    assert guide_tr.nodes["z"]["log_prob"].shape == (b,)
    assert model_tr.nodes["z"]["log_prob"].shape == (b,)
    assert model_tr.nodes["x"]["is_observed"]
    assert model_tr.nodes["x"]["log_prob"].shape == (b,)
    assert model_tr.nodes["x"]["scale"] == 1.0  # plain sum over the batch
    assert any(n.startswith("decoder$$$") for n in model_tr.param_nodes)
    assert any(n.startswith("encoder$$$") for n in guide_tr.param_nodes)
    assert torch.isfinite(model_tr.log_prob_sum())


@pytest.mark.parametrize("name", FAMILIES)
def test_vectorized_latent_matches_loop(name, batch_for):
    """z of shape [K, B, D] gives log p(x|z) of shape [K, B], equal to K separate calls."""
    pair = tiny(name).eval()
    x = batch_for(pair)
    k = 3
    z = torch.randn(k, x.shape[0], pair.latent_dim)
    with torch.no_grad():
        batched = pair.log_likelihood(x, z)
        looped = torch.stack([pair.log_likelihood(x, z[i]) for i in range(k)])
        deeper = pair.log_likelihood(x, z.unsqueeze(0).expand(2, k, *z.shape[1:]))
    assert batched.shape == (k, x.shape[0])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(deeper, batched.expand(2, k, x.shape[0]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_program_runs_inside_particle_plate(name, batch_for):
    """The importance-weighted estimator's setting: model and guide inside a size-K plate left of 'data'."""
    pair = tiny(name)
    x = batch_for(pair)
    guide_tr, model_tr = traces(pair, x, particles=4)
    assert guide_tr.nodes["z"]["value"].shape == (4, x.shape[0], pair.latent_dim)
    assert model_tr.nodes["x"]["log_prob"].shape == (4, x.shape[0])
    assert model_tr.nodes["z"]["log_prob"].shape == (4, x.shape[0])


@pytest.mark.parametrize("name", FAMILIES)
def test_decoder_only(name, batch_for):
    pair = tiny(name)
    x = batch_for(pair)
    lm = pair.decoder_only()
    assert type(lm) is type(pair) and lm.kind == pair.kind
    assert lm.latent_dim == 0 and lm.encoder is None
    guide_tr = poutine.trace(lm.guide).get_trace(x)
    assert not [n for n, s in guide_tr.nodes.items() if s["type"] == "sample"]
    pyro.clear_param_store()
    model_tr = poutine.trace(lm.model).get_trace(x)
    model_tr.compute_log_prob()
    sites = [n for n, s in model_tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]
    assert sites == ["x"]
    assert model_tr.nodes["x"]["log_prob"].shape == (x.shape[0],)
    assert lm.log_likelihood(x).shape == (x.shape[0],)
    with pytest.raises(ValueError, match="decoder-only"):
        lm.encode(x)


@pytest.mark.parametrize("name", FAMILIES)
def test_svi_step_changes_both_networks(name, batch_for):
    pair = tiny(name)
    x = batch_for(pair)
    svi = pyro.infer.SVI(pair.model, pair.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    before = {k: v.detach().clone() for k, v in pair.state_dict().items()}
    loss = svi.step(x)
    assert math.isfinite(loss) and loss > 0
    after = pair.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"encoder", "decoder"}


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_shapes(name, batch_for):
    pair = tiny(name)
    x = batch_for(pair)
    loc, scale = pair.encode(x)
    assert loc.shape == scale.shape == (x.shape[0], pair.latent_dim)
    assert bool((scale > 0).all())


# ----- text ---------------------------------------------------------------------------------
def _manual_lstm_text_log_lik(pair, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x|z) written out step by step: c0 = W z, h0 = tanh(c0), input [emb(x_t); z], softmax output."""
    dec = pair.decoder
    w_ih, w_hh = dec.lstm.weight_ih_l0, dec.lstm.weight_hh_l0
    b = dec.lstm.bias_ih_l0 + dec.lstm.bias_hh_l0
    c = z @ dec.trans_linear.weight.T
    h = torch.tanh(c)
    total = torch.zeros(x.shape[0])
    for t in range(x.shape[1] - 1):
        inp = torch.cat([dec.embed.weight[x[:, t]], z], dim=-1)
        i, f, g, o = (inp @ w_ih.T + h @ w_hh.T + b).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        logits = h @ dec.pred_linear.weight.T
        total += torch.distributions.Categorical(logits=logits).log_prob(x[:, t + 1])
    return total


def test_lstm_text_log_density_by_hand(text_batch):
    pair = tiny("lstm-text").eval()
    with torch.no_grad():
        z = torch.randn(text_batch.shape[0], pair.latent_dim)
        expected = _manual_lstm_text_log_lik(pair, text_batch, z)
        pyro.clear_param_store()
        cond = poutine.condition(pair.model, data={"z": z})
        tr = poutine.trace(cond).get_trace(text_batch)
        tr.compute_log_prob()
    torch.testing.assert_close(tr.nodes["x"]["log_prob"], expected, rtol=1e-5, atol=1e-4)


def test_next_token_categorical_equals_torch_categorical():
    """The fused cross-entropy distribution scores, broadcasts, expands and samples like Categorical."""
    from pyro_lag.models.lstm_text import NextTokenCategorical

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 6, 50, generator=gen)  # particles, batch, length, vocabulary
    tokens = torch.randint(0, 50, (4, 6), generator=gen)  # broadcast over the particle dim
    fused = NextTokenCategorical(logits, validate_args=True)
    reference = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(fused.log_prob(tokens), reference.log_prob(tokens), rtol=0, atol=1e-5)
    assert fused.expand((2, 3, 4, 6)).log_prob(tokens).shape == (2, 3, 4, 6)
    assert fused.sample((5,)).shape == (5, 3, 4, 6)
    with pytest.raises(ValueError):
        fused.log_prob(torch.full((4, 6), 50))  # outside the vocabulary


def test_lstm_text_initialisation_as_reference():
    pair = build("lstm-text", vocab_size=50, ni=16, enc_nh=16, dec_nh=16)
    for name, p in pair.state_dict().items():
        bound = 0.1 if "embed" in name else 0.01
        assert float(p.abs().max()) <= bound, name
        assert float(p.abs().max()) > bound / 2, name


def test_lstm_text_dropout_only_in_training(text_batch):
    pair = build("lstm-text", vocab_size=1002, ni=8, enc_nh=8, dec_nh=8, latent_dim=2)
    z = torch.randn(text_batch.shape[0], 2)
    pair.eval()
    assert torch.equal(pair.log_likelihood(text_batch, z), pair.log_likelihood(text_batch, z))
    pair.train()
    torch.manual_seed(0)
    a = pair.log_likelihood(text_batch, z)
    b = pair.log_likelihood(text_batch, z)
    assert not torch.equal(a, b)


def test_text_prior_samples_valid():
    pair = tiny("lstm-text")
    sents = pair.sample_prior(6, torch.Generator().manual_seed(1), max_len=12)
    assert len(sents) == 6
    for s in sents:
        assert 0 < len(s) <= 12 or len(s) == 0
        assert all(isinstance(t, int) and 0 <= t < 1002 and t != EOS for t in s)
    again = pair.sample_prior(6, torch.Generator().manual_seed(1), max_len=12)
    assert again == sents
    assert pair.training  # generation restores the training mode
    greedy = pair.sample_prior(3, torch.Generator().manual_seed(2), max_len=5, greedy=True)
    assert all(len(s) <= 5 for s in greedy)
    lm = pair.decoder_only()
    assert len(lm.sample_prior(2, torch.Generator().manual_seed(0), max_len=4)) == 2


def test_text_sampling_stops_at_eos():
    """A decoder whose output always puts all mass on </s> generates empty sentences."""
    pair = build("lstm-text", vocab_size=5, ni=4, enc_nh=4, dec_nh=4, latent_dim=2, bos_id=0, eos_id=1)
    out = torch.nn.Linear(4, 5)
    with torch.no_grad():
        out.weight.zero_()
        out.bias.copy_(torch.tensor([0.0, 100.0, 0.0, 0.0, 0.0]))
    pair.decoder.pred_linear = out
    assert pair.sample_prior(3, torch.Generator().manual_seed(0), max_len=7) == [[], [], []]
    out.bias.data[1] = -100.0
    assert all(len(s) == 7 for s in pair.sample_prior(3, torch.Generator().manual_seed(0), max_len=7))


def test_text_reconstruct(text_batch):
    pair = tiny("lstm-text")
    out = pair.reconstruct(text_batch, max_len=9)
    assert len(out) == text_batch.shape[0]
    assert all(len(s) <= 9 and all(0 <= t < 1002 for t in s) for s in out)


def test_text_needs_bos_to_generate():
    pair = build("lstm-text", vocab_size=10, ni=4, enc_nh=4, dec_nh=4, bos_id=None)
    with pytest.raises(ValueError, match="bos_id"):
        pair.sample_prior(2)


# ----- images -------------------------------------------------------------------------------
def test_mlp_image_log_density_by_hand(image_batch):
    pair = tiny("mlp-image")
    z = torch.randn(image_batch.shape[0], pair.latent_dim)
    with torch.no_grad():
        logits = pair.decoder.net(z).reshape(-1, 1, 28, 28)
        p = torch.sigmoid(logits)
        expected = (image_batch * p.log() + (1 - image_batch) * (1 - p).log()).flatten(1).sum(-1)
        got = pair.log_likelihood(image_batch, z)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", [n for n in FAMILIES if MODELS[n].kind == "image"])
def test_image_prior_samples(name):
    pair = tiny(name)
    imgs = pair.sample_prior(2, torch.Generator().manual_seed(0))
    assert imgs.shape == (2, 1, 28, 28)
    assert bool(((imgs >= 0) & (imgs <= 1)).all())
    assert pair.training  # sampling restores the training mode
    if name == "mlp-image":  # PixelCNN sampling is 785 decoder passes: once in the default run
        torch.testing.assert_close(pair.sample_prior(2, torch.Generator().manual_seed(0)), imgs)
        lm_imgs = pair.decoder_only().sample_prior(2, torch.Generator().manual_seed(0))
        assert lm_imgs.shape == (2, 1, 28, 28)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "pixelcnn-image" else n
             for n in FAMILIES if MODELS[n].kind == "image"],
)
def test_image_reconstruct(name, image_batch):
    pair = tiny(name)
    rec = pair.reconstruct(image_batch[:2], torch.Generator().manual_seed(0))
    assert rec.shape == (2, 1, 28, 28)
    assert bool(((rec >= 0) & (rec <= 1)).all())
    if name == "mlp-image":
        with torch.no_grad():
            z = pair.encode(image_batch[:2])[0]
            torch.testing.assert_close(rec, pair.decoder(z).sigmoid().reshape(2, 1, 28, 28))


def test_image_shape_is_checked():
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        tiny("mlp-image").log_likelihood(torch.zeros(2, 784), torch.zeros(2, 3))


# ----- registry -----------------------------------------------------------------------------
def test_registry_lists_families():
    names = list_models()
    assert {"lstm-text", "synthetic", "mlp-image"} <= set(names)
    for name in names:
        entry = MODELS[name]
        assert entry.description and "\n" not in entry.description
        assert entry.kind in {"text", "image"}
        assert {"small", "paper"} <= set(entry.presets)


def test_registry_presets_follow_paper():
    paper = MODELS["lstm-text"].presets["paper"]
    assert (paper["ni"], paper["dec_nh"], paper["latent_dim"], paper["dropout"]) == (512, 1024, 32, 0.5)
    syn = MODELS["synthetic"].presets["paper"]
    assert (syn["latent_dim"], syn["enc_nh"], syn["dec_nh"]) == (1, 50, 50)
    pair = build("lstm-text", "paper", vocab_size=20)
    assert pair.decoder.lstm.hidden_size == 1024 and pair.decoder.embed.embedding_dim == 512
    assert pair.name == "lstm-text" and pair.kind == "text"


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'; valid names: .*lstm-text"):
        build("nope")
    with pytest.raises(ValueError, match="unknown preset 'huge'.*small"):
        build("mlp-image", "huge")
    with pytest.raises(ValueError, match="needs argument.*vocab_size"):
        build("lstm-text")
    with pytest.raises(ValueError, match="unknown argument.*colour"):
        build("mlp-image", colour=3)


def test_follows_input_device():
    """Everything is created on the parameters' device; on a GPU machine the pair runs there."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pair = tiny("mlp-image").to(device)
    x = torch.bernoulli(torch.full((2, 1, 28, 28), 0.3, device=device))
    _, model_tr = traces(pair, x)
    assert model_tr.nodes["x"]["log_prob"].device.type == device.type
    assert pair.sample_prior(2).device.type == device.type


def test_text_special_ids_match_data_vocabulary():
    from pyro_lag.data import Vocabulary

    vocab = Vocabulary()
    pair = build("lstm-text", vocab_size=10, ni=4, enc_nh=4, dec_nh=4)
    assert (pair.bos_id, pair.eos_id) == (vocab.bos, vocab.eos)


# ----- synthetic ----------------------------------------------------------------------------
def test_synthetic_corpus_deterministic():
    state = torch.get_rng_state()
    a = sample_corpus(64, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert a.shape == (64, 10) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 1000
    assert torch.equal(a, sample_corpus(64, seed=0))
    assert not torch.equal(a, sample_corpus(64, seed=1))
    assert not torch.equal(a, sample_corpus(64, seed=0, weights_seed=1))


def test_synthetic_generator_weights():
    gen = SyntheticGenerator(seed=0)
    assert gen.lstm.input_size == 102 and gen.lstm.hidden_size == 100
    assert gen.out_linear2.weight.shape == (1000, 2)
    w2 = gen.out_linear2.weight
    assert float(w2.abs().max()) <= 5.0 and float(w2.abs().max()) > 4.5
    for name, p in gen.named_parameters():
        if name != "out_linear2.weight":
            assert float(p.abs().max()) <= 1.0, name
    assert torch.equal(gen.embed.weight, SyntheticGenerator(seed=0).embed.weight)
    assert not torch.equal(gen.embed.weight, SyntheticGenerator(seed=1).embed.weight)


def test_synthetic_mixture_prior():
    tokens, z = sample_corpus(4000, seed=3, return_latent=True)
    assert z.shape == (4000, 2)
    quadrant = (z[:, 0] > 0).long() * 2 + (z[:, 1] > 0).long()
    freq = torch.bincount(quadrant, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.full((4,), 0.25), atol=0.03, rtol=0)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=0.15, rtol=0)
    torch.testing.assert_close(z.var(0), torch.full((2,), 5.0), atol=0.4, rtol=0)  # 1 + 2^2
    point = torch.tensor([0.5, -1.0])
    comps = [torch.distributions.MultivariateNormal(torch.tensor(c), torch.eye(2)).log_prob(point) for c in
             [(-2.0, -2.0), (2.0, 2.0), (-2.0, 2.0), (2.0, -2.0)]]
    expected = torch.logsumexp(torch.stack(comps), 0) - math.log(4)
    torch.testing.assert_close(SyntheticGenerator().prior().log_prob(point), expected)


def test_synthetic_generator_log_density_by_hand():
    """Score sentences under the Pyro model and by hand: first token uniform, logits = W1 h + W2 z."""
    gen = SyntheticGenerator(seed=0)
    tokens, z = sample_corpus(5, seed=0, return_latent=True)
    tr = poutine.trace(poutine.condition(gen.model, data={"z": z})).get_trace(x=tokens)
    tr.compute_log_prob()
    got = sum(tr.nodes[f"x_{t}"]["log_prob"] for t in range(10))
    w_ih, w_hh = gen.lstm.weight_ih_l0, gen.lstm.weight_hh_l0
    b = gen.lstm.bias_ih_l0 + gen.lstm.bias_hh_l0
    c = z @ gen.trans_linear.weight.T
    h = torch.tanh(c)
    expected = torch.full((5,), -math.log(1000))
    for t in range(9):
        inp = torch.cat([gen.embed.weight[tokens[:, t]], z], dim=-1)
        i, f, g, o = (inp @ w_ih.T + h @ w_hh.T + b).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        logits = h @ gen.out_linear1.weight.T + z @ gen.out_linear2.weight.T
        expected += torch.distributions.Categorical(logits=logits).log_prob(tokens[:, t + 1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)


def test_synthetic_write_corpus_reads_back(tmp_path):
    from pyro_lag.data import TextCorpus, Vocabulary

    path = write_corpus(tmp_path / "syn" / "train.txt", n=30, seed=2)
    lines = path.read_text().splitlines()
    assert len(lines) == 30
    assert torch.equal(torch.tensor([[int(t) for t in line.split()] for line in lines]), sample_corpus(30, seed=2))
    vocab = Vocabulary.from_file(path)
    corpus = TextCorpus.from_file(path, vocab)
    assert len(corpus) == 30 and all(corpus.sentence(i) == lines[i].split() for i in range(30))


def test_synthetic_pair_is_papers_vae(text_batch):
    pair = tiny("synthetic")
    assert pair.latent_dim == 1 and pair.kind == "text"
    assert pair.encoder.lstm.hidden_size == 50 and pair.decoder.lstm.hidden_size == 50


def _direct_posterior_mean(pair, x, grid):
    """One grid point at a time, in float64: sum_g z_g p(x|z_g) p(z_g) / sum_g p(x|z_g) p(z_g)."""
    rows = []
    with pair.evaluating():
        for g in grid.tolist():
            z = torch.full((x.shape[0], 1), g)
            rows.append(pair.log_likelihood(x, z).double() + torch.distributions.Normal(0.0, 1.0).log_prob(torch.tensor(g)).double())
    log_joint = torch.stack(rows)  # [G, B]
    w = (log_joint - log_joint.max(0).values).exp()
    return ((w * grid.double().unsqueeze(-1)).sum(0) / w.sum(0)).float()


def test_true_posterior_mean_matches_direct_integration(text_batch):
    pair = tiny("synthetic")
    with torch.no_grad():  # make z matter: large weights from z into the decoder
        pair.decoder.trans_linear.weight.uniform_(-2, 2)
        pair.decoder.lstm.weight_ih_l0[:, -1].uniform_(-2, 2)
        pair.decoder.pred_linear.weight.uniform_(-2, 2)
    grid = torch.arange(-4.0, 4.0, 0.25)
    got = true_posterior_mean(pair, text_batch, grid, chunk_size=7)
    assert got.shape == (text_batch.shape[0],)
    torch.testing.assert_close(got, _direct_posterior_mean(pair, text_batch, grid), rtol=1e-4, atol=1e-4)
    assert float((got - got[0]).abs().max()) > 0.1  # the toy posterior depends on x
    default = true_posterior_mean(pair, text_batch)  # the paper's grid [-20, 20) step 0.1
    assert default.shape == (text_batch.shape[0],) and bool(torch.isfinite(default).all())


def test_true_posterior_mean_of_ignored_latent_is_prior_mean(text_batch):
    """If the decoder ignores z the posterior is the N(0, 1) prior: on the paper's grid its mean is -0.05 (grid offset)."""
    pair = tiny("synthetic")
    with torch.no_grad():
        pair.decoder.trans_linear.weight.zero_()
        pair.decoder.lstm.weight_ih_l0[:, -1].zero_()
    got = true_posterior_mean(pair, text_batch)
    grid = torch.arange(-20, 20, 0.1)
    prior_w = torch.distributions.Normal(0.0, 1.0).log_prob(grid).softmax(0)
    torch.testing.assert_close(got, (prior_w * grid).sum().expand_as(got), rtol=0, atol=1e-4)


def test_true_posterior_mean_needs_1d_latent(text_batch):
    with pytest.raises(ValueError, match="1-d latent"):
        true_posterior_mean(tiny("lstm-text"), text_batch)


# ----- pixelcnn -----------------------------------------------------------------------------
def test_pixelcnn_is_autoregressive(image_batch):
    """Changing pixel (i, j) changes no logit at or before (i, j) in raster order, but some later one."""
    pair = tiny("pixelcnn-image").eval()
    x = image_batch[:1]
    z = torch.randn(1, pair.latent_dim)
    with torch.no_grad():
        base = pair.decoder(x, z)[0, 0].flatten()
        for pos in (0, 27, 300, 405, 783):
            flipped = x.clone().flatten()
            flipped[pos] = 1 - flipped[pos]
            out = pair.decoder(flipped.reshape(1, 1, 28, 28), z)[0, 0].flatten()
            changed = (out - base).abs() > 1e-6
            assert not bool(changed[: pos + 1].any()), pos
            if pos < 783:
                assert bool(changed[pos + 1:].any()), pos


def test_pixelcnn_conditions_on_z(image_batch):
    pair = tiny("pixelcnn-image").eval()
    z = torch.randn(2, image_batch.shape[0], pair.latent_dim)
    with torch.no_grad():
        ll = pair.log_likelihood(image_batch, z)
    assert not torch.allclose(ll[0], ll[1])


def test_pixelcnn_log_density_by_hand(image_batch):
    pair = tiny("pixelcnn-image")
    z = torch.randn(image_batch.shape[0], pair.latent_dim)
    with torch.no_grad():
        p = torch.sigmoid(pair.decoder(image_batch, z))
        expected = (image_batch * p.log() + (1 - image_batch) * (1 - p).log()).flatten(1).sum(-1)
        pyro.clear_param_store()
        tr = poutine.trace(poutine.condition(pair.model, data={"z": z})).get_trace(image_batch)
        tr.compute_log_prob()
    torch.testing.assert_close(tr.nodes["x"]["log_prob"], expected, rtol=1e-4, atol=1e-3)


def test_pixelcnn_paper_preset_sizes():
    pair = build("pixelcnn-image", "paper")
    assert pair.latent_dim == 32 and len(pair.decoder.blocks) == 12
    assert pair.decoder.first.kernel_size == (7, 7) and pair.decoder.feature_maps == 4
    assert pair.encoder.linear.in_features == 512


@pytest.mark.parametrize("preset_kernels", [(5, 3), (7, 5, 5, 3)])
def test_pixelcnn_window_logits_equal_full_pass(preset_kernels, image_batch):
    """Sampling computes each pixel on a cropped window; it must equal the full-image logit exactly."""
    pair = build("pixelcnn-image", latent_dim=3, enc_channels=(4,), enc_hidden=4, hidden=6,
                 kernel_sizes=preset_kernels, latent_feature_maps=2).eval()
    z = torch.randn(image_batch.shape[0], 3)
    with torch.no_grad():
        maps = pair.decoder.latent_maps(z)
        full = pair.decoder(image_batch, z)[:, 0]
        for i, j in [(0, 0), (0, 27), (5, 13), (14, 2), (27, 27), (20, 25)]:
            torch.testing.assert_close(pair.decoder.pixel_logits(image_batch, maps, i, j), full[:, i, j],
                                       rtol=1e-5, atol=1e-5)
