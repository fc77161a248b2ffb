"""The literal drop-in on five program styles: swap SVI for AggressiveSVI and nothing else.

    python benchmarks/program_styles.py --steps 400

Each style of benchmarks/program_catalog.py (a VAE on OMNIGLOT, a deep Markov model with ragged
masks and one module in model and guide, a semi-supervised VAE with enumeration and an
unsized plate, an amortized LDA with a global plate first, a conditional VAE with
``(args, kwargs)`` batches) trains with only the class name changed: no guide_batches, no
observe_mi. Recorded: the validation MI (with its standard error) and AU after training,
mean inner steps per step while aggressive, and whether and when aggressive mode ended.
Written to benchmarks/results/program_styles.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.optim import Adam

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import program_catalog as styles  # noqa: E402
from pyro_lag import AggressiveSVI, evaluate  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def run(program: styles.Program, steps: int) -> dict:
    """Train with the literal drop-in for ``steps`` steps; the figures the note reports."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = AggressiveSVI(program.model, program.guide, Adam({"lr": 1e-2}), program.make_loss())
    inner, aggressive_steps, ended_at = 0, 0, None
    started = time.perf_counter()
    for step in range(steps):
        args, kwargs = styles.split_batch(program.train_batches[step % len(program.train_batches)])
        was_aggressive = svi.aggressive
        svi.step(*args, **kwargs)
        if was_aggressive:
            inner += svi.last_inner_steps
            aggressive_steps += 1
            if not svi.aggressive:
                ended_at = step + 1
    figures = evaluate(program.model, program.guide, program.eval_batches, data_plate=program.data_plate,
                       mi_samples=4)
    return {
        "style": program.name, "steps": steps, "seconds": round(time.perf_counter() - started, 1),
        "mi": round(figures["mi"], 3), "mi_se": round(figures["mi_se"], 3), "au": figures["au"],
        "units": int(figures["au_var"].numel()),
        "inner_steps_per_step": round(inner / max(aggressive_steps, 1), 1),
        "aggressive_ended_at_step": ended_at, "mi_checks": [round(v, 3) for v in svi.mi_history],
        "why": svi.stop_reason or svi.plain_reason,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "program_styles.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    programs = [styles.vae(DATA), styles.dmm(), styles.ss_vae(), styles.lda(), styles.cvae()]
    rows = [run(program, args.steps) for program in programs]
    args.out.write_text(json.dumps(rows, indent=1))
    print("| style | MI | AU | inner steps/step | aggressive ended at step | why |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['style']} | {r['mi']} ± {r['mi_se']} | {r['au']} of {r['units']} | {r['inner_steps_per_step']} "
              f"| {r['aggressive_ended_at_step'] or 'not ended'} | {r['why'] or ''} |")


if __name__ == "__main__":
    main()
