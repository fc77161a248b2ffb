"""The run directory: its files, the run marker (run.json), and the lock that keeps runs apart.

``run.json`` names the run (id, config hash, status). It says ``running`` from the start
and ``complete`` only once every result file is written, so an interrupted run never
looks finished. A directory holding another run refuses a new ``fit`` unless ``--resume``;
a lock file (``.lock``, held with ``flock``) refuses a second process while one trains.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import click

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
DIAGNOSTICS_FILE = "diagnostics.nc"
REPORT_FILE = "report.html"
MEAN_SPACE_FILE = "posterior_mean_space.json"
EVAL_FILE = "eval.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"

try:  # POSIX advisory locks; elsewhere the run.json check alone guards the directory
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """JSON-able copy: tensors and arrays to lists, numpy scalars to Python numbers."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(_plain(data), indent=2, allow_nan=True) + "\n")


def read_json(path: Path) -> Any:
    """Read a run file; a missing or broken one is a one-line error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.name} not found in run directory {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def history_csv(history: Sequence[Mapping[str, Any]]) -> str:
    """The per-epoch history as CSV text, one column per key seen in any row."""
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _plain(row.get(k)) for k in columns})
    return out.getvalue()


class RunDirectory:
    """One run's folder; use :meth:`claim` to start or resume a run in it, or :meth:`open` to read it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.created = False
        self._lock_handle: Optional[io.TextIOWrapper] = None

    # -------------------------------------------------------------------------- files
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def marker(self) -> Optional[dict[str, Any]]:
        marker = self.file(RUN_FILE)
        return read_json(marker) if marker.is_file() else None

    def update_marker(self, **changes: Any) -> dict[str, Any]:
        marker = self.marker() or {}
        marker.update(changes, updated=now())
        write_json(self.file(RUN_FILE), marker)
        return marker

    def has_checkpoint(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("*.pt"))

    # -------------------------------------------------------------------------- reading
    @classmethod
    def open(cls, path: str | Path) -> "RunDirectory":
        """An existing run directory (it must hold run.json and config.json)."""
        run = cls(Path(path))
        if not run.path.is_dir():
            raise FileNotFoundError(f"run directory not found: {run.path}")
        if not run.file(RUN_FILE).is_file():
            raise click.UsageError(f"{run.path} is not a pyro-lag run directory (no {RUN_FILE})")
        if not run.file(CONFIG_FILE).is_file():
            raise click.UsageError(f"run directory {run.path} has no {CONFIG_FILE}; was the run started?")
        return run

    # -------------------------------------------------------------------------- claiming
    def claim(self, resume: bool) -> Optional[dict[str, Any]]:
        """Take the directory for this process; returns the marker of the run being resumed.

        Refuses (one line) a path that is a file, a non-empty folder that is not a run, a
        folder holding another run without ``resume``, ``resume`` with nothing to resume,
        and a run another process is training right now.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise click.UsageError(f"--out {path} is a file, not a folder")
        existed = path.is_dir()
        if existed and not self.file(RUN_FILE).is_file():
            foreign = [p.name for p in path.iterdir() if p.name != LOCK_FILE]
            if foreign:
                raise click.UsageError(
                    f"--out {path} is not empty and holds no pyro-lag run; choose a new or empty folder"
                )
        if resume and not existed:
            raise click.UsageError(f"--resume: run directory {path} does not exist; nothing to resume")
        path.mkdir(parents=True, exist_ok=True)
        self.created = not existed
        try:
            self._lock()
            marker = self.marker()
            if marker is not None and not resume:
                raise click.UsageError(
                    f"--out {path} already holds run {marker.get('run_id', '?')} "
                    f"(model {marker.get('model', '?')}, status {marker.get('status', '?')}); "
                    "pass --resume to continue it, or choose another --out"
                )
            if marker is None and resume:
                raise click.UsageError(f"--resume: {path} holds no run ({RUN_FILE} missing); nothing to resume")
        except BaseException:
            self.release(discard=self.created)
            raise
        return marker

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        handle = open(self.file(LOCK_FILE), "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise click.UsageError(f"run directory {self.path} is in use by {holder}; wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pyro-lag process {os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def start(self, config_hash: str, model: str, resumed: Optional[Mapping[str, Any]],
              model_import_root: Optional[str] = None) -> dict[str, Any]:
        """Write run.json with status ``running`` (a new id, or the resumed run's id)."""
        import pyro_lag

        if resumed is not None:
            return self.update_marker(status="running", pid=os.getpid(), resumed=now(), error=None)
        marker = {
            "run_id": uuid.uuid4().hex[:12],
            "config_hash": config_hash,
            "model": model,
            "status": "running",
            "created": now(),
            "updated": now(),
            "finished": None,
            "pid": os.getpid(),
            "pyro_lag_version": pyro_lag.__version__,
            "model_import_root": model_import_root,
            "error": None,
        }
        write_json(self.file(RUN_FILE), marker)
        return marker

    def release(self, discard: bool = False, written: Iterable[str] = ()) -> None:
        """Drop the lock; with ``discard``, delete the files this process wrote (and the folder if it made it)."""
        held = self._lock_handle is not None
        if discard:
            for name in (*written, *((LOCK_FILE,) if held else ())):
                try:
                    self.file(name).unlink()
                except FileNotFoundError:
                    pass
            for folder in ((self.checkpoints, self.path) if self.created else (self.checkpoints,)):
                try:
                    folder.rmdir()
                except OSError:
                    pass  # not empty (or not there): leave it
        if held:
            self._lock_handle.close()
            self._lock_handle = None
