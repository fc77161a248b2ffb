"""The LightningModule that trains a Pyro model/guide pair aggressively on any number of ranks."""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyro
import pyro.optim
import torch
from torch.utils.data import DataLoader

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pyro_lag.lightning needs PyTorch Lightning 2.x: pip install 'pyro-lag[lightning]'"
    ) from error

from pyro_lag.compat import attached_trainer
from pyro_lag.data.batches import SequenceBatches, examples_in, to_device, validation_batches
from pyro_lag.engine.collectives import gather_from_ranks, is_distributed, reduce_mi, seed_rank, sum_over_ranks
from pyro_lag.engine.distributed import DistributedAggressiveSVI
from pyro_lag.engine.losses import make_loss
from pyro_lag.estimators.active_units import ACTIVE_THRESHOLD, ActiveUnits
from pyro_lag.estimators.diagnostics import estimate_mutual_information, usage_totals
from pyro_lag.handlers.kl_weight import KLSchedule
from pyro_lag.io.checkpoint import (
    CheckpointError,
    capture_param_store,
    load_checkpoint,
    restore_param_store,
    restore_rng_state,
    restore_training_state,
)
from pyro_lag.lightning.checkpoints import RankZeroCheckpoints
from pyro_lag.lightning.epoch_batches import EpochBatches, EpochShardSampler, _unchanged
from pyro_lag.lightning.settings import LightningSettings
from pyro_lag.trace.guide_view import eval_mode
from pyro_lag.trace.sites import normalize_batch
from pyro_lag.training.callbacks import Callbacks
from pyro_lag.training.faults import FaultDiagnosis
from pyro_lag.training.lr_plateau import Plateau
from pyro_lag.training.user_programs import InnerUnits, make_optim, modules_of, training_programs

__all__ = ["AggressiveLightningModule"]

# The Pyro optimizers live in the SVI, not in configure_optimizers; Lightning's note about it is expected.
warnings.filterwarnings("ignore", message=r".*`LightningModule.configure_optimizers` returned `None`.*")


class AggressiveLightningModule(pl.LightningModule):
    """Trains a Pyro model/guide pair with aggressive inference-network training, on any number of ranks.

    :param model, guide: Pyro programs taking a batch's positional args; their
        ``nn.Module`` owners become submodules, so Lightning moves them to the device.
    :param train: a :class:`pyro_lag.data.BatchSource` or a sequence of batches; rank r
        trains on positions r, r + R, ... of each epoch (see :class:`EpochShardSampler`).
    :param valid: validation batches; rank r estimates MI on batches r, r + R, ...
    :param settings: :class:`~pyro_lag.lightning.settings.LightningSettings`.
    :param run_dir: where rank 0 writes ``last.pt`` every epoch and ``best.pt``; None: nowhere.
    :param resume_from: a ``last.pt`` to continue from (every rank reads it).
    :param fit_callbacks: :func:`pyro_lag.fit`-style callbacks, called on global rank 0
        only: ``on_batch_end(info)`` after every step (epoch, step, steps, loss,
        inner_steps, aggressive, kl_weight) and ``on_epoch_end(row)`` (or a plain callable)
        with each epoch's history row.

    Attributes filled while training (on every rank): ``history`` (one dict per epoch),
    ``step_log`` (per step: epoch, step, loss, inner_steps, aggressive), ``best_epoch``,
    ``stopped`` (why training ended early: the lr decayed ``max_decays`` times; else None).
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        train: Any,
        valid: Any,
        settings: LightningSettings | None = None,
        *,
        run_dir: str | Path | None = None,
        resume_from: str | Path | None = None,
        fit_callbacks: Sequence[Any] = (),
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.pyro_model, self.pyro_guide = model, guide
        self.programs = torch.nn.ModuleList(modules_of(model, guide))
        self.train_batches = EpochBatches(train)
        if len(self.train_batches) == 0:
            raise ValueError("train has no batch")
        self.valid_source = valid
        self.settings = settings or LightningSettings()
        self.checkpoints = RankZeroCheckpoints(run_dir)
        self.resume_from = None if resume_from is None else Path(resume_from)
        self.history: list[dict[str, Any]] = []
        self.step_log: list[dict[str, Any]] = []
        self.epochs_done = 0
        self.best_val_loss = math.inf
        self.best_epoch: int | None = None
        self.plateau = Plateau(float(self.settings.lr or 1e-3))
        self.seed = self.settings.seed if self.settings.seed is not None else 0
        self.stopped: str | None = None
        self.fit_callbacks = Callbacks(fit_callbacks)
        self._best_params: dict[str, Any] | None = None  # kept in memory for the lr decay only
        self.svi: DistributedAggressiveSVI | None = None
        self.schedule: KLSchedule | None = None
        self._first_epoch = 0
        self._valid_shard: list[Any] = []
        self._positions: list[int] = []
        self._epoch_acc = {"loss": 0.0, "steps": 0, "inner": 0, "aggressive_steps": 0, "started": 0.0}

    # ------------------------------------------------------------------ setup

    @property
    def world(self) -> int:
        return self.trainer.world_size if attached_trainer(self) is not None else 1

    def configure_optimizers(self) -> None:
        """None: the guide's and the model's Pyro optimizers live in the SVI."""
        return

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShardSampler(self.train_batches, self.world, self.global_rank, self._first_epoch)
        return DataLoader(self.train_batches, batch_size=None, sampler=sampler, collate_fn=_unchanged)

    def on_fit_start(self) -> None:
        """Build the SVI on this rank, agree on the parameters, resume if asked, seed this rank's draws."""
        state = self._read_resume_state()
        self._first_epoch = int(state["meta"]["epoch"]) if state is not None else 0
        self._positions = EpochShardSampler(self.train_batches, self.world, self.global_rank).positions()
        self._valid_shard = [
            to_device(b, self.device)
            for i, b in enumerate(validation_batches(self.valid_source)) if i % self.world == self.global_rank
        ]
        pyro.set_rng_seed(self.seed)  # parameters start from the same draws on every rank
        for module in self.programs:
            module.train()
        first = normalize_batch(to_device(self.train_batches[(self._first_epoch, self._positions[0])], self.device))
        self.svi = self._build_svi(first)
        self.svi.split_params(*first[0], **first[1])  # creates lazy parameters, gives them rank 0's values
        self._reseed_source()
        if state is not None:
            self._restore(state)
        else:
            seed_rank(self.seed)

    def _build_svi(self, first: tuple[tuple, dict]) -> DistributedAggressiveSVI:
        s = self.settings
        self.schedule = s.kl_schedule(len(self._positions))
        free_bits = s.kl_handlers(len(self._positions))[1]
        self.faults = FaultDiagnosis(len(self._positions), self.checkpoints.last)
        model_recorder, guide_recorder = self.faults.recorders()
        model, guide = training_programs(model_recorder(self.pyro_model), guide_recorder(self.pyro_guide),
                                         self.schedule, free_bits, s.per_example_loss)
        return DistributedAggressiveSVI(
            model, guide, self._make_optim(), make_loss(s.loss, self.pyro_model, self.pyro_guide, first),
            guide_batches=self._guide_batch,
            guide_optim=self._make_optim() if s.separate_guide_optim else None,
            max_inner_steps=s.inner_steps_limit, check_every=s.check_every, inner_rule=s.inner_rule,
            clip_norm=s.clip_norm, clip_scope=s.clip_scope, stop_rule=s.stop_rule,
            patience=s.patience, mi_noise=s.mi_noise, mi_every=None,
            inner_loss_normalizer=InnerUnits(self.train_batches.source, s.per_example_loss),
            aggressive=s.aggressive,
        )

    def _make_optim(self) -> Any:
        return make_optim(self.settings.optim, self.plateau.lr)

    def _renew_optims(self) -> None:
        """Fresh optimizers at the plateau's lr (the reference rebuilds them after each decay)."""
        assert self.svi is not None
        self.svi.optim = self._make_optim()
        if self.svi.guide_optim is not None:
            self.svi.guide_optim = self._make_optim()

    def optims(self) -> dict[str, Any]:
        assert self.svi is not None
        optims = {"model": self.svi.optim}
        if self.svi.guide_optim is not None:
            optims["guide"] = self.svi.guide_optim
        return optims

    def _guide_batch(self) -> Any:
        """A random training batch for an inner step, from this rank's own random stream."""
        source = self.train_batches.source
        if isinstance(source, SequenceBatches):  # a plain sequence: a batch of this rank's shard
            position = self._positions[int(torch.randint(len(self._positions), ()))]
            return to_device(self.train_batches[(0, position)], self.device)
        return to_device(source.sample(), self.device)

    def _reseed_source(self) -> None:
        """Give rank r > 0 its own stream for a batch source's ``sample()`` (rank 0 keeps the source's)."""
        source = self.train_batches.source
        from pyro_lag.data.batching import SAMPLE, BatchSource, torch_generator

        if self.global_rank == 0 or not isinstance(source, BatchSource):  # others draw from torch's RNG
            return

        state = source.state_dict()
        state["sample_rng"] = torch_generator(source.seed, SAMPLE, self.global_rank).get_state()
        source.load_state_dict(state)

    def source_state(self) -> Any:
        return self.train_batches.source.state_dict()

    # ------------------------------------------------------------------ resume

    def _read_resume_state(self) -> dict[str, Any] | None:
        """The checkpoint to resume from, read by every rank (the run directory must be shared)."""
        if self.resume_from is None:
            return None
        found = self.resume_from.is_file()
        if sum_over_ranks([float(found)])[0] not in (0.0, float(self.world)):
            raise CheckpointError(
                f"{self.resume_from} exists on some ranks only; resuming needs a run directory every node sees"
            )
        return load_checkpoint(self.resume_from) if found else None

    def _restore(self, state: dict[str, Any]) -> None:
        meta = state["meta"]
        if meta.get("plateau") is not None:
            self.plateau = Plateau(**meta["plateau"])
            self._renew_optims()  # at the lr the run had reached, before their state comes back
        restore_training_state(state, self.optims(), rng=False, device=self.device)
        assert self.svi is not None
        self.svi.load_state_dict(meta["svi"])
        self.history = [dict(row) for row in meta["history"]]
        self.epochs_done = int(meta["epoch"])
        self.best_val_loss = float(meta.get("best_val_loss", math.inf))
        self.best_epoch = meta.get("best_epoch")
        self.stopped = meta.get("stopped")
        best = self.checkpoints.best
        if self.settings.lr_decay is not None and best is not None and best.is_file():
            self._best_params = load_checkpoint(best)["params"]
        ranks = meta.get("ranks", [])
        if len(ranks) == self.world:  # the same number of ranks: continue every rank's streams exactly
            restore_rng_state(ranks[self.global_rank]["rng"])
            source = self.train_batches.source
            if ranks[self.global_rank].get("train_source") is not None:
                source.load_state_dict(ranks[self.global_rank]["train_source"])
        else:  # another number of ranks: fresh streams, still one per rank and epoch
            seed_rank(self.seed + 1000 * self.epochs_done)

    # ------------------------------------------------------------------ training

    def on_train_epoch_start(self) -> None:
        self._epoch_acc = {"loss": 0.0, "steps": 0, "inner": 0, "aggressive_steps": 0,
                           "started": time.perf_counter()}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One aggressive (or, later, joint) step of the SVI on this rank's batch."""
        assert self.svi is not None
        args, kwargs = normalize_batch(batch)
        epoch = self._first_epoch + self.current_epoch
        if self.schedule is not None:
            self.schedule.update(epoch, batch_idx)
        aggressive = self.svi.aggressive
        loss = self.faults.checked_step(self.svi, epoch, batch_idx, args, kwargs)
        self.step_log.append({
            "epoch": epoch + 1, "step": batch_idx + 1, "loss": loss,
            "inner_steps": self.svi.last_inner_steps, "aggressive": self.svi.aggressive,
        })
        if self.fit_callbacks and self.global_rank == 0:
            info = {**self.step_log[-1], "steps": len(self._positions),
                    "kl_weight": self.schedule.value if self.schedule is not None else 1.0}
            self.fit_callbacks.batch_end(info)
        acc = self._epoch_acc
        acc["loss"] += loss
        acc["steps"] += 1
        acc["inner"] += self.svi.last_inner_steps
        acc["aggressive_steps"] += int(aggressive)
        self._check_aggressive_budget()
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)

    def _check_aggressive_budget(self) -> None:
        """End aggressive mode once ``max_aggressive_steps`` model steps have been aggressive (every
        rank takes the same steps, so every rank decides alike)."""
        limit = self.settings.max_aggressive_steps
        if self.svi is None or not self.svi.aggressive or limit is None:
            return
        taken = sum(int(row.get("aggressive_steps", 0)) for row in self.history) + self._epoch_acc["aggressive_steps"]
        if taken >= limit:
            self.svi.stop_aggressive(f"max_aggressive_steps={limit} reached")

    def on_train_epoch_end(self) -> None:
        """Validate on every rank's shard, reduce, apply the stop rule, record the epoch, checkpoint."""
        assert self.svi is not None
        epoch = self._first_epoch + self.current_epoch
        val_loss, mi, usage = self._validate()
        if self.svi.aggressive:
            self.svi.observe_mi(mi.value, mi.se)  # the same reduced value on every rank
        limit = self.settings.max_aggressive_epochs
        if self.svi.aggressive and limit is not None and epoch + 1 >= limit:
            self.svi.stop_aggressive(f"max_aggressive_epochs={limit} reached")
        acc = self._epoch_acc
        train_loss, steps, inner = sum_over_ranks([acc["loss"], acc["steps"], acc["inner"]])
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss / max(steps, 1),
            "val_loss": val_loss,
            "elbo": -val_loss,
            "recon": usage["recon"],
            "kl": usage["kl"],
            "mi": mi.value,
            "mi_se": mi.se,
            "mi_points": mi.points,
            "au": usage["au"],
            "aggressive": acc["aggressive_steps"] > 0,  # the epoch had aggressive steps, as in fit
            "inner_steps": inner / max(steps, 1),
            "aggressive_steps": acc["aggressive_steps"],
            "kl_weight": self.schedule.value if self.schedule is not None else 1.0,
            "lr": self.plateau.lr,
            "ranks": self.world,
        }
        self.epochs_done = epoch + 1
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch = val_loss, epoch + 1
            self.checkpoints.write_best(self, val_loss)
            if self.settings.lr_decay is not None:
                self._best_params = capture_param_store()
        row["decayed"] = self._decay_on_plateau(epoch, val_loss)
        row["wall_time"] = time.perf_counter() - acc["started"]
        self.history.append(row)
        # the same on every rank already; sync_dist averages equal numbers (and keeps Lightning quiet)
        self.log_dict({k: float(row[k]) for k in ("val_loss", "mi", "inner_steps")}, prog_bar=True, sync_dist=True)
        if self.plateau.exhausted(self.settings):  # the same decision on every rank
            self.stopped = f"learning rate decayed {self.settings.max_decays} times"
            self.trainer.should_stop = True
        self.checkpoints.write_last(self)
        if self.global_rank == 0:
            self.fit_callbacks.epoch_end(row)

    def _decay_on_plateau(self, epoch: int, val_loss: float) -> bool:
        """The reference's decay: on a plateau, every rank reloads the best parameters and gets new
        optimizers at the decayed lr (see :class:`~pyro_lag.lightning.settings.LightningSettings`)."""
        if not self.plateau.should_decay(self.settings, epoch, val_loss):
            return False
        if self._best_params is not None:
            restore_param_store(self._best_params)
        self._renew_optims()
        return True

    def _validate(self) -> tuple[float, Any, dict[str, Any]]:
        """Negative ELBO per data point, MI, and recon, KL and active units, each over all ranks'
        validation shards (AU from every shard's posterior-mean moments, merged exactly)."""
        assert self.svi is not None
        total, points = 0.0, 0.0
        with torch.no_grad(), eval_mode(self.pyro_model, self.pyro_guide):
            for batch in self._valid_shard:  # the plain ELBO of the raw programs: no KL weight, no scaling
                args, kwargs = normalize_batch(batch)
                total += float(self.svi.loss(self.pyro_model, self.pyro_guide, *args, **kwargs))
                points += examples_in(args, kwargs)
        local = None
        if self._valid_shard:
            local = estimate_mutual_information(
                self.pyro_guide, self._valid_shard, model=self.pyro_model, num_samples=self.settings.mi_samples
            )
        sums, units = usage_totals(self.pyro_model, self.pyro_guide, self._valid_shard)
        total, points, recon, kl, usage_points = sum_over_ranks(
            [total, points, sums["recon"], sums["kl"], sums["points"]]
        )
        merged = ActiveUnits()
        for state in gather_from_ranks(units.state()):
            merged.merge(state)
        usage = {
            "recon": recon / max(usage_points, 1.0), "kl": kl / max(usage_points, 1.0),
            "au": int((merged.variance() >= ACTIVE_THRESHOLD).sum()) if merged.points >= 2 else None,
        }
        return total / max(points, 1.0), reduce_mi(local), usage

    def on_fit_end(self) -> None:
        """Wait until rank 0 has written its last checkpoint, so every rank can read the result."""
        if is_distributed():
            self.trainer.strategy.barrier("pyro_lag_fit_end")
