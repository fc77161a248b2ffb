"""Diagnostics cost: MI and AU over the validation set as a fraction of a training epoch; IW-NLL speed.

The training slice and the validation slice keep PTB's proportion (3,370 validation to
42,068 training sentences, 8%), so the fraction is the one a full PTB run sees. The
epoch is a standard (non-aggressive) epoch of ``fit``'s step (per-example loss, SGD
lr 1.0, separate guide optimizer, clip 5.0): the cheapest epoch, so the strictest
denominator; an aggressive epoch is many times longer. ``evaluate`` (ELBO, KL, MI, AU in
one pass, what ``fit`` runs after every epoch) is timed beside MI + AU.

IW-NLL with K = 500 importance samples: data points per second of
``pyro_lag.iw_log_likelihood``, against the reference's plain-PyTorch ``nll_iw`` on the
same sentences and chunk size.

    python benchmarks/bench_diagnostics.py [--device cuda]
"""
from __future__ import annotations

import sys
from pathlib import Path

import pyro
import pyro.optim
from pyro.infer import Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pyro_lag import AggressiveSVI, active_units, evaluate, iw_log_likelihood, mutual_information  # noqa: E402
from pyro_lag.data import TextBatches  # noqa: E402

try:
    from benchmarks import bench_common as common
    from benchmarks.bench_reference_loop import per_example
    from benchmarks.reference_loop import iw_log_likelihood_reference
except ImportError:  # run as a script from the benchmarks folder
    import bench_common as common
    from bench_reference_loop import per_example
    from reference_loop import iw_log_likelihood_reference

PTB_VALID_OVER_TRAIN = 3370 / 42068


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    common.add_slice_options(p, lengths="14,15,16,17,18,19,20,21,22,23,24,25", per_length=96)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs (and evaluations)")
    p.add_argument("--iw-samples", type=int, default=500)
    p.add_argument("--iw-chunk", type=int, default=50)
    p.add_argument("--iw-batch", type=int, default=4, help="sentences per IW-NLL call")
    p.add_argument("--iw-batches", type=int, default=2, help="IW-NLL calls timed per repeat")
    args = p.parse_args(argv)
    device = common.setup(args)

    vocab, train_corpus, valid_corpus = common.slices(args)
    train = TextBatches(train_corpus, args.batch_size, seed=args.seed, device=device)
    valid = TextBatches(valid_corpus, args.batch_size, shuffle=False, device=device)
    iw_sentences = TextBatches(valid_corpus, args.iw_batch, shuffle=False, device=device)
    iw_batches = [b for (b,) in iw_sentences][: args.iw_batches]

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    pair = common.build_pair(args.size, len(vocab), device, seed=args.seed)
    svi = AggressiveSVI(
        per_example(pair.model), per_example(pair.guide), pyro.optim.SGD({"lr": 1.0}), Trace_ELBO(),
        guide_optim=pyro.optim.SGD({"lr": 1.0}), clip_norm=5.0, aggressive=False,
    )

    def epoch() -> None:
        for (x,) in train:
            svi.step(x)

    def mi_and_au() -> None:
        mutual_information(pair.guide, valid)
        active_units(pair.guide, valid)

    def iw_pyro() -> None:
        for x in iw_batches:
            iw_log_likelihood(pair.model, pair.guide, x, num_samples=args.iw_samples, chunk_size=args.iw_chunk)

    def iw_reference() -> None:
        for x in iw_batches:
            iw_log_likelihood_reference(pair, x, num_samples=args.iw_samples, chunk_size=args.iw_chunk)

    times = common.interleaved({
        "standard_epoch": epoch,
        "mi_and_au": mi_and_au,
        "evaluate": lambda: evaluate(pair.model, pair.guide, valid),
    }, repeats=args.repeats, warmup=1, device=device)
    iw_times = common.interleaved({"pyro": iw_pyro, "reference": iw_reference},
                                  repeats=args.repeats, warmup=1, device=device)
    points = sum(x.shape[0] for x in iw_batches)

    result = {
        "what": "MI + AU over the validation slice as a fraction of one standard training epoch; IW-NLL speed",
        "torch_device": str(device),
        "train_sentences": len(train_corpus),
        "valid_sentences": len(valid_corpus),
        "valid_over_train": len(valid_corpus) / len(train_corpus),
        "ptb_valid_over_train": PTB_VALID_OVER_TRAIN,
        "batches_per_epoch": len(train),
        "times": {name: common.timing(t) for name, t in times.items()},
        "mi_au_fraction_of_epoch": common.ratio(times["mi_and_au"], times["standard_epoch"]),
        "evaluate_fraction_of_epoch": common.ratio(times["evaluate"], times["standard_epoch"]),
        "iw_nll": {
            "num_samples": args.iw_samples,
            "chunk_size": args.iw_chunk,
            "sentences_per_call": args.iw_batch,
            "points_timed": points,
            "pyro_points_per_s": points / common.timing(iw_times["pyro"])["median_s"],
            "reference_points_per_s": points / common.timing(iw_times["reference"])["median_s"],
            "pyro_over_reference_time": common.ratio(iw_times["pyro"], iw_times["reference"]),
        },
        "target": "MI + AU evaluation <= 5% of an epoch",
    }
    result["target_met"] = result["mi_au_fraction_of_epoch"]["median"] <= 0.05
    path = common.save("diagnostics", result, args)
    iw = result["iw_nll"]
    print(f"MI + AU = {result['mi_au_fraction_of_epoch']['median']:.2%} of a standard epoch "
          f"(evaluate: {result['evaluate_fraction_of_epoch']['median']:.2%}); IW-NLL K={args.iw_samples}: "
          f"{iw['pyro_points_per_s']:.2f} points/s ({iw['pyro_over_reference_time']['median']:.2f} x the "
          f"reference's time); written to {path}")
    return result


if __name__ == "__main__":
    main()
