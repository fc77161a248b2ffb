"""The paper's Figures 1 and 3 for pyro_lag: the posterior mean space on the synthetic corpus.

For 500 held-out sentences, each point is (model posterior mean E_p[z | x], computed on
the paper's grid z in [-20, 20) step 0.1; guide posterior mean E_q[z | x]). A guide that
keeps up with the model puts the points on the diagonal; a lagging one flattens them
onto the horizontal line z = 0, where both collapse. Plain training (standard) against
aggressive training, at several moments, and one point's trajectory; saved as PNG.

    python examples/synthetic_posterior_mean_space.py            # CPU: 4,000 sentences, 10 epochs
    python examples/synthetic_posterior_mean_space.py --paper    # the paper's 20,000 sentences, 50 epochs
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro_lag.models import sample_corpus, true_posterior_mean  # noqa: E402
from pyro_lag.models.registry import build  # noqa: E402

from pyro_lag import fit  # noqa: E402
from pyro_lag.data import TextBatches, TextCorpus, Vocabulary  # noqa: E402

METHODS = {"standard": "plain training (standard)", "aggressive": "aggressive training"}


def posterior_means(pair, x: torch.Tensor) -> tuple[list[float], list[float]]:
    """(model posterior means on the grid, guide posterior means) of the sentences ``x``."""
    model_mean = true_posterior_mean(pair, x, chunk_size=20)
    with pair.evaluating():
        guide_mean = pair.encode(x)[0][:, 0]
    return model_mean.tolist(), guide_mean.tolist()


class Snapshots:
    """fit callback: the posterior mean space at chosen iterations, one point's path at every ``trace_every``."""

    def __init__(self, pair, points: torch.Tensor, at: list[int], trace_every: int) -> None:
        self.pair, self.points, self.at, self.trace_every = pair, points, set(at), trace_every
        self.spaces: dict[int, tuple[list[float], list[float]]] = {}
        self.path: list[tuple[int, float, float]] = []
        self.seconds = 0.0  # spent here during training, to take out of fit's epoch times
        self.record(0)

    def record(self, iteration: int) -> None:
        if iteration in self.at:
            self.spaces[iteration] = posterior_means(self.pair, self.points)
        if iteration % self.trace_every == 0:
            model_mean, guide_mean = posterior_means(self.pair, self.points[:1])
            self.path.append((iteration, model_mean[0], guide_mean[0]))

    def on_batch_end(self, info: dict) -> None:
        started = time.perf_counter()
        self.record((info["epoch"] - 1) * info["steps"] + info["step"])
        self.seconds += time.perf_counter() - started


def train(method: str, data: dict, vocab: Vocabulary, args: argparse.Namespace) -> dict:
    """Train the paper's synthetic VAE with ``method``; return snapshots and test figures."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    pair = build("synthetic", "paper", vocab_size=len(vocab))
    steps = len(data["train"])
    final = steps * args.epochs
    snapshots = Snapshots(pair, data["points"], [i for i in args.iterations if i < final] + [final], args.trace_every)
    result = fit(pair.model, pair.guide, data["train"], data["valid"], data["test"], method=method,
                 epochs=args.epochs, seed=args.seed, lr_decay=None, callbacks=[snapshots])
    last = len(result.history) * steps  # training may end early (lr decay off: it does not)
    if last not in snapshots.spaces:
        snapshots.spaces[last] = posterior_means(pair, data["points"])
    test = result.test or {}
    aggressive_epochs = sum(bool(h.get("aggressive")) for h in result.history)
    seconds = sum(h["wall_time"] for h in result.history) - snapshots.seconds  # training and validation
    print(f"{method}: test KL {test.get('kl', float('nan')):.3f}, MI {test.get('mi', float('nan')):.3f}, "
          f"AU {test.get('au')}, aggressive epochs {aggressive_epochs}, {seconds:.0f} s", flush=True)
    return {"spaces": snapshots.spaces, "path": snapshots.path, "test": test,
            "aggressive_epochs": aggressive_epochs, "seconds": seconds}


def plot_spaces(runs: dict[str, dict], out: Path) -> Path:
    """One row per method, one panel per snapshot: guide posterior mean against model posterior mean."""
    columns = max(len(run["spaces"]) for run in runs.values())
    fig, axes = plt.subplots(len(runs), columns, figsize=(2.6 * columns, 2.7 * len(runs)), squeeze=False)
    for row, (method, run) in enumerate(runs.items()):
        for col, (iteration, (model_mean, guide_mean)) in enumerate(sorted(run["spaces"].items())):
            ax = axes[row][col]
            ax.scatter(model_mean, guide_mean, s=4, alpha=0.5, color="tab:blue" if method == "standard" else "tab:red")
            lim = max(1.0, max(map(abs, model_mean + guide_mean)))
            ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_title(f"{method}, iter {iteration}", fontsize=9)
            if row == len(runs) - 1:
                ax.set_xlabel("model posterior mean")
            if col == 0:
                ax.set_ylabel("guide posterior mean")
        for col in range(len(run["spaces"]), columns):
            axes[row][col].axis("off")
    fig.tight_layout()
    path = out / "posterior_mean_space.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_paths(runs: dict[str, dict], out: Path) -> Path:
    """One sentence's (model mean, guide mean) over training for each method, start and end marked."""
    fig, ax = plt.subplots(figsize=(5, 5))
    values = []
    for method, run in runs.items():
        iteration, model_mean, guide_mean = zip(*run["path"])
        color, cmap = ("tab:blue", "Blues") if method == "standard" else ("tab:red", "Reds")
        ax.plot(model_mean, guide_mean, "-", lw=0.6, alpha=0.4, color=color)
        ax.scatter(model_mean, guide_mean, c=iteration, cmap=cmap, s=12, vmin=-0.3 * max(iteration),
                   label=f"{METHODS[method]} (darker: later)")
        ax.plot(model_mean[0], guide_mean[0], "o", color="black", ms=5)
        ax.plot(model_mean[-1], guide_mean[-1], "*", ms=14, color=color, markeredgecolor="black")
        values += list(model_mean) + list(guide_mean)
    lim = max(1.0, max(map(abs, values)))
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("model posterior mean")
    ax.set_ylabel("guide posterior mean")
    ax.set_title("one sentence's trajectory (o start, * end)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "trajectory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="the paper's 20,000 sentences and 50 epochs")
    parser.add_argument("--train-sentences", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--points", type=int, default=500, help="held-out sentences in the scatter plots")
    parser.add_argument("--iterations", default="0,100,500,2000", help="iterations to snapshot (the end is added)")
    parser.add_argument("--trace-every", type=int, default=25, help="iterations between points of the trajectory")
    parser.add_argument("--methods", default="standard,aggressive")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=783435)
    parser.add_argument("--out", type=Path, default=Path("runs/synthetic_posterior_mean_space"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.iterations = sorted({int(i) for i in args.iterations.split(",")})
    n_train = 20000 - 2 * args.points if args.paper else args.train_sentences
    args.epochs = args.epochs or (50 if args.paper else 10)

    sentences = [[str(t) for t in row] for row in sample_corpus(n_train + 2 * args.points, seed=0).tolist()]
    vocab = Vocabulary.from_sentences(sentences[:n_train])
    corpus = {"train": sentences[:n_train], "valid": sentences[n_train:n_train + args.points],
              "test": sentences[n_train + args.points:]}
    corpus = {split: TextCorpus.from_sentences(rows, vocab) for split, rows in corpus.items()}
    data = {"train": TextBatches(corpus["train"], 16, seed=args.seed),
            "valid": TextBatches(corpus["valid"], 100, shuffle=False),
            "test": TextBatches(corpus["test"], 100, shuffle=False)}
    data["points"] = torch.cat([x for (x,) in TextBatches(corpus["test"], args.points, shuffle=False)])

    runs = {method: train(method, data, vocab, args) for method in args.methods.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {method: {"test": run["test"], "aggressive_epochs": run["aggressive_epochs"], "seconds": run["seconds"],
                        "trajectory": run["path"],
                        "spaces": {str(k): {"model": v[0], "guide": v[1]} for k, v in run["spaces"].items()}}
               for method, run in runs.items()}
    (args.out / "posterior_mean_space.json").write_text(json.dumps(summary) + "\n")
    print(f"wrote {plot_spaces(runs, args.out)}, {plot_paths(runs, args.out)} and posterior_mean_space.json")


if __name__ == "__main__":
    main()
