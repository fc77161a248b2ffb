"""Estimator errors against closed forms on a linear Gaussian model (exact posterior known).

Run: python benchmarks/estimator_accuracy.py  -> benchmarks/results/estimator_accuracy.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.linear_gaussian import make_linear_gaussian  # noqa: E402
from pyro_lag import active_units, evaluate, iw_log_likelihood, mutual_information  # noqa: E402

try:
    from benchmarks.harness import write_result
except ImportError:
    from harness import write_result


def main() -> None:
    pyro.set_rng_seed(0)
    lg = make_linear_gaussian(D=4, d=2, s=0.8)
    x = lg.sample(2000, torch.Generator().manual_seed(6))
    truth = lg.log_marginal(x)
    figures = evaluate(lg.model, lg.exact_guide, [x])
    iw = iw_log_likelihood(lg.model, lg.exact_guide, x, num_samples=500, chunk_size=100)
    mi = mutual_information(lg.exact_guide, [x])
    poor = {k: float(iw_log_likelihood(lg.model, lg.poor_guide, x[:500], num_samples=k, chunk_size=250).mean())
            for k in (1, 10, 100, 1000)}
    sparse = make_linear_gaussian(D=6, d=5, active=2)
    count, variance = active_units(sparse.exact_guide, [sparse.sample(500, torch.Generator().manual_seed(11))])
    result = {
        "elbo_exact_guide_abs_error": abs(figures["elbo"] - float(truth.mean())),
        "iw_nll_exact_guide_max_abs_error": float((iw - truth).abs().max()),
        "mi_estimate": mi,
        "mi_analytic": lg.true_mi,
        "mi_relative_error_batch_2000": abs(mi - lg.true_mi) / lg.true_mi,
        "poor_guide_iw_by_k": poor,
        "poor_guide_truth": float(lg.log_marginal(x[:500]).mean()),
        "active_units_found": count,
        "active_units_true": 2,
        "posterior_mean_variance": [float(v) for v in variance],
    }
    path = write_result("estimator_accuracy", result)
    for key, value in result.items():
        print(f"{key}: {value}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
