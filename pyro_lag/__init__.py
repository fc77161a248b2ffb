"""pyro-lag: aggressive inference-network training for Pyro, against posterior collapse.

Implements He, Spokoyny, Neubig and Berg-Kirkpatrick, "Lagging Inference Networks and
Posterior Collapse in Variational Autoencoders" (ICLR 2019) as a drop-in for
``pyro.infer.SVI``, with diagnostics that show whether a model uses its latent.

Every public name is loaded on first use (module ``__getattr__``), so ``import pyro_lag``
and ``pyro-lag --help`` do not pay for importing torch and pyro.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what editors and type checkers see; at run time __getattr__ loads these
    from .batches import Batches
    from .diagnostics import (
        MutualInformation,
        active_units,
        estimate_mutual_information,
        evaluate,
        iw_log_likelihood,
        mutual_information,
    )
    from .fit_result import FitResult
    from .inference_data import to_inference_data
    from .settings import FitSettings
    from .sites import NoLocalLatentError
    from .svi import AggressiveSVI, InnerLoopStopper
    from .training import fit

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_SOURCES: dict[str, str] = {
    "AggressiveSVI": "svi",
    "Batches": "batches",
    "FitResult": "fit_result",
    "FitSettings": "settings",
    "InnerLoopStopper": "svi",
    "MutualInformation": "diagnostics",
    "NoLocalLatentError": "sites",
    "active_units": "diagnostics",
    "estimate_mutual_information": "diagnostics",
    "evaluate": "diagnostics",
    "fit": "training",
    "iw_log_likelihood": "diagnostics",
    "mutual_information": "diagnostics",
    "to_inference_data": "inference_data",
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


class _Package(types.ModuleType):
    """``pyro_lag`` itself: the function ``mutual_information`` keeps its name over the submodule.

    Importing a submodule binds it as an attribute of its package, so importing
    ``pyro_lag.mutual_information`` (which ``pyro_lag.diagnostics`` does) would otherwise
    hide the function of that name from ``from pyro_lag import mutual_information``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SOURCES and isinstance(value, types.ModuleType):
            return  # a same-named submodule was imported: the public name stays lazy
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
