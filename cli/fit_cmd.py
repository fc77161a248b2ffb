"""``pyro-lag fit``: train a model/guide pair and leave a complete run directory behind.

This module only declares the command and its options, so that ``pyro-lag fit --help``
answers without importing torch or pyro; the work is in :mod:`.fit_run`, imported when
the command runs.
"""
from __future__ import annotations

from typing import Any, Optional

import click

from pyro_lag.training.settings import DEFAULT_POLICY, POLICIES

from .methods import METHODS
from .scale_out import ACCELERATORS, STRATEGIES


@click.command("fit")
@click.argument("model", required=False)
@click.option("--data", "path", metavar="PATH", help="Folder with *train*, *valid*, *test* files, or an .npz with train/valid/test arrays.")
@click.option("--train", metavar="FILE", help="Training file (text: one sentence a line; images: .npz/.npy).")
@click.option("--valid", metavar="FILE", help="Validation file (default: held out of the training file).")
@click.option("--test", metavar="FILE", help="Test file for the final evaluation (default: the validation set).")
@click.option("--preset", help="Model size preset of a built-in model (small, paper).")
@click.option("--method", type=click.Choice(METHODS), help="Training method (default: aggressive).")
@click.option("--anneal/--no-anneal", default=None, help="Add KL annealing to the aggressive method.")
@click.option("--beta", type=float, help="KL weight for --method beta.")
@click.option("--free-bits", "free_bits", type=float, help="Nats per latent dimension for --method free-bits.")
@click.option("--loss", type=click.Choice(("exact", "sampled")),
              help="KL in closed form (exact, default; as the paper) or from one sample (sampled).")
@click.option("--clip-scope", "clip_scope", type=click.Choice(("joint-exact", "joint", "separate")),
              help="Gradient clipping: one norm over guide and model (joint-exact, default; as the paper), the same "
                   "with the other side's latest norm (joint, cheaper), or each side alone (separate).")
@click.option("--stop-rule", "stop_rule", type=click.Choice(("drop", "paper", "patience")),
              help="How validation MI ends aggressive mode (default: drop, noise-aware, for text; patience for images).")
@click.option("--policy", type=click.Choice(tuple(POLICIES)),
              help="How much aggressive training to buy: paper (the reference's: up to 100 inner steps a model "
                   "step, aggressive until MI stops rising) or budget (the same within 30 inner steps and 250 "
                   f"aggressive model steps). Default: {DEFAULT_POLICY}.")
@click.option("--inner-rule", "inner_rule", type=click.Choice(("paper", "noise")),
              help="When the guide-only inner loop stops: paper (windows of 15, about 50 steps) or noise (windows "
                   "of 5, stop once the improvement is within noise; at least 10).")
@click.option("--mi-checks", "mi_checks_per_epoch", type=click.IntRange(min=1),
              help="Validation MI checks per epoch while aggressive (default 1): more let aggressive mode end sooner.")
@click.option("--epochs", type=int, help="Training epochs (default: 50 synthetic, else 10).")
@click.option("--batch-size", "batch_size", type=int, help="Batch size (default: 16 synthetic, 32 text, 50 images).")
@click.option("--device", help="cpu or cuda.")
@click.option("--accelerator", type=click.Choice(ACCELERATORS),
              help="cpu (default), gpu or auto. Alone it picks the device of the one process; with --devices, "
                   "--strategy or --num-nodes, the device kind of every process.")
@click.option("--devices", type=click.IntRange(min=1),
              help="Processes (one per CPU or GPU device) on each node; more than 1 trains through PyTorch Lightning.")
@click.option("--strategy", type=click.Choice(STRATEGIES),
              help="How the processes start: ddp (the command runs again in each; the default), ddp_spawn or "
                   "ddp_fork. Only global rank 0 writes the run directory.")
@click.option("--num-nodes", "num_nodes", type=click.IntRange(min=1),
              help="Machines, each running the same command (MASTER_ADDR, MASTER_PORT, NODE_RANK, or SLURM); "
                   "needs --out on a filesystem every node sees.")
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option("--threads", type=int, help="CPU threads for torch (default: 1 for the synthetic run, else torch's).")
@click.option("--out", metavar="RUN_DIR", help="Run directory (default: runs/<model>-<method>-<time>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--config", "config_file", metavar="FILE", help="TOML settings; command-line flags override them.")
def fit_cmd(model: Optional[str], config_file: Optional[str], out: Optional[str], resume: bool, **flags: Any) -> None:
    """Train MODEL (a built-in name or package.module:factory) and write a run directory.

    With no MODEL and no data, trains the paper's synthetic experiment (a corpus
    generated by code) and writes a report: about five minutes on a laptop CPU.
    """
    from .fit_run import run_fit  # torch, pyro and the library: only when the command runs

    run_fit(model, config_file, out, resume, flags)
