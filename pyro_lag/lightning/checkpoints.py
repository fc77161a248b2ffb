"""What a Lightning run keeps between epochs: rank 0's checkpoints (the lr plateau is :mod:`pyro_lag.training.lr_plateau`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from pyro_lag.engine.collectives import gather_from_ranks
from pyro_lag.io.checkpoint import (
    capture_param_store,
    capture_rng_state,
    capture_training_state,
    plain_data,
    save_checkpoint,
)

if TYPE_CHECKING:
    from pyro_lag.lightning.module import AggressiveLightningModule

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


class RankZeroCheckpoints:
    """``last.pt`` and ``best.pt`` in a run directory, written by global rank 0 only, atomically.

    Every rank contributes its own random state and data-source state to ``last.pt`` (one
    gather), so a resumed run with the same number of ranks continues each rank's streams.
    """

    def __init__(self, run_dir: str | Path | None) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)

    @property
    def last(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / LAST_CHECKPOINT

    @property
    def best(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / BEST_CHECKPOINT

    def write_last(self, module: AggressiveLightningModule) -> None:
        own = {"rng": capture_rng_state(), "train_source": module.source_state()}
        ranks = gather_from_ranks(own)
        if self.last is None or module.global_rank != 0:
            return
        assert module.svi is not None, "the SVI is built in on_fit_start, before any checkpoint"
        meta = {
            "config": module.settings.record(),
            "epoch": module.epochs_done,
            "history": module.history,
            "svi": plain_data(module.svi.state_dict()),
            "world_size": len(ranks),
            "ranks": ranks,
            "best_val_loss": module.best_val_loss,
            "best_epoch": module.best_epoch,
            "plateau": dataclasses.asdict(module.plateau),
            "stopped": module.stopped,
        }
        save_checkpoint(self.last, capture_training_state(module.optims(), meta))

    def write_best(self, module: AggressiveLightningModule, val_loss: float) -> None:
        if self.best is None or module.global_rank != 0:
            return
        meta = {"epoch": module.epochs_done, "val_loss": val_loss}
        save_checkpoint(self.best, {"params": capture_param_store(), "meta": meta})
