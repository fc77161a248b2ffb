"""Which exceptions are the user's to fix, and how they are shown: one line, no traceback."""
from __future__ import annotations

import tomllib

# ValueError covers DataFileError, NoLocalLatentError, CheckpointError and bad settings;
# FloatingPointError is TrainingDivergedError; OSError covers missing or unreadable files.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    ImportError,
    FloatingPointError,
    tomllib.TOMLDecodeError,
)


def one_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    text = exc if isinstance(exc, str) else str(exc)
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__ if not isinstance(exc, str) else "unknown error"
