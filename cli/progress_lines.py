"""The plain pieces of progress output: durations, one-line messages, rich bars, and log lines.

On a terminal progress is a rich bar; in a log file or CI it is :class:`LogLines`: one line
every few percent of the work or every minute, whichever comes first, with the time
elapsed and an estimate of the time left.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LINE_EVERY_PERCENT = 5  # a plain progress line every 5 % of the batches...
LINE_EVERY_SECONDS = 60.0  # ...or every minute, whichever comes first

Clock = Callable[[], float]


# ------------------------------------------------------------------------------ text


def number_text(value: Any, fmt: str = ".3f") -> str:
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
        f"train loss {number_text(row.get('train_loss'))}",
        f"val ELBO {number_text(row.get('elbo'))}",
        f"KL {number_text(row.get('kl'))}",
        f"MI {number_text(row.get('mi'))}" + (f" ± {number_text(row.get('mi_se'))}" if row.get("mi_se") is not None else ""),
        f"AU {row.get('au') if row.get('au') is not None else '–'}",
    ]
    if row.get("aggressive"):
        parts.append(f"aggressive, {number_text(row.get('inner_steps'), '.1f')} inner steps/step")
    if row.get("decayed"):
        parts.append("lr decayed")
    parts.append(f"{number_text(row.get('wall_time'), '.1f')} s")
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


