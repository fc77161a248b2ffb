"""Run settings for ``pyro-lag fit``: a TOML file, command-line flags over it, defaults under both.

A config file uses the flag names as top-level keys and four tables::

    model = "synthetic"            # built-in name or "package.module:factory"
    preset = "small"
    method = "aggressive"          # aggressive|standard|anneal|beta|cyclical|free-bits
    anneal = false                 # add KL annealing to the aggressive method
    epochs = 10
    batch_size = 16
    device = "cpu"
    seed = 0
    threads = 1                    # CPU threads for torch (default: 1 for the synthetic run)

    [data]                         # path (a folder or .npz), or train/valid/test files
    path = "data/ptb"
    valid_size = 1000              # held out of train when there is no valid file

    [synthetic]                    # the embedded default corpus (used when no data is given)
    train = 2000
    valid = 500
    test = 500
    seed = 0

    [model_options]                # keyword arguments of the model builder or factory
    latent_dim = 16

    [fit]                          # further keyword arguments of pyro_lag.fit
    lr = 0.5
    iw_samples = 100

Relative paths in the file are relative to the file's folder.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import tomllib
from pathlib import Path
from typing import Any, Mapping

import click

TOP_KEYS = ("model", "preset", "method", "anneal", "epochs", "batch_size", "device", "seed", "threads")
DATA_KEYS = ("path", "train", "valid", "test", "valid_size")
SYNTHETIC_KEYS = ("train", "valid", "test", "seed")
TABLES = ("data", "synthetic", "model_options", "fit")

# fit() arguments that the command sets itself; everything else may go in [fit].
_FIT_RESERVED = {
    "model", "guide", "train", "valid", "test", "method", "epochs", "anneal", "device", "seed",
    "run_dir", "resume", "callbacks", "kind", "loss",
}

# Settings that may change when a run is resumed (more epochs, another device).
RESUMABLE_CHANGES = ("epochs", "device", "threads")

DEFAULTS: dict[str, Any] = {
    "preset": "small",
    "method": "aggressive",
    "anneal": False,
    "device": "cpu",
    "seed": 0,
}
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = {"text": 32, "image": 50}


def fit_option_names() -> list[str]:
    """The keyword arguments of :func:`pyro_lag.fit` that a ``[fit]`` table may set."""
    from pyro_lag.training import fit

    return [name for name in inspect.signature(fit).parameters if name not in _FIT_RESERVED]


def _check_keys(where: str, given: Mapping[str, Any], allowed: tuple[str, ...] | list[str]) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise click.UsageError(f"{where}: unknown key '{unknown[0]}'; valid keys: {', '.join(allowed)}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read and check a TOML config file; its data paths become absolute (relative to the file)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise click.UsageError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise click.UsageError(f"config file is a directory: {path}") from None
    except UnicodeDecodeError:
        raise click.UsageError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.UsageError(f"config file {path} is not valid TOML: {exc}") from None
    _check_keys(f"config file {path}", raw, list(TOP_KEYS) + list(TABLES))
    for table in TABLES:
        if table in raw and not isinstance(raw[table], dict):
            raise click.UsageError(f"config file {path}: '{table}' must be a table ([{table}])")
    for key in TOP_KEYS:
        if isinstance(raw.get(key), dict):
            raise click.UsageError(f"config file {path}: '{key}' must be a value, not a table")
    if "data" in raw:
        _check_keys(f"config file {path} [data]", raw["data"], DATA_KEYS)
        base = path.resolve().parent
        for key in ("path", "train", "valid", "test"):
            value = raw["data"].get(key)
            if value is not None:
                if not isinstance(value, str):
                    raise click.UsageError(f"config file {path}: data.{key} must be a path string")
                raw["data"][key] = str((base / value).resolve()) if not Path(value).is_absolute() else value
    if "synthetic" in raw:
        _check_keys(f"config file {path} [synthetic]", raw["synthetic"], SYNTHETIC_KEYS)
    if "fit" in raw:
        _check_keys(f"config file {path} [fit]", raw["fit"], fit_option_names())
    return raw


def config_hash(config: Mapping[str, Any]) -> str:
    """A short fingerprint of the settings that define a run (not epochs, device or threads)."""
    identity = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def first_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """``key: old -> new`` for the first setting (other than epochs, device, threads) that differs."""
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES:
            continue
        a, b = old.get(key), new.get(key)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            return f"{key}={json.dumps(a, default=str)} (now {json.dumps(b, default=str)})"
    return None
