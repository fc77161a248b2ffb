"""The epoch loop: training steps, validation, end of aggressive mode, lr decay, checkpoints, test pass.

``fit`` runs every method of He et al. (2019) and its baselines on any Pyro model/guide pair
(see :class:`~pyro_lag.training.settings.FitSettings`); a guide with no latent trains as a plain
likelihood model. Settings, state, faults, data, lr decay and checkpoints have modules of their own.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyro
import pyro.optim
import torch

from pyro_lag.data.batches import as_batches, examples_in, to_device, validation_batches
from pyro_lag.engine.losses import make_loss
from pyro_lag.engine.svi import AggressiveSVI
from pyro_lag.estimators.decoder_only import latent_sites
from pyro_lag.estimators.diagnostics import quiet_mi_estimate
from pyro_lag.io.checkpoint import plain_data
from pyro_lag.trace.sites import normalize_batch
from pyro_lag.training.callbacks import Callbacks
from pyro_lag.training.checkpoints import LAST_CHECKPOINT, RunCheckpoints
from pyro_lag.training.evaluation import evaluate_pair, test_pass
from pyro_lag.training.faults import FaultDiagnosis, TrainingDivergedError
from pyro_lag.training.result import FitResult
from pyro_lag.training.settings import FitSettings
from pyro_lag.training.state import TrainingState
from pyro_lag.training.user_programs import InnerUnits, make_optim, modules_of, training_programs

__all__ = ["fit"]


class _Run:
    """One training run: the SVI object and its optimizers, the state, and the checkpoints."""

    def __init__(self, model: Callable, guide: Callable, train: Any, valid: Any, settings: FitSettings, *,
                 device: torch.device | None, run_path: Path | None, callbacks: Sequence[Any]) -> None:
        self.model, self.guide, self.settings, self.device = model, guide, settings, device
        self.train, self.valid = as_batches(train), valid
        self.callbacks = Callbacks(callbacks)
        self.steps_per_epoch = len(self.train)
        self.checkpoints = RunCheckpoints(run_path)
        self.state = TrainingState.start(float(settings.lr or 0.0))
        self.faults = FaultDiagnosis(self.steps_per_epoch, self.checkpoints.last)

        first = normalize_batch(to_device(next(self.train.iter_from(0, 0)), device))
        self.decoder_only = not latent_sites(guide, first)
        self.schedule, free_bits = (None, None) if self.decoder_only else settings.kl_handlers(self.steps_per_epoch)
        model_recorder, guide_recorder = self.faults.recorders()
        train_model, train_guide = training_programs(model_recorder(model), guide_recorder(guide), self.schedule, free_bits)
        self.svi = AggressiveSVI(
            train_model, train_guide, self._make_optim(), make_loss(settings.loss, model, guide, first),
            guide_batches=self._guide_batch, guide_optim=self._make_optim(),
            max_inner_steps=settings.inner_steps_limit, check_every=settings.check_every, inner_rule=settings.inner_rule,
            clip_norm=settings.clip_norm, clip_scope=settings.clip_scope, stop_rule=settings.stop_rule or "drop",
            patience=settings.patience or 2, mi_noise=settings.mi_noise, mi_every=None,
            inner_loss_normalizer=InnerUnits(self.train), aggressive=settings.aggressive and not self.decoder_only,
        )
        # Probe the guide/model parameter split now (it draws random numbers), so that an
        # uninterrupted run and a resumed one never probe at different moments.
        self.svi.split_params(*first[0], **first[1])

    def _make_optim(self) -> Any:
        return make_optim(self.settings.optim, self.state.lr)

    def _guide_batch(self) -> Any:
        """A random training batch for an aggressive inner step."""
        return to_device(self.train.sample(), self.device)

    def optims(self) -> dict[str, Any]:
        return {"model": self.svi.optim, "guide": self.svi.guide_optim}

    def renew_optims(self) -> None:
        """Fresh optimizers at the plateau's lr (the reference rebuilds them after each decay)."""
        self.svi.optim, self.svi.guide_optim = self._make_optim(), self._make_optim()

    def kl_weight(self) -> float:
        return self.schedule.value if self.schedule is not None else 1.0

    @property
    def config(self) -> dict[str, Any]:
        return {**self.settings.record(), "steps_per_epoch": self.steps_per_epoch, "decoder_only": self.decoder_only}

    # ------------------------------------------------------------------ checkpoints

    def restore(self) -> None:
        """Continue from ``last.pt``: parameters, optimizers, RNGs, data order, state."""
        def optims_for(meta: dict[str, Any]) -> dict[str, Any]:
            assert self.checkpoints.last is not None
            self.settings.check_resumable(meta.get("config", {}), self.checkpoints.last.parent,
                                          steps_per_epoch=self.steps_per_epoch, decoder_only=self.decoder_only)
            self.state.load_state_dict(meta["state"])
            self.renew_optims()
            return self.optims()

        meta = self.checkpoints.load_last(optims_for, self.device)
        self.svi.load_state_dict(meta["svi"])
        self.train.load_state_dict(meta["train_source"])

    def write_last(self) -> None:
        meta = {"config": self.config, "state": self.state.state_dict(), "svi": plain_data(self.svi.state_dict()),
                "train_source": self.train.state_dict()}
        self.checkpoints.save_last(self.optims(), meta, self.state.epoch)

    # ------------------------------------------------------------------ training

    def step(self, epoch: int, step: int, batch: Any) -> float:
        """One training step, refusing bad input and stopping on any non-finite number."""
        args, kwargs = normalize_batch(to_device(batch, self.device))
        if self.schedule is not None:
            self.schedule.update(epoch, step)
        aggressive = self.svi.aggressive
        loss_value = self.faults.checked_step(self.svi, epoch, step, args, kwargs)
        self.state.totals.add(loss_value, int(examples_in(args, kwargs)), self.svi.last_inner_steps, aggressive)
        return loss_value

    def train_epoch(self, epoch: int) -> None:
        """The epoch's remaining steps, from ``state.step``, with mid-epoch checkpoints."""
        every, totals = self.settings.checkpoint_every, self.state.totals
        started, start = time.perf_counter(), self.state.step
        for offset, batch in enumerate(self.train.iter_from(epoch, start)):
            step = start + offset
            loss_value = self.step(epoch, step, batch)
            if self.svi.aggressive and self.mi_check_due(step):
                self.check_mi()
            self.check_aggressive_budget()
            self.callbacks.batch_end({
                "epoch": epoch + 1, "step": step + 1, "steps": self.steps_per_epoch, "loss": loss_value,
                "inner_steps": self.svi.last_inner_steps, "aggressive": self.svi.aggressive,
                "kl_weight": self.kl_weight(),
            })
            if every and (step + 1) % every == 0 and step + 1 < self.steps_per_epoch:
                now = time.perf_counter()
                totals.time += now - started
                started = now
                self.state.step = step + 1
                self.write_last()
        self.faults.recorded.clear()
        totals.time += time.perf_counter() - started

    def check_aggressive_budget(self) -> None:
        """End aggressive mode once ``max_aggressive_steps`` model steps have been aggressive."""
        limit = self.settings.max_aggressive_steps
        if self.svi.aggressive and limit is not None and self.state.aggressive_steps >= limit:
            self.svi.stop_aggressive(f"max_aggressive_steps={limit} reached")

    def mi_check_due(self, step: int) -> bool:
        """Whether validation MI is checked after ``step``: ``mi_checks_per_epoch`` times an epoch, the
        last of them at the epoch's end (with the rest of the validation)."""
        every = max(self.steps_per_epoch // self.settings.mi_checks_per_epoch, 1)
        return (step + 1) % every == 0 and step + 1 <= self.steps_per_epoch - every

    def check_mi(self) -> None:
        """Estimate validation MI now (drawing nothing from the training streams) and apply the stop rule."""
        mi = quiet_mi_estimate(self.guide, validation_batches(self.valid), model=self.model,
                               num_samples=self.settings.mi_samples)
        self.svi.observe_mi(mi.value, mi.se)

    def evaluate(self, batches: Any) -> dict[str, Any]:
        return evaluate_pair(self.model, self.guide, batches, self.settings, decoder_only=self.decoder_only)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Validate, update aggressive mode, best parameters and lr; record and checkpoint the epoch."""
        s, state, totals = self.settings, self.state, self.state.totals
        started = time.perf_counter()
        metrics = self.evaluate(validation_batches(self.valid))
        mi, mi_se = metrics.get("mi"), metrics.get("mi_se")
        if self.svi.aggressive and mi is not None:
            self.svi.observe_mi(mi, mi_se)
        if self.svi.aggressive and s.max_aggressive_epochs is not None and epoch + 1 >= s.max_aggressive_epochs:
            self.svi.stop_aggressive(f"max_aggressive_epochs={s.max_aggressive_epochs} reached")
        val_loss = -float(metrics["elbo"])
        if not math.isfinite(val_loss):
            raise TrainingDivergedError(f"non-finite validation loss at epoch {epoch + 1}{self.faults.kept()}")
        if state.improves(val_loss):
            self.checkpoints.save_best(epoch, val_loss)
        lr_used = state.lr
        decayed = state.plateau.should_decay(s, epoch, val_loss)
        if decayed:  # the reference reloads the best parameters and starts new optimizers
            self.checkpoints.restore_best()
            self.renew_optims()
        row = {
            "epoch": epoch + 1, "train_loss": totals.mean_loss, "val_loss": val_loss,
            "elbo": float(metrics["elbo"]), "recon": float(metrics["recon"]), "kl": float(metrics["kl"]),
            "mi": None if mi is None else float(mi), "mi_se": None if mi_se is None else float(mi_se),
            "mi_points": metrics.get("mi_points"), "au": metrics.get("au"), "aggressive": totals.aggressive_steps > 0,
            "aggressive_steps": totals.aggressive_steps, "inner_steps": totals.inner_per_step,
            "kl_weight": self.kl_weight(), "lr": lr_used, "decayed": decayed,
            "wall_time": totals.time + time.perf_counter() - started, "ranks": 1,
        }
        state.history.append(row)
        state.next_epoch()
        if state.plateau.exhausted(s):
            state.stopped = f"learning rate decayed {s.max_decays} times"
        self.write_last()
        return row

    def run(self) -> None:
        while self.state.stopped is None and self.state.epoch < self.settings.epochs:
            epoch = self.state.epoch
            self.train_epoch(epoch)
            self.callbacks.epoch_end(self.end_epoch(epoch))


def fit(
    model: Callable,
    guide: Callable,
    train: Any,
    valid: Any,
    test: Any = None,
    settings: FitSettings | None = None,
    *,
    device: str | torch.device | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    test_progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> FitResult:
    """Train a model/guide pair with aggressive inference or a baseline; validate every epoch.

    :param model, guide: Pyro programs taking the positional args of a batch. Their
        ``torch.nn.Module`` owners (when they are bound methods) are moved to ``device``.
    :param train, valid, test: batch sources (:class:`pyro_lag.data.batches.Batches`, e.g.
        ``pyro_lag.data``'s) or sequences of batches, each batch a tuple of positional args
        (a bare tensor is one argument). Aggressive inner steps draw ``train.sample()``.
    :param settings: a :class:`~pyro_lag.training.settings.FitSettings`; or pass its fields as keyword
        ``options`` (``method``, ``epochs``, ``lr``, ...), which also override ``settings``.
        ``kind`` (default: the model owner's ``.kind``) picks the reference defaults.
    :param run_dir: where ``last.pt`` and ``best.pt`` go (atomically); ``resume=True``
        continues from ``last.pt`` exactly where it stopped, bitwise on CPU.
    :param callbacks: objects with ``on_epoch_end(row)`` and/or ``on_batch_end(info)``, or
        plain callables called with each epoch's history row.
    :param test_progress: ``f(done, total)`` called as the final test pass goes through its batches.

    The param store is cleared first, so build model and guide with the same seed for
    reproducible runs. The final test pass evaluates the best parameters, which stay in the
    param store afterwards.

    :raises TrainingDivergedError: on a NaN or infinite loss or parameter, naming the epoch,
        step and site; checkpoints written before it are kept.
    """
    unknown = sorted(set(options) - set(FitSettings.names()))
    if unknown:
        raise TypeError(f"fit() got an unexpected keyword argument '{unknown[0]}'")
    settings = (settings or FitSettings()).replace(**options) if options else (settings or FitSettings())
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir, the directory holding the checkpoint")
    try:
        if len(train) == 0:
            raise ValueError("train has no batch")
    except TypeError:
        raise ValueError("train must have a length (a batch source or a sequence of batches)") from None
    kind = settings.kind
    for module in modules_of(model, guide) if kind is None else ():
        kind = getattr(module, "kind", None) or kind
    settings = settings.resolved(kind)
    target = torch.device(device) if device is not None else None
    if target is not None and target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {target} was asked for but CUDA is not available")
    run_path = Path(run_dir) if run_dir is not None else None
    if run_path is not None and (run_path / LAST_CHECKPOINT).exists() and not resume:
        raise ValueError(f"run directory {run_path} already holds a training checkpoint; pass resume=True to continue it")

    pyro.clear_param_store()
    if settings.seed is not None:
        pyro.set_rng_seed(settings.seed)
    for module in modules_of(model, guide):
        if target is not None:
            module.to(target)
        module.train()
    run = _Run(model, guide, train, valid, settings, device=target, run_path=run_path, callbacks=callbacks)
    if resume and run.checkpoints.resumable():
        run.restore()
    run.run()

    run.checkpoints.restore_best()
    test_metrics = None
    if test is not None:
        test_metrics = test_pass(model, guide, test, settings, decoder_only=run.decoder_only, progress=test_progress)
    return FitResult(
        history=[dict(r) for r in run.state.history], test=test_metrics, best_epoch=run.state.best_epoch,
        best_val_loss=run.state.best_val_loss, stopped=run.state.stopped or f"completed {settings.epochs} epochs",
        decoder_only=run.decoder_only, run_dir=run_path, config=run.config,
        aggressive=run.svi.aggressive, stop_reason=run.svi.stop_reason,
    )
