"""``last.pt`` and ``best.pt`` of a single-process run: written atomically, never with broken parameters.

The best parameters are also kept in memory (the lr decay reloads them, and ``fit`` ends
with them in the param store) whether or not there is a run directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pyro_lag.io.checkpoint import (
    capture_param_store,
    capture_training_state,
    load_checkpoint,
    nonfinite_params,
    restore_param_store,
    restore_training_state,
    save_checkpoint,
)
from pyro_lag.training.faults import TrainingDivergedError

__all__ = ["RunCheckpoints", "LAST_CHECKPOINT", "BEST_CHECKPOINT"]

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


class RunCheckpoints:
    """The checkpoints of one run in ``run_path`` (None: the best parameters in memory only)."""

    def __init__(self, run_path: Path | None) -> None:
        self.last = run_path / LAST_CHECKPOINT if run_path is not None else None
        self.best = run_path / BEST_CHECKPOINT if run_path is not None else None
        self.best_params: dict[str, Any] | None = None

    def resumable(self) -> bool:
        return self.last is not None and self.last.exists()

    def save_last(self, optims: dict[str, Any], meta: dict[str, Any], epoch: int) -> None:
        """Parameters, optimizer and RNG states with ``meta``; refused when a parameter is not finite."""
        if self.last is None:
            return
        bad = nonfinite_params()
        if bad:  # never replace a good checkpoint with broken parameters
            raise TrainingDivergedError(f"parameter '{bad[0]}' is not finite at epoch {epoch + 1}; checkpoint not written")
        save_checkpoint(self.last, capture_training_state(optims, meta))

    def load_last(self, optims_for: Any, device: Any) -> dict[str, Any]:
        """``last.pt``'s metadata; ``optims_for(meta)`` builds the optimizers its states go into."""
        assert self.last is not None
        checkpoint = load_checkpoint(self.last)
        restore_training_state(checkpoint, optims_for(checkpoint["meta"]), device=device)
        if self.best is not None and self.best.exists():
            self.best_params = load_checkpoint(self.best)["params"]
        return checkpoint["meta"]

    def save_best(self, epoch: int, val_loss: float) -> None:
        self.best_params = capture_param_store()
        if self.best is not None:
            save_checkpoint(self.best, {"params": self.best_params, "meta": {"epoch": epoch + 1, "val_loss": val_loss}})

    def restore_best(self) -> None:
        """Put the best parameters so far back into the param store (if there are any)."""
        if self.best_params is not None:
            restore_param_store(self.best_params)
