"""Progress of ``pyro-lag fit`` and ``pyro-lag eval``: a rich bar on a terminal, plain lines in a log.

Training plugs into :func:`pyro_lag.fit` as a callback (``on_batch_end`` / ``on_epoch_end``)
and prints one summary line per epoch either way. On a terminal a transient bar shows the
batches of the current epoch, the aggressive inner steps of the last model step, and KL and
MI measured every few steps on one fixed validation batch (the RNG state is saved and
restored around it, so training is unchanged). A bar draws nothing useful into a log file
or CI, so there plain lines are printed instead: one every few percent of the batches or
every minute, whichever comes first, with the time elapsed and an estimate of the time left.
Long evaluation passes (fit's final test pass, ``pyro-lag eval``) are shown the same way by
:class:`EvaluationProgress`.

torch is imported only when the live monitor runs, so importing this module is cheap.
"""
from __future__ import annotations

import inspect
import math
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LINE_EVERY_PERCENT = 5  # a plain progress line every 5 % of the batches...
LINE_EVERY_SECONDS = 60.0  # ...or every minute, whichever comes first

Clock = Callable[[], float]


# ------------------------------------------------------------------------------ text


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m07s`` or ``1h02m``: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


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


def say(console: Console, line: str) -> None:
    """Print one plain line: above a live bar on a terminal, flushed at once into a log."""
    if console.is_terminal:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        click.echo(line, file=console.file)  # click flushes, so `tail -f` sees the line now


def new_bar(console: Console) -> Progress:
    """The transient rich bar: description, bar, k/N, status, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


# ------------------------------------------------------------------------------ plain lines


class LogLines:
    """Plain progress lines for a log: when the next one is due, and the line with an estimate."""

    def __init__(
        self,
        write: Callable[[str], None],
        *,
        every_percent: int = LINE_EVERY_PERCENT,
        every_seconds: float = LINE_EVERY_SECONDS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.write = write
        self.every_percent = every_percent
        self.every_seconds = every_seconds
        self.clock = clock
        self.start(total=0)

    def start(self, total: int, done: int = 0, started: Optional[float] = None) -> None:
        """Count ``total`` batches from now (or ``started``), ``done`` of them done before (a resumed epoch)."""
        self.total = total
        self.first = self.last_done = done
        self.started = self.clock() if started is None else started
        self.last_time = self.started

    def _mark(self, done: int) -> int:
        """How many few-percent marks ``done`` batches have passed."""
        return done * 100 // (self.every_percent * max(self.total, 1))

    def due(self, done: int) -> bool:
        """Whether batch ``done`` passes the next few-percent mark, or a minute went by since the last line."""
        return self._mark(done) > self._mark(self.last_done) or self.clock() - self.last_time >= self.every_seconds

    def line(self, done: int, head: str, details: Sequence[str] = ()) -> str:
        """``head  batch k/N  p%  details  elapsed …  left ~…``; the next line is due from here on."""
        now = self.clock()
        elapsed = now - self.started
        parts = [head, f"batch {done}/{self.total}", f"{100 * done // max(self.total, 1)}%", *details,
                 f"elapsed {format_duration(elapsed)}"]
        if self.first < done < self.total:
            parts.append(f"left ~{format_duration(elapsed / (done - self.first) * (self.total - done))}")
        self.last_time, self.last_done = now, done
        return "  ".join(parts)

    def emit(self, done: int, head: str, details: Sequence[str] = ()) -> None:
        """Write the line for batch ``done``."""
        self.write(self.line(done, head, details))


# ------------------------------------------------------------------------------ evaluation


class EvaluationProgress:
    """One long evaluation pass (fit's final test pass, ``pyro-lag eval``): a bar or plain lines.

    Call :meth:`start` when the pass begins; the instance itself is the library's per-batch
    hook, called with ``(done, total)``. Used as a context manager it prints how long the
    pass took when it ends without an error. Without per-batch calls (a library that has no
    such hook) the bar pulses and a log gets the start and end lines only.
    """

    def __init__(self, console: Console, label: str, progress: Optional[Progress] = None,
                 clock: Clock = time.monotonic) -> None:
        self.console, self.label, self.clock = console, label, clock
        self.progress = progress  # a live bar to add a row to (fit's training bar), else our own
        self._own_bar = progress is None
        self.lines = LogLines(lambda line: say(console, line), clock=clock)
        self.task: Optional[TaskID] = None
        self.started: Optional[float] = None

    def start(self, batches: Optional[int] = None) -> None:
        """The pass begins (over ``batches`` batches, when known); a second call does nothing."""
        if self.started is not None:
            return
        self.started = self.clock()
        if self.console.is_terminal:
            if self.progress is None:
                self.progress = new_bar(self.console)
                self.progress.start()
            self.task = self.progress.add_task(self.label, total=None, status="")  # pulses until a batch is done
        else:
            self.lines.start(batches or 0, started=self.started)
            count = f": {batches} batch{'es' if batches != 1 else ''}" if batches else ""
            say(self.console, f"{self.label}{count}…")

    def __call__(self, done: int, total: int) -> None:
        """The per-batch hook: ``done`` of ``total`` batches are evaluated."""
        self.start(total)
        if self.console.is_terminal:
            self.progress.update(self.task, total=total, completed=done)
        else:
            self.lines.total = total
            if self.lines.due(done):
                self.lines.emit(done, self.label)

    def finish(self, succeeded: bool = True) -> None:
        """Take the bar away; when the pass succeeded, say how long it took."""
        if self.started is None:
            return
        if self.task is not None:
            self.progress.remove_task(self.task)
            if self._own_bar:
                self.progress.stop()
                self.progress = None
        if succeeded:
            say(self.console, f"{self.label}: done in {format_duration(self.clock() - self.started)}")
        self.started, self.task = None, None

    def __enter__(self) -> "EvaluationProgress":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.finish(succeeded=exc_type is None)


def accepts_keyword(function: Callable, name: str) -> bool:
    """Whether ``function`` takes the keyword argument ``name``: a progress hook is passed only where it exists."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def progress_keyword(function: Callable, hook: Callable[[int, int], None], name: str = "progress") -> dict[str, Any]:
    """``{name: hook}`` when ``function`` accepts it, else no keyword: pass on with ``**``."""
    return {name: hook} if accepts_keyword(function, name) else {}


class AnnouncedSource:
    """A batch source that calls ``on_start(number of batches)`` each time it is read.

    fit reads its ``test`` batches only for the final test pass, so wrapping them shows when
    that pass begins, even where the library has no per-batch progress hook.
    """

    def __init__(self, source: Any, on_start: Callable[[int], None]) -> None:
        self.source, self.on_start = source, on_start

    def __len__(self) -> int:
        return len(self.source)

    def iter_from(self, epoch: int, step: int) -> Iterable[Any]:
        self.on_start(len(self.source))
        return self.source.iter_from(epoch, step)


# ------------------------------------------------------------------------------ training


class LiveMonitor:
    """KL and MI of the current guide on one fixed batch, without touching the training RNG."""

    def __init__(self, model: Callable, guide: Callable, batch: Any) -> None:
        self.model, self.guide, self.batch = model, guide, batch

    def __call__(self) -> dict[str, float]:
        import torch

        from pyro_lag.diagnostics import evaluate

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
        return [f"KL {_num(self.live['kl'])}", f"MI {_num(self.live['mi'])}"]

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
        parts = [f"loss {_num(info.get('loss'), '.1f')}"]
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
        details = [f"loss {_num(info.get('loss'), '.1f')}"]
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
