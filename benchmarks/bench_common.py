"""What the bench_*.py scripts share: command-line options, the PTB slice, interleaved timing, results.

Every benchmark times a candidate against a baseline in the same process. The calls
are interleaved (baseline, candidate, baseline, ...) so that load from other
processes on a shared machine falls on both alike; the figure reported is the median
of the per-repeat ratios, with its interquartile range.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from pyro_lag.models.registry import build

from pyro_lag.data import TextCorpus, Vocabulary

try:
    from benchmarks.harness import device_description, write_result
except ImportError:  # run as a script from the benchmarks folder
    from harness import device_description, write_result

PTB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ptb"

# Network sizes: "small" for CPU runs (ni 128, 256-d LSTMs), "paper" for a GPU, "tiny" for smoke tests.
SIZES = {
    "tiny": dict(latent_dim=4, ni=16, enc_nh=16, dec_nh=16),
    "small": dict(latent_dim=32, ni=128, enc_nh=256, dec_nh=256),
    "paper": dict(latent_dim=32, ni=512, enc_nh=1024, dec_nh=1024),
}


def parser(description: str | None) -> argparse.ArgumentParser:
    """Options every benchmark takes: device, threads, size, batch size, data, output folder."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives stable ratios on a shared CPU)")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="network sizes (tiny: smoke test only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data", type=Path, default=PTB, help="folder with ptb.train.txt and ptb.valid.txt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON here instead of benchmarks/results/")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Apply the thread count and check the device; returns it."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} was asked for but CUDA is not available")
    if not (args.data / "ptb.train.txt").is_file():
        raise FileNotFoundError(f"PTB not found: {args.data / 'ptb.train.txt'} (pass --data)")
    return device


@functools.lru_cache(maxsize=2)
def vocabulary(data: Path) -> Vocabulary:
    """PTB's 10,000-word vocabulary (plus the four specials), from the training file (read once per process)."""
    return Vocabulary.from_file(data / "ptb.train.txt")


def ptb_slice(
    data: Path, split: str, vocab: Vocabulary, *, lengths: Sequence[int], per_length: int
) -> TextCorpus:
    """The first ``per_length`` sentences of each length in ``lengths`` (tokens with <s> and </s>).

    Choosing whole groups of equal length gives full batches when ``per_length`` is a
    multiple of the batch size, so every step of every benchmark does the same work.
    """
    corpus = TextCorpus.from_file(data / f"ptb.{split}.txt", vocab)
    picked = []
    for length in lengths:
        found = np.flatnonzero(corpus.lengths == length)[:per_length]
        if len(found) < per_length:
            raise ValueError(f"ptb.{split}.txt has only {len(found)} sentences of length {length}, need {per_length}")
        picked.append(found)
    return corpus.subset(np.concatenate(picked))


def build_pair(size: str, vocab_size: int, device: torch.device, *, seed: int = 0) -> torch.nn.Module:
    """An ``lstm-text`` pair of the given size on ``device``, initialised from ``seed``."""
    torch.manual_seed(seed)
    return build("lstm-text", "small", vocab_size=vocab_size, **SIZES[size]).to(device)


def one_batch_and_pair(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.nn.Module]:
    """One full PTB batch of ``args.length`` tokens and a fresh pair, with the param store cleared and seeded.

    For the benchmarks that time single steps on the same batch (``--length``, ``--batch-size``).
    """
    import pyro

    from pyro_lag.data import TextBatches

    vocab = vocabulary(args.data)
    corpus = ptb_slice(args.data, "train", vocab, lengths=[args.length], per_length=args.batch_size)
    (x,) = next(iter(TextBatches(corpus, args.batch_size, device=device).iter_from(0, 0)))
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    return x, build_pair(args.size, len(vocab), device, seed=args.seed)


def add_slice_options(p: argparse.ArgumentParser, *, lengths: str, per_length: int, valid: bool = True) -> None:
    """``--lengths``/``--per-length`` for the training slice, and ``--valid-lengths``/``--valid-per-length``."""
    p.add_argument("--lengths", default=lengths, help="train sentence lengths (with <s>, </s>), comma-separated")
    p.add_argument("--per-length", type=int, default=per_length, help="train sentences of each length")
    if valid:
        p.add_argument("--valid-lengths", default="18,20,22", help="validation sentence lengths")
        p.add_argument("--valid-per-length", type=int, default=32, help="validation sentences of each length")


def slices(args: argparse.Namespace) -> tuple[Vocabulary, TextCorpus, TextCorpus | None]:
    """The vocabulary and the training (and, when the options exist, validation) slices the options name."""
    vocab = vocabulary(args.data)

    def lengths(text: str) -> list[int]:
        return [int(v) for v in text.split(",")]

    train = ptb_slice(args.data, "train", vocab, lengths=lengths(args.lengths), per_length=args.per_length)
    valid = None
    if hasattr(args, "valid_lengths"):
        valid = ptb_slice(args.data, "valid", vocab, lengths=lengths(args.valid_lengths), per_length=args.valid_per_length)
    return vocab, train, valid


def plain_and_aggressive_svi(pair: torch.nn.Module, x: torch.Tensor):
    """``pyro.infer.SVI`` and ``AggressiveSVI`` on one pair (Trace_ELBO, SGD lr 1e-3), the split probed on ``x``."""
    import pyro.optim
    from pyro.infer import SVI, Trace_ELBO

    from pyro_lag import AggressiveSVI

    plain = SVI(pair.model, pair.guide, pyro.optim.SGD({"lr": 1e-3}), Trace_ELBO())
    aggressive = AggressiveSVI(pair.model, pair.guide, pyro.optim.SGD({"lr": 1e-3}), Trace_ELBO())
    aggressive.split_params(x)
    return plain, aggressive


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(values: Sequence[float]) -> dict:
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4)
    else:
        q1 = q3 = values[0]
    return {"median": statistics.median(values), "q1": q1, "q3": q3}


def timing(values: Sequence[float]) -> dict:
    """Median and quartiles of wall times in seconds, the harness's format."""
    s = _stats(values)
    return {"median_s": s["median"], "q1_s": s["q1"], "q3_s": s["q3"], "repeats": len(values)}


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict:
    """Median and quartiles of the per-repeat ratios numerator[i] / denominator[i]."""
    return _stats([a / b for a, b in zip(numerator, denominator)])


def interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Wall times of each function, called in turn ``repeats`` times after ``warmup`` calls each.

    The order within a round rotates, so no function always runs first (or after the same one).
    """
    device = torch.device(device)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def save(name: str, result: dict, args: argparse.Namespace) -> Path:
    """Write the result with device, torch version, thread count and the machine's load; to ``--out`` when given.

    The load average (1, 5, 15 minutes) at the end of the run says how busy a shared machine
    was: interleaving keeps the ratios fair under load, but their spread grows with it.
    """
    result = {"benchmark": name, "threads": torch.get_num_threads(), "size": args.size,
              "network": SIZES[args.size], "batch_size": args.batch_size,
              "load_average": [round(v, 2) for v in os.getloadavg()], **result}
    if args.device != "cpu" and torch.cuda.is_available():
        result["device_name"] = torch.cuda.get_device_name(0)
    if args.out is None:
        return write_result(name, result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps({"device": device_description(), "torch": torch.__version__, **result}, indent=2) + "\n")
    return path
