"""The paper's Table 1 (text) on Penn Treebank with the lstm-text VAE, at CPU scale by default.

    python examples/ptb_text.py                       # reduced: a slice of PTB, small preset
    python examples/ptb_text.py --paper --device cuda # full PTB, paper preset, 40 epochs

Rows: LSTM language model alone, VAE, VAE + anneal, beta-VAE, cyclical, free bits,
aggressive, aggressive + anneal. The reduced run trains the small preset (ni = nh = 128)
on 2,500 training sentences for 6 epochs, validates on 1,000 sentences (the MI that ends
aggressive mode is noisy on fewer: sentences are batched by length, so small sets give
batches of a few sentences), reports KL, MI and AU on 1,000 test sentences and IW-NLL on
the first 100 of them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from paper_table import add_common_options, parse_args, run_rows
from pyro_lag.models.registry import build

from pyro_lag.data import TextBatches, TextCorpus, Vocabulary, num_tokens

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train-sentences", type=int, default=2500, help="training sentences in the reduced run")
    parser.add_argument("--valid-sentences", type=int, default=1000, help="validation sentences in the reduced run")
    parser.add_argument("--test-sentences", type=int, default=1000, help="test sentences for KL, MI, AU in the reduced run")
    parser.add_argument("--iw-sentences", type=int, default=100, help="the first test sentences, scored by IW-NLL")
    add_common_options(parser, out="runs/ptb_text")
    args = parse_args(parser)

    vocab = Vocabulary.from_file(args.data / "ptb.train.txt")
    corpora = {split: TextCorpus.from_file(args.data / f"ptb.{split}.txt", vocab) for split in ("train", "valid", "test")}
    if not args.paper:
        rng = np.random.default_rng(0)
        corpora["train"] = corpora["train"].subset(rng.permutation(len(corpora["train"]))[: args.train_sentences])
        for split, count in (("valid", args.valid_sentences), ("test", args.test_sentences)):
            corpora[split] = corpora[split].subset(np.arange(min(count, len(corpora[split]))))
    train = TextBatches(corpora["train"], 32, seed=args.seed, device=args.device)
    valid = TextBatches(corpora["valid"], 50, shuffle=False, device=args.device)
    usage = TextBatches(corpora["test"], 50, shuffle=False, device=args.device)
    scored = corpora["test"]
    if not args.paper:  # IW-NLL on the first sentences only: it costs iw_samples decoder passes each
        scored = scored.subset(np.arange(min(args.iw_sentences, len(scored))))
    test = TextBatches(scored, 50, shuffle=False, device=args.device)
    tokens = sum(num_tokens(b) for (b,) in test)
    preset = "paper" if args.paper else "small"
    epochs = args.epochs or (40 if args.paper else 6)
    run_rows(lambda: build("lstm-text", preset, vocab_size=len(vocab)), train, valid, test,
             rows=args.rows.split(","), epochs=epochs, iw_samples=args.iw_samples, seed=args.seed, tokens=tokens,
             out=args.out, fit_options={"device": args.device, "stop_rule": args.stop_rule, "patience": args.patience},
             threads=args.threads, jobs=args.jobs, usage=usage)


if __name__ == "__main__":
    main()
