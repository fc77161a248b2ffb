"""Progress of `pyro-lag fit` and `pyro-lag eval` when the output is a log, not a terminal.

Fast unit tests on the display classes: a rich console writing into a string (not a
terminal) and a fake clock stand in for a log file and the time of a long run.
"""
from __future__ import annotations

import io

from pyro_lag.cli.progress import (
    AnnouncedSource,
    EvaluationProgress,
    LogLines,
    TrainingBar,
    TrainingLog,
    accepts_keyword,
    format_duration,
    progress_keyword,
    training_progress,
)
from rich.console import Console


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def log_console() -> tuple[Console, io.StringIO]:
    """A console writing into a string: not a terminal, like a log file or CI."""
    stream = io.StringIO()
    return Console(file=stream), stream


def batch(epoch: int, step: int, steps: int, aggressive: bool = True, inner: int = 4) -> dict:
    return {"epoch": epoch, "step": step, "steps": steps, "loss": 12.5, "inner_steps": inner,
            "aggressive": aggressive, "kl_weight": 1.0}


ROW = {"epoch": 1, "train_loss": 10.0, "elbo": -9.5, "kl": 0.2, "mi": 0.1, "au": 2, "aggressive": True,
       "inner_steps": 4.0, "wall_time": 40.0}


def test_durations_are_short():
    assert [format_duration(s) for s in (0, 42.4, 187, 3720)] == ["0s", "42s", "3m07s", "1h02m"]


def test_log_lines_every_few_percent_or_every_minute():
    clock = FakeClock()
    written: list[str] = []
    lines = LogLines(written.append, every_percent=10, every_seconds=60, clock=clock)
    lines.start(total=100)
    due = []
    for done in range(1, 31):
        clock.now += 1
        if lines.due(done):
            lines.emit(done, "pass")
            due.append(done)
    assert due == [10, 20, 30]
    assert written[0] == "pass  batch 10/100  10%  elapsed 10s  left ~1m30s"

    clock.now += 61  # a slow batch: a minute is up before the next mark
    assert lines.due(31)


def test_training_log_prints_batch_lines_with_an_estimate_and_the_epoch_line():
    console, stream = log_console()
    clock = FakeClock()
    display = training_progress(console, epochs=2, steps_per_epoch=40, clock=clock)
    assert isinstance(display, TrainingLog)
    with display:
        for step in range(1, 41):
            clock.now += 0.5
            display.on_batch_end(batch(1, step, 40, inner=2 + step % 2 * 2))
        display.on_epoch_end(ROW)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 21  # every 5 % of 40 batches, then the epoch summary
    assert lines[0] == ("epoch 1/2  batch 2/40  5%  loss 12.5  aggressive, 3.0 inner steps/step  "
                        "elapsed 1s  left ~19s")
    assert lines[9].startswith("epoch 1/2  batch 20/40  50%") and lines[9].endswith("elapsed 10s  left ~10s")
    assert lines[-1].startswith("epoch 1/2  train loss 10.000  val ELBO -9.500")


def test_training_log_lines_leave_out_inner_steps_when_not_aggressive_and_show_live_kl_mi():
    console, stream = log_console()
    calls = []

    def monitor() -> dict:
        calls.append(1)
        return {"kl": 0.25, "mi": 0.125}

    display = TrainingLog(console, 1, 20, monitor, clock=FakeClock())
    with display:
        for step in range(1, 21):
            display.on_batch_end(batch(1, step, 20, aggressive=False))
    first = stream.getvalue().splitlines()[0]
    assert first.startswith("epoch 1/1  batch 1/20  5%  loss 12.5  KL 0.250  MI 0.125  elapsed 0s")
    assert "inner" not in first
    assert len(calls) == 20  # measured for the lines only: here every batch is a new 5 %


def test_training_log_estimates_a_resumed_epoch_from_the_batches_it_ran():
    console, stream = log_console()
    clock = FakeClock()
    with TrainingLog(console, 3, 100, every_percent=50, clock=clock, first_epoch=2) as display:
        for step in range(41, 51):  # resumed at batch 41 of epoch 2
            clock.now += 1
            display.on_batch_end(batch(2, step, 100))
    assert stream.getvalue().splitlines() == [
        "epoch 2/3  batch 50/100  50%  loss 12.5  aggressive, 4.0 inner steps/step  elapsed 10s  left ~50s"
    ]


def test_training_log_writes_a_line_every_minute_in_a_slow_epoch():
    console, stream = log_console()
    clock = FakeClock()
    with TrainingLog(console, 1, 1000, clock=clock) as display:
        for step in range(1, 4):
            clock.now += 61
            display.on_batch_end(batch(1, step, 1000))
    assert [line.split("  ")[1] for line in stream.getvalue().splitlines()] == ["batch 1/1000", "batch 2/1000",
                                                                                 "batch 3/1000"]


def test_final_pass_in_a_log_has_start_batch_and_done_lines():
    console, stream = log_console()
    clock = FakeClock()
    display = training_progress(console, 1, 10, evaluation_label="final evaluation on test, 100 importance samples",
                                clock=clock)
    with display:
        display.evaluation_started(4)
        for done in range(1, 5):
            clock.now += 30
            display.evaluation_step(done, 4)
    assert stream.getvalue().splitlines() == [
        "final evaluation on test, 100 importance samples: 4 batches…",
        "final evaluation on test, 100 importance samples  batch 1/4  25%  elapsed 30s  left ~1m30s",
        "final evaluation on test, 100 importance samples  batch 2/4  50%  elapsed 1m00s  left ~1m00s",
        "final evaluation on test, 100 importance samples  batch 3/4  75%  elapsed 1m30s  left ~30s",
        "final evaluation on test, 100 importance samples  batch 4/4  100%  elapsed 2m00s",
        "final evaluation on test, 100 importance samples: done in 2m00s",
    ]


def test_final_pass_without_the_library_hook_says_when_it_starts_and_ends():
    console, stream = log_console()
    clock = FakeClock()

    class Batches:
        def __len__(self) -> int:
            return 7

        def iter_from(self, epoch: int, step: int):
            return iter(range(7))

    display = training_progress(console, 1, 10, evaluation_label="final evaluation on test", clock=clock)
    with display:
        source = AnnouncedSource(Batches(), display.evaluation_started)
        assert len(source) == 7
        assert list(source.iter_from(0, 0)) == list(range(7))  # what fit does in its final pass
        clock.now += 200
    assert stream.getvalue().splitlines() == ["final evaluation on test: 7 batches…",
                                              "final evaluation on test: done in 3m20s"]


def test_failed_evaluation_does_not_say_done():
    console, stream = log_console()
    try:
        with EvaluationProgress(console, "evaluating on test", clock=FakeClock()) as progress:
            progress.start(3)
            progress(1, 3)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert "done" not in stream.getvalue()
    assert stream.getvalue().splitlines()[0] == "evaluating on test: 3 batches…"


def test_terminal_gets_the_rich_bar_and_the_same_summary_lines():
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=160)
    display = training_progress(console, 1, 5, evaluation_label="final evaluation on test")
    assert isinstance(display, TrainingBar)
    with display:
        for step in range(1, 6):
            display.on_batch_end(batch(1, step, 5))
        display.on_epoch_end(ROW)
        for done in range(4):
            display.evaluation_step(done, 3)
    text = stream.getvalue()
    assert "epoch 1/1  train loss 10.000" in text
    assert "final evaluation on test: done in" in text


def test_progress_keyword_only_where_the_function_takes_it():
    def with_hook(batches, progress=None):
        return progress

    def without_hook(batches):
        return None

    hook = object()
    assert accepts_keyword(with_hook, "progress") and not accepts_keyword(without_hook, "progress")
    assert progress_keyword(with_hook, hook) == {"progress": hook}
    assert progress_keyword(without_hook, hook) == {}


def test_fit_run_uses_fits_hook_when_it_exists(monkeypatch):
    from pyro_lag.cli import fit_run

    display = training_progress(log_console()[0], 1, 10)
    source = object()

    def fit_with_hook(model, guide, train, valid, test=None, *, test_progress=None):
        return None

    def fit_without_hook(model, guide, train, valid, test=None):
        return None

    monkeypatch.setattr(fit_run, "fit", fit_with_hook)
    assert fit_run._watch_final_pass(source, display) == (source, {"test_progress": display.evaluation_step})
    monkeypatch.setattr(fit_run, "fit", fit_without_hook)
    watched, keywords = fit_run._watch_final_pass(source, display)
    assert isinstance(watched, AnnouncedSource) and watched.source is source and keywords == {}
