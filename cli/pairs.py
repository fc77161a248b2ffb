"""Turn the MODEL argument into a Pyro model/guide pair: a built-in name or ``package.module:factory``.

A factory is any callable importable as ``package.module:name`` (the current folder is
importable, as with ``python -m``). It is called with the ``[model_options]`` of the
config as keyword arguments, plus ``vocab_size`` for text data when its signature takes
one, and returns an object with ``.model`` and ``.guide`` (like the built-in pairs) or
a ``(model, guide)`` tuple.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import click
import pyro

from pyro_lag.estimators.decoder_only import latent_sites
from pyro_lag.trace.sites import NoLocalLatentError

DEFAULT_MODEL = {"text": "lstm-text", "image": "mlp-image"}
SYNTHETIC_MODEL = "synthetic"


@dataclass
class PairHandle:
    """A resolved model/guide pair and what the command needs to know about it."""

    spec: str
    model: Callable
    guide: Callable
    pair: Any = None  # the object holding model and guide (None for a bare tuple)
    builtin: bool = False
    import_root: Optional[str] = None  # the sys.path folder a factory's module came from

    @property
    def latent_dim(self) -> Optional[int]:
        return getattr(self.pair, "latent_dim", None)

    def can(self, method: str) -> bool:
        """Whether the pair offers ``sample_prior`` / ``reconstruct`` / ``encode`` / ``to``."""
        return callable(getattr(self.pair, method, None))


def is_factory_spec(spec: str) -> bool:
    return ":" in spec


def default_model(kind: str, synthetic: bool) -> str:
    """The built-in used when MODEL is left out: the synthetic VAE, or one per data kind."""
    return SYNTHETIC_MODEL if synthetic else DEFAULT_MODEL[kind]


def _import_root(module: Any, module_name: str) -> Optional[str]:
    """The folder on sys.path from which ``module`` was imported (None for a namespace or built-in)."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    depth = len(module_name.split(".")) + (1 if path.name == "__init__.py" else 0)
    return str(path.parents[depth - 1])


def _import_factory(spec: str, search_path: Optional[str] = None) -> tuple[Callable, Optional[str]]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.UsageError(f"MODEL '{spec}': expected package.module:factory")
    for folder in (os.getcwd(), search_path):  # like `python -m`: modules in the current folder import
        if folder and folder not in sys.path:
            sys.path.append(folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.UsageError(f"MODEL '{spec}': cannot import module '{module_name}': {exc}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise click.UsageError(f"MODEL '{spec}': module '{module_name}' has no attribute '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise click.UsageError(f"MODEL '{spec}': '{attr}' is a {type(target).__name__}, not a callable factory")
    return target, _import_root(module, module_name)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _from_factory(spec: str, options: Mapping[str, Any], kind: str, vocab_size: Optional[int],
                  search_path: Optional[str]) -> PairHandle:
    factory, root = _import_factory(spec, search_path)
    kwargs = dict(options)
    if kind == "text" and vocab_size is not None and "vocab_size" not in kwargs and _accepts(factory, "vocab_size"):
        kwargs["vocab_size"] = vocab_size
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise click.UsageError(f"MODEL '{spec}': the factory does not take these [model_options]: {exc}") from None
    except ValueError:
        pass  # no signature to check (a builtin or C callable)
    result = factory(**kwargs)
    if callable(getattr(result, "model", None)) and callable(getattr(result, "guide", None)):
        pair_kind = getattr(result, "kind", None)
        if isinstance(pair_kind, str) and pair_kind in ("text", "image") and pair_kind != kind:
            raise click.UsageError(f"MODEL '{spec}' is a {pair_kind} model but the data are {kind}")
        return PairHandle(spec, result.model, result.guide, pair=result, import_root=root)
    if isinstance(result, (tuple, list)) and len(result) == 2 and all(callable(f) for f in result):
        return PairHandle(spec, result[0], result[1], import_root=root)
    raise click.UsageError(
        f"MODEL '{spec}': the factory returned a {type(result).__name__}, not a model/guide pair "
        "(an object with .model and .guide, or a (model, guide) tuple)"
    )


def _builtin(spec: str, preset: str, options: Mapping[str, Any], kind: str, vocab_size: Optional[int]) -> PairHandle:
    from pyro_lag.models import MODELS, build, list_models

    entry = MODELS.get(spec)
    if entry is None:
        raise click.UsageError(
            f"unknown model '{spec}'; built-in models: {', '.join(list_models())} "
            "(or give your own as package.module:factory)"
        )
    if entry.kind != kind:
        raise click.UsageError(f"model '{spec}' reads {entry.kind} but the data are {kind}")
    kwargs = dict(options)
    if kind == "text":
        if "vocab_size" in kwargs and kwargs["vocab_size"] != vocab_size:
            raise click.UsageError(
                f"model_options.vocab_size={kwargs['vocab_size']} but the training vocabulary has {vocab_size} words"
            )
        kwargs["vocab_size"] = vocab_size
    pair = build(spec, preset, **kwargs)
    return PairHandle(spec, pair.model, pair.guide, pair=pair, builtin=True)


def make_pair(spec: str, preset: str, options: Mapping[str, Any], kind: str, vocab_size: Optional[int],
              search_path: Optional[str] = None) -> PairHandle:
    """Build the pair named by ``spec`` for data of ``kind`` (``vocab_size`` for text).

    A factory's module is imported from the current folder, the usual sys.path, or
    ``search_path`` (where it was found when the run was made).
    """
    if is_factory_spec(spec):
        return _from_factory(spec, options, kind, vocab_size, search_path)
    return _builtin(spec, preset, options, kind, vocab_size)


def check_local_latents(handle: PairHandle, batch: Any) -> bool:
    """Run the guide once on ``batch``: True when it has local latents, False when it has none.

    Refuses (one line) a guide whose latents are all global, as the diagnostics need
    latents inside the data plate. Leaves the param store empty.
    """
    try:
        return bool(latent_sites(handle.guide, batch))
    except NoLocalLatentError as exc:
        raise click.UsageError(f"MODEL '{handle.spec}': {exc}") from None
    finally:
        pyro.clear_param_store()
