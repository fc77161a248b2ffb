"""Atomic checkpoints and exact-resume state capture, loaded only with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and plain Python data (str, int,
float, bool, None, lists, tuples, dicts), so loading it can never run code.
Everything that exact resume needs is turned into that form here: the Pyro
param store (with its constraints), PyroOptim states, and every random
number generator (torch, CUDA, numpy, Python ``random``; Pyro draws from
these three).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import pyro
import pyro.util
import torch
from pyro.optim import PyroOptim
from torch.distributions.constraints import Constraint

from pyro_lag.compat import pending_optim_state

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "capture_param_store",
    "restore_param_store",
    "capture_optim_state",
    "restore_optim_state",
    "capture_training_state",
    "restore_training_state",
    "nonfinite_params",
]

PathLike = Union[str, os.PathLike]
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read safely (unsafe content, corrupt, or mismatched)."""


# --------------------------------------------------------------------------- files


def _check_plain(value: Any, where: str = "state") -> None:
    """Raise TypeError if ``value`` holds anything ``torch.load(weights_only=True)`` would refuse."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.Size, torch.dtype)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, (dict, OrderedDict)):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint key {key!r} at {where} is a {type(key).__name__}, not str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"checkpoint value at {where} is a {type(value).__name__}; only tensors and plain Python data can be saved"
    )


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: temporary file beside it, flush, fsync, rename.

    A crash or kill at any moment leaves either the previous file or the new
    one, never a truncated mix. ``state`` must hold only tensors and plain
    data (checked before anything is written).
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    _check_plain(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a write that was killed
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; refuse anything that is not plain data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # a legacy raw pickle makes torch warn before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it refers to the Python object '{found.group(1)}'" if found else "it is not a weights-only torch file"
        raise CheckpointError(
            f"refusing to load checkpoint {path}: {what}; only tensors and plain data are ever loaded"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> Dict[str, Any]:
    """Every global random state Pyro and torch draw from, as tensors and plain data."""
    state = pyro.util.get_rng_state()
    version, internal, gauss_next = state["random"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out: Dict[str, Any] = {
        "torch": state["torch"].clone(),
        "random": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    rnd = state["random"]
    npy = state["numpy"]
    pyro.util.set_rng_state(
        {
            "torch": state["torch"].cpu(),
            "random": (rnd["version"], tuple(int(v) for v in rnd["internal"].tolist()), rnd["gauss_next"]),
            "numpy": (
                npy["kind"],
                npy["keys"].numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            ),
        }
    )
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# --------------------------------------------------------------------------- param store

_CONSTRAINT_MODULES = ("torch.distributions.constraints", "pyro.distributions.constraints")


def _encode_constraint(c: Any) -> Any:
    if isinstance(c, Constraint):
        cls = type(c)
        if cls.__module__ not in _CONSTRAINT_MODULES:
            raise CheckpointError(f"cannot save constraint {cls.__module__}.{cls.__name__}: not a built-in constraint")
        return {
            "__constraint__": f"{cls.__module__}:{cls.__name__}",
            "attrs": {k: _encode_constraint(v) for k, v in vars(c).items()},
        }
    if isinstance(c, torch.Tensor):
        return c.detach().clone()
    _check_plain(c, "constraint")
    return c


def _decode_constraint(data: Any) -> Any:
    if isinstance(data, dict) and "__constraint__" in data:
        module_name, _, class_name = data["__constraint__"].partition(":")
        if module_name not in _CONSTRAINT_MODULES:
            raise CheckpointError(f"checkpoint names constraint module '{module_name}', which is not allowed")
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Constraint)):
            raise CheckpointError(f"checkpoint names unknown constraint '{data['__constraint__']}'")
        obj = cls.__new__(cls)
        obj.__dict__.update({k: _decode_constraint(v) for k, v in data["attrs"].items()})
        return obj
    return data


def _clone(value: Any) -> Any:
    """Deep copy of nested containers, tensors detached and cloned (state dicts hold live references)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, _clone(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


def capture_param_store() -> Dict[str, Any]:
    """Unconstrained values and encoded constraints of every parameter in Pyro's param store."""
    store = pyro.get_param_store()
    state = store.get_state()
    return {
        "params": {name: value.detach().clone() for name, value in state["params"].items()},
        "constraints": {name: _encode_constraint(c) for name, c in state["constraints"].items()},
    }


def restore_param_store(state: Mapping[str, Any], device: Optional[Union[str, torch.device]] = None) -> None:
    """Put saved parameter values back into Pyro's param store.

    Parameters already in the store are overwritten in place, so modules
    registered with ``pyro.module`` and optimizers keep pointing at the same
    tensors; missing ones are added with their saved constraint (run the
    model and guide once beforehand so that module parameters exist).
    """
    store = pyro.get_param_store()
    live = dict(store.named_parameters())
    new_params: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, value in state["params"].items():
            target = live.get(name)
            if target is None:
                tensor = value.detach().clone()
                if device is not None:
                    tensor = tensor.to(device)
                new_params[name] = tensor.requires_grad_(True)
                continue
            if target.shape != value.shape:
                raise CheckpointError(
                    f"parameter '{name}' has shape {tuple(value.shape)} in the checkpoint "
                    f"but {tuple(target.shape)} in the model"
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    if new_params:
        store.set_state(
            {
                "params": new_params,
                "constraints": {n: _decode_constraint(state["constraints"][n]) for n in new_params},
            }
        )


# --------------------------------------------------------------------------- optimizers


def capture_optim_state(optim: PyroOptim) -> Dict[str, Any]:
    """A PyroOptim's per-parameter optimizer states, keyed by param name, as detached copies."""
    state = pending_optim_state(optim)  # restored but not yet used: keep it
    state.update(optim.get_state())
    return _clone(state)


def restore_optim_state(optim: PyroOptim, state: Mapping[str, Any]) -> None:
    """Give a PyroOptim saved states: applied now to the parameters it already steps, later to new ones."""
    store = pyro.get_param_store()
    pending = dict(state)
    for param, opt in optim.optim_objs.items():
        name = store.param_name(param)
        if name in pending:
            saved = pending.pop(name)
            if isinstance(saved, dict) and "scheduler" in saved:
                opt.load_state_dict(saved["scheduler"])
                opt.optimizer.load_state_dict(saved["optimizer"])
            else:
                opt.load_state_dict(saved)
    optim.set_state(pending)


# --------------------------------------------------------------------------- all together


def capture_training_state(
    optims: Optional[Mapping[str, PyroOptim]] = None, meta: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """Everything exact resume needs: params, optimizer states, RNGs, and plain metadata."""
    meta = dict(meta or {})
    _check_plain(meta, "meta")
    return {
        "format": FORMAT_VERSION,
        "params": capture_param_store(),
        "optim": {key: capture_optim_state(opt) for key, opt in (optims or {}).items()},
        "rng": capture_rng_state(),
        "meta": meta,
    }


def restore_training_state(
    state: Mapping[str, Any],
    optims: Optional[Mapping[str, PyroOptim]] = None,
    *,
    rng: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> Dict[str, Any]:
    """Inverse of :func:`capture_training_state`; returns the metadata."""
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"unsupported checkpoint format {state.get('format')!r} (expected {FORMAT_VERSION})")
    restore_param_store(state["params"], device=device)
    for key, opt in (optims or {}).items():
        if key in state["optim"]:
            restore_optim_state(opt, state["optim"][key])
    if rng:
        restore_rng_state(state["rng"])
    return dict(state["meta"])


def nonfinite_params() -> list:
    """Names of param-store parameters holding a NaN or infinite value."""
    bad = []
    for name, value in pyro.get_param_store().named_parameters():
        if not bool(torch.isfinite(value).all()):
            bad.append(name)
    return bad


def plain_data(value: Any) -> Any:
    """Tensors to Python numbers and lists, recursively: history rows and checkpoint metadata."""
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.dim() > 0 else value.item()
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return value
