"""Throughput of data-parallel training: ``fit_lightning`` on 1 and on 2 processes.

Each run trains the LSTM text VAE on a PTB slice for one epoch through
:func:`pyro_lag.lightning.fit_lightning` (2 processes: ``ddp_fork`` on gloo, one torch
thread each; 1 process: one device, no process group) and times its training steps on
rank 0, from the end of the ``--warmup``-th step to the end of the epoch (validation is
not timed). Throughput is the training sentences of the timed model steps of all ranks
per second; scaling efficiency is ``throughput(2) / (2 * throughput(1))``.

Two kinds of step: ``standard`` (plain SVI steps: one all-reduce of the gradients per
step) and ``aggressive`` (``--inner-steps`` guide-only steps before each model step, the
inner loop's stop rule disabled so every step does the same work; each inner step adds a
gradient all-reduce and a loss sum over ranks). Runs are interleaved (1, 2, 1, 2, ...)
over ``--repeats`` and the medians reported; on a shared CPU, other processes' load
falls on both alike, but two processes on a two-core machine that is running anything
else cannot scale fully.

    python benchmarks/bench_scaling.py                      # CPU, small networks
    python benchmarks/bench_scaling.py --size tiny --repeats 1
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from pyro_lag.data import TextBatches  # noqa: E402
from pyro_lag.lightning import LightningSettings, fit_lightning  # noqa: E402

try:
    from benchmarks import bench_common as common
except ImportError:  # run as a script from the benchmarks folder
    import bench_common as common

KINDS = ("standard", "aggressive")


class StepClock(pl.Callback):
    """On rank 0: the time from the end of the ``warmup``-th step to the end of the last, and the steps between."""

    def __init__(self, out: Path, warmup: int) -> None:
        self.out, self.warmup = Path(out), warmup
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # before the module validates
        if trainer.global_rank == 0:
            timed = self.ends[self.warmup - 1:]
            self.out.write_text(json.dumps({"seconds": timed[-1] - timed[0], "steps": len(timed) - 1,
                                            "world_size": trainer.world_size}))


def run_once(kind: str, processes: int, args, vocab, train_corpus, valid_batch, scratch: Path) -> dict:
    """One epoch on ``processes`` processes; its timed steps' sentences per second (all ranks)."""
    pair = common.build_pair(args.size, len(vocab), torch.device("cpu"), seed=args.seed)
    train = TextBatches(train_corpus, args.batch_size, seed=args.seed)
    settings = LightningSettings.for_kind(
        "text", method="aggressive" if kind == "aggressive" else "standard", max_inner_steps=args.inner_steps,
        check_every=args.inner_steps + 1,  # no window ever completes: always --inner-steps inner steps
        stop_rule="patience", patience=100, mi_samples=1, seed=args.seed,
    )
    clock_file = scratch / f"clock-{kind}-{processes}.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_lightning(
            pair.model, pair.guide, train, [valid_batch], epochs=1, accelerator="cpu", devices=processes,
            strategy="ddp_fork" if processes > 1 else "auto", settings=settings,
            callbacks=[StepClock(clock_file, args.warmup)],
            trainer_options={"enable_progress_bar": False},
        )
    clock = json.loads(clock_file.read_text())
    if clock["steps"] < 1:
        raise ValueError(f"{processes} process(es) took only {args.warmup} step(s) each: nothing left to time after "
                         "--warmup; give a larger slice (--per-length) or a smaller --batch-size")
    sentences = clock["steps"] * clock["world_size"] * args.batch_size
    return {"seconds": clock["seconds"], "steps_per_rank": clock["steps"], "sentences": sentences,
            "sentences_per_s": sentences / clock["seconds"]}


def markdown(result: dict) -> str:
    lines = [
        "| step | 1 process (sentences/s) | 2 processes (sentences/s) | speed-up | scaling efficiency |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        r = result["kinds"][kind]
        one, two = r["throughput"]["1"], r["throughput"]["2"]
        label = kind if kind == "standard" else f"aggressive ({result['inner_steps']} inner steps per model step)"
        lines.append(f"| {label} | {one:.1f} | {two:.1f} | {two / one:.2f} | {r['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    common.add_slice_options(p, lengths="18,20,22", per_length=128, valid=False)
    p.add_argument("--inner-steps", type=int, default=4, help="guide-only steps per model step in aggressive steps")
    p.add_argument("--warmup", type=int, default=2, help="steps of each rank left untimed at the epoch's start")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting (interleaved); medians reported")
    args = p.parse_args(argv)
    common.setup(args)
    if args.device != "cpu":
        raise ValueError("bench_scaling measures CPU processes (gloo); run it with --device cpu")

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # its start-up notes, once per run
        logging.getLogger(name).setLevel(logging.WARNING)
    vocab, train_corpus, _ = common.slices(args)
    valid_batch = next(iter(TextBatches(train_corpus, args.batch_size, shuffle=False).iter_from(0, 0)))
    runs: dict[str, dict[str, list[dict]]] = {kind: {"1": [], "2": []} for kind in KINDS}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as scratch:
        for _ in range(args.repeats):
            for kind in KINDS:
                for processes in (1, 2):
                    runs[kind][str(processes)].append(
                        run_once(kind, processes, args, vocab, train_corpus, valid_batch, Path(scratch)))
    kinds = {}
    for kind in KINDS:
        throughput = {n: statistics.median(r["sentences_per_s"] for r in runs[kind][n]) for n in ("1", "2")}
        kinds[kind] = {"throughput": throughput, "efficiency": throughput["2"] / (2 * throughput["1"]),
                       "runs": runs[kind]}
    result = {
        "what": "training sentences per second of fit_lightning on 1 and 2 CPU processes (gloo, ddp_fork)",
        "train_sentences": len(train_corpus),
        "inner_steps": args.inner_steps,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "cpu_count": torch.multiprocessing.cpu_count(),
        "wall_s": time.perf_counter() - started,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "kinds": kinds,
    }
    result["table"] = markdown(result)
    path = common.save("scaling", result, args)
    print(result["table"], end="")
    print(f"({result['train_sentences']} PTB sentences, batch {args.batch_size}, {args.size} network, "
          f"{torch.get_num_threads()} thread per process, {result['cpu_count']} CPUs, load average "
          f"{result['load_average_at_end']}; {result['wall_s']:.0f} s) -> {path}")
    return result


if __name__ == "__main__":
    main()
