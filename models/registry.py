"""Built-in model/guide pairs by name, each with a one-line description and size presets.

``small`` trains on 2 CPU cores in minutes; ``paper`` matches He et al. (2019).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import LatentPair
from .lstm_text import LSTMTextVAE
from .mlp_image import MLPImageVAE
from .pixelcnn_image import PixelCNNImageVAE


@dataclass(frozen=True)
class ModelEntry:
    """A registered family: how to build it, what data it eats, and its size presets."""

    name: str
    description: str
    kind: str
    factory: Callable[..., LatentPair]
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


MODELS: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    """Add ``entry`` to :data:`MODELS` under its name (replacing any entry of that name)."""
    MODELS[entry.name] = entry
    return entry


register(ModelEntry(
    name="lstm-text",
    description="LSTM-VAE for sentences: LSTM encoder, LSTM decoder with z in its initial state and every input (32-d latent)",
    kind="text",
    factory=LSTMTextVAE,
    presets={
        # 128-unit LSTMs: a PTB epoch's cost is mostly the 10k-word output layer
        "small": dict(latent_dim=32, ni=128, enc_nh=128, dec_nh=128, dropout=0.5),
        "paper": dict(latent_dim=32, ni=512, enc_nh=1024, dec_nh=1024, dropout=0.5),
    },
))

register(ModelEntry(
    name="synthetic",
    description="The paper's VAE for its synthetic corpus: 1-d latent, 50-d LSTM encoder and decoder",
    kind="text",
    factory=LSTMTextVAE,
    presets={
        "small": dict(latent_dim=1, ni=50, enc_nh=50, dec_nh=50, dropout=0.5),
        "paper": dict(latent_dim=1, ni=50, enc_nh=50, dec_nh=50, dropout=0.5),
    },
))

register(ModelEntry(
    name="mlp-image",
    description="Bernoulli VAE with two-layer MLP encoder and decoder for 28x28 binary images (32-d latent)",
    kind="image",
    factory=MLPImageVAE,
    presets={
        "small": dict(latent_dim=32, hidden=256),
        "paper": dict(latent_dim=32, hidden=512),
    },
))

register(ModelEntry(
    name="pixelcnn-image",
    description="VAE with a ResNet encoder and a PixelCNN decoder for 28x28 binary images, as for OMNIGLOT (32-d latent)",
    kind="image",
    factory=PixelCNNImageVAE,
    presets={
        "small": dict(latent_dim=32, enc_channels=(32, 32, 32), enc_hidden=128, hidden=32,
                      kernel_sizes=(7, 5, 5, 3), latent_feature_maps=4),
        "paper": dict(latent_dim=32, enc_channels=(64, 64, 64), enc_hidden=512, hidden=64,
                      kernel_sizes=(7, 7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3), latent_feature_maps=4),
    },
))


def list_models() -> list[str]:
    """Names of the registered model/guide pairs, sorted."""
    return sorted(MODELS)


def build(name: str, preset: str = "small", **overrides: Any) -> LatentPair:
    """Build the pair ``name`` at size ``preset``; keyword ``overrides`` replace preset values.

    Text families need ``vocab_size`` (the vocabulary of the corpus they will read).
    Raises ValueError (one line) for an unknown name, preset or argument.
    """
    entry = MODELS.get(name)
    if entry is None:
        raise ValueError(f"unknown model '{name}'; valid names: {', '.join(list_models())}")
    if preset not in entry.presets:
        raise ValueError(f"unknown preset '{preset}' for model '{name}'; valid presets: {', '.join(sorted(entry.presets))}")
    kwargs = {**entry.presets[preset], "name": name, **overrides}
    params = inspect.signature(entry.factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"unknown argument(s) for model '{name}': {', '.join(unknown)}; valid: {', '.join(params)}")
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise ValueError(f"model '{name}' needs argument(s): {', '.join(missing)} (e.g. vocab_size=len(vocabulary))")
    return entry.factory(**kwargs)
