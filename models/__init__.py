"""Built-in model/guide pairs of He et al. (2019), usable with pyro_lag's SVI and diagnostics.

``build(name, preset)`` makes one by name; ``list_models()`` names them all.
"""
from .base import LatentPair
from .lstm_text import LSTMTextVAE
from .mlp_image import MLPImageVAE
from .pixelcnn_image import PixelCNNImageVAE
from .registry import MODELS, ModelEntry, build, list_models, register
from .synthetic import SyntheticGenerator, sample_corpus, true_posterior_mean, write_corpus

__all__ = [
    "LatentPair",
    "LSTMTextVAE",
    "MLPImageVAE",
    "PixelCNNImageVAE",
    "MODELS",
    "ModelEntry",
    "build",
    "list_models",
    "register",
    "SyntheticGenerator",
    "sample_corpus",
    "true_posterior_mean",
    "write_corpus",
]
