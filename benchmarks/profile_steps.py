"""Where the time of a training step goes: torch.profiler over the three kinds of step.

Profiles, on one PTB batch and the benchmarks' LSTM text VAE, a full ``pyro.infer.SVI``
step, an AggressiveSVI inner (guide-only) step, and the reference loop's inner step
(full backward, encoder update only), and writes the operators that take the most
self CPU time in each, as shares of the step, to ``results/profile_steps.md`` (and .json).

    python benchmarks/profile_steps.py [--device cuda] [--steps 10]
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from benchmarks import bench_common as common
    from benchmarks.reference_loop import ReferenceAggressiveLoop
except ImportError:  # run as a script from the benchmarks folder
    import bench_common as common
    from reference_loop import ReferenceAggressiveLoop


def top_operators(fn, steps: int, cuda: bool, top: int) -> dict:
    """Profile ``steps`` calls of ``fn``; the top operators by self time, per step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    return {
        "ms_per_step": total / steps / 1e3,
        "operators": [{"name": e.key, "share": getattr(e, attr) / total, "calls_per_step": e.count / steps}
                      for e in ranked],
    }


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--length", type=int, default=22, help="sentence length of the batch (with <s>, </s>)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="calls of each kind of step before profiling")
    args = p.parse_args(argv)
    device = common.setup(args)

    x, pair = common.one_batch_and_pair(args, device)
    plain, aggressive = common.plain_and_aggressive_svi(pair, x)
    reference = ReferenceAggressiveLoop(copy.deepcopy(pair), lambda: x, lr=1e-3, kl="mc")

    cuda = device.type == "cuda"
    steps = {
        "full SVI step": lambda: plain.step(x),
        "AggressiveSVI inner step": lambda: aggressive.inner_step(x),
        "reference inner step": lambda: reference.inner_step(x),
    }
    # Warm up all three in turn first: the allocator settles on reusing the large logits-sized
    # buffers only after a few steps, and the first kind profiled would otherwise pay for it.
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    result = {"what": "top operators by self time in each kind of step (torch.profiler)",
              "batch_shape": list(x.shape),
              "steps": {name: top_operators(fn, args.steps, cuda, args.top) for name, fn in steps.items()}}
    path = common.save("profile_steps", result, args)
    lines = [f"# Where a step's time goes ({result['batch_shape'][0]} x {result['batch_shape'][1]} PTB batch, "
             f"{'GPU' if cuda else 'CPU, ' + str(args.threads) + ' thread(s)'})", ""]
    for name, figures in result["steps"].items():
        lines += [f"## {name}: {figures['ms_per_step']:.1f} ms of operator time per step", "",
                  "| operator | share of the step | calls per step |", "|---|---|---|"]
        lines += [f"| `{op['name']}` | {op['share']:.1%} | {op['calls_per_step']:.0f} |" for op in figures["operators"]]
        lines.append("")
    markdown = path.with_suffix(".md")
    markdown.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {path} and {markdown}")
    return result


if __name__ == "__main__":
    main()
