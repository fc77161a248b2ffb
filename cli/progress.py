"""Live training progress for ``pyro-lag fit``: a rich progress bar and one summary line per epoch.

Plugs into :func:`pyro_lag.fit` as a callback (``on_batch_end`` / ``on_epoch_end``).
The bar shows the batches of the current epoch, the aggressive inner steps of the
last model step, and KL and MI measured every few steps on one fixed validation
batch (the RNG state is saved and restored around it, so training is unchanged).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pyro_lag.diagnostics import evaluate


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt)


def epoch_line(row: Mapping[str, Any], epochs: int) -> str:
    """One line per epoch: losses, KL, MI, AU, whether aggressive, inner steps, lr, time."""
    parts = [
        f"epoch {row['epoch']}/{epochs}",
        f"train loss {_num(row.get('train_loss'))}",
        f"val ELBO {_num(row.get('elbo'))}",
        f"KL {_num(row.get('kl'))}",
        f"MI {_num(row.get('mi'))}" + (f" ± {_num(row.get('mi_se'))}" if row.get("mi_se") is not None else ""),
        f"AU {row.get('au') if row.get('au') is not None else '–'}",
    ]
    if row.get("aggressive"):
        parts.append(f"aggressive, {_num(row.get('inner_steps'), '.1f')} inner steps/step")
    if row.get("decayed"):
        parts.append("lr decayed")
    parts.append(f"{_num(row.get('wall_time'), '.1f')} s")
    return "  ".join(parts)


class LiveMonitor:
    """KL and MI of the current guide on one fixed batch, without touching the training RNG."""

    def __init__(self, model: Callable, guide: Callable, batch: Any) -> None:
        self.model, self.guide, self.batch = model, guide, batch

    def __call__(self) -> dict[str, float]:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            metrics = evaluate(self.model, self.guide, [self.batch])
        return {"kl": float(metrics["kl"]), "mi": float(metrics["mi"])}


class TrainingProgress:
    """A fit callback that draws the progress bar and prints the per-epoch summary lines."""

    def __init__(
        self,
        console: Console,
        epochs: int,
        steps_per_epoch: int,
        monitor: Optional[LiveMonitor] = None,
        monitor_every: int = 20,
        first_epoch: int = 1,
    ) -> None:
        self.console = console
        self.epochs = epochs
        self.steps = steps_per_epoch
        self.monitor = monitor
        self.monitor_every = max(1, monitor_every)
        self.live = {"kl": None, "mi": None}
        self._epoch = first_epoch
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = None

    def __enter__(self) -> "TrainingProgress":
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.steps, epoch=self._epoch, epochs=self.epochs,
                                           status="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def _status(self, info: Mapping[str, Any]) -> str:
        parts = [f"loss {_num(info.get('loss'), '.1f')}"]
        if info.get("aggressive"):
            parts.append(f"inner {info.get('inner_steps', 0)}")
        parts.append(f"KL {_num(self.live['kl'])}")
        parts.append(f"MI {_num(self.live['mi'])}")
        return "  ".join(parts)

    def on_batch_end(self, info: Mapping[str, Any]) -> None:
        if info["epoch"] != self._epoch:
            self._epoch = info["epoch"]
            self.progress.reset(self.task, total=info["steps"], epoch=self._epoch, epochs=self.epochs, status="")
        if self.monitor is not None and (info["step"] % self.monitor_every == 0 or info["step"] == 1):
            self.live.update(self.monitor())
        status = self._status(info)
        if info["step"] == info["steps"]:
            status += "  validating…"
        self.progress.update(self.task, completed=info["step"], status=status)

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        self.progress.console.print(epoch_line(row, self.epochs), soft_wrap=True, highlight=False, markup=False)
        self._epoch = row["epoch"] + 1
        self.progress.reset(self.task, total=self.steps, epoch=min(self._epoch, self.epochs), epochs=self.epochs,
                            status="")
