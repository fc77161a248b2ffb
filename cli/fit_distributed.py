"""``pyro-lag fit`` on several processes: training through :func:`pyro_lag.lightning.fit_lightning`.

Every rank trains; global rank 0 alone shows progress, keeps metrics.json current, and, once
training has ended, evaluates the best parameters on the test split (IW-NLL included) and
returns a :class:`pyro_lag.training.loop.FitResult` like :func:`pyro_lag.fit`'s, so the rest of
the command is the same for one process and for many.

What differs from one process: the settings come from the same resolution as ``fit``'s
(:func:`lightning_settings`); each epoch's row has the validation ELBO and MI reduced over
the ranks but no KL or AU (those come in the final evaluation); mid-epoch checkpoints
(``checkpoint_every``) are refused.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import click
import lightning.pytorch as pl
import pyro
import torch
from rich.console import Console

from pyro_lag.data.batches import to_device
from pyro_lag.io.checkpoint import load_checkpoint, restore_param_store
from pyro_lag.training.result import FitResult

from .artifacts import (
    MEAN_SPACE_POINTS,
    HistoryWriter,
    MeanSpaceRecorder,
    collect_batches,
    mean_space_supported,
)
from .pairs import PairHandle
from .progress import LiveMonitor, TrainingLog, epoch_line, training_progress
from .rundir import CHECKPOINT_DIR, METRICS_FILE, RunDirectory, read_json
from .scale_out import RUN_DIR_ENV, START_METHODS

QUIET_TRAINER = {"enable_progress_bar": False}
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")  # "ValueError: ..." in a traceback


def lightning_settings(config: Mapping[str, Any], kind: str):
    """The :class:`~pyro_lag.lightning.LightningSettings` of this run: exactly the settings
    ``pyro_lag.fit`` would train with (one resolution for both paths)."""
    from pyro_lag.lightning import LightningSettings

    from .settings import fit_settings

    return LightningSettings.from_fit(fit_settings(config, kind))


def program_device(handle: PairHandle) -> torch.device:
    """Where the pair's parameters are now (Lightning placed rank 0's on its device)."""
    for owner in (handle.pair, getattr(handle.model, "__self__", None), getattr(handle.guide, "__self__", None)):
        if isinstance(owner, torch.nn.Module):
            for parameter in owner.parameters():
                return parameter.device
    for _, parameter in pyro.get_param_store().named_parameters():
        return parameter.device
    return torch.device("cpu")


class _FollowingMonitor(LiveMonitor):
    """The live KL/MI monitor, with its batch on the device the pair trains on."""

    def __init__(self, handle: PairHandle, batch: Any) -> None:
        super().__init__(handle.model, handle.guide, batch)
        self.handle = handle

    def __call__(self) -> dict[str, float]:
        self.batch = to_device(self.batch, program_device(self.handle))
        return super().__call__()


class _FollowingRecorder(MeanSpaceRecorder):
    """The posterior-mean-space snapshots, with their batches on the device the pair trains on."""

    def _record(self, key: str, label: str) -> None:
        device = program_device(self.handle)
        self.batches = [to_device(b, device) for b in self.batches]
        super()._record(key, label)


class EpochLines:
    """One plain line per epoch from rank 0's process; it can be pickled into a ``ddp_spawn`` process."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        print(epoch_line(row, self.epochs), flush=True)


_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def _ignore_lightning_notes() -> None:
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`srun` command is available.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up notes (GPU available..., Initializing distributed...) and its advice on
    data loader workers say nothing about this run: keep them out of the output."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            _ignore_lightning_notes()
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class QuietRank(pl.Callback):
    """:func:`quiet_lightning` inside processes that ``ddp_spawn`` starts afresh (they inherit no settings):
    it takes effect as it is unpickled there, before the process group comes up."""

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in _LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        _ignore_lightning_notes()


@contextlib.contextmanager
def _run_dir_for_other_ranks(start_method: str, path: Path) -> Iterator[None]:
    """With ``ddp`` the other processes run the command again: tell them which run directory this is."""
    if start_method != "popen":
        yield
        return
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(path.resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def _fit_lightning(config: Mapping[str, Any], handle: PairHandle, kind: str, train: Any, valid: Any,
                   run_dir: Path, resume: bool, fit_callbacks: list[Any]):
    from pyro_lag.lightning import fit_lightning

    setup = config["distributed"]
    settings = lightning_settings(config, kind)
    with quiet_lightning(), _failures_as_one_line():
        result = fit_lightning(
            handle.model, handle.guide, train, valid, epochs=config["epochs"], accelerator=setup["accelerator"],
            devices=setup["devices"], strategy=setup["strategy"], num_nodes=setup["num_nodes"], run_dir=run_dir,
            resume=resume, settings=settings, callbacks=[QuietRank()], fit_callbacks=fit_callbacks,
            trainer_options=QUIET_TRAINER,
        )
    return result, settings


@contextlib.contextmanager
def _failures_as_one_line() -> Iterator[None]:
    """Ctrl-C and a failed rank, as one process reports them.

    Lightning answers Ctrl-C with a graceful shutdown and ``sys.exit(1)``, leaving SIGINT ignored:
    here it is a KeyboardInterrupt again (the run is marked interrupted) and SIGINT is restored.
    A forked or spawned rank that raised reaches this process as the rank's whole traceback in
    one exception: here it is its last line, naming the rank.
    """
    from torch.multiprocessing.spawn import ProcessException

    try:
        handler = signal.getsignal(signal.SIGINT)
    except ValueError:  # pragma: no cover - not the main thread
        handler = None
    try:
        yield
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise KeyboardInterrupt from None
        raise
    except ProcessException as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raised = [line for line in lines if _EXCEPTION_LINE.match(line)]  # Pyro adds trace tables below it
        last = raised[-1] if raised else (lines[-1] if lines else type(exc).__name__)
        if last.startswith("KeyboardInterrupt"):
            raise KeyboardInterrupt from None
        raise click.ClickException(f"rank {exc.error_index} failed: {last}") from None
    finally:
        if handler is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, handler)


def train_other_rank(config: Mapping[str, Any], handle: PairHandle, kind: str, train: Any, valid: Any,
                     run_path: Optional[str], resume: bool) -> None:
    """A rank other than 0: train, write nothing, print nothing of its own."""
    if run_path is None:
        raise click.UsageError("this process is not rank 0 of a multi-process run and has no run directory: "
                               "give --out RUN_DIR, a folder every node sees")
    _fit_lightning(config, handle, kind, train, valid, Path(run_path) / CHECKPOINT_DIR, resume, [])


def train(console: Console, run: RunDirectory, config: Mapping[str, Any], handle: PairHandle, splits: Any,
          train: Any, valid: Any, test: Any, evaluation_label: str, has_latents: bool,
          resume: bool) -> tuple[FitResult, torch.device]:
    """Rank 0: train with the other ranks, then evaluate the best parameters on ``test`` alone.

    Returns the result as :func:`pyro_lag.fit` would, and the device the pair is on afterwards.
    """
    setup = config["distributed"]
    start = START_METHODS[setup["strategy"]]
    previous = read_json(run.file(METRICS_FILE))["history"] if resume and run.file(METRICS_FILE).is_file() else []
    steps = math.ceil(len(train) / setup["world_size"])
    cpu = torch.device("cpu")
    monitor = recorder = None
    if has_latents:
        monitor = _FollowingMonitor(handle, to_device(next(iter(valid.iter_from(0, 0))), cpu))
        if mean_space_supported(handle):  # holds no lock handle: it can be pickled
            batches = collect_batches(valid, MEAN_SPACE_POINTS, cpu)
            recorder = _FollowingRecorder(RunDirectory(run.path), handle, batches)
    options = {"first_epoch": len(previous) + 1, "evaluation_label": evaluation_label}
    # a live bar only where rank 0 is this process; a forked or spawned rank 0 prints plain lines
    if start == "popen":
        display = training_progress(console, config["epochs"], steps, monitor, **options)
    else:
        display = TrainingLog(console, config["epochs"], steps, monitor, **options)
    history = HistoryWriter(RunDirectory(run.path), previous)  # no lock handle in it: it can be pickled
    # the display holds the console (and the monitor a live bar's state): a spawned rank 0 prints plain epoch lines
    shown = EpochLines(config["epochs"]) if start == "spawn" else display
    fit_callbacks = [shown, history, *([recorder] if recorder is not None else [])]
    with display, _run_dir_for_other_ranks(start, run.path):
        result, settings = _fit_lightning(config, handle, splits.kind, train, valid, run.checkpoints, resume,
                                          fit_callbacks)
        test_metrics = _test_pass(run, config, handle, test, settings, display.evaluation_step)
    if recorder is not None:  # a fresh recorder reads the snapshots rank 0 wrote, wherever it ran
        _FollowingRecorder(run, handle, recorder.batches).final(result.best_epoch)
    result.test, result.run_dir = test_metrics, run.checkpoints
    return result, program_device(handle)


def _test_pass(run: RunDirectory, config: Mapping[str, Any], handle: PairHandle, test: Any, settings: Any,
               progress: Any) -> dict[str, Any]:
    """The best parameters (best.pt) on the test split, on this process alone, by fit's final pass."""
    from pyro_lag.lightning import BEST_CHECKPOINT
    from pyro_lag.training.evaluation import test_pass

    best = run.checkpoints / BEST_CHECKPOINT
    if best.is_file():
        restore_param_store(load_checkpoint(best)["params"])
    device = program_device(handle)
    batches = [to_device(batch, device) for batch in test.iter_from(0, 0)]
    pyro.set_rng_seed(int(config["seed"]))  # the same numbers whichever process ran it
    return test_pass(handle.model, handle.guide, batches, settings, progress=progress)
