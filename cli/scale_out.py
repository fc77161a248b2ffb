"""Training on several processes, GPUs or nodes: ``--accelerator``, ``--devices``, ``--strategy`` and
``--num-nodes`` of ``pyro-lag fit``, and which process of such a run this one is.

One process is the default and goes through :func:`pyro_lag.fit` as before (``--accelerator``
alone only picks its device). Several devices, several nodes or a named strategy go through
:func:`pyro_lag.lightning.fit_lightning` and are recorded in config.json as ``distributed``.

With ``--strategy ddp`` Lightning starts the other processes of a node by running the same
command again; the first process passes them the run directory in ``PYRO_LAG_DDP_RUN_DIR``.
Only global rank 0 writes the run directory. Importing this module is cheap (no torch), so
``pyro-lag fit --help`` can list the choices.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import click

ACCELERATORS = ("cpu", "gpu", "auto")
STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork")
# how Lightning starts the other processes: popen runs the command again, spawn and fork start a function
START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork"}
KEYS = ("accelerator", "devices", "strategy", "num_nodes")
RUN_DIR_ENV = "PYRO_LAG_DDP_RUN_DIR"
NO_CUDA = "CUDA is not available on this machine (no GPU, or torch built without CUDA)"
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")  # as settings.check_device accepts
# the [fit] options that pyro_lag.fit has and the Lightning path does not
UNSUPPORTED_FIT_OPTIONS = {"checkpoint_every": "mid-epoch checkpoints"}


def _pick(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _check_value(key: str, value: Any) -> None:
    """A value from a config file (flags are checked by click)."""
    if key in ("devices", "num_nodes"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise click.UsageError(f"{key} must be an integer >= 1, got {value!r}")
    elif key == "accelerator" and value not in ACCELERATORS:
        raise click.UsageError(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {value!r}")
    elif key == "strategy" and value not in STRATEGIES:
        raise click.UsageError(f"strategy must be one of {', '.join(STRATEGIES)}, got {value!r}")


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve(flags: Mapping[str, Any], user: Mapping[str, Any], stored: Optional[Mapping[str, Any]],
            device: str, fit_options: Mapping[str, Any]) -> tuple[Optional[dict[str, Any]], str]:
    """The run's distributed setup (None: one process) and its ``device`` setting.

    Flags over the config file's ``[distributed]`` table over the resumed run's setup.
    ``device`` is the resolved ``--device``; an explicit one must agree with ``--accelerator``.
    """
    table = dict(user.get("distributed") or {})
    base = dict((stored or {}).get("distributed") or {})
    for key, value in table.items():
        _check_value(key, value)
    chosen = {key: _pick(flags.get(key), table.get(key), base.get(key)) for key in KEYS}
    explicit = _pick(flags.get("device"), user.get("device"))
    if not (isinstance(explicit, str) and _DEVICE.match(explicit)):
        explicit = None  # none given, or not a device at all (the config check says so)
    accelerator = chosen["accelerator"]
    if accelerator == "auto":
        accelerator = "gpu" if _cuda_devices() else "cpu"
    devices, nodes, strategy = chosen["devices"] or 1, chosen["num_nodes"] or 1, chosen["strategy"]

    if devices == 1 and nodes == 1 and strategy is None:  # one process: --accelerator only picks its device
        if accelerator is None:
            return None, device
        if explicit is not None and explicit.startswith("cuda") != (accelerator == "gpu"):
            raise click.UsageError(f"--accelerator {accelerator} and --device {explicit} disagree; give one of them")
        if accelerator == "gpu" and not _cuda_devices():
            raise click.UsageError(f"--accelerator gpu: {NO_CUDA}")
        if explicit is not None and explicit.startswith("cuda"):
            return None, explicit
        return None, "cuda" if accelerator == "gpu" else "cpu"

    if explicit is not None and explicit not in ("cpu", "cuda"):
        raise click.UsageError(f"--device {explicit} picks one GPU for one process; with --devices use "
                               "--accelerator gpu (CUDA_VISIBLE_DEVICES picks which GPUs)")
    asked = f"--accelerator {accelerator}" if accelerator is not None else f"--device {explicit}"
    if accelerator is None:
        accelerator = "gpu" if explicit == "cuda" else "cpu"
    elif explicit is not None and (explicit == "cuda") != (accelerator == "gpu"):
        raise click.UsageError(f"--accelerator {accelerator} and --device {explicit} disagree; give one of them")
    if accelerator == "gpu" and not _cuda_devices():
        raise click.UsageError(f"{asked}: {NO_CUDA}")
    if accelerator == "gpu" and devices > _cuda_devices():
        raise click.UsageError(f"--devices {devices}: only {_cuda_devices()} CUDA device(s) on this machine")
    for key, what in UNSUPPORTED_FIT_OPTIONS.items():
        if fit_options.get(key) is not None:
            raise click.UsageError(f"[fit] {key} ({what}) is not available with --devices/--strategy/--num-nodes; "
                                   "remove it, or train in one process")
    setup = {
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": nodes,
        "strategy": strategy or "ddp",
        "world_size": devices * nodes,
    }
    return setup, "cuda" if accelerator == "gpu" else "cpu"


def require_lightning() -> None:
    """Refuse (one line) a multi-process run when PyTorch Lightning cannot be imported."""
    try:
        import pyro_lag.lightning  # noqa: F401
    except ImportError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.UsageError(f"--devices/--strategy/--num-nodes train through PyTorch Lightning: {reason}") from None


def describe(setup: Optional[Mapping[str, Any]]) -> str:
    """``2 processes (ddp; 2 cpu devices x 1 node)``, or ``1 process``."""
    if not setup:
        return "1 process"
    nodes = setup["num_nodes"]
    return (f"{setup['world_size']} processes ({setup['strategy']}; {setup['devices']} {setup['accelerator']} "
            f"device{'s' if setup['devices'] != 1 else ''} x {nodes} node{'s' if nodes != 1 else ''})")


# ------------------------------------------------------------------------------ which process this is


def started_by_lightning() -> bool:
    """Whether Lightning started this process by running the command again (a ``ddp`` rank > 0 on its node)."""
    return bool(os.environ.get(RUN_DIR_ENV)) and "LOCAL_RANK" in os.environ


def writes_results() -> bool:
    """Whether this process is global rank 0, the one that writes the run directory.

    Not a process Lightning started, and rank 0 by every variable a launcher sets: ``RANK``
    (torchrun), ``SLURM_PROCID``, ``NODE_RANK`` / ``GROUP_RANK`` (other nodes), ``LOCAL_RANK``.
    """
    if started_by_lightning():
        return False
    for name in ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value and value != "0":
            return False
    return True


def launched_elsewhere() -> bool:
    """Whether a launcher outside Lightning started this command once per process (torchrun, ``srun`` with
    several tasks): then every process needs the same ``--out``."""
    tasks = os.environ.get("SLURM_NTASKS", "").strip()
    return "RANK" in os.environ or (tasks.isdigit() and int(tasks) > 1)


def shared_run_dir(out: Optional[str]) -> Optional[str]:
    """The run directory of a process that does not write it: the one rank 0 passed on, else ``--out``."""
    return os.environ.get(RUN_DIR_ENV) if started_by_lightning() else out
