"""Run settings for ``pyro-lag fit``: a TOML file, command-line flags over it, defaults under both.

A config file uses the flag names as top-level keys and four tables::

    model = "synthetic"            # built-in name or "package.module:factory"
    preset = "small"
    method = "aggressive"          # aggressive|standard|anneal|beta|cyclical|free-bits
    anneal = false                 # add KL annealing to the aggressive method
    epochs = 50
    batch_size = 16
    device = "cpu"
    seed = 0
    threads = 1                    # CPU threads for torch (default: 1 for the synthetic run)

    [data]                         # path (a folder or .npz), or train/valid/test files
    path = "data/ptb"
    valid_size = 1000              # held out of train when there is no valid file

    [synthetic]                    # the embedded default corpus (used when no data is given)
    train = 4000
    valid = 500
    test = 500
    seed = 0

    [model_options]                # keyword arguments of the model builder or factory
    latent_dim = 16

    [fit]                          # further keyword arguments of pyro_lag.fit
    lr = 0.5
    iw_samples = 100

    [distributed]                  # several processes, through PyTorch Lightning (see .scale_out)
    accelerator = "cpu"            # cpu|gpu|auto
    devices = 2                    # processes per node
    strategy = "ddp"               # ddp|ddp_spawn|ddp_fork
    num_nodes = 1

Relative paths in the file are relative to the file's folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import click
import torch

from pyro_lag.training.settings import FitSettings

from . import scale_out
from .datasets import data_kind, resolve_data
from .pairs import default_model

TOP_KEYS = ("model", "preset", "method", "anneal", "epochs", "batch_size", "device", "seed", "threads")
DATA_KEYS = ("path", "train", "valid", "test", "valid_size")
SYNTHETIC_KEYS = ("train", "valid", "test", "seed")
TABLES = ("data", "synthetic", "model_options", "fit", "distributed")

# FitSettings fields that the command sets itself (from flags or the data); the rest may go in [fit].
_FIT_RESERVED = {"method", "epochs", "anneal", "seed", "kind", "loss"}

# Settings that may change when a run is resumed: the library's resumable ones, and where it runs.
RESUMABLE_CHANGES = (*FitSettings.resumable_names(), "device", "threads")

DEFAULTS: dict[str, Any] = {
    "preset": "small",
    "method": "aggressive",
    "anneal": False,
    "device": "cpu",
    "seed": 0,
}
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = {"text": 32, "image": 50}
DEFAULT_IW_SAMPLES = 100
# The embedded default run (no MODEL, no data): the paper's synthetic experiment with a
# fifth of its corpus (cli.datasets.SYNTHETIC_DEFAULT), batch size and epochs as in the
# paper: about 4-5 minutes of one CPU core. One thread: small LSTMs gain nothing from more,
# and a busy second core stalls them.
SYNTHETIC_EPOCHS = 50  # as in the paper (lr decay may end training earlier)
SYNTHETIC_BATCH_SIZE = 16
SYNTHETIC_THREADS = 1
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def fit_option_names() -> list[str]:
    """The :class:`~pyro_lag.training.settings.FitSettings` fields that a ``[fit]`` table may set."""
    return [name for name in FitSettings.names() if name not in _FIT_RESERVED]


def fit_settings(config: Mapping[str, Any], kind: str) -> FitSettings:
    """The run's typed settings, validated (and resolved for ``kind``) by the library itself."""
    try:
        return FitSettings(method=config["method"], anneal=bool(config["anneal"]), epochs=config["epochs"],
                           seed=config["seed"], kind=kind, **config["fit"]).resolved()
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None


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
    if "distributed" in raw:
        _check_keys(f"config file {path} [distributed]", raw["distributed"], scale_out.KEYS)
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


def check_device(device: Any, where: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA only when this machine has it."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise click.UsageError(f"{where}: device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise click.UsageError(f"{where} {device}: CUDA is not available on this machine (no GPU, or torch built without CUDA)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise click.UsageError(f"{where} {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Use ``threads`` CPU threads in torch for the duration (None: leave torch's setting)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pick(*values: Any) -> Any:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def resolve_config(flags: dict[str, Any], user: dict[str, Any], stored: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The run's full settings: flags over the config file over the resumed run over defaults."""
    data_flags = {k: flags[k] for k in ("path", "train", "valid", "test") if flags.get(k) is not None}
    user_data = dict(user.get("data") or {})
    if data_flags:
        data = resolve_data(**data_flags, valid_size=user_data.get("valid_size"))
    elif user_data or user.get("synthetic"):
        data = resolve_data(**user_data, synthetic=user.get("synthetic"))
    elif stored is not None:
        data = stored["data"]
    else:
        data = resolve_data()
    kind = data_kind(data)
    synthetic = data["source"] == "synthetic"
    base = stored or {}

    def setting(key: str, default: Any) -> Any:
        return _pick(flags.get(key), user.get(key), base.get(key), default)

    fit_options = dict(base.get("fit") or {"iw_samples": DEFAULT_IW_SAMPLES})
    fit_options.update(user.get("fit") or {})
    for key in ("beta", "free_bits", "loss", "clip_scope", "stop_rule", "policy", "inner_rule", "mi_checks_per_epoch"):
        if flags.get(key) is not None:
            fit_options[key] = flags[key]
    config = {
        "model": setting("model", default_model(kind, synthetic)),
        "preset": setting("preset", DEFAULTS["preset"]),
        "method": setting("method", DEFAULTS["method"]),
        "anneal": bool(setting("anneal", DEFAULTS["anneal"])),
        "epochs": setting("epochs", SYNTHETIC_EPOCHS if synthetic else DEFAULT_EPOCHS),
        "batch_size": setting("batch_size", SYNTHETIC_BATCH_SIZE if synthetic else DEFAULT_BATCH_SIZE[kind]),
        "device": setting("device", DEFAULTS["device"]),
        "seed": setting("seed", DEFAULTS["seed"]),
        "threads": setting("threads", SYNTHETIC_THREADS if synthetic else None),
        "model_options": dict(_pick(user.get("model_options"), base.get("model_options"), {})),
        "fit": fit_options,
        "data": data,
    }
    distributed, config["device"] = scale_out.resolve(flags, user, stored, config["device"], fit_options)
    if distributed is not None:  # one process: no key, config.json exactly as before
        config["distributed"] = distributed
    _check_config(config)
    return config


def _check_int(config: dict[str, Any], key: str, minimum: int) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise click.UsageError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _check_config(config: dict[str, Any]) -> None:
    """Refuse settings that cannot work together, before anything is loaded."""
    if not isinstance(config["model"], str) or not config["model"]:
        raise click.UsageError(f"model must be a name or package.module:factory, got {config['model']!r}")
    _check_int(config, "epochs", 1)
    _check_int(config, "batch_size", 1)
    _check_int(config, "seed", 0)
    if config["threads"] is not None:
        _check_int(config, "threads", 1)
    check_device(config["device"], "--device")
    fit_settings(config, data_kind(config["data"]))
