"""One inner (guide-only) step of AggressiveSVI against one full ``pyro.infer.SVI`` step, interleaved.

Same network, Trace_ELBO, SGD, one batch of typical length, with the calls interleaved
so that the machine's load falls on both alike, and the ratio's spread over the repeats. The inner step freezes the model's parameters, so
autograd never computes the decoder's weight gradients; that is what it can save.

    python benchmarks/bench_inner_step.py [--device cuda]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from benchmarks import bench_common as common
except ImportError:  # run as a script from the benchmarks folder
    import bench_common as common


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--length", type=int, default=22, help="sentence length of the batch (with <s>, </s>)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    device = common.setup(args)

    x, pair = common.one_batch_and_pair(args, device)
    plain, aggressive = common.plain_and_aggressive_svi(pair, x)

    times = common.interleaved({
        "full_svi_step": lambda: plain.step(x),
        "inner_step": lambda: aggressive.inner_step(x),
        "model_only_step": lambda: aggressive._model_step((x,), {}),
    }, repeats=args.repeats, warmup=2, device=device)
    result = {
        "what": "AggressiveSVI inner (guide-only) step and model-only step against a full pyro.infer.SVI step",
        "torch_device": str(device),
        "batch_shape": list(x.shape),
        "per_step": {name: common.timing(t) for name, t in times.items()},
        "inner_over_full": common.ratio(times["inner_step"], times["full_svi_step"]),
        "model_only_over_full": common.ratio(times["model_only_step"], times["full_svi_step"]),
        "target": "inner step <= 0.8 x a full step",
    }
    result["target_met"] = result["inner_over_full"]["median"] <= 0.8
    path = common.save("inner_vs_full_step", result, args)
    print(f"inner step / full SVI step = {result['inner_over_full']['median']:.3f}, model-only step / full = "
          f"{result['model_only_over_full']['median']:.3f}; written to {path}")
    return result


if __name__ == "__main__":
    main()
