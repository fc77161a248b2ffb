"""Progress of one long evaluation pass (fit's final test pass, ``pyro-lag eval``): a bar or plain lines."""
from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Iterable, Optional

from rich.console import Console
from rich.progress import Progress, TaskID

from .progress_lines import Clock, LogLines, format_duration, new_bar, say

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


