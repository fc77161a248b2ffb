"""Multi-process, multi-GPU and multi-node aggressive training through PyTorch Lightning.

Lightning starts the processes, sets up ``torch.distributed``, places each rank on its
device and drives the epochs; everything the aggressive method needs per step comes
from :class:`~pyro_lag.engine.distributed.DistributedAggressiveSVI`, so the algorithm is the
same code as in single-process training:

    >>> from pyro_lag.lightning import fit_lightning
    >>> result = fit_lightning(model, guide, train, valid, epochs=20,  # doctest: +SKIP
    ...                        accelerator="gpu", devices=4, strategy="ddp", run_dir="runs/vae")

The pieces live in modules of their own (``lightning_settings``, ``lightning_data``,
``lightning_module``, ``lightning_checkpoints``, ``lightning_strategy``) and are all
importable from here. For users who build their own ``Trainer``:

- :class:`AggressiveLightningModule` trains any Pyro model/guide pair. It uses manual
  optimization: ``training_step`` calls the SVI's ``step``, which runs the inner
  guide-only loop and the model step with separate Pyro optimizers for guide and model
  (and clipping). At the end of every epoch each rank estimates MI on its own
  validation shard, the estimates are reduced, and the stop rule sees the same number
  on every rank; so does the reference's learning-rate decay on a plateau, when
  :class:`~pyro_lag.lightning.settings.LightningSettings` asks for it (``lr_decay``). Rank 0 writes ``last.pt``
  (and ``best.pt``) atomically.
- :class:`EpochShardSampler` hands each rank the same number of batches per epoch.
- :class:`PyroDDPStrategy` is Lightning's DDP strategy without the
  ``DistributedDataParallel`` wrapper: gradients are averaged by the SVI, and Pyro
  programs whose parameters live only in the param store need no ``nn.Module``.

Install the extra: ``pip install 'pyro-lag[lightning]'``.
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyro
import pyro.util
import torch
from pyro import poutine

from pyro_lag.compat import lightning_start_method
from pyro_lag.data.batches import to_device
from pyro_lag.io.checkpoint import load_checkpoint, restore_param_store
from pyro_lag.lightning.checkpoints import BEST_CHECKPOINT, LAST_CHECKPOINT
from pyro_lag.lightning.epoch_batches import EpochBatches, EpochShardSampler
from pyro_lag.lightning.module import AggressiveLightningModule, pl
from pyro_lag.lightning.settings import LightningSettings
from pyro_lag.lightning.strategy import DDP_STRATEGIES, PyroDDPStrategy, resolve_strategy
from pyro_lag.trace.sites import normalize_batch
from pyro_lag.training.evaluation import test_pass
from pyro_lag.training.result import FitResult
from pyro_lag.training.settings import FitSettings
from pyro_lag.training.user_programs import modules_of

__all__ = [
    "AggressiveLightningModule",
    "BEST_CHECKPOINT",
    "DDP_STRATEGIES",
    "EpochBatches",
    "EpochShardSampler",
    "LAST_CHECKPOINT",
    "LightningFitResult",
    "LightningSettings",
    "PyroDDPStrategy",
    "fit_lightning",
    "resolve_strategy",
]


LightningFitResult = FitResult
"""The name earlier versions gave ``fit_lightning``'s result: it is :class:`~pyro_lag.training.result.FitResult`."""


def fit_lightning(
    model: Callable,
    guide: Callable,
    train: Any,
    valid: Any,
    test: Any = None,
    *,
    epochs: int = 10,
    accelerator: str = "auto",
    devices: Any = "auto",
    strategy: Any = "auto",
    num_nodes: int = 1,
    run_dir: str | Path | None = None,
    resume: bool = False,
    settings: FitSettings | None = None,
    callbacks: Sequence[pl.Callback] = (),
    fit_callbacks: Sequence[Any] = (),
    trainer_options: dict[str, Any] | None = None,
    test_progress: Callable[[int, int], None] | None = None,
    **setting_overrides: Any,
) -> FitResult:
    """Train ``model``/``guide`` with aggressive inference on one or many processes, through Lightning.

    :param train, valid: a :class:`pyro_lag.data.BatchSource` or a sequence of batches
        (each a tuple of positional args); each rank takes every R-th batch.
    :param accelerator, devices, strategy, num_nodes: as ``lightning.pytorch.Trainer``'s;
        the DDP strategies (``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``
        and ``"auto"`` with several devices) run as :class:`PyroDDPStrategy`.
    :param run_dir: where rank 0 writes ``last.pt`` each epoch and ``best.pt``; with
        ``resume=True`` training continues from ``last.pt`` (same settings required). Without
        it a temporary directory carries the result back from spawned processes.
    :param settings: :class:`~pyro_lag.lightning.settings.LightningSettings` (a plain :class:`~pyro_lag.training.settings.FitSettings`
        is taken as ``fit`` resolves it), or pass its fields as keyword arguments.
    :param callbacks: Lightning callbacks (they run on every rank).
    :param fit_callbacks: :func:`pyro_lag.fit`-style callbacks (``on_batch_end(info)``,
        ``on_epoch_end(row)`` or plain callables with each epoch's row), run on global rank 0
        only; with ``ddp_spawn`` they are pickled into that rank's process.
    :param trainer_options: further ``Trainer`` arguments (``enable_progress_bar``, ``logger``, ...).
    :param test, test_progress: as :func:`pyro_lag.fit`'s: after training, global rank 0 evaluates the
        best parameters on ``test`` alone (:func:`~pyro_lag.training.evaluation.test_pass`).

    Returns a :class:`~pyro_lag.training.result.FitResult`, as :func:`pyro_lag.fit` does, with the
    same history keys; ``rank`` and ``world_size`` say which process returned it.

    The param store is cleared first, as :func:`pyro_lag.fit` does; afterwards it holds the
    trained parameters (rank 0's, which all ranks share).
    """
    if settings is not None and setting_overrides:
        raise ValueError("pass either settings or its fields as keyword arguments, not both")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if settings is None:
        settings = LightningSettings(**setting_overrides)
    elif not isinstance(settings, LightningSettings):
        settings = LightningSettings.from_fit(settings)
    settings = settings.replace(epochs=epochs)
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir, the directory holding last.pt")
    with tempfile.TemporaryDirectory(prefix="pyro_lag_lightning_") as scratch:
        run_path = Path(run_dir) if run_dir is not None else Path(scratch)
        last = run_path / LAST_CHECKPOINT
        done = 0
        if last.exists():
            if not resume:
                raise ValueError(f"{run_path} already holds a training checkpoint; pass resume=True to continue it")
            meta = load_checkpoint(last)["meta"]
            settings.check_resumable(meta.get("config", {}), run_path)
            done = epochs if meta.get("stopped") else int(meta["epoch"])
        if done < epochs:
            pyro.clear_param_store()
            module = AggressiveLightningModule(
                model, guide, train, valid, settings, run_dir=run_path, resume_from=last if done else None,
                fit_callbacks=fit_callbacks,
            )
            options: dict[str, Any] = {
                "logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                "num_sanity_val_steps": 0, "use_distributed_sampler": False,
            }
            options.update(trainer_options or {})
            trainer = pl.Trainer(
                accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                strategy=resolve_strategy(strategy, accelerator, devices, num_nodes),
                max_epochs=epochs - done, callbacks=list(callbacks), **options,
            )
            with _tensor_sharing_for(trainer.strategy):
                trainer.fit(module)
            if module.history:  # trained in this process (one device, or a rank of "ddp"): read it here
                return _with_test(_result_here(module, run_dir, epochs), model, guide, test, settings,
                                  run_path, test_progress)
        if not last.exists():
            raise RuntimeError(
                "no result came back from the spawned processes: give run_dir on a filesystem every node shares"
            )
        result = _result_from_checkpoint(model, guide, train, load_checkpoint(last), run_dir, epochs)
        return _with_test(result, model, guide, test, settings, run_path, test_progress)


def _with_test(result: FitResult, model: Callable, guide: Callable, test: Any, settings: FitSettings,
               run_path: Path, progress: Callable[[int, int], None] | None) -> FitResult:
    """The final test pass on global rank 0, with the best parameters (``best.pt``), as ``fit``'s."""
    if test is None or result.rank != 0:
        return result
    best = run_path / BEST_CHECKPOINT
    if best.is_file():
        restore_param_store(load_checkpoint(best)["params"])
    result.test = test_pass(model, guide, test, settings, progress=progress)
    return result


@contextlib.contextmanager
def _tensor_sharing_for(strategy: Any) -> Iterator[None]:
    """Spawned processes receive the module pickled; its tensors (batches that are views of one
    corpus tensor, say) go through shared memory. The default ``file_descriptor`` sharing passes
    one descriptor per storage, and a storage pickled twice (two views) passes the same one
    twice, which the spawn refuses ("bad value(s) in fds_to_keep"): share by file name meanwhile."""
    if lightning_start_method(strategy) != "spawn":
        yield
        return
    import torch.multiprocessing

    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)


def _result_here(module: AggressiveLightningModule, run_dir: Any, epochs: int) -> FitResult:
    assert module.svi is not None
    return FitResult(
        history=[dict(row) for row in module.history],
        test=None,
        aggressive=module.svi.aggressive,
        stop_reason=module.svi.stop_reason,
        run_dir=None if run_dir is None else Path(run_dir),
        world_size=module.world,
        rank=module.global_rank,
        config={**module.settings.record(), "world_size": module.world},
        best_epoch=module.best_epoch,
        best_val_loss=module.best_val_loss,
        stopped=module.stopped or f"completed {epochs} epochs",
        decoder_only=False,
    )


def _result_from_checkpoint(
    model: Callable, guide: Callable, train: Any, state: dict[str, Any], run_dir: Any, epochs: int
) -> FitResult:
    """The result of spawned processes, from rank 0's final ``last.pt``; its parameters go into this
    process's param store (the programs run once first, so module parameters are registered)."""
    store = pyro.get_param_store()
    if any(name not in store for name in state["params"]["params"]):
        modules = modules_of(model, guide)
        device = next((p.device for m in modules for p in m.parameters()), torch.device("cpu"))
        args, kwargs = normalize_batch(to_device(EpochBatches(train)[(0, 0)], device))
        rng = pyro.util.get_rng_state()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            poutine.replay(model, trace=guide_trace)(*args, **kwargs)
        pyro.util.set_rng_state(rng)
    restore_param_store(state["params"])
    meta = state["meta"]
    svi = meta["svi"]
    world = int(meta.get("world_size", 1))
    return FitResult(
        history=[dict(row) for row in meta["history"]],
        test=None,
        aggressive=bool(svi["aggressive"]),
        stop_reason=svi.get("stop_reason"),
        run_dir=None if run_dir is None else Path(run_dir),
        world_size=world,
        config={**meta.get("config", {}), "world_size": world},
        best_epoch=meta.get("best_epoch"),
        best_val_loss=float(meta.get("best_val_loss", float("inf"))),
        stopped=meta.get("stopped") or f"completed {epochs} epochs",
        decoder_only=False,
    )
