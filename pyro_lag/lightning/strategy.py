"""Lightning's DDP without the ``DistributedDataParallel`` wrapper, and the strategy names that map onto it."""
from __future__ import annotations

from typing import Any

import torch

try:
    from lightning.pytorch.strategies import DDPStrategy
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pyro_lag.lightning needs PyTorch Lightning 2.x: pip install 'pyro-lag[lightning]'"
    ) from error

__all__ = ["DDP_STRATEGIES", "PyroDDPStrategy", "resolve_strategy"]


class PyroDDPStrategy(DDPStrategy):
    """Lightning's DDP (process launch, process group, device placement) without the DDP wrapper.

    :class:`~pyro_lag.engine.distributed.DistributedAggressiveSVI` averages every gradient
    itself, after each of its backward passes; a ``DistributedDataParallel`` wrapper
    would only add buffers, and refuses programs whose parameters are all in Pyro's
    param store.
    """

    def configure_ddp(self) -> None:
        """Keep the LightningModule unwrapped."""


DDP_STRATEGIES = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}
"""Strategy name -> how Lightning starts the other processes (``popen``: it runs the command again)."""

_SPAWN_METHODS = DDP_STRATEGIES  # the name used before the module was split


def _num_devices(accelerator: str, devices: Any) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:  # "0,1": these device indices
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def resolve_strategy(strategy: Any, accelerator: str = "auto", devices: Any = "auto", num_nodes: int = 1) -> Any:
    """The strategy to hand Lightning: DDP names (and ``"auto"`` with several processes) become
    :class:`PyroDDPStrategy` with the same start method; anything else is passed through."""
    if isinstance(strategy, str):
        if strategy in DDP_STRATEGIES:
            return PyroDDPStrategy(start_method=DDP_STRATEGIES[strategy])  # type: ignore[arg-type]  # one of the four
        if strategy == "auto" and (num_nodes > 1 or _num_devices(accelerator, devices) > 1):
            return PyroDDPStrategy()
    return strategy
