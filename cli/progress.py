"""Progress of ``pyro-lag fit`` and ``pyro-lag eval``: a rich bar on a terminal, plain lines in a log.

Training plugs into :func:`pyro_lag.fit` as a callback (``on_batch_end`` / ``on_epoch_end``)
and prints one summary line per epoch either way. On a terminal a transient bar shows the
batches of the current epoch, the aggressive inner steps of the last model step, and KL and
MI measured every few steps on one fixed validation batch (the RNG state is saved and
restored around it, so training is unchanged). A bar draws nothing useful into a log file
or CI, so there plain lines are printed instead: one every few percent of the batches or
every minute, whichever comes first, with the time elapsed and an estimate of the time left.
Long evaluation passes (fit's final test pass, ``pyro-lag eval``) are shown the same way by
:class:`EvaluationProgress` (in ``evaluation_progress``; the plain pieces are in ``progress_lines``).

torch is imported only when the live monitor runs, so importing this module is cheap.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

from rich.console import Console
from rich.progress import (
    Progress,
    TaskID,
)

from .evaluation_progress import AnnouncedSource, EvaluationProgress, accepts_keyword, progress_keyword
from .progress_lines import (
    LINE_EVERY_PERCENT,
    LINE_EVERY_SECONDS,
    Clock,
    LogLines,
    epoch_line,
    format_duration,
    new_bar,
    number_text,
    say,
)

__all__ = [
    "AnnouncedSource", "EvaluationProgress", "LINE_EVERY_PERCENT", "LINE_EVERY_SECONDS", "LiveMonitor", "LogLines",
    "TrainingBar", "TrainingDisplay", "TrainingLog", "accepts_keyword", "epoch_line", "format_duration",
    "progress_keyword", "training_progress",
]


# ------------------------------------------------------------------------------ training


class LiveMonitor:
    """KL and MI of the current guide on one fixed batch, without touching the training RNG."""

    def __init__(self, model: Callable, guide: Callable, batch: Any) -> None:
        self.model, self.guide, self.batch = model, guide, batch

    def __call__(self) -> dict[str, float]:
        import torch

        from pyro_lag.estimators.diagnostics import evaluate

        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            metrics = evaluate(self.model, self.guide, [self.batch])
        return {"kl": float(metrics["kl"]), "mi": float(metrics["mi"])}


class TrainingDisplay:
    """What the bar and the log lines share: the epoch count, the live KL/MI, the final pass.

    A fit callback and a context manager; fit's final test pass is shown through
    :meth:`evaluation_started` and :meth:`evaluation_step`.
    """

    def __init__(
        self,
        console: Console,
        epochs: int,
        steps_per_epoch: int,
        monitor: Optional[LiveMonitor] = None,
        *,
        first_epoch: int = 1,
        evaluation_label: str = "final evaluation",
        clock: Clock = time.monotonic,
        bar: Optional[Progress] = None,
    ) -> None:
        self.console = console
        self.epochs = epochs
        self.steps = steps_per_epoch
        self.monitor = monitor
        self.clock = clock
        self.live: dict[str, Optional[float]] = {"kl": None, "mi": None}
        self._epoch = first_epoch
        # the final pass adds its row to the live bar, if there is one, else writes lines
        self.evaluation = EvaluationProgress(console, evaluation_label, bar, clock)

    def _live_text(self) -> list[str]:
        """KL and MI last measured by the monitor (nothing without one: a decoder-only model)."""
        if self.monitor is None:
            return []
        return [f"KL {number_text(self.live['kl'])}", f"MI {number_text(self.live['mi'])}"]

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        say(self.console, epoch_line(row, self.epochs))
        self._epoch = row["epoch"] + 1

    def evaluation_started(self, batches: int) -> None:
        """fit's final test pass begins."""
        self.evaluation.start(batches)

    def evaluation_step(self, done: int, total: int) -> None:
        """fit's per-batch hook for the final test pass (its first call starts the pass)."""
        if self.evaluation.started is None:
            self.evaluation_started(total)
        self.evaluation(done, total)

    def __enter__(self) -> "TrainingDisplay":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.evaluation.finish(succeeded=exc_type is None)


class TrainingBar(TrainingDisplay):
    """On a terminal: a transient rich bar over the current epoch's batches, with live KL and MI."""

    def __init__(self, console: Console, epochs: int, steps_per_epoch: int, monitor: Optional[LiveMonitor] = None,
                 *, monitor_every: int = 20, **options: Any) -> None:
        self.progress = new_bar(console)
        super().__init__(console, epochs, steps_per_epoch, monitor, bar=self.progress, **options)
        self.monitor_every = max(1, monitor_every)
        self.task: Optional[TaskID] = None

    def _description(self) -> str:
        return f"epoch {min(self._epoch, self.epochs)}/{self.epochs}"

    def __enter__(self) -> "TrainingBar":
        self.progress.start()
        self.task = self.progress.add_task(self._description(), total=self.steps, status="")
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        super().__exit__(exc_type, *exc)
        self.progress.stop()

    def _status(self, info: Mapping[str, Any]) -> str:
        parts = [f"loss {number_text(info.get('loss'), '.1f')}"]
        if info.get("aggressive"):
            parts.append(f"inner {info.get('inner_steps', 0)}")
        return "  ".join(parts + self._live_text())

    def on_batch_end(self, info: Mapping[str, Any]) -> None:
        if info["epoch"] != self._epoch:
            self._epoch = info["epoch"]
            self.progress.reset(self.task, total=info["steps"], description=self._description(), status="")
        if self.monitor is not None and (info["step"] % self.monitor_every == 0 or info["step"] == 1):
            self.live.update(self.monitor())
        status = self._status(info)
        if info["step"] == info["steps"]:
            status += "  validating…"
        self.progress.update(self.task, completed=info["step"], status=status)

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        super().on_epoch_end(row)
        self.progress.reset(self.task, total=self.steps, description=self._description(), status="")

    def evaluation_started(self, batches: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, visible=False)  # training is over: only the pass shows
        super().evaluation_started(batches)


class TrainingLog(TrainingDisplay):
    """Not on a terminal (a log file, CI): a plain line every few percent of an epoch or every minute.

    A line reads ``epoch 3/50  batch 125/250  50%  loss …  aggressive, 7.2 inner steps/step
    KL …  MI …  elapsed 1m05s  left ~1m05s``; inner steps are the mean since the previous line,
    elapsed time and estimate are those of the current epoch. KL and MI are measured only for
    the lines, not every few steps.
    """

    def __init__(self, console: Console, epochs: int, steps_per_epoch: int, monitor: Optional[LiveMonitor] = None,
                 *, every_percent: int = LINE_EVERY_PERCENT, every_seconds: float = LINE_EVERY_SECONDS,
                 **options: Any) -> None:
        super().__init__(console, epochs, steps_per_epoch, monitor, **options)
        self.lines = LogLines(lambda line: say(self.console, line), every_percent=every_percent,
                              every_seconds=every_seconds, clock=self.clock)
        self._epoch_started = self.clock()
        self._counting: Optional[int] = None  # the epoch the line schedule counts batches of
        self._inner: list[float] = []

    def __enter__(self) -> "TrainingLog":
        self._epoch_started = self.clock()
        return self

    def on_batch_end(self, info: Mapping[str, Any]) -> None:
        step, steps = info["step"], info["steps"]
        if self._counting != info["epoch"]:  # the epoch's first batch (after a resume: not batch 1)
            self._counting = self._epoch = info["epoch"]
            self.lines.start(steps, done=step - 1, started=self._epoch_started)
            self._inner.clear()
        if info.get("aggressive"):
            self._inner.append(float(info.get("inner_steps") or 0))
        if not self.lines.due(step):
            return
        if self.monitor is not None:
            self.live.update(self.monitor())
        details = [f"loss {number_text(info.get('loss'), '.1f')}"]
        if info.get("aggressive") and self._inner:
            details.append(f"aggressive, {sum(self._inner) / len(self._inner):.1f} inner steps/step")
        self._inner.clear()
        self.lines.emit(step, f"epoch {info['epoch']}/{self.epochs}", details + self._live_text())

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        super().on_epoch_end(row)
        self._epoch_started = self.clock()


def training_progress(console: Console, epochs: int, steps_per_epoch: int, monitor: Optional[LiveMonitor] = None,
                      **options: Any) -> TrainingDisplay:
    """The fit callback for ``console``: a rich bar on a terminal, plain lines otherwise."""
    display = TrainingBar if console.is_terminal else TrainingLog
    return display(console, epochs, steps_per_epoch, monitor, **options)
