"""pyro-lag: aggressive inference-network training for Pyro, against posterior collapse.

Implements He, Spokoyny, Neubig and Berg-Kirkpatrick, "Lagging Inference Networks and
Posterior Collapse in Variational Autoencoders" (ICLR 2019) as a drop-in for
``pyro.infer.SVI``, with diagnostics that show whether a model uses its latent.

Every public name is loaded on first use (module ``__getattr__``), so ``import pyro_lag``
and ``pyro-lag --help`` do not pay for importing torch and pyro.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what editors and type checkers see; at run time __getattr__ loads these
    from pyro_lag.data.batches import Batches
    from pyro_lag.engine.inner_loop import InnerLoopStopper
    from pyro_lag.engine.svi import AggressiveSVI
    from pyro_lag.estimators.active_units import active_units
    from pyro_lag.estimators.diagnostics import estimate_mutual_information, evaluate, mutual_information
    from pyro_lag.estimators.iw_nll import iw_log_likelihood
    from pyro_lag.estimators.mutual_info import MutualInformation
    from pyro_lag.io.inference_data import to_inference_data
    from pyro_lag.trace.sites import NoLocalLatentError
    from pyro_lag.training.loop import fit
    from pyro_lag.training.result import FitResult
    from pyro_lag.training.settings import FitSettings

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_SOURCES: dict[str, str] = {
    "AggressiveSVI": "engine.svi",
    "Batches": "data.batches",
    "FitResult": "training.result",
    "FitSettings": "training.settings",
    "InnerLoopStopper": "engine.inner_loop",
    "MutualInformation": "estimators.mutual_info",
    "NoLocalLatentError": "trace.sites",
    "active_units": "estimators.active_units",
    "estimate_mutual_information": "estimators.diagnostics",
    "evaluate": "estimators.diagnostics",
    "fit": "training.loop",
    "iw_log_likelihood": "estimators.iw_nll",
    "mutual_information": "estimators.diagnostics",
    "to_inference_data": "io.inference_data",
}

__all__ = [
    "AggressiveSVI",
    "Batches",
    "FitResult",
    "FitSettings",
    "InnerLoopStopper",
    "MutualInformation",
    "NoLocalLatentError",
    "active_units",
    "estimate_mutual_information",
    "evaluate",
    "fit",
    "iw_log_likelihood",
    "mutual_information",
    "to_inference_data",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use, and keep the value."""
    if name not in _SOURCES:
        raise AttributeError(f"module 'pyro_lag' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
