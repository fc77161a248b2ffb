"""Shared runner for the paper's Table 1 rows: train each method with `fit`, then tabulate.

Used by ptb_text.py and omniglot_image.py; not meant to be run on its own.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import pyro
import torch

from pyro_lag import fit

# name -> (method, extra fit arguments); "decoder-only" trains the decoder alone (no latent).
METHODS: dict[str, tuple[str, dict]] = {
    "decoder-only": ("standard", {}),
    "vae": ("standard", {}),
    "vae+anneal": ("anneal", {}),
    "beta-vae": ("beta", {"beta": 0.2}),
    "cyclical": ("cyclical", {}),
    "free-bits": ("free-bits", {"free_bits": 0.1}),
    "aggressive": ("aggressive", {}),
    "aggressive+anneal": ("aggressive", {"anneal": True}),
}


def run_rows(
    build_pair: Callable[[], torch.nn.Module],
    train, valid, test, *, rows: list[str], epochs: int, iw_samples: int, seed: int,
    tokens: float | None, out: Path, fit_options: dict,
) -> list[dict]:
    """Train every requested row with the same data and seed; return one result dict each."""
    results = []
    for row in rows:
        method, extra = METHODS[row]
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        pair = build_pair()
        if row == "decoder-only":
            pair = pair.decoder_only()
        started = time.perf_counter()
        result = fit(pair.model, pair.guide, train, valid, test, method=method, epochs=epochs,
                     seed=seed, iw_samples=iw_samples, **{**fit_options, **extra})
        seconds = time.perf_counter() - started
        metrics = result.test or {}
        nll = metrics.get("iw_nll")
        results.append({
            "row": row, "iw_nll": nll,
            "ppl": math.exp(nll * metrics["num_points"] / tokens) if tokens and nll is not None else None,
            "kl": metrics.get("kl"), "mi": metrics.get("mi"), "au": metrics.get("au"),
            "seconds": seconds, "epochs": len(result.history),
            "aggressive_epochs": sum(bool(h.get("aggressive")) for h in result.history),
        })
        print(json.dumps(results[-1]), flush=True)
    write_table(results, out)
    return results


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_table(results: list[dict], out: Path) -> None:
    """Write results as JSON and as a Markdown table with time relative to the plain VAE row."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    base = next((r["seconds"] for r in results if r["row"] == "vae"), None)
    lines = ["| model | IW-NLL | PPL | KL | MI | AU | time (x VAE) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        relative = r["seconds"] / base if base else None
        lines.append(f"| {r['row']} | {_fmt(r['iw_nll'])} | {_fmt(r['ppl'])} | {_fmt(r['kl'])} | "
                     f"{_fmt(r['mi'])} | {_fmt(r['au'])} | {_fmt(relative)} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
