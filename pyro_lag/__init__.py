"""pyro-lag: aggressive inference-network training for Pyro, against posterior collapse.

Implements He, Spokoyny, Neubig and Berg-Kirkpatrick, "Lagging Inference Networks and
Posterior Collapse in Variational Autoencoders" (ICLR 2019) as a drop-in for
``pyro.infer.SVI``, with diagnostics that show whether a model uses its latent.
"""
from .diagnostics import active_units, evaluate, iw_log_likelihood, mutual_information
from .sites import NoLocalLatentError
from .svi import AggressiveSVI, InnerLoopStopper

__version__ = "0.1.0"

__all__ = [
    "AggressiveSVI",
    "InnerLoopStopper",
    "NoLocalLatentError",
    "active_units",
    "evaluate",
    "fit",
    "iw_log_likelihood",
    "mutual_information",
    "to_inference_data",
]


def __getattr__(name: str):
    """Load the heavier parts (training loop, ArviZ output) on first use."""
    if name == "fit":
        from .training import fit

        return fit
    if name == "to_inference_data":
        from .inference_data import to_inference_data

        return to_inference_data
    raise AttributeError(f"module 'pyro_lag' has no attribute {name!r}")
