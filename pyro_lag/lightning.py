"""Multi-process, multi-GPU and multi-node aggressive training through PyTorch Lightning.

Lightning starts the processes, sets up ``torch.distributed``, places each rank on its
device and drives the epochs; everything the aggressive method needs per step comes
from :class:`~pyro_lag.distributed.DistributedAggressiveSVI`, so the algorithm is the
same code as in single-process training:

    >>> from pyro_lag.lightning import fit_lightning
    >>> result = fit_lightning(model, guide, train, valid, epochs=20,
    ...                        accelerator="gpu", devices=4, strategy="ddp", run_dir="runs/vae")

Pieces, for users who build their own ``Trainer``:

- :class:`AggressiveLightningModule` trains any Pyro model/guide pair. It uses manual
  optimization: ``training_step`` calls the SVI's ``step``, which runs the inner
  guide-only loop and the model step with separate Pyro optimizers for guide and model
  (and clipping). At the end of every epoch each rank estimates MI on its own
  validation shard, the estimates are reduced, and the stop rule sees the same number
  on every rank. Rank 0 writes ``last.pt`` (and ``best.pt``) atomically.
- :class:`EpochShardSampler` hands each rank the same number of batches per epoch.
- :class:`PyroDDPStrategy` is Lightning's DDP strategy without the
  ``DistributedDataParallel`` wrapper: gradients are averaged by the SVI, and Pyro
  programs whose parameters live only in the param store need no ``nn.Module``.

Install the extra: ``pip install 'pyro-lag[lightning]'``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.optim
import pyro.util
import torch
from pyro import poutine
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pyro_lag.lightning needs PyTorch Lightning 2.x: pip install 'pyro-lag[lightning]'"
    ) from error

from .checkpoint import (
    CheckpointError,
    capture_param_store,
    capture_rng_state,
    capture_training_state,
    load_checkpoint,
    restore_param_store,
    restore_rng_state,
    restore_training_state,
    save_checkpoint,
)
from .diagnostics import estimate_mutual_information, eval_mode
from .distributed import DistributedAggressiveSVI, is_distributed, reduce_mi, seed_rank, sum_over_ranks
from .handlers import FreeBits, KLSchedule, KLWeight, beta
from .inner_loop import examples_in
from .losses import make_loss
from .sites import normalize_batch

__all__ = [
    "AggressiveLightningModule",
    "EpochBatches",
    "EpochShardSampler",
    "LightningFitResult",
    "LightningSettings",
    "PyroDDPStrategy",
    "fit_lightning",
]

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"

# The Pyro optimizers live in the SVI, not in configure_optimizers; Lightning's note about it is expected.
warnings.filterwarnings("ignore", message=r".*`LightningModule.configure_optimizers` returned `None`.*")


# --------------------------------------------------------------------------- settings


@dataclass
class LightningSettings:
    """How to train: the same knobs as :func:`pyro_lag.fit` where they exist there.

    :param optim: ``"adam"``, ``"sgd"`` or ``lr -> PyroOptim`` (a module-level function
        when processes are spawned: it is pickled).
    :param separate_guide_optim: guide and model get optimizers of their own (the paper).
    :param loss: ``"exact"`` (closed-form KL, TraceMeanField_ELBO), ``"sampled"`` or an ELBO.
    :param kl_weight: None, a constant, a :class:`~pyro_lag.handlers.KLSchedule`, or a
        factory ``steps_per_epoch -> KLSchedule`` such as
        ``functools.partial(pyro_lag.handlers.linear_annealing, 0.1, 10)``; steps per epoch
        are those of one rank.
    :param free_bits: nats per latent dimension below which the KL is not penalised (None: off).
    :param aggressive: train aggressively until the stop rule ends it (False: plain SVI).
    :param mi_samples: latent draws per validation point for the MI estimate.
    :param per_example_loss: scale the loss by 1/batch size, as :func:`pyro_lag.fit` does.
    :param seed: parameters are initialised with ``seed`` on every rank; rank r then draws
        its samples with ``seed + r``.
    """

    optim: str | Callable[[float], Any] = "adam"
    lr: float = 1e-3
    separate_guide_optim: bool = True
    loss: Any = "exact"
    clip_norm: float | None = 5.0
    clip_scope: str = "joint-exact"
    stop_rule: str = "patience"
    patience: int = 5
    mi_noise: float = 2.0
    mi_samples: int = 4
    max_inner_steps: int = 100
    check_every: int = 15
    max_aggressive_epochs: int | None = None
    aggressive: bool = True
    kl_weight: Any = None
    free_bits: float | None = None
    per_example_loss: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.optim, str) and self.optim not in ("adam", "sgd"):
            raise ValueError(f"optim must be 'adam', 'sgd' or a callable lr -> PyroOptim, got {self.optim!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.mi_samples < 1:
            raise ValueError(f"mi_samples must be a positive integer, got {self.mi_samples!r}")
        if self.max_aggressive_epochs is not None and self.max_aggressive_epochs < 1:
            raise ValueError(f"max_aggressive_epochs must be a positive integer or None, got {self.max_aggressive_epochs!r}")

    @classmethod
    def for_kind(cls, kind: str | None, **overrides: Any) -> LightningSettings:
        """The reference's defaults for ``kind`` (as :func:`pyro_lag.fit` picks them), then ``overrides``.

        ``"text"``: SGD at lr 1.0 and the noise-aware ``drop`` stop rule (patience 2);
        ``"image"`` or None: Adam at lr 1e-3 and the ``patience`` rule (patience 5).
        """
        if kind not in (None, "text", "image"):
            raise ValueError(f"kind must be 'text' or 'image', got {kind!r}")
        if kind == "text":
            defaults: dict[str, Any] = {"optim": "sgd", "lr": 1.0, "stop_rule": "drop", "patience": 2}
        else:
            defaults = {"optim": "adam", "lr": 1e-3, "stop_rule": "patience", "patience": 5}
        return cls(**{**defaults, **overrides})

    def record(self) -> dict[str, Any]:
        """The settings as plain data (callables by name), for checkpoints and resume checks."""
        return {
            f.name: _describe(getattr(self, f.name)) for f in dataclasses.fields(self)
        }


def _describe(value: Any) -> Any:
    """A setting as plain data that is the same in every run: no memory addresses."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, functools.partial):
        return f"{_describe(value.func)}{value.args!r}{value.keywords or ''}"
    if hasattr(value, "__qualname__"):  # a function or class
        return f"{value.__module__}.{value.__qualname__}"
    if type(value).__repr__ is not object.__repr__:  # e.g. KL schedules: linear_annealing(...)
        return repr(value)
    return type(value).__name__  # e.g. an ELBO instance


# --------------------------------------------------------------------------- data


def _unchanged(batch: Any) -> Any:
    """The DataLoader's collate function: batches come ready-made."""
    return batch


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class EpochBatches(Dataset):
    """The training batches, addressed by ``(epoch, position)``.

    A :class:`pyro_lag.data.BatchSource` (shuffled and binarised per epoch) gives batch
    ``position`` of ``epoch``; a sequence of batches gives its item ``position`` in
    every epoch (as :func:`pyro_lag.fit` iterates it).
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self._by_epoch = hasattr(source, "iter_from")
        self._items = None if self._by_epoch or hasattr(source, "__getitem__") else list(source)

    def __len__(self) -> int:
        return len(self.source) if self._items is None else len(self._items)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, position = key
        if self._by_epoch:
            return next(iter(self.source.iter_from(epoch, position)))
        items = self.source if self._items is None else self._items
        return items[position]


class EpochShardSampler(DistributedSampler):
    """Rank ``rank``'s share of each epoch's batches, as ``(epoch, position)`` keys.

    Positions ``rank, rank + R, rank + 2R, ...`` of the epoch, wrapping around so that
    every rank gets ``ceil(batches / R)``: equal step counts, so no rank waits in a
    collective that another rank never enters. Lightning calls ``set_epoch`` before each
    epoch; ``first_epoch`` shifts it when a run resumes. Being a ``DistributedSampler``,
    it is never wrapped by Lightning's own.
    """

    def __init__(self, dataset: EpochBatches, num_replicas: int, rank: int, first_epoch: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.first_epoch = first_epoch

    def positions(self) -> list[int]:
        n = len(self.dataset)
        return [(self.rank + k * self.num_replicas) % n for k in range(self.num_samples)]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.first_epoch + self.epoch
        return iter([(epoch, p) for p in self.positions()])

    def __len__(self) -> int:
        return self.num_samples


def _eval_batches(source: Any) -> list[Any]:
    """The validation batches, the same at every epoch (epoch 0 of a batch source)."""
    if hasattr(source, "iter_from"):
        return list(source.iter_from(0, 0))
    return list(source)


def _per_example(fn: Callable) -> Callable:
    """Scale a program's log-densities by 1/batch size (the reference averages its loss over the batch)."""

    def scaled(*args: Any, **kwargs: Any) -> Any:
        with poutine.scale(scale=1.0 / examples_in(args, kwargs)):
            return fn(*args, **kwargs)

    return scaled


def _modules_of(*fns: Callable) -> list[torch.nn.Module]:
    """The torch modules behind callables (modules themselves or their bound methods)."""
    found: list[torch.nn.Module] = []
    for fn in fns:
        owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module) and all(owner is not m for m in found):
            found.append(owner)
    return found


# --------------------------------------------------------------------------- checkpoints


class _RankZeroCheckpoints:
    """``last.pt`` and ``best.pt`` in a run directory, written by global rank 0 only, atomically.

    Every rank contributes its own random state and data-source state to ``last.pt`` (one
    gather), so a resumed run with the same number of ranks continues each rank's streams.
    """

    def __init__(self, run_dir: str | Path | None) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)

    @property
    def last(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / LAST_CHECKPOINT

    @property
    def best(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / BEST_CHECKPOINT

    def write_last(self, module: AggressiveLightningModule) -> None:
        own = {"rng": capture_rng_state(), "train_source": module.source_state()}
        ranks = _gather(own)
        if self.last is None or module.global_rank != 0:
            return
        meta = {
            "config": module.settings.record(),
            "epoch": module.epochs_done,
            "history": module.history,
            "svi": _plain(module.svi.state_dict()),
            "world_size": len(ranks),
            "ranks": ranks,
            "best_val_loss": module.best_val_loss,
        }
        save_checkpoint(self.last, capture_training_state(module.optims(), meta))

    def write_best(self, module: AggressiveLightningModule, val_loss: float) -> None:
        if self.best is None or module.global_rank != 0:
            return
        meta = {"epoch": module.epochs_done, "val_loss": val_loss}
        save_checkpoint(self.best, {"params": capture_param_store(), "meta": meta})


def _gather(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.dim() > 0 else value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- the module


class AggressiveLightningModule(pl.LightningModule):
    """Trains a Pyro model/guide pair with aggressive inference-network training, on any number of ranks.

    :param model, guide: Pyro programs taking a batch's positional args; their
        ``nn.Module`` owners become submodules, so Lightning moves them to the device.
    :param train: a :class:`pyro_lag.data.BatchSource` or a sequence of batches; rank r
        trains on positions r, r + R, ... of each epoch (see :class:`EpochShardSampler`).
    :param valid: validation batches; rank r estimates MI on batches r, r + R, ...
    :param settings: :class:`LightningSettings`.
    :param run_dir: where rank 0 writes ``last.pt`` every epoch and ``best.pt``; None: nowhere.
    :param resume_from: a ``last.pt`` to continue from (every rank reads it).

    Attributes filled while training (on every rank): ``history`` (one dict per epoch),
    ``step_log`` (per step: epoch, step, loss, inner_steps, aggressive).
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
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.pyro_model, self.pyro_guide = model, guide
        self.programs = torch.nn.ModuleList(_modules_of(model, guide))
        self.train_batches = EpochBatches(train)
        if len(self.train_batches) == 0:
            raise ValueError("train has no batch")
        self.valid_source = valid
        self.settings = settings or LightningSettings()
        self.checkpoints = _RankZeroCheckpoints(run_dir)
        self.resume_from = None if resume_from is None else Path(resume_from)
        self.history: list[dict[str, Any]] = []
        self.step_log: list[dict[str, Any]] = []
        self.epochs_done = 0
        self.best_val_loss = math.inf
        self.svi: DistributedAggressiveSVI | None = None
        self.schedule: KLSchedule | None = None
        self._first_epoch = 0
        self._valid_shard: list[Any] = []
        self._positions: list[int] = []
        self._epoch_acc = {"loss": 0.0, "steps": 0, "inner": 0, "started": 0.0}

    # ------------------------------------------------------------------ setup

    @property
    def world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def configure_optimizers(self) -> None:
        """None: the guide's and the model's Pyro optimizers live in the SVI."""
        return

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShardSampler(self.train_batches, self.world, self.global_rank, self._first_epoch)
        return DataLoader(self.train_batches, batch_size=None, sampler=sampler, collate_fn=_unchanged)

    def on_fit_start(self) -> None:
        """Build the SVI on this rank, agree on the parameters, resume if asked, seed this rank's draws."""
        s = self.settings
        state = self._read_resume_state()
        self._first_epoch = int(state["meta"]["epoch"]) if state is not None else 0
        self._positions = EpochShardSampler(self.train_batches, self.world, self.global_rank).positions()
        self._valid_shard = [
            _to_device(b, self.device)
            for i, b in enumerate(_eval_batches(self.valid_source)) if i % self.world == self.global_rank
        ]
        pyro.set_rng_seed(s.seed)  # parameters start from the same draws on every rank
        for module in self.programs:
            module.train()
        first = normalize_batch(_to_device(self.train_batches[(self._first_epoch, self._positions[0])], self.device))
        self.svi = self._build_svi(first)
        self.svi.split_params(*first[0], **first[1])  # creates lazy parameters, gives them rank 0's values
        self._reseed_source()
        if state is not None:
            self._restore(state)
        else:
            seed_rank(s.seed)

    def _build_svi(self, first: tuple[tuple, dict]) -> DistributedAggressiveSVI:
        s = self.settings
        model, guide = self.pyro_model, self.pyro_guide
        self.schedule = self._kl_schedule(len(self._positions))
        if self.schedule is not None:
            weight = KLWeight(self.schedule)
            model, guide = weight(model), weight(guide)
        if s.free_bits is not None:
            free_bits = FreeBits(float(s.free_bits))
            model, guide = free_bits.model(model), free_bits.guide(guide)
        if s.per_example_loss:
            model, guide = _per_example(model), _per_example(guide)
        source = self.train_batches.source
        if s.per_example_loss and hasattr(source, "normalizer"):
            normalizer = _PerExampleUnits(source)
        elif s.per_example_loss:
            normalizer = _one_unit
        else:
            normalizer = None
        return DistributedAggressiveSVI(
            model, guide, self._make_optim(), make_loss(s.loss, self.pyro_model, self.pyro_guide, first),
            guide_batches=self._guide_batch,
            guide_optim=self._make_optim() if s.separate_guide_optim else None,
            max_inner_steps=s.max_inner_steps, check_every=s.check_every,
            clip_norm=s.clip_norm, clip_scope=s.clip_scope, stop_rule=s.stop_rule,
            patience=s.patience, mi_noise=s.mi_noise, mi_every=None,
            inner_loss_normalizer=normalizer, aggressive=s.aggressive,
        )

    def _kl_schedule(self, steps_per_epoch: int) -> KLSchedule | None:
        weight = self.settings.kl_weight
        if weight is None or isinstance(weight, KLSchedule):
            return weight
        if isinstance(weight, (int, float)):
            return beta(float(weight))
        return weight(steps_per_epoch)

    def _make_optim(self) -> Any:
        optim, lr = self.settings.optim, self.settings.lr
        if callable(optim):
            return optim(lr)
        return pyro.optim.SGD({"lr": lr}) if optim == "sgd" else pyro.optim.Adam({"lr": lr})

    def optims(self) -> dict[str, Any]:
        assert self.svi is not None
        optims = {"model": self.svi.optim}
        if self.svi.guide_optim is not None:
            optims["guide"] = self.svi.guide_optim
        return optims

    def _guide_batch(self) -> Any:
        """A random training batch for an inner step, from this rank's own random stream."""
        source = self.train_batches.source
        if hasattr(source, "sample"):
            return _to_device(source.sample(), self.device)
        position = self._positions[int(torch.randint(len(self._positions), ()))]
        return _to_device(self.train_batches[(0, position)], self.device)

    def _reseed_source(self) -> None:
        """Give rank r > 0 its own stream for a batch source's ``sample()`` (rank 0 keeps the source's)."""
        source = self.train_batches.source
        if self.global_rank == 0 or not (hasattr(source, "sample") and hasattr(source, "load_state_dict")):
            return
        from .data.batching import SAMPLE, torch_generator

        state = source.state_dict()
        state["sample_rng"] = torch_generator(source.seed, SAMPLE, self.global_rank).get_state()
        source.load_state_dict(state)

    def source_state(self) -> Any:
        source = self.train_batches.source
        return source.state_dict() if hasattr(source, "state_dict") else None

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
        restore_training_state(state, self.optims(), rng=False, device=self.device)
        assert self.svi is not None
        self.svi.load_state_dict(meta["svi"])
        self.history = [dict(row) for row in meta["history"]]
        self.epochs_done = int(meta["epoch"])
        self.best_val_loss = float(meta.get("best_val_loss", math.inf))
        ranks = meta.get("ranks", [])
        if len(ranks) == self.world:  # the same number of ranks: continue every rank's streams exactly
            restore_rng_state(ranks[self.global_rank]["rng"])
            source = self.train_batches.source
            if ranks[self.global_rank].get("train_source") is not None and hasattr(source, "load_state_dict"):
                source.load_state_dict(ranks[self.global_rank]["train_source"])
        else:  # another number of ranks: fresh streams, still one per rank and epoch
            seed_rank(self.settings.seed + 1000 * self.epochs_done)

    # ------------------------------------------------------------------ training

    def on_train_epoch_start(self) -> None:
        self._epoch_acc = {"loss": 0.0, "steps": 0, "inner": 0, "started": time.perf_counter()}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One aggressive (or, later, joint) step of the SVI on this rank's batch."""
        assert self.svi is not None
        args, kwargs = normalize_batch(batch)
        epoch = self._first_epoch + self.current_epoch
        if self.schedule is not None:
            self.schedule.update(epoch, batch_idx)
        loss = float(self.svi.step(*args, **kwargs))
        if not math.isfinite(loss):
            from .training import TrainingDivergedError

            raise TrainingDivergedError(
                f"non-finite loss ({loss}) on rank {self.global_rank} at epoch {epoch + 1}, step {batch_idx + 1}"
            )
        self.step_log.append({
            "epoch": epoch + 1, "step": batch_idx + 1, "loss": loss,
            "inner_steps": self.svi.last_inner_steps, "aggressive": self.svi.aggressive,
        })
        acc = self._epoch_acc
        acc["loss"] += loss
        acc["steps"] += 1
        acc["inner"] += self.svi.last_inner_steps
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)

    def on_train_epoch_end(self) -> None:
        """Validate on every rank's shard, reduce, apply the stop rule, record the epoch, checkpoint."""
        assert self.svi is not None
        epoch = self._first_epoch + self.current_epoch
        aggressive = self.svi.aggressive
        val_loss, mi = self._validate()
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
            "mi": mi.value,
            "mi_se": mi.se,
            "mi_points": mi.points,
            "aggressive": aggressive,
            "inner_steps": inner / max(steps, 1),
            "kl_weight": self.schedule.value if self.schedule is not None else 1.0,
            "ranks": self.world,
            "wall_time": time.perf_counter() - acc["started"],
        }
        self.history.append(row)
        self.epochs_done = epoch + 1
        # the same on every rank already; sync_dist averages equal numbers (and keeps Lightning quiet)
        self.log_dict({k: float(row[k]) for k in ("val_loss", "mi", "inner_steps")}, prog_bar=True, sync_dist=True)
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.checkpoints.write_best(self, val_loss)
        self.checkpoints.write_last(self)

    def _validate(self) -> tuple[float, Any]:
        """Negative ELBO per data point and MI, each over all ranks' validation shards."""
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
        total, points = sum_over_ranks([total, points])
        return total / max(points, 1.0), reduce_mi(local)

    def on_fit_end(self) -> None:
        """Wait until rank 0 has written its last checkpoint, so every rank can read the result."""
        if is_distributed():
            self.trainer.strategy.barrier("pyro_lag_fit_end")


class _PerExampleUnits:
    """Inner-loop units per example of a batch (tokens per sentence for text), for a per-example loss."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __call__(self, args: tuple, kwargs: dict) -> float:
        return float(self.source.normalizer(args)) / examples_in(args, kwargs)


def _one_unit(args: tuple, kwargs: dict) -> float:
    return 1.0


# --------------------------------------------------------------------------- strategy


class PyroDDPStrategy(DDPStrategy):
    """Lightning's DDP (process launch, process group, device placement) without the DDP wrapper.

    :class:`~pyro_lag.distributed.DistributedAggressiveSVI` averages every gradient
    itself, after each of its backward passes; a ``DistributedDataParallel`` wrapper
    would only add buffers, and refuses programs whose parameters are all in Pyro's
    param store.
    """

    def configure_ddp(self) -> None:
        """Keep the LightningModule unwrapped."""


_SPAWN_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}


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
        if strategy in _SPAWN_METHODS:
            return PyroDDPStrategy(start_method=_SPAWN_METHODS[strategy])
        if strategy == "auto" and (num_nodes > 1 or _num_devices(accelerator, devices) > 1):
            return PyroDDPStrategy()
    return strategy


# --------------------------------------------------------------------------- fit


@dataclass
class LightningFitResult:
    """What :func:`fit_lightning` returns: per-epoch history (reduced over ranks), whether aggressive
    mode is still on and why it ended, where the checkpoints are, the number of ranks, and the
    global rank of this process (under ``strategy="ddp"`` every rank's process returns one: write
    reports where ``rank == 0``)."""

    history: list[dict[str, Any]]
    aggressive: bool
    stop_reason: str | None
    run_dir: Path | None
    world_size: int
    rank: int = 0
    config: dict[str, Any] = field(default_factory=dict)


def fit_lightning(
    model: Callable,
    guide: Callable,
    train: Any,
    valid: Any,
    *,
    epochs: int = 10,
    accelerator: str = "auto",
    devices: Any = "auto",
    strategy: Any = "auto",
    num_nodes: int = 1,
    run_dir: str | Path | None = None,
    resume: bool = False,
    settings: LightningSettings | None = None,
    callbacks: Sequence[pl.Callback] = (),
    trainer_options: dict[str, Any] | None = None,
    **setting_overrides: Any,
) -> LightningFitResult:
    """Train ``model``/``guide`` with aggressive inference on one or many processes, through Lightning.

    :param train, valid: a :class:`pyro_lag.data.BatchSource` or a sequence of batches
        (each a tuple of positional args); each rank takes every R-th batch.
    :param accelerator, devices, strategy, num_nodes: as ``lightning.pytorch.Trainer``'s;
        the DDP strategies (``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``
        and ``"auto"`` with several devices) run as :class:`PyroDDPStrategy`.
    :param run_dir: where rank 0 writes ``last.pt`` each epoch and ``best.pt``; with
        ``resume=True`` training continues from ``last.pt`` (same settings required). Without
        it a temporary directory carries the result back from spawned processes.
    :param settings: :class:`LightningSettings`, or pass its fields as keyword arguments.
    :param trainer_options: further ``Trainer`` arguments (``enable_progress_bar``, ``logger``, ...).

    The param store is cleared first, as :func:`pyro_lag.fit` does; afterwards it holds the
    trained parameters (rank 0's, which all ranks share).
    """
    if settings is not None and setting_overrides:
        raise ValueError("pass either settings or its fields as keyword arguments, not both")
    settings = settings or LightningSettings(**setting_overrides)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
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
            _check_resumable(meta.get("config", {}), settings.record(), run_path)
            done = int(meta["epoch"])
        if done < epochs:
            pyro.clear_param_store()
            module = AggressiveLightningModule(
                model, guide, train, valid, settings, run_dir=run_path, resume_from=last if done else None
            )
            options = {
                "logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                "num_sanity_val_steps": 0, "use_distributed_sampler": False,
            }
            options.update(trainer_options or {})
            trainer = pl.Trainer(
                accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                strategy=resolve_strategy(strategy, accelerator, devices, num_nodes),
                max_epochs=epochs - done, callbacks=list(callbacks), **options,
            )
            trainer.fit(module)
            if module.history:  # trained in this process (one device, or a rank of "ddp"): read it here
                return _result_here(module, run_dir)
        if not last.exists():
            raise RuntimeError(
                "no result came back from the spawned processes: give run_dir on a filesystem every node shares"
            )
        return _result_from_checkpoint(model, guide, train, load_checkpoint(last), run_dir)


def _check_resumable(old: dict[str, Any], new: dict[str, Any], run_path: Path) -> None:
    for key, value in old.items():
        if new.get(key) != value:
            raise ValueError(
                f"run directory {run_path} was trained with {key}={value!r}, not {new.get(key)!r}; "
                "resume with the same settings or use another run directory"
            )


def _result_here(module: AggressiveLightningModule, run_dir: Any) -> LightningFitResult:
    assert module.svi is not None
    return LightningFitResult(
        history=[dict(row) for row in module.history],
        aggressive=module.svi.aggressive,
        stop_reason=module.svi.stop_reason,
        run_dir=None if run_dir is None else Path(run_dir),
        world_size=module.world,
        rank=module.global_rank,
        config=module.settings.record(),
    )


def _result_from_checkpoint(
    model: Callable, guide: Callable, train: Any, state: dict[str, Any], run_dir: Any
) -> LightningFitResult:
    """The result of spawned processes, from rank 0's final ``last.pt``; its parameters go into this
    process's param store (the programs run once first, so module parameters are registered)."""
    store = pyro.get_param_store()
    if any(name not in store for name in state["params"]["params"]):
        modules = _modules_of(model, guide)
        device = next((p.device for m in modules for p in m.parameters()), torch.device("cpu"))
        args, kwargs = normalize_batch(_to_device(EpochBatches(train)[(0, 0)], device))
        rng = pyro.util.get_rng_state()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            poutine.replay(model, trace=guide_trace)(*args, **kwargs)
        pyro.util.set_rng_state(rng)
    restore_param_store(state["params"])
    meta = state["meta"]
    svi = meta["svi"]
    return LightningFitResult(
        history=[dict(row) for row in meta["history"]],
        aggressive=bool(svi["aggressive"]),
        stop_reason=svi.get("stop_reason"),
        run_dir=None if run_dir is None else Path(run_dir),
        world_size=int(meta.get("world_size", 1)),
        config=dict(meta.get("config", {})),
    )
