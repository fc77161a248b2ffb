"""How every run is measured: one evaluation of a pair, for validation and for the final test pass.

``fit``, ``fit_lightning`` and the command line all call :func:`test_pass` after training, so a
run's test figures mean the same whichever way it was trained.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyro_lag.data.batches import validation_batches
from pyro_lag.estimators.decoder_only import exact_metrics
from pyro_lag.estimators.diagnostics import evaluate
from pyro_lag.io.checkpoint import plain_data
from pyro_lag.training.settings import FitSettings

__all__ = ["evaluate_pair", "test_pass"]


def evaluate_pair(model: Callable, guide: Callable, batches: Any, settings: FitSettings, *, decoder_only: bool = False,
                  iw_samples: int = 0, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """:func:`~pyro_lag.estimators.diagnostics.evaluate` with the run's estimator settings, as plain
    data; a pair whose guide samples no latent gets its exact likelihood instead."""
    if decoder_only:
        return exact_metrics(model, batches, progress, with_iw_nll=iw_samples > 0)
    return plain_data(evaluate(model, guide, batches, iw_samples=iw_samples, iw_chunk_size=settings.iw_chunk_size,
                               mi_samples=settings.mi_samples, progress=progress))


def test_pass(model: Callable, guide: Callable, test: Any, settings: FitSettings, *, decoder_only: bool = False,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The final test metrics of the parameters now in the param store (IW-NLL with ``settings.iw_samples``)."""
    return evaluate_pair(model, guide, validation_batches(test), settings, decoder_only=decoder_only,
                         iw_samples=settings.iw_samples, progress=progress)
