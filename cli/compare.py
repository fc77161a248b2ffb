"""The paper's results table (He et al. 2019, Tables 1-3) for several run directories.

One row per run: IW-NLL (and perplexity for text), the negative ELBO, KL, MI, active
units, the processes that trained it, training time and time relative to the first run,
as a rich table, CSV or Markdown. The processes column shows only when some run used more
than one (``pyro-lag fit --devices``); the CSV always has it, with the strategy.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Optional

import click
from rich.table import Table

from .rundir import CONFIG_FILE, EVAL_FILE, METRICS_FILE, RunDirectory, read_json

# (key, CSV header, table header, decimals in the table)
COLUMNS = (
    ("run", "run", "run", None),
    ("model", "model", "model", None),
    ("method", "method", "method", None),
    ("iw_nll", "iw_nll", "IW-NLL", 2),
    ("ppl", "ppl", "PPL", 2),
    ("neg_elbo", "neg_elbo", "-ELBO", 2),
    ("kl", "kl", "KL", 2),
    ("mi", "mi", "MI", 2),
    ("au", "au", "AU", 0),
    ("world_size", "world_size", "procs", 0),
    ("strategy", "strategy", "strategy", None),
    ("time", "train_time_s", "time (s)", 1),
    ("relative_time", "relative_time", "rel. time", 2),
)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def row_of(path: str | Path) -> dict[str, Any]:
    """The table row of one run: its final evaluation, or its latest ``eval`` of the same split."""
    from pyro_lag.report import perplexity

    run = RunDirectory.open(path)
    config = read_json(run.file(CONFIG_FILE))
    if not run.file(METRICS_FILE).is_file():
        raise click.UsageError(f"run {run.path} has no {METRICS_FILE} yet; nothing to compare")
    saved = read_json(run.file(METRICS_FILE))
    metrics = saved.get("final")
    if metrics is None:
        status = (run.marker() or {}).get("status", "?")
        raise click.UsageError(f"run {run.path} has no final metrics (status {status}); finish or resume it first")
    metrics = dict(metrics)
    if run.file(EVAL_FILE).is_file():  # a later `pyro-lag eval` of the same split (e.g. with more samples)
        evaluated = read_json(run.file(EVAL_FILE)).get("metrics") or {}
        if evaluated.get("evaluated_on") == metrics.get("evaluated_on"):
            metrics.update({k: v for k, v in evaluated.items() if v is not None})
    kind = metrics.get("kind") or "text"
    elbo = _number(metrics.get("elbo"))
    setup = config.get("distributed") if isinstance(config.get("distributed"), dict) else {}
    return {
        "run": run.path.name,
        "model": config.get("model"),
        "method": config.get("method", "?") + (" + anneal" if config.get("anneal") else ""),
        "iw_nll": _number(metrics.get("iw_nll")),
        "ppl": perplexity(metrics) if kind == "text" else None,
        "neg_elbo": -elbo if elbo is not None else None,
        "kl": _number(metrics.get("kl")),
        "mi": _number(metrics.get("mi")),
        "au": _number(metrics.get("au")),
        "world_size": int(setup.get("world_size", 1)),
        "strategy": setup.get("strategy"),
        "time": _number(saved.get("training_time")),
        "relative_time": None,
    }


def relative_times(rows: list[dict[str, Any]]) -> None:
    """Fill ``relative_time``: each run's training time over the first run's."""
    base = rows[0]["time"] if rows else None
    for row in rows:
        if base and row["time"] is not None:
            row["relative_time"] = row["time"] / base


def _cell(value: Any, decimals: Optional[int]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if decimals is None:
        return str(value)
    return f"{value:.{decimals}f}"


def _columns(rows: list[dict[str, Any]]) -> list[tuple]:
    """Columns, without PPL when no run has one (image runs), without processes and strategy
    when every run trained in one process."""
    distributed = any(r["world_size"] > 1 or r["strategy"] is not None for r in rows)
    return [c for c in COLUMNS
            if (c[0] != "ppl" or any(r["ppl"] is not None for r in rows))
            and (c[0] not in ("world_size", "strategy") or distributed)]


def rich_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="runs compared (time relative to the first)", title_justify="left")
    columns = _columns(rows)
    for key, _, header, decimals in columns:
        table.add_column(header, justify="left" if decimals is None else "right", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row[key], decimals) for key, _, _, decimals in columns))
    return table


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Full-precision CSV (empty cells for missing values)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([c[1] for c in COLUMNS])
    for row in rows:
        writer.writerow(["" if row[key] is None else (repr(row[key]) if isinstance(row[key], float) else row[key])
                         for key, *_ in COLUMNS])
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """A GitHub Markdown table, numbers rounded as in the paper."""
    columns = _columns(rows)
    lines = [
        "| " + " | ".join(c[2] for c in columns) + " |",
        "|" + "|".join("---" if c[3] is None else "---:" for c in columns) + "|",
    ]
    for row in rows:
        cells = [_cell(row[key], decimals).replace("|", "\\|") for key, _, _, decimals in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
