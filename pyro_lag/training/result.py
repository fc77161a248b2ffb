"""What :func:`pyro_lag.fit` returns, and how it becomes an ArviZ InferenceData."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import arviz

__all__ = ["FitResult"]


@dataclass
class FitResult:
    """The outcome of a run.

    :func:`pyro_lag.fit` and :func:`pyro_lag.lightning.fit_lightning` both return one.
    ``history``: one dict per epoch with the same keys from both (epoch, train_loss, val_loss,
    elbo, recon, kl, mi, mi_se, mi_points, au, aggressive (the epoch had aggressive steps),
    aggressive_steps, inner_steps, kl_weight, lr, decayed, wall_time, ranks; over several
    ranks every figure is reduced over all of them); ``test``: the final test metrics of the
    best parameters (with ``iw_nll`` when asked for), or None without test data; ``stopped``:
    why training ended; ``config``: the resolved settings as plain data; ``aggressive`` and
    ``stop_reason``: whether aggressive mode is still on and why it ended; ``rank`` and
    ``world_size``: this process's global rank and the number of ranks (under DDP every rank's
    process returns a result: write reports where ``rank == 0``).
    """

    history: list[dict[str, Any]]
    test: dict[str, Any] | None
    best_epoch: int | None
    best_val_loss: float
    stopped: str
    decoder_only: bool
    run_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    aggressive: bool = False
    stop_reason: str | None = None
    rank: int = 0
    world_size: int = 1

    def to_inference_data(
        self,
        guide: Callable | None = None,
        batch: Any = None,
        *,
        model: Callable | None = None,
        metrics: Mapping[str, Any] | None = None,
        num_draws: int = 200,
        max_obs: int | None = 8,
        posterior_mean_space: Mapping[str, tuple[Any, Any]] | None = None,
    ) -> arviz.InferenceData:
        """History, final metrics (``metrics``, default: the test metrics), latent usage and, with
        ``guide`` and ``batch``, posterior draws of the local latents; ``posterior_mean_space``
        adds the model-vs-guide posterior-mean snapshots (label -> (model means, guide means))."""
        from pyro_lag.io.inference_data import to_inference_data

        final = dict(metrics if metrics is not None else (self.test or {}))
        final = {k: v for k, v in final.items() if v is not None}
        draws = {} if guide is None or batch is None or self.decoder_only else {
            "guide": guide, "model": model, "batch": batch, "num_draws": num_draws, "max_obs": max_obs,
        }
        return to_inference_data(history=self.history, metrics=final, posterior_mean_space=posterior_mean_space,
                                 **draws)
