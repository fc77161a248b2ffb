"""One inner (guide-only) step against one full SVI step on the LSTM text VAE, in one process.

The inner step freezes the decoder, so autograd never computes the decoder's weight
gradients; this benchmark measures what that saves. Run: python benchmarks/inner_step.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import SGD

from pyro_lag import AggressiveSVI
from pyro_lag.data import TextBatches, TextCorpus, Vocabulary
from pyro_lag.models.registry import build

try:
    from benchmarks.harness import time_call, write_result
except ImportError:  # run as a script from the benchmarks folder
    from harness import time_call, write_result

PTB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ptb"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    vocab = Vocabulary.from_file(PTB / "ptb.train.txt")
    corpus = TextCorpus.from_file(PTB / "ptb.valid.txt", vocab)
    batches = TextBatches(corpus, args.batch_size, seed=0, device=args.device)
    # A batch of typical length (the median sentence of PTB is about 20 tokens).
    batch = min((b for (b,) in batches if b.shape[0] == args.batch_size), key=lambda b: abs(b.shape[1] - 22))

    pyro.set_rng_seed(0)
    pair = build("lstm-text", args.preset, vocab_size=len(vocab)).to(args.device)
    elbo = Trace_ELBO()
    plain = SVI(pair.model, pair.guide, SGD({"lr": 1e-3}), elbo)
    aggressive = AggressiveSVI(pair.model, pair.guide, SGD({"lr": 1e-3}), elbo)
    aggressive.split_params(batch)

    full = time_call(lambda: plain.step(batch), repeats=args.repeats)
    inner = time_call(lambda: aggressive.inner_step(batch), repeats=args.repeats)
    model_only = time_call(lambda: aggressive._model_step((batch,), {}), repeats=args.repeats)
    result = {
        "model": f"lstm-text/{args.preset}",
        "batch_shape": list(batch.shape),
        "full_svi_step": full,
        "inner_step": inner,
        "model_only_step": model_only,
        "inner_over_full": inner["median_s"] / full["median_s"],
        "model_only_over_full": model_only["median_s"] / full["median_s"],
    }
    path = write_result("inner_step", result)
    print(f"full SVI step {full['median_s'] * 1e3:.1f} ms, inner step {inner['median_s'] * 1e3:.1f} ms "
          f"(ratio {result['inner_over_full']:.3f}); written to {path}")


if __name__ == "__main__":
    main()
