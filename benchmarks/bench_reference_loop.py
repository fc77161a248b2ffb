"""AggressiveSVI against the paper's training loop in plain PyTorch, on identical work.

Both train the same LSTM text VAE (two copies of one initialisation) on the same PTB
slice, batch order and inner-step batches, with SGD lr 1.0 for encoder and decoder
separately, gradient clipping 5.0, the loss averaged over the batch, and exactly
``--inner-steps`` guide-only steps per model step (the stop rule is switched off on
both sides so they do the same number of steps). The reference back-propagates into
every parameter in each inner step, as its code does; AggressiveSVI freezes the
decoder there (and the encoder in the model step). AggressiveSVI is set up as
``pyro_lag.fit`` sets it up (per-example loss scale, separate guide optimizer).

    python benchmarks/bench_reference_loop.py [--device cuda] [--kl closed|mc]

Figures: time per model step (inner loop plus model step) and per epoch, as
AggressiveSVI / reference, the two sides alternating batch by batch through the same
epochs; and the two kinds of step one by one.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pyro
import pyro.optim
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pyro_lag import AggressiveSVI  # noqa: E402
from pyro_lag.data import TextBatches  # noqa: E402

try:
    from benchmarks import bench_common as common
    from benchmarks.reference_loop import ReferenceAggressiveLoop
except ImportError:  # run as a script from the benchmarks folder
    import bench_common as common
    from reference_loop import ReferenceAggressiveLoop

LOSSES = {"closed": TraceMeanField_ELBO, "mc": Trace_ELBO}


def per_example(fn):
    """Scale a program's log-densities by 1/batch size, as ``pyro_lag.fit`` does (the reference's batch mean)."""

    def scaled(x):
        with poutine.scale(scale=1.0 / x.shape[0]):
            return fn(x)

    return scaled


def aggressive_svi(pair, train: TextBatches, *, inner_steps: int, kl: str) -> AggressiveSVI:
    """AggressiveSVI configured like ``fit`` for text, with the inner loop fixed at ``inner_steps``."""
    return AggressiveSVI(
        per_example(pair.model), per_example(pair.guide), pyro.optim.SGD({"lr": 1.0}), LOSSES[kl](),
        guide_batches=train.sample, guide_optim=pyro.optim.SGD({"lr": 1.0}),
        max_inner_steps=inner_steps, check_every=10**9, clip_norm=5.0,
        inner_loss_normalizer=lambda args, kwargs: float(args[0].shape[1] - 1),
    )


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--kl", choices=sorted(LOSSES), default="closed",
                   help="closed-form KL (the reference; TraceMeanField_ELBO) or Monte Carlo (Trace_ELBO)")
    p.add_argument("--inner-steps", type=int, default=10)
    common.add_slice_options(p, lengths="20,21,22,23", per_length=64, valid=False)
    p.add_argument("--repeats", type=int, default=20, help="timed single inner and model steps per side")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per side")
    args = p.parse_args(argv)
    device = common.setup(args)

    vocab, corpus, _ = common.slices(args)
    ref_train = TextBatches(corpus, args.batch_size, seed=args.seed, device=device)
    svi_train = TextBatches(corpus, args.batch_size, seed=args.seed, device=device)
    (x,) = next(iter(ref_train.iter_from(0, 0)))

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    ref_pair = common.build_pair(args.size, len(vocab), device, seed=args.seed)
    svi_pair = copy.deepcopy(ref_pair)
    reference = ReferenceAggressiveLoop(
        ref_pair, lambda: ref_train.sample()[0], lr=1.0, clip_grad=5.0,
        max_inner_steps=args.inner_steps, check_every=None, kl=args.kl,
    )
    svi = aggressive_svi(svi_pair, svi_train, inner_steps=args.inner_steps, kl=args.kl)

    # One by one: an inner step and a model step of each side on the same batch.
    single = common.interleaved({
        "reference_inner_step": lambda: reference.inner_step(x),
        "svi_inner_step": lambda: svi.inner_step(x),
        "reference_model_step": lambda: reference.model_step(x),
        "svi_model_step": lambda: svi._model_step((x,), {}),
    }, repeats=args.repeats, warmup=2, device=device)
    # Whole epochs, the two sides alternating batch by batch over the same batch sequence, so
    # that a change in the machine's load falls on both: each training step (inner loop and
    # model step) is timed, an epoch's time is the sum of its steps.
    svi.step(x), reference.step(x)  # warm-up
    step_times: dict[str, list[float]] = {"reference": [], "aggressive_svi": []}
    epoch_times: dict[str, list[float]] = {"reference": [], "aggressive_svi": []}
    for epoch in range(args.epochs):
        totals = dict.fromkeys(epoch_times, 0.0)
        for position, ((ref_x,), (svi_x,)) in enumerate(zip(ref_train, svi_train)):
            steps = {"reference": lambda: reference.step(ref_x), "aggressive_svi": lambda: svi.step(svi_x)}
            order = list(steps) if (epoch + position) % 2 == 0 else list(reversed(steps))
            timed = common.interleaved({name: steps[name] for name in order}, repeats=1, warmup=0, device=device)
            for name, (seconds,) in timed.items():
                step_times[name].append(seconds)
                totals[name] += seconds
        for name, total in totals.items():
            epoch_times[name].append(total)
    assert reference.last_inner_steps == svi.last_inner_steps == args.inner_steps

    result = {
        "what": "AggressiveSVI (configured as fit does) against the paper's loop in plain PyTorch, "
                f"{args.inner_steps} inner steps per model step on both sides",
        "kl": args.kl,
        "loss": LOSSES[args.kl].__name__,
        "torch_device": str(device),
        "inner_steps_per_model_step": args.inner_steps,
        "batch_shape": list(x.shape),
        "train_sentences": len(corpus),
        "batches_per_epoch": len(ref_train),
        "per_model_step": {name: common.timing(t) for name, t in step_times.items()},
        "per_epoch": {name: common.timing(t) for name, t in epoch_times.items()},
        "single_steps": {name: common.timing(t) for name, t in single.items()},
        "model_step_ratio": common.ratio(step_times["aggressive_svi"], step_times["reference"]),
        "epoch_ratio": common.ratio(epoch_times["aggressive_svi"], epoch_times["reference"]),
        "inner_step_ratio": common.ratio(single["svi_inner_step"], single["reference_inner_step"]),
        "model_only_step_ratio": common.ratio(single["svi_model_step"], single["reference_model_step"]),
        "target": "aggressive epoch <= 0.8 x the reference loop's",
    }
    result["target_met"] = result["epoch_ratio"]["median"] <= 0.8
    path = common.save("reference_loop", result, args)
    print(f"per model step: AggressiveSVI / reference = {result['model_step_ratio']['median']:.3f}; "
          f"per epoch: {result['epoch_ratio']['median']:.3f} "
          f"(inner step {result['inner_step_ratio']['median']:.3f}, "
          f"model step {result['model_only_step_ratio']['median']:.3f}); written to {path}")
    return result


if __name__ == "__main__":
    main()
