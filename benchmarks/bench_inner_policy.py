"""The aggressive phase's cost under each inner-loop policy, on the run a newcomer starts first.

Runs ``pyro-lag fit`` on the embedded synthetic default (the paper's synthetic experiment at
a fifth of its corpus, batch 16, one thread) for ``--epochs`` epochs, in this process, once
per case: ``standard``; ``aggressive`` with the paper's inner-loop rule and one MI check per
epoch (the reference); and ``aggressive`` with the noise-aware rule and several MI checks per
epoch. For each: training time (the sum of the epochs' wall times; the final evaluation is
not training), the aggressive epochs, inner steps per model step, and test KL, MI, AU and
IW-NLL. Ratios are against the standard run of the same seed, run in the same process.

    python benchmarks/bench_inner_policy.py [--epochs 10] [--seeds 0] [--out benchmarks/results/inner_policy.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from pyro_lag.cli.main import main as cli

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "inner_policy.json"

# case -> the [fit] table it runs with (on top of the default run's settings)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("standard", {}),
    "paper": ("aggressive", {"policy": "paper"}),  # the reference's policy
    "noise": ("aggressive", {"policy": "paper", "inner_rule": "noise", "mi_checks_per_epoch": 1}),
    "noise-mi4": ("aggressive", {"policy": "paper", "inner_rule": "noise", "mi_checks_per_epoch": 4}),
    "paper-mi4": ("aggressive", {"policy": "paper", "inner_rule": "paper", "mi_checks_per_epoch": 4}),
    "noise10": ("aggressive", {"policy": "paper", "inner_rule": "noise", "check_every": 10, "mi_checks_per_epoch": 1}),
    "noise10-mi4": ("aggressive", {"policy": "paper", "inner_rule": "noise", "check_every": 10, "mi_checks_per_epoch": 4}),
    # one aggressive epoch at most, two of the paper's windows (30 inner steps) per model step at most
    "fast": ("aggressive", {"policy": "paper", "max_inner_steps": 30, "max_aggressive_epochs": 1}),
    # the paper's rules within 30 inner steps per model step and 250 aggressive model steps
    "budget": ("aggressive", {"policy": "budget"}),
    # the step budget alone: the paper's inner loop, 250 aggressive model steps at most
    "steps250": ("aggressive", {"policy": "paper", "max_aggressive_steps": 250}),
}


def _toml(fit: dict[str, Any]) -> str:
    lines = ["[fit]"] + [f"{k} = {json.dumps(v)}" for k, v in fit.items()]
    return "\n".join(lines) + "\n"


def run_case(method: str, fit: dict[str, Any], epochs: int, seed: int, folder: Path) -> dict[str, Any]:
    """One ``pyro-lag fit`` run; its history and final metrics."""
    config = folder / f"{method}-{len(fit)}-{seed}.toml"
    config.write_text(_toml(fit))
    out = folder / f"run-{method}-{'-'.join(str(v) for v in fit.values())}-{seed}"
    started = time.perf_counter()
    result = CliRunner().invoke(cli, ["fit", "--config", str(config), "--method", method, "--epochs", str(epochs),
                                      "--seed", str(seed), "--out", str(out)])
    if result.exit_code != 0:
        raise RuntimeError(f"pyro-lag fit failed: {result.output[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    history, final = metrics["history"], metrics["final"]
    aggressive = [r for r in history if r["aggressive"]]
    return {
        "method": method, "fit": fit, "seed": seed, "epochs": len(history),
        "training_s": sum(r["wall_time"] for r in history), "total_s": time.perf_counter() - started,
        "aggressive_epochs": len(aggressive),
        "inner_steps_per_step": statistics.mean(r["inner_steps"] for r in aggressive) if aggressive else 0.0,
        "test": {k: final.get(k) for k in ("iw_nll", "elbo", "kl", "mi", "mi_se", "au")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--cases", default="standard,paper,noise-mi4", help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pyro_lag_inner_policy_") as scratch:
        for seed in (int(s) for s in args.seeds.split(",")):
            standard = None
            for name in args.cases.split(","):
                method, fit = CASES[name]
                row = {"case": name, **run_case(method, fit, args.epochs, seed, Path(scratch))}
                if method == "standard":
                    standard = row["training_s"]
                row["time_vs_standard"] = row["training_s"] / standard if standard else None
                runs.append(row)
                test = row["test"]
                print(f"seed {seed} {name}: {row['training_s']:.0f} s training"
                      + (f" ({row['time_vs_standard']:.2f}x standard)" if standard else "")
                      + f", {row['aggressive_epochs']} aggressive epochs, {row['inner_steps_per_step']:.1f} inner/step;"
                      f" test KL {test['kl']:.3f} MI {test['mi']:.3f} AU {test['au']} IW-NLL {test['iw_nll']:.2f}",
                      flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"epochs": args.epochs, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
