"""Run pyro-lag on a named setting of the paper's code and record what the paper's code records per epoch.

    python benchmarks/side_by_side.py --setting ptb-small --seeds 783435,1,2 --epochs 3
    python benchmarks/side_by_side.py --table benchmarks/results/side_by_side_ptb_small.json \\
        --reference /path/to/reference_ptb_small.json
    python benchmarks/side_by_side.py --seeds 783435 --epochs 1 --methods aggressive --save-states states/
    python benchmarks/side_by_side.py --load-state states/aggressive_783435_e1.pt --label "from epoch 1" \\
        --methods standard --epochs 2 --seeds 11,12,13 --out continued.json

Per epoch and seed: validation KL, MI (with its standard error), AU, -ELBO, the mean number
of inner (guide-only) steps per model step, and wall time; written as JSON records with
the same keys the reference runs are recorded with, so ``--table`` can print both side by
side (mean, min and max over seeds).

``--save-states`` writes the model's ``state_dict`` after every epoch and ``--load-state`` starts
from one, so a state reached by one implementation can be trained on by the other (the
reference's module names are the same; keys the model does not have are ignored and named).
That separates what an aggressive epoch leaves behind from what the plain epochs after it do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from pyro_lag.models.lstm_text import LSTMTextVAE

from pyro_lag import fit
from pyro_lag.data import TextBatches, TextCorpus, Vocabulary
from pyro_lag.data.text import read_sentences

PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"


@dataclass(frozen=True)
class Setting:
    """A setting both implementations are run on: data slice, network sizes, optimisation."""

    sentences: tuple[int, int, int]
    model: dict[str, Any]
    batch_size: int = 32
    fit: dict[str, Any] = field(default_factory=dict)


SETTINGS = {
    # The first 2,000 / 300 / 300 PTB sentences; latent 32, embeddings 128, LSTMs 256, dropout 0.5,
    # batch 32, SGD lr 1.0, clipping 5.0, aggressive mode for the first epoch only.
    "ptb-small": Setting(
        sentences=(2000, 300, 300),
        model=dict(latent_dim=32, ni=128, enc_nh=256, dec_nh=256, dropout=0.5),
        fit=dict(optim="sgd", lr=1.0, clip_norm=5.0, max_aggressive_epochs=1, lr_decay=None, policy="paper"),
    ),
}


def load(setting: Setting, folder: Path) -> tuple[Vocabulary, dict[str, TextCorpus]]:
    """The first sentences of each PTB split; the vocabulary from the training slice, as the reference."""
    slices = {}
    for split, count in zip(("train", "valid", "test"), setting.sentences):
        slices[split] = list(islice(read_sentences(folder / f"ptb.{split}.txt"), count))
    vocab = Vocabulary.from_sentences(slices["train"])
    return vocab, {split: TextCorpus.from_sentences(s, vocab) for split, s in slices.items()}


@dataclass(frozen=True)
class States:
    """Where a run starts from (a saved ``state_dict``) and where it saves one after every epoch."""

    load: Path | None = None
    save: Path | None = None
    label: str | None = None

    def start(self, pair: LSTMTextVAE) -> None:
        if self.load is None:
            return
        state = torch.load(self.load, map_location="cpu")
        own = pair.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise SystemExit(f"{self.load} has no {missing[0]} (and {len(missing) - 1} more): not a state of this model")
        ignored = sorted(set(state) - set(own))
        if ignored:
            print(f"{self.load}: ignoring {', '.join(ignored)}", flush=True)
        pair.load_state_dict({k: state[k] for k in own})

    def saver(self, pair: LSTMTextVAE, method: str, seed: int) -> list[Any]:
        if self.save is None:
            return []
        self.save.mkdir(parents=True, exist_ok=True)
        folder = self.save

        def save(row: dict) -> None:
            torch.save(pair.state_dict(), folder / f"{method}_{seed}_e{row['epoch']}.pt")

        return [save]


def run(setting: Setting, method: str, seed: int, epochs: int, folder: Path, options: dict[str, Any],
        states: States = States()) -> list[dict]:
    """One training run; one record per epoch."""
    vocab, corpora = load(setting, folder)
    torch.manual_seed(seed)
    pair = LSTMTextVAE(len(vocab), **setting.model)
    states.start(pair)
    train = TextBatches(corpora["train"], setting.batch_size, seed=seed)
    valid = TextBatches(corpora["valid"], setting.batch_size, shuffle=False)
    started = time.perf_counter()
    result = fit(pair.model, pair.guide, train, valid, method=method, epochs=epochs, kind="text", seed=seed,
                 callbacks=states.saver(pair, method, seed), **{**setting.fit, **options})
    side = "pyro-lag" if states.label is None else f"pyro-lag ({states.label})"
    records = []
    for row in result.history:
        records.append({
            "side": side, "method": method, "seed": seed, "epoch": row["epoch"], "kl": row["kl"],
            "mi": row["mi"], "mi_se": row.get("mi_se"), "au": row["au"], "neg_elbo": row["val_loss"],
            "inner_steps_per_step": row["inner_steps"] if row["aggressive"] else None,
            "wall_s": row["wall_time"], "aggressive": row["aggressive"],
        })
    print(f"{method} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return records


def table(records: list[dict]) -> str:
    """Markdown: per side, method and epoch, the mean [min, max] over seeds of each figure."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["side"], r["method"], r["epoch"]), []).append(r)
    lines = ["| side | method | epoch | seeds | KL | MI | AU | -ELBO | inner steps/step |", "|---|---|---|---|---|---|---|---|---|"]
    for (side, method, epoch), rows in sorted(groups.items()):
        cells = [_spread([r.get(k) for r in rows]) for k in ("kl", "mi", "au", "neg_elbo", "inner_steps_per_step")]
        lines.append(f"| {side} | {method} | {epoch} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _spread(values: list[Any]) -> str:
    numbers = [float(v) for v in values if v is not None]
    if not numbers:
        return "-"
    if len(numbers) == 1:
        return f"{numbers[0]:.3g}"
    return f"{statistics.mean(numbers):.3g} [{min(numbers):.3g}, {max(numbers):.3g}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="ptb-small")
    parser.add_argument("--data", type=Path, default=PTB)
    parser.add_argument("--seeds", default="783435,1,2")
    parser.add_argument("--methods", default="aggressive,standard")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--loss", default="exact", help="exact (closed-form KL) or sampled")
    parser.add_argument("--clip-scope", default="joint-exact", help="joint-exact, joint or separate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-states", type=Path, help="save the model's state_dict here after every epoch")
    parser.add_argument("--load-state", type=Path, help="start every run from this state_dict")
    parser.add_argument("--label", help="name the runs' side 'pyro-lag (LABEL)' in the records and the table")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/side_by_side_ptb_small.json"))
    parser.add_argument("--table", type=Path, help="print the table of this results file instead of running")
    parser.add_argument("--reference", type=Path, help="with --table: the reference's records to show beside it")
    args = parser.parse_args()
    if args.table is not None:
        records = json.loads(args.table.read_text())
        if args.reference is not None:
            records += json.loads(args.reference.read_text())
        print(table(records))
        return
    torch.set_num_threads(args.threads)
    options = {"loss": args.loss, "clip_scope": args.clip_scope}
    states = States(load=args.load_state, save=args.save_states, label=args.label)
    records: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            records += run(SETTINGS[args.setting], method, seed, args.epochs, args.data, options, states)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(records, indent=1))
    print(table(records))


if __name__ == "__main__":
    main()
