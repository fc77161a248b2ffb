"""Text corpora: one sentence a line, whitespace tokens, batches of equal-length sentences.

As in the reference code of He et al. (2019): the vocabulary comes from the training
file, every sentence is wrapped in ``<s> ... </s>``, sentences are grouped by length
into batches of at most ``batch_size`` (no padding), and the order of the batches is
shuffled every epoch.
"""
from __future__ import annotations

import os
from array import array
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .batching import (
    BatchSource,
    DataFileError,
    as_tuple,
    check_positive,
    epoch_permutation,
)

__all__ = ["Vocabulary", "TextCorpus", "TextBatches", "read_sentences", "num_tokens"]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
DEFAULT_MAX_TOKENS = 1000
# A line is read at most this many bytes per allowed token before it is refused as too long.
BYTES_PER_TOKEN = 64


def read_sentences(path: str | os.PathLike, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> Iterator[list[str]]:
    """Yield the token list of every non-blank line of a UTF-8 text file.

    Raises ``FileNotFoundError`` for a missing file and ``DataFileError`` (one line naming
    the file) for a directory, an unreadable, empty, binary or non-UTF-8 file, a line of
    more than ``max_tokens`` tokens, or a file with no sentence at all.
    """
    max_tokens = check_positive(max_tokens, "max_tokens")
    path = Path(path)
    max_bytes = max_tokens * BYTES_PER_TOKEN
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataFileError(f"data file is a directory, not a file: {path}") from None
    except OSError as err:
        raise DataFileError(f"cannot read data file {path}: {err.strerror or err}") from None
    with handle:
        found = False
        lineno = 0
        try:
            while True:
                raw = handle.readline(max_bytes + 1)
                if not raw:
                    break
                lineno += 1
                if len(raw) > max_bytes and not raw.endswith(b"\n"):
                    raise DataFileError(
                        f"line {lineno} is longer than {max_bytes} bytes (max_tokens={max_tokens}): {path}"
                    )
                if b"\x00" in raw:
                    raise DataFileError(f"data file looks binary (NUL byte on line {lineno}), expected text: {path}")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFileError(
                        f"data file is not UTF-8 text (line {lineno}, byte {err.start}): {path}"
                    ) from None
                tokens = line.split()
                if len(tokens) > max_tokens:
                    raise DataFileError(
                        f"line {lineno} has {len(tokens)} tokens, more than max_tokens={max_tokens}: {path}"
                    )
                if tokens:
                    found = True
                    yield tokens
        except OSError as err:
            raise DataFileError(f"cannot read data file {path}: {err.strerror or err}") from None
    if lineno == 0:
        raise DataFileError(f"data file is empty: {path}")
    if not found:
        raise DataFileError(f"data file has no sentences (only blank lines): {path}")


class Vocabulary:
    """Word <-> id map with ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, then words by first use.

    A literal ``<unk>`` in the text (PTB has it) is the same id as unknown words.
    """

    def __init__(self, words: Iterable[str] = ()):
        self._words: list[str] = list(SPECIALS)
        self._ids: dict[str, int] = {w: i for i, w in enumerate(SPECIALS)}
        for word in words:
            if word not in self._ids:
                self._ids[word] = len(self._words)
                self._words.append(word)
        self.pad, self.bos, self.eos, self.unk = (self._ids[s] for s in SPECIALS)

    @classmethod
    def from_sentences(cls, sentences: Iterable[Sequence[str]], *, min_count: int = 1) -> "Vocabulary":
        """The vocabulary of tokenised sentences, keeping words seen at least ``min_count`` times."""
        min_count = check_positive(min_count, "min_count")
        counts: dict[str, int] = {}
        for sentence in sentences:
            for word in sentence:
                counts[word] = counts.get(word, 0) + 1
        return cls(w for w, c in counts.items() if c >= min_count)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, min_count: int = 1, max_tokens: int = DEFAULT_MAX_TOKENS
    ) -> "Vocabulary":
        """The vocabulary of a training file (one sentence a line, whitespace tokens)."""
        return cls.from_sentences(read_sentences(path, max_tokens=max_tokens), min_count=min_count)

    def to_list(self) -> list[str]:
        """All words in id order (specials first): JSON-able, for a run directory."""
        return list(self._words)

    @classmethod
    def from_list(cls, words: Sequence[str]) -> "Vocabulary":
        """Rebuild from ``to_list()``; refuses a list whose ids would not match."""
        words = list(words)
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary list must start with {', '.join(SPECIALS)}")
        if not all(isinstance(w, str) for w in words):
            raise ValueError("vocabulary list must hold strings only")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary list has duplicate words")
        return cls(words[len(SPECIALS):])

    def __len__(self) -> int:
        return len(self._words)

    def __contains__(self, word: str) -> bool:
        return word in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._words == other._words

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens``; unknown words become ``unk``."""
        get, unk = self._ids.get, self.unk
        return [get(t, unk) for t in tokens]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> list[str]:
        """Words of ``ids`` (ints or a 1-d tensor/array); optionally without pad, <s>, </s>."""
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = ids.tolist()
        words = [self._words[int(i)] for i in ids]
        if skip_special:
            words = [w for w in words if w not in (PAD, BOS, EOS)]
        return words


class TextCorpus:
    """Sentences as token ids, each ``<s> ... </s>``, stored as one flat int32 array plus offsets."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, vocab: Vocabulary, path: Path | None = None):
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.vocab = vocab
        self.path = path
        if len(self.offsets) < 2:
            where = f": {path}" if path is not None else ""
            raise DataFileError(f"corpus has no sentences{where}")

    @classmethod
    def from_sentences(cls, sentences: Iterable[Sequence[str]], vocab: Vocabulary, *, path: Path | None = None) -> "TextCorpus":
        """Encode tokenised sentences (blank ones skipped) with ``vocab``."""
        flat = array("i")
        offsets = array("q", [0])
        for sentence in sentences:
            if not sentence:
                continue
            flat.append(vocab.bos)
            flat.extend(vocab.encode(sentence))
            flat.append(vocab.eos)
            offsets.append(len(flat))
        return cls(np.frombuffer(flat, dtype=np.int32), np.frombuffer(offsets, dtype=np.int64), vocab, path)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, vocab: Vocabulary, *, max_tokens: int = DEFAULT_MAX_TOKENS
    ) -> "TextCorpus":
        """Read a text file (one sentence a line) and encode it with ``vocab``."""
        return cls.from_sentences(read_sentences(path, max_tokens=max_tokens), vocab, path=Path(path))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        """Ids of sentence ``index``, with ``<s>`` and ``</s>``."""
        index = range(len(self))[index]
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """Length of every sentence, counting ``<s>`` and ``</s>``."""
        return np.diff(self.offsets)

    def sentence(self, index: int) -> list[str]:
        """Words of sentence ``index`` without ``<s>``/``</s>``."""
        return self.vocab.decode(self[index][1:-1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "TextCorpus":
        """A new corpus of the sentences at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= len(self))):
            raise ValueError(f"subset indices must be a 1-d array of values in [0, {len(self)})")
        starts, lens = self.offsets[idx], self.lengths[idx]
        offsets = np.concatenate([[0], np.cumsum(lens)])
        gather = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1])
        return TextCorpus(self.tokens[gather], offsets, self.vocab, self.path)


def num_tokens(batch) -> int:
    """Predicted tokens of a [B, T] batch, ``(T - 1) * B`` (every word and ``</s>``)."""
    x = as_tuple(batch)[0]
    return (x.shape[1] - 1) * x.shape[0]


class TextBatches(BatchSource):
    """Batches ``(x,)`` with ``x`` a LongTensor [B, T] of sentences of one length, B <= batch_size.

    Batches are formed once (sentences sorted by length, stable, then cut into chunks of
    ``batch_size``); each epoch visits every batch once, in an order shuffled from
    ``(seed, epoch)`` unless ``shuffle=False``. ``sample()`` returns a random batch.
    """

    def __init__(
        self,
        corpus: TextCorpus,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
    ):
        super().__init__(seed=seed, shuffle=shuffle, device=device)
        self.corpus = corpus
        self.batch_size = check_positive(batch_size, "batch_size")
        lengths = corpus.lengths
        order = np.argsort(lengths, kind="stable")
        cuts = np.flatnonzero(np.diff(lengths[order])) + 1
        self._batches: list[np.ndarray] = []
        for group in np.split(order, cuts):
            self._batches.extend(np.split(group, np.arange(self.batch_size, len(group), self.batch_size)))

    @property
    def vocab(self) -> Vocabulary:
        return self.corpus.vocab

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def num_examples(self) -> int:
        return len(self.corpus)

    def _plan(self, epoch: int) -> np.ndarray:
        n = len(self._batches)
        return epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)

    def _tensor(self, index: int) -> tuple[torch.Tensor]:
        idx = self._batches[index]
        length = int(self.corpus.offsets[idx[0] + 1] - self.corpus.offsets[idx[0]])
        gather = self.corpus.offsets[idx][:, None] + np.arange(length)
        return (torch.from_numpy(self.corpus.tokens[gather].astype(np.int64)),)

    def _batch(self, plan: np.ndarray, epoch: int, position: int) -> tuple[torch.Tensor]:
        return self._tensor(int(plan[position]))

    def _sample(self, generator: torch.Generator) -> tuple[torch.Tensor]:
        return self._tensor(int(torch.randint(len(self._batches), (), generator=generator)))

    def batch_indices(self, epoch: int, position: int) -> np.ndarray:
        """Corpus indices of the sentences in batch ``position`` of ``epoch``."""
        return self._batches[int(self._plan(epoch)[position])]

    def normalizer(self, batch) -> float:
        """Predicted tokens of the batch, ``(T - 1) * B``."""
        return float(num_tokens(batch))
