"""Pyro's overhead: one plain ``pyro.infer.SVI`` step (Trace_ELBO) against the same step in plain PyTorch.

Same LSTM text VAE (two copies of one initialisation), same batch, same optimizer (SGD
over every parameter, no clipping), same estimator (one reparameterized z, Monte Carlo
KL = log q(z|x) - log p(z), the loss summed over the batch). Three plain-PyTorch
versions separate where a difference comes from:

- ``torch_cross_entropy``: the tokens scored with the fused cross-entropy, as the paper's code does;
- ``torch_same_densities``: the tokens scored with the pair's own likelihood object (the
  ``NextTokenCategorical`` the Pyro model scores, itself one fused cross-entropy); Pyro's
  machinery is then the only difference;
- and Pyro with argument validation off (``pyro.validation_enabled(False)``) beside the default.

    python benchmarks/bench_pyro_overhead.py [--device cuda]
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from benchmarks import bench_common as common
    from benchmarks.reference_loop import elbo_loss
except ImportError:  # run as a script from the benchmarks folder
    import bench_common as common
    from reference_loop import elbo_loss


def torch_step(pair: torch.nn.Module, x: torch.Tensor, lr: float, recon: str):
    """A plain-PyTorch SGD step on the summed negative ELBO (Monte Carlo KL, as Trace_ELBO)."""
    optimizer = torch.optim.SGD(pair.parameters(), lr=lr)

    def step() -> float:
        optimizer.zero_grad()
        loss = elbo_loss(pair, x, kl="mc", recon=recon).sum()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--length", type=int, default=22, help="sentence length of the batch (with <s>, </s>)")
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (the loss is summed over the batch)")
    p.add_argument("--repeats", type=int, default=12)
    args = p.parse_args(argv)
    device = common.setup(args)

    x, pyro_pair = common.one_batch_and_pair(args, device)
    pairs = {name: copy.deepcopy(pyro_pair) for name in ("torch_cross_entropy", "torch_same_densities")}
    svi = SVI(pyro_pair.model, pyro_pair.guide, pyro.optim.SGD({"lr": args.lr}), Trace_ELBO())

    def pyro_unvalidated() -> float:
        with pyro.validation_enabled(False):
            return svi.step(x)

    times = common.interleaved({
        "pyro_svi": lambda: svi.step(x),
        "pyro_svi_no_validation": pyro_unvalidated,
        "torch_cross_entropy": torch_step(pairs["torch_cross_entropy"], x, args.lr, "cross_entropy"),
        "torch_same_densities": torch_step(pairs["torch_same_densities"], x, args.lr, "pair"),
    }, repeats=args.repeats, warmup=2, device=device)

    result = {
        "what": "one pyro.infer.SVI step (Trace_ELBO, pyro.optim.SGD) against the same step in plain PyTorch",
        "torch_device": str(device),
        "batch_shape": list(x.shape),
        "per_step": {name: common.timing(t) for name, t in times.items()},
        "overhead": common.ratio(times["pyro_svi"], times["torch_cross_entropy"]),
        "overhead_same_densities": common.ratio(times["pyro_svi"], times["torch_same_densities"]),
        "overhead_no_validation": common.ratio(times["pyro_svi_no_validation"], times["torch_cross_entropy"]),
        "density_cost": common.ratio(times["torch_same_densities"], times["torch_cross_entropy"]),
        "target": "Pyro step <= 1.10 x the plain-PyTorch step",
    }
    result["target_met"] = result["overhead"]["median"] <= 1.10
    path = common.save("pyro_overhead", result, args)
    print(f"SVI step / plain PyTorch = {result['overhead']['median']:.3f} "
          f"(against the pair's own likelihood: {result['overhead_same_densities']['median']:.3f}; "
          f"pair likelihood / cross-entropy in plain PyTorch: {result['density_cost']['median']:.3f}); written to {path}")
    return result


if __name__ == "__main__":
    main()
