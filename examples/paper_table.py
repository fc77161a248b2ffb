"""Shared runner for the paper's Table 1 rows: train each method with `fit`, then tabulate.

Used by ptb_text.py and omniglot_image.py; not meant to be run on its own.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable

import pyro
import torch

from pyro_lag import evaluate, fit

# name -> (method, extra fit arguments); "decoder-only" trains the decoder alone (no latent).
METHODS: dict[str, tuple[str, dict]] = {
    "decoder-only": ("standard", {}),
    "vae": ("standard", {}),
    "vae+anneal": ("anneal", {}),
    "beta-vae": ("beta", {"beta": 0.2}),
    "cyclical": ("cyclical", {}),
    "free-bits": ("free-bits", {"free_bits": 0.1}),
    # the reference's policy: up to 100 inner steps a model step, aggressive until MI stops rising
    "aggressive": ("aggressive", {"policy": "paper"}),
    "aggressive+anneal": ("aggressive", {"anneal": True, "policy": "paper"}),
    # aggressive mode ended sooner: validation MI checked 4 times an epoch (the paper's inner rule)
    "aggressive-mi4": ("aggressive", {"policy": "paper", "mi_checks_per_epoch": 4}),
    # one aggressive epoch at most, two of the paper's 15-step windows per model step
    "aggressive-fast": ("aggressive", {"policy": "paper", "max_inner_steps": 30, "max_aggressive_epochs": 1}),
    # the budget policy: the paper's rules within 30 inner steps a model step and 250 aggressive model steps
    "aggressive-budget": ("aggressive", {"policy": "budget"}),
    "aggressive-budget+anneal": ("aggressive", {"anneal": True, "policy": "budget"}),
    # the budget's 30 inner steps with 345 aggressive model steps: three epochs of the PTB slice, as the paper's policy ran
    "aggressive-budget-345": ("aggressive", {"policy": "budget", "max_aggressive_steps": 345}),
}
# policy comparisons: asked for by name
EXTRA_ROWS = ("aggressive-mi4", "aggressive-fast", "aggressive-budget", "aggressive-budget+anneal",
              "aggressive-budget-345")


def add_common_options(parser: argparse.ArgumentParser, *, out: str) -> None:
    """The options every Table 1 example shares (scale, rows, evaluation, device, parallel rows)."""
    parser.add_argument("--paper", action="store_true", help="all the data, the paper preset and schedule (use a GPU)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per row")
    parser.add_argument("--rows", default=",".join(m for m in METHODS if m not in EXTRA_ROWS),
                        help=f"comma-separated rows out of: {', '.join(METHODS)}")
    parser.add_argument("--iw-samples", type=int, default=500, help="importance samples per test point for IW-NLL")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=783435)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per row")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="rows trained at once on the CPU, in separate processes (default: 2, or 1 on a one-core machine)")
    parser.add_argument("--stop-rule", choices=["drop", "patience"], default=None,
                        help="how validation MI ends aggressive mode (default: the reference's for the data kind)")
    parser.add_argument("--patience", type=int, default=5, help="epochs without a new best MI, for --stop-rule patience")
    parser.add_argument("--out", type=Path, default=Path(out), help="folder for results.json and table.md")



def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line and set torch's thread count before any data is loaded or forked."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


# What worker processes need; set before they are forked, so closures need not be pickled.
_JOB: dict[str, Any] = {}


def _run_row(row: str) -> dict:
    """Train one row and return its test figures, wall time and epoch counts."""
    job = _JOB
    torch.set_num_threads(job["threads"])
    method, extra = METHODS[row]
    pyro.clear_param_store()
    pyro.set_rng_seed(job["seed"])
    pair = job["build_pair"]()
    if row == "decoder-only":
        pair = pair.decoder_only()
    started = time.perf_counter()
    result = fit(pair.model, pair.guide, job["train"], job["valid"], job["test"], method=method,
                 epochs=job["epochs"], seed=job["seed"], iw_samples=job["iw_samples"],
                 **{**job["fit_options"], **extra})
    total = time.perf_counter() - started
    metrics = result.test or {}
    nll, tokens = metrics.get("iw_nll"), job["tokens"]
    usage = metrics
    if job["usage"] is not None and row != "decoder-only":  # KL, MI, AU on a larger held-out set
        usage = evaluate(pair.model, pair.guide, job["usage"])
    figures = {
        "row": row, "iw_nll": nll,
        "ppl": math.exp(nll * metrics["num_points"] / tokens) if tokens and nll is not None else None,
        "kl": usage.get("kl"), "mi": usage.get("mi"), "au": usage.get("au"),
        # training time: every epoch with its validation pass, not the final IW-NLL test pass
        "seconds": sum(h["wall_time"] for h in result.history), "total_seconds": total,
        "epochs": len(result.history),
        "aggressive_epochs": sum(bool(h.get("aggressive")) for h in result.history),
        "history": [{k: h.get(k) for k in ("epoch", "kl", "mi", "au", "aggressive", "aggressive_steps", "inner_steps",
                                           "val_loss")}
                    for h in result.history],
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "history"}), flush=True)
    return figures


def run_rows(
    build_pair: Callable[[], torch.nn.Module],
    train, valid, test, *, rows: list[str], epochs: int, iw_samples: int, seed: int,
    tokens: float | None, out: Path, fit_options: dict, threads: int = 1, jobs: int = 1, usage=None,
) -> list[dict]:
    """Train every requested row with the same data and seed; return one result dict each.

    ``test`` gives IW-NLL (and PPL over ``tokens``); KL, MI and AU come from ``usage``
    when given (a larger held-out set: IW-NLL costs ``iw_samples`` decoder passes a point,
    these do not), else from ``test``.
    ``jobs > 1`` trains that many rows at once in forked processes (each with ``threads``
    torch threads); the table is rewritten after every finished row.
    """
    unknown = [row for row in rows if row not in METHODS]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    _JOB.update(build_pair=build_pair, train=train, valid=valid, test=test, epochs=epochs, iw_samples=iw_samples,
                seed=seed, tokens=tokens, fit_options=fit_options, threads=threads, usage=usage)
    if str(fit_options.get("device") or "cpu") != "cpu":
        jobs = 1  # a forked process cannot use a CUDA context its parent opened
    done: dict[str, dict] = {}
    started = time.perf_counter()
    if jobs <= 1:
        for row in rows:
            done[row] = _run_row(row)
            write_table([done[r] for r in rows if r in done], out)
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for figures in pool.imap_unordered(_run_row, rows):
                done[figures["row"]] = figures
                write_table([done[r] for r in rows if r in done], out)
    print((out / "table.md").read_text(), flush=True)
    print(f"{len(rows)} rows in {(time.perf_counter() - started) / 60:.1f} min wall time ({jobs} at once)", flush=True)
    return [done[r] for r in rows]


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_table(results: list[dict], out: Path) -> None:
    """Write results as JSON and as a Markdown table with time relative to the plain VAE row."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    base = next((r["seconds"] for r in results if r["row"] == "vae"), None)
    lines = ["| model | IW-NLL | PPL | KL | MI | AU | epochs (aggressive) | time (x VAE) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        relative = r["seconds"] / base if base else None
        lines.append(f"| {r['row']} | {_fmt(r['iw_nll'])} | {_fmt(r['ppl'])} | {_fmt(r['kl'])} | "
                     f"{_fmt(r['mi'])} | {_fmt(r['au'])} | {r['epochs']} ({r['aggressive_epochs']}) | {_fmt(relative)} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
