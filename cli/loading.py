"""Bring a finished (or interrupted) run back: its settings, data, and the model with trained parameters.

Used by ``eval``, ``report`` and ``sample``. The model is rebuilt from config.json
(same name, preset, options, vocabulary and seed), run once so its parameters exist in
Pyro's param store, and then given the best checkpoint's values (the last one if no
best was written). Checkpoints are read weights-only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import click
import pyro
import torch
from pyro import poutine

from pyro_lag.data import Vocabulary
from pyro_lag.io.checkpoint import load_checkpoint, restore_param_store
from pyro_lag.trace.sites import normalize_batch
from pyro_lag.training.checkpoints import BEST_CHECKPOINT, LAST_CHECKPOINT

from .artifacts import eval_source, to_device
from .datasets import Splits, load_splits
from .pairs import PairHandle, make_pair
from .rundir import CONFIG_FILE, METRICS_FILE, VOCAB_FILE, RunDirectory, read_json
from .settings import check_device, torch_threads


@dataclass
class LoadedRun:
    run: RunDirectory
    marker: dict[str, Any]
    config: dict[str, Any]
    splits: Splits
    handle: PairHandle
    device: torch.device
    checkpoint: Path

    @property
    def kind(self) -> str:
        return self.splits.kind

    def metrics_file(self) -> Optional[dict[str, Any]]:
        path = self.run.file(METRICS_FILE)
        return read_json(path) if path.is_file() else None

    def source(self, split: str, batch_size: Optional[int] = None) -> Any:
        return eval_source(self.splits, split, batch_size or self.config["batch_size"], self.config["seed"])

    @property
    def eval_split(self) -> str:
        return "test" if self.splits.test is not None else "valid"


def pick_device(requested: Optional[str], config: Mapping[str, Any]) -> torch.device:
    """``requested``, else the run's device when available, else the CPU."""
    if requested is not None:
        check_device(requested, "--device")
        return torch.device(requested)
    device = str(config.get("device") or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(device)


def _register_params(handle: PairHandle, batch: Any) -> None:
    """Run guide and model once (no gradients) so every parameter is in the param store."""
    args, kwargs = normalize_batch(batch)
    with torch.no_grad():
        guide_trace = poutine.trace(handle.guide).get_trace(*args, **kwargs)
        poutine.trace(poutine.replay(handle.model, trace=guide_trace)).get_trace(*args, **kwargs)


@contextlib.contextmanager
def open_run(path: str | Path, device: Optional[str] = None) -> Iterator[LoadedRun]:
    """:func:`load_run`, with torch using the run's CPU thread count while the block runs."""
    config = read_json(RunDirectory.open(path).file(CONFIG_FILE))
    with torch_threads(config.get("threads")):
        yield load_run(path, device)


def load_run(path: str | Path, device: Optional[str] = None) -> LoadedRun:
    """Open the run directory ``path`` and rebuild its trained model (one-line errors on any problem)."""
    run = RunDirectory.open(path)
    marker = run.marker() or {}
    config = read_json(run.file(CONFIG_FILE))
    vocab = None
    if run.file(VOCAB_FILE).is_file():
        vocab = Vocabulary.from_list(read_json(run.file(VOCAB_FILE)))
    splits = load_splits(config["data"], vocab=vocab, with_train=False)
    checkpoint = run.checkpoints / BEST_CHECKPOINT
    if not checkpoint.is_file():
        checkpoint = run.checkpoints / LAST_CHECKPOINT
    if not checkpoint.is_file():
        raise click.UsageError(f"run directory {run.path} has no checkpoint yet (status {marker.get('status', '?')})")
    state = load_checkpoint(checkpoint)
    target = pick_device(device, config)

    pyro.clear_param_store()
    pyro.set_rng_seed(int(config.get("seed") or 0))
    vocab_size = len(splits.vocab) if splits.vocab is not None else None
    handle = make_pair(config["model"], config["preset"], config.get("model_options") or {}, splits.kind, vocab_size,
                       search_path=marker.get("model_import_root"))
    for module in {id(m): m for m in (handle.pair, getattr(handle.model, "__self__", None),
                                      getattr(handle.guide, "__self__", None))
                   if isinstance(m, torch.nn.Module)}.values():
        module.to(target)
    first = next(iter(eval_source(splits, "valid", config["batch_size"], config["seed"]).iter_from(0, 0)))
    _register_params(handle, to_device(first, target))
    restore_param_store(state["params"], device=target)
    return LoadedRun(run, marker, config, splits, handle, target, checkpoint)
