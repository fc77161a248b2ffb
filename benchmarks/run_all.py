"""Run every speed benchmark, each in its own process, and write the Markdown table of the results.

    python benchmarks/run_all.py                    # CPU, 1 thread, small networks
    python benchmarks/run_all.py --device cuda      # on a GPU
    python benchmarks/run_all.py --table-only       # rebuild results/README.md from the JSON files

Each benchmark writes ``benchmarks/results/<name>.json`` (or into ``--out``); the table,
``README.md`` beside them, quotes the median ratio, its interquartile range, the target
and the device of every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name (of the JSON file) -> script.
BENCHMARKS = {
    "reference_loop": "bench_reference_loop.py",
    "inner_vs_full_step": "bench_inner_step.py",
    "aggressive_vs_standard": "bench_aggressive_vs_standard.py",
    "pyro_overhead": "bench_pyro_overhead.py",
    "diagnostics": "bench_diagnostics.py",
    "user_model": "bench_user_model.py",
}


def _command(name: str, args: argparse.Namespace) -> list[str]:
    script = [sys.executable, str(HERE / BENCHMARKS[name])]
    command = script + ["--device", args.device, "--threads", str(args.threads), "--size", args.size,
                        "--batch-size", str(args.batch_size)]
    if args.out is not None:
        command += ["--out", str(args.out)]
    return command + args.extra.get(name, [])


def run(names: list[str], args: argparse.Namespace) -> None:
    """Run the benchmarks one after another; stop at the first that fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for name in names:
        print(f"== {name}", flush=True)
        subprocess.run(_command(name, args), check=True, env=env)


# ----------------------------------------------------------------------------- table


def _fmt(value: float, percent: bool = False) -> str:
    return f"{value:.1%}" if percent else f"{value:.3f}"


def _ratio_cells(stats: dict, percent: bool = False) -> tuple[str, str]:
    return _fmt(stats["median"], percent), f"{_fmt(stats['q1'], percent)} - {_fmt(stats['q3'], percent)}"


def _met(flag: bool | None) -> str:
    return "—" if flag is None else ("yes" if flag else "no")


def _rows(name: str, r: dict[str, Any]) -> list[list[str]]:
    """Table rows (figure, median, IQR, target, met, device) for one result file."""
    device = f"{r.get('device', '?')}"
    if name == "reference_loop":
        n = r["inner_steps_per_model_step"]
        return [
            ["AggressiveSVI / reference loop, per epoch", *_ratio_cells(r["epoch_ratio"]), "<= 0.8", _met(r["target_met"]), device],
            [f"AggressiveSVI / reference loop, per model step ({n} inner steps)", *_ratio_cells(r["model_step_ratio"]), "", "", device],
            ["AggressiveSVI inner step / reference inner step", *_ratio_cells(r["inner_step_ratio"]), "", "", device],
            ["AggressiveSVI model step / reference model step", *_ratio_cells(r["model_only_step_ratio"]), "", "", device],
        ]
    if name == "inner_vs_full_step":
        return [
            ["inner (guide-only) step / full SVI step", *_ratio_cells(r["inner_over_full"]), "<= 0.8", _met(r["target_met"]), device],
            ["model-only step / full SVI step", *_ratio_cells(r["model_only_over_full"]), "", "", device],
        ]
    if name == "aggressive_vs_standard":
        return [
            [f"aggressive / standard total time, {r['epochs']} epochs ({r['aggressive_epochs']} aggressive)",
             _fmt(r["total_ratio"]), f"standard runs differ by {r['standard_total_spread']:.1%}", "<= 2.0",
             _met(r["target_met"]), device],
            [f"aggressive epoch / standard epoch ({r['mean_inner_steps_while_aggressive']:.1f} inner steps per model step)",
             _fmt(r["aggressive_epoch_over_standard_epoch"]), "", "", "", device],
            ["epochs until the total ratio is 2.0 at these costs", str(r["epochs_for_ratio_2"]), "", "", "", device],
        ]
    if name == "pyro_overhead":
        return [
            ["Pyro SVI step / plain PyTorch step (cross-entropy)", *_ratio_cells(r["overhead"]), "<= 1.10", _met(r["target_met"]), device],
            ["Pyro SVI step / plain PyTorch step (the pair's own likelihood)", *_ratio_cells(r["overhead_same_densities"]), "", "", device],
            ["Pyro SVI step without validation / plain PyTorch (cross-entropy)", *_ratio_cells(r["overhead_no_validation"]), "", "", device],
            ["plain PyTorch: pair likelihood / cross-entropy", *_ratio_cells(r["density_cost"]), "", "", device],
        ]
    if name == "diagnostics":
        iw = r["iw_nll"]
        return [
            ["MI + AU over validation / standard training epoch", *_ratio_cells(r["mi_au_fraction_of_epoch"], True), "<= 5%", _met(r["target_met"]), device],
            ["evaluate (ELBO, KL, MI, AU) / standard training epoch", *_ratio_cells(r["evaluate_fraction_of_epoch"], True), "", "", device],
            [f"IW-NLL, K = {iw['num_samples']}: data points per second", f"{iw['pyro_points_per_s']:.2f}",
             f"reference loop: {iw['reference_points_per_s']:.2f}", "", "", device],
            ["IW-NLL time, pyro_lag / reference", *_ratio_cells(iw["pyro_over_reference_time"]), "", "", device],
        ]
    if name == "user_model":
        return [
            ["AggressiveSVI / paper's loop, per model step, user-written model (Categorical)",
             *_ratio_cells(r["aggressive_over_paper_loop"]), "<= 0.8", _met(r["target_met"]), device],
            ["the same with NextTokenCategorical", *_ratio_cells(r["aggressive_fused_over_paper_loop"]), "", "", device],
            ["user model: inner step / physical cost, same densities", *_ratio_cells(r["inner_over_physical_user_densities"]), "", "", device],
            ["user model: physical inner step / paper's inner step", *_ratio_cells(r["physical_over_paper_inner"]), "", "", device],
            ["user model: fused / Categorical likelihood, per model step", *_ratio_cells(r["fused_over_user_likelihood_model_step"]), "", "", device],
            ["user model: Pyro SVI step / plain PyTorch step", *_ratio_cells(r["svi_over_raw_step"]), "", "", device],
        ]
    return []


def render_table(results: Path) -> str:
    """The Markdown table of every known result file in ``results``."""
    lines = [
        "# Speed benchmarks",
        "",
        "Every figure is a ratio measured in one process against a baseline run beside it (calls",
        "interleaved), median and interquartile range over the repeats. Re-run with",
        "`python benchmarks/run_all.py [--device cuda]`; each row's JSON is in this folder.",
        "",
        "| Figure | Median | Spread (IQR) | Target | Met | Device |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for name in BENCHMARKS:
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        for row in _rows(name, r):
            lines.append("| " + " | ".join(row) + " |")
        setup = [f"torch {r.get('torch', '?')}"]
        if "threads" in r:
            setup.append(f"{r['threads']} thread(s)")
        if "network" in r:
            net = r["network"]
            setup.append(f"lstm-text ni={net['ni']}, nh={net['enc_nh']}/{net['dec_nh']}, z={net['latent_dim']}")
        elif "model" in r:
            setup.append(r["model"])
        if "batch_size" in r:
            setup.append(f"batch {r['batch_size']}")
        if "load_average" in r:
            setup.append(f"machine load average {r['load_average'][1]} over 5 min")
        elif "batch_shape" in r:
            setup.append(f"batch {r['batch_shape']}")
        notes.append(f"- `{name}.json`: " + ", ".join(setup) + (f". {r['what']}." if "what" in r else "."))
    return "\n".join(lines + ["", "Set-ups:", "", *notes, ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", default="small", choices=["tiny", "small", "paper"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from the JSON files")
    p.add_argument("--extra", action="append", default=[], metavar="NAME:ARGS",
                   help="extra arguments for one benchmark, e.g. 'diagnostics:--repeats 5'")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    extra: dict[str, list[str]] = {}
    for item in args.extra:
        name, _, rest = item.partition(":")
        extra.setdefault(name, []).extend(rest.split())
    args.extra = extra
    if not args.table_only:
        run(names, args)
    results = args.out or RESULTS
    table = results / "README.md"
    table.write_text(render_table(results))
    print(f"table written to {table}")


if __name__ == "__main__":
    main()
