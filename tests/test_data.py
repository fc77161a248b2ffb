"""Data pipelines on the real PTB, synthetic and OMNIGLOT files, and their bad-input errors."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_lag.data.text as text_module
from pyro_lag.data import (
    DataFileError,
    ImageBatches,
    TextBatches,
    TextCorpus,
    Vocabulary,
    heldout_split,
    load_images,
    num_tokens,
    read_sentences,
    split_images,
)


# ---------------------------------------------------------------- fixtures (real data)
@pytest.fixture(scope="module")
def ptb(shared_data):
    folder = shared_data / "ptb"
    vocab = Vocabulary.from_file(folder / "ptb.train.txt")
    return folder, vocab, TextCorpus.from_file(folder / "ptb.train.txt", vocab)


@pytest.fixture(scope="module")
def omniglot(shared_data):
    path = shared_data / "omniglot28" / "omniglot28.npz"
    return path, load_images(path, "train")


def one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    """The error message, checked to be one line naming ``path``."""
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def collect(source, epoch=None):
    batches = list(source) if epoch is None else list(source.iter_from(epoch))
    return [b[0] for b in batches]


# ---------------------------------------------------------------- vocabulary
def test_ptb_vocabulary_has_10000_words_plus_specials(ptb):
    folder, vocab, _ = ptb
    words = vocab.to_list()
    assert words[:4] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert (vocab.pad, vocab.bos, vocab.eos, vocab.unk) == (0, 1, 2, 3)
    # The file holds 9,999 distinct tokens (its literal <unk> among them); with the
    # end-of-sentence symbol that is PTB's standard 10,000-word vocabulary.
    in_file = {t for line in (folder / "ptb.train.txt").read_text("utf-8").splitlines() for t in line.split()}
    assert len(in_file) == 9_999 and "<unk>" in in_file
    assert set(words) == in_file | {"<pad>", "<s>", "</s>"}
    assert len(set(words) - {"<pad>", "<s>"}) == 10_000
    assert len(vocab) == 10_002 == len(words)


def test_literal_unk_and_unknown_words_map_to_unk(ptb):
    folder, vocab, _ = ptb
    assert vocab.encode(["<unk>", "zyzzyva-not-in-ptb", "the"]) == [vocab.unk, vocab.unk, vocab.encode(["the"])[0]]
    assert vocab.to_list().count("<unk>") == 1
    # The validation file only holds train words: its unk ids are exactly its literal <unk>s.
    valid = TextCorpus.from_file(folder / "ptb.valid.txt", vocab)
    literal = sum(line.split().count("<unk>") for line in (folder / "ptb.valid.txt").read_text("utf-8").splitlines())
    assert int((valid.tokens == vocab.unk).sum()) == literal > 0
    assert len(valid) == 3_370


def test_vocabulary_round_trips_through_json(ptb):
    _, vocab, _ = ptb
    again = Vocabulary.from_list(json.loads(json.dumps(vocab.to_list())))
    assert again == vocab and len(again) == len(vocab)
    sentence = "the company said N shares rose".split()
    assert again.encode(sentence) == vocab.encode(sentence)
    assert vocab.decode(vocab.encode(sentence)) == sentence
    assert vocab.decode([vocab.bos, *vocab.encode(sentence), vocab.eos, vocab.pad], skip_special=True) == sentence


@pytest.mark.parametrize(
    "words, message",
    [(["a", "b"], "must start with"), (["<pad>", "<s>", "</s>", "<unk>", "a", "a"], "duplicate")],
)
def test_vocabulary_from_list_refuses_bad_lists(words, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary.from_list(words)


# ---------------------------------------------------------------- corpus and batches
def test_ptb_corpus_wraps_every_line_in_bos_eos(ptb):
    folder, vocab, corpus = ptb
    assert len(corpus) == 42_068
    assert corpus.tokens.dtype == np.int32
    lines = (folder / "ptb.train.txt").read_text("utf-8").splitlines()
    for i in (0, 1, 1000, len(corpus) - 1):
        assert corpus.sentence(i) == lines[i].split()
        assert corpus[i][0] == vocab.bos and corpus[i][-1] == vocab.eos
    assert int(corpus.lengths.sum()) == len(corpus.tokens)


def test_text_batches_have_equal_lengths_and_cover_each_sentence_once(ptb):
    _, vocab, corpus = ptb
    source = TextBatches(corpus, 32, seed=3)
    seen = []
    for position, (x,) in enumerate(source.iter_from(2)):
        assert x.dtype == torch.long and x.dim() == 2 and 1 <= x.shape[0] <= 32
        idx = source.batch_indices(2, position)
        assert (corpus.lengths[idx] == x.shape[1]).all()
        assert (x[:, 0] == vocab.bos).all() and (x[:, -1] == vocab.eos).all()
        assert not (x[:, 1:-1] == vocab.eos).any() and not (x == vocab.pad).any()
        assert torch.equal(x, torch.from_numpy(np.stack([corpus[i] for i in idx]).astype(np.int64)))
        assert source.normalizer((x,)) == num_tokens(x) == (x.shape[1] - 1) * x.shape[0]
        seen.append(idx)
    seen = np.concatenate(seen)
    assert len(seen) == len(corpus) and np.array_equal(np.sort(seen), np.arange(len(corpus)))
    # Batches are full except the last one of each length.
    full = sum(1 for b in source._batches if len(b) == 32)
    assert full >= len(source) - len(np.unique(corpus.lengths))


def test_text_batches_are_deterministic_per_seed_and_epoch(ptb):
    _, _, corpus = ptb
    a, b, c = (TextBatches(corpus, 64, seed=s) for s in (7, 7, 8))
    first = collect(a, 4)
    assert all(torch.equal(x, y) for x, y in zip(first, collect(b, 4)))
    order = lambda src, e: [int(src._plan(e)[p]) for p in range(len(src))]  # noqa: E731
    assert order(a, 4) != order(c, 4)
    assert order(a, 4) != order(a, 5)
    # Resuming mid-epoch yields the rest of that epoch.
    rest = [x for (x,) in a.iter_from(4, 100)]
    assert len(rest) == len(a) - 100 and all(torch.equal(x, y) for x, y in zip(rest, first[100:]))
    # Iterating a whole epoch moves .epoch on; setting it picks the epoch.
    a.epoch = 4
    assert all(torch.equal(x, y) for x, y in zip(collect(a), first)) and a.epoch == 5
    unshuffled = TextBatches(corpus, 64, shuffle=False)
    assert order(unshuffled, 0) == order(unshuffled, 9) == list(range(len(unshuffled)))


def test_sample_is_seeded_and_resumable(ptb):
    _, _, corpus = ptb
    a, b = TextBatches(corpus, 16, seed=1), TextBatches(corpus, 16, seed=1)
    draws = [a.sample()[0] for _ in range(5)]
    assert all(torch.equal(x, b.sample()[0]) for x in draws)
    assert len({tuple(x.shape) for x in draws}) > 1  # random batches, not one batch
    state = a.state_dict()
    nxt = a.sample()[0]
    b.load_state_dict(state)
    assert torch.equal(b.sample()[0], nxt)
    # sample() leaves the epoch's batches untouched.
    assert all(torch.equal(x, y) for x, y in zip(collect(a, 0)[:5], collect(TextBatches(corpus, 16, seed=1), 0)[:5]))


def test_synthetic_corpus_loads_through_the_text_path(shared_data):
    path = shared_data / "synthetic-he2019" / "synthetic_data.txt"
    vocab = Vocabulary.from_file(path)
    corpus = TextCorpus.from_file(path, vocab)
    assert len(corpus) == 10_000 and len(vocab) <= 1_000 + 4
    assert corpus.sentence(0) == "734 378 934 724 388 223 949 297 518 765".split()
    train_idx, valid_idx = heldout_split(len(corpus), 1_000)
    train, valid = corpus.subset(train_idx), corpus.subset(valid_idx)
    assert len(train) == 9_000 and valid.sentence(0) == corpus.sentence(9_000)
    source = TextBatches(train, 16, seed=0)
    assert len(source) == 9_000 // 16 + 1
    assert {tuple(x.shape[1:]) for (x,) in source} == {(12,)}


# ---------------------------------------------------------------- text errors
def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "data file is empty"),
        (b"\n  \n\t\n", "no sentences"),
        (b"a b\n\x00\x01\x02binary\n", "binary"),
        ("caf\u00e9 ok\n".encode("latin-1"), "not UTF-8"),
        (b"a b c\n" + b"w " * 1_500 + b"\n", "line 2 has 1500 tokens, more than max_tokens=1000"),
        (b"x" * 100_000, "longer than"),
    ],
    ids=["empty", "blank", "binary", "latin1", "long-line", "huge-line"],
)
def test_bad_text_files_give_one_line_errors(tmp_path, data, message):
    path = write(tmp_path, "bad.txt", data)
    with pytest.raises(DataFileError) as err:
        Vocabulary.from_file(path)
    assert message in one_line_naming(err, path)
    with pytest.raises(DataFileError):
        TextCorpus.from_file(path, Vocabulary())


def test_missing_directory_and_unreadable_text_files(tmp_path, monkeypatch):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as err:
        Vocabulary.from_file(missing)
    assert "not found" in one_line_naming(err, missing)
    with pytest.raises(DataFileError) as err:
        Vocabulary.from_file(tmp_path)
    assert "directory" in one_line_naming(err, tmp_path)
    locked = write(tmp_path, "locked.txt", b"a b\n")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root ignores permissions: make opening fail as it would
            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(text_module, "open", refuse, raising=False)
        with pytest.raises(DataFileError) as err:
            Vocabulary.from_file(locked)
        assert "cannot read" in one_line_naming(err, locked) and "Permission denied" in str(err.value)
    finally:
        locked.chmod(0o600)


def test_max_tokens_is_configurable(tmp_path):
    path = write(tmp_path, "t.txt", b"a b c d\n")
    assert list(read_sentences(path, max_tokens=4)) == [["a", "b", "c", "d"]]
    with pytest.raises(DataFileError, match="max_tokens=3"):
        list(read_sentences(path, max_tokens=3))
    with pytest.raises(ValueError, match="max_tokens"):
        list(read_sentences(path, max_tokens=0))


# Lines of any unicode text except line feeds and NUL (which marks a binary file).
line_text = st.text(st.characters(blacklist_characters="\n\x00", blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(line_text, min_size=1, max_size=12))
def test_random_unicode_lines_round_trip(lines):
    expected = [line.split() for line in lines if line.split()]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "corpus.txt"
        path.write_bytes("\n".join(lines).encode("utf-8"))
        if not expected:
            with pytest.raises(DataFileError):
                Vocabulary.from_file(path)
            return
        vocab = Vocabulary.from_file(path)
        corpus = TextCorpus.from_file(path, vocab)
    assert len(corpus) == len(expected)
    for i, tokens in enumerate(expected):
        specials = {"<pad>", "<s>", "</s>"}
        if not specials & set(tokens):
            assert corpus.sentence(i) == tokens
        assert vocab.decode(vocab.encode(tokens)) == [t if t in vocab else "<unk>" for t in tokens]
    source = TextBatches(corpus, 3, seed=0)
    assert sum(x.shape[0] for (x,) in source) == len(expected)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_load_or_raise_the_project_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "any.txt"
        path.write_bytes(data)
        try:
            vocab = Vocabulary.from_file(path)
            corpus = TextCorpus.from_file(path, vocab)
        except DataFileError as err:
            assert "\n" not in str(err) and str(path) in str(err)
            return
    assert len(corpus) >= 1 and b"\x00" not in data


# ---------------------------------------------------------------- images
def test_omniglot_loads_with_its_splits(omniglot, shared_data):
    path, train = omniglot
    assert train.shape == (24_345, 28, 28) and train.dtype == np.uint8
    test = load_images(path, "test")
    assert test.shape == (8_115, 28, 28)
    kept, held = split_images(train, 1_000)
    assert len(kept) == 23_345 and np.array_equal(held, train[-1_000:])
    k2, h2 = split_images(train, 1_000, seed=5)
    assert np.array_equal(h2, split_images(train, 1_000, seed=5)[1]) and not np.array_equal(h2, held)


def test_dynamic_binarisation_statistics_and_determinism(omniglot):
    _, train = omniglot
    source = ImageBatches(train, 500, seed=0)
    batches = collect(source, 0)
    x = torch.cat(batches)
    assert x.shape == (24_345, 1, 28, 28) and x.dtype == torch.float32
    assert set(torch.unique(x).tolist()) <= {0.0, 1.0}
    assert abs(x.mean().item() - train.mean() / 255.0) < 1e-3
    # Pixels of intensity 0 never turn on; pixels of intensity 255 always do.
    order = source._plan(0)
    assert not x[torch.from_numpy(train[order] == 0).unsqueeze(1)].any()
    assert x[torch.from_numpy(train[order] == 255).unsqueeze(1)].all()
    # Same seed and epoch: same pixels; another epoch or seed: other pixels; mid-epoch resume agrees.
    first = batches[0]
    assert torch.equal(next(iter(ImageBatches(train, 500, seed=0)))[0], first)
    again = ImageBatches(train, 500, seed=0, shuffle=False)
    e0, e1 = next(again.iter_from(0))[0], next(again.iter_from(1))[0]
    assert e0.shape == e1.shape and not torch.equal(e0, e1)
    assert not torch.equal(next(ImageBatches(train, 500, seed=1).iter_from(0))[0], first)
    assert torch.equal(next(source.iter_from(0, 7))[0], batches[7])
    assert source.normalizer((first,)) == 500.0


def test_image_epoch_covers_each_image_once(omniglot):
    _, train = omniglot
    images = train[:300]
    source = ImageBatches(images, 64, seed=2, binarize="none")
    x = torch.cat(collect(source))
    assert len(source) == 5 and x.shape[0] == 300
    back = np.rint(x[:, 0].numpy() * 255).astype(np.uint8).reshape(300, -1)
    key = lambda a: sorted(r.tobytes() for r in a)  # noqa: E731
    assert key(back) == key(images.reshape(300, -1))
    assert not np.array_equal(back, images.reshape(300, -1))  # shuffled
    dropped = ImageBatches(images, 64, drop_last=True)
    assert len(dropped) == 4 and dropped.num_examples == 256


def test_fixed_binarisation_is_drawn_once(omniglot, shared_data):
    path, _ = omniglot
    test = load_images(path, "test")
    a = ImageBatches(test, 1_000, seed=4, binarize="fixed", shuffle=False)
    x = torch.cat(collect(a, 0))
    assert torch.equal(x, torch.cat(collect(a, 3)))
    assert torch.equal(x, torch.cat(collect(ImageBatches(test, 1_000, seed=4, binarize="fixed", shuffle=False))))
    assert abs(x.mean().item() - test.mean() / 255.0) < 2e-3
    assert set(torch.unique(x).tolist()) == {0.0, 1.0}


def test_image_sample_is_seeded(omniglot):
    _, train = omniglot
    a, b = ImageBatches(train, 32, seed=9), ImageBatches(train, 32, seed=9)
    x, y = a.sample()[0], b.sample()[0]
    assert x.shape == (32, 1, 28, 28) and torch.equal(x, y)
    assert not torch.equal(a.sample()[0], x)


def test_float_and_channel_arrays_are_accepted(tmp_path):
    rng = np.random.default_rng(0)
    floats = rng.random((10, 1, 28, 28)).astype(np.float64)
    path = tmp_path / "f.npy"
    np.save(path, floats)
    images = load_images(path)
    assert images.shape == (10, 28, 28) and images.dtype == np.float32
    x = next(iter(ImageBatches(images, 4, binarize="none", shuffle=False)))[0]
    assert torch.allclose(x, torch.from_numpy(floats[:4]).float())
    general = tmp_path / "g.npz"
    np.savez(general, only=(rng.random((5, 12, 9)) * 255).astype(np.uint8))
    assert load_images(general, image_size=None).shape == (5, 12, 9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_batches_follow_the_device(omniglot, ptb):
    _, train = omniglot
    assert next(iter(ImageBatches(train[:64], 32).to("cuda")))[0].is_cuda
    assert TextBatches(ptb[2], 8, device="cuda").sample()[0].is_cuda


# ---------------------------------------------------------------- image errors
def bad_images(tmp_path, kind):
    rng = np.random.default_rng(0)
    good = (rng.random((4, 28, 28)) * 255).astype(np.uint8)
    path = tmp_path / f"{kind}.npy"
    if kind == "shape":
        np.save(path, good[:, :, :27])
    elif kind == "channels":
        np.save(path, np.stack([good] * 3, axis=1))
    elif kind == "flat":
        np.save(path, good.reshape(4, -1))
    elif kind == "range":
        np.save(path, good.astype(np.float32))  # 0..255 stored as float
    elif kind == "negative":
        np.save(path, good.astype(np.int64) - 1)
    elif kind == "nan":
        np.save(path, np.full((2, 28, 28), np.nan, dtype=np.float32))
    elif kind == "pickle":
        np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    elif kind == "text":
        path.write_text("hello\n")
    elif kind == "empty":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("shape", "28 x 28"),
        ("channels", "N x H x W"),
        ("flat", "N x H x W"),
        ("range", "[0, 1]"),
        ("negative", "0..255"),
        ("nan", "finite"),
        ("pickle", "pickled"),
        ("text", "not a NumPy"),
        ("empty", "empty"),
    ],
)
def test_bad_image_files_give_one_line_errors(tmp_path, kind, message):
    path = bad_images(tmp_path, kind)
    with pytest.raises(DataFileError) as err:
        load_images(path)
    assert message in one_line_naming(err, path)


def test_image_keys_and_missing_files(omniglot, tmp_path):
    path, _ = omniglot
    with pytest.raises(DataFileError) as err:
        load_images(path)
    assert "choose one with key" in one_line_naming(err, path)
    with pytest.raises(DataFileError) as err:
        load_images(path, "valid")
    assert "no array 'valid'" in one_line_naming(err, path)
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataFileError, match="single array"):
        load_images(npy, "train")
    with pytest.raises(FileNotFoundError) as err:
        load_images(tmp_path / "missing.npz")
    one_line_naming(err, tmp_path / "missing.npz")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"batch_size": 0}, "batch_size"), ({"seed": -1}, "seed"), ({"binarize": "sometimes"}, "binarize")],
)
def test_bad_parameters_are_named(kwargs, message):
    args = {"batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        ImageBatches(np.zeros((3, 28, 28), np.uint8), **args)
