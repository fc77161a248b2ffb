"""Data-parallel AggressiveSVI: every rank takes the same steps and makes the same decisions.

In data-parallel training each process (rank) holds a copy of the parameters and
trains on its own shard of the data. Plain SGD only needs the gradients averaged.
The aggressive method also makes *decisions* from data: how many guide-only inner
steps to take, and when to leave aggressive mode. If each rank decided from its own
shard, one rank would take 12 inner steps while another took 30; their collective
calls would no longer pair up and the run would hang or silently diverge.

:class:`DistributedAggressiveSVI` is :class:`~pyro_lag.engine.svi.AggressiveSVI` with its
hooks filled in, so the algorithm itself is not copied:

- ``_reduce_grads``: after every backward pass, gradients are averaged over ranks
  (a parameter whose gradient is None on some ranks counts as zero there); a
  parameter seen for the first time takes rank 0's value, so lazily initialized
  parameters (AutoGuides) start equal everywhere.
- ``_reduce_inner_loss``: the inner loop's stop rule reads loss and count summed
  over ranks, so every rank stops after the same number of inner steps.
- ``_joint_step``: always goes through ``_loss_and_grads`` (plain ``SVI.step`` would
  skip the gradient hook).
- ``split_params``: the guide/model parameter split is agreed on by all ranks.
- MI for the stop rule: :meth:`~DistributedAggressiveSVI.observe_local_mi` takes the
  rank's own estimate and reduces it (size-weighted, see :func:`reduce_mi`);
  :meth:`~DistributedAggressiveSVI.observe_mi` refuses values that differ between
  ranks; the self-driven check reduces its estimates too.
- ``step``: before each step the ranks agree on the mode, so a ``stop_aggressive()``
  called on one rank only ends aggressive mode everywhere at the same step.

Random draws (latent samples, inner-step batches) should differ between ranks:
call :func:`seed_rank` once the process group is up. Every decision is made from
reduced numbers, which are bitwise equal on all ranks, so the ranks' parameters stay
bitwise equal too.

Without an initialized ``torch.distributed`` process group (or with one rank) the
class behaves exactly like :class:`~pyro_lag.engine.svi.AggressiveSVI`.

The collectives themselves (sums over ranks, the MI reduction, gradient averaging) are in
:mod:`pyro_lag.engine.collectives`, and importable from here.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from pyro_lag.engine.collectives import (
    RankMismatchError,
    _average,
    _broadcast,
    _check_same_tensors,
    _collective,
    _max_over_ranks,
    _same_on_all_ranks,
    is_distributed,
    reduce_mi,
    sum_over_ranks,
)
from pyro_lag.engine.svi import AggressiveSVI
from pyro_lag.estimators.mutual_info import MutualInformation

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pyro_lag.engine.param_split import ParamSplit

__all__ = ["DistributedAggressiveSVI"]


# --------------------------------------------------------------------------- the SVI


class DistributedAggressiveSVI(AggressiveSVI):
    """:class:`~pyro_lag.engine.svi.AggressiveSVI` for data-parallel training: same arguments, same methods.

    Create it on every rank after ``torch.distributed`` is initialized (PyTorch
    Lightning, ``torchrun`` or ``torch.multiprocessing`` all do this), feed each rank
    its own shard, and call :meth:`observe_local_mi` with each rank's own validation MI
    estimate. Every rank must call ``step`` the same number of times (give each rank
    the same number of batches). See the module docstring for what is reduced where.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._synced: dict[int, weakref.ref] = {}  # id -> the parameter given rank 0's value
        self._self_check: str | None = None  # "due" / "applied" while the self-driven MI check runs

    # ------------------------------------------------------------------ hooks of AggressiveSVI

    def _reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Make new parameters equal to rank 0's, then average every gradient over ranks."""
        if not is_distributed():
            return
        new = self._unsynced(params)
        _check_same_tensors(params, "gradient averaging", extra=[len(new)])
        self._mark_synced(new)
        _average(params)

    def _reduce_inner_loss(self, loss: float, count: float) -> tuple[float, float]:
        """Sum the inner step's loss and unit count over ranks: the stop rule sees the global window."""
        if not is_distributed():
            return loss, count
        total_loss, total_count = sum_over_ranks([loss, count])
        return total_loss, total_count

    def _joint_step(self, args: tuple, kwargs: dict) -> Any:
        """A joint step whose gradients pass through ``_reduce_grads`` (``SVI.step`` would bypass it)."""
        if not is_distributed():
            return super()._joint_step(args, kwargs)
        loss, params = self._loss_and_grads(args, kwargs)
        return self._apply_joint(loss, params, args, kwargs)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """One step (see :meth:`AggressiveSVI.step`), after the ranks agree on aggressive mode."""
        if is_distributed():
            self._agree_on_mode()
        return super().step(*args, **kwargs)

    def split_params(self, *args: Any, **kwargs: Any) -> ParamSplit:
        """Probe the guide/model split on this rank's batch; all ranks then use one merged split.

        A parameter that is the model's on any rank is the model's; else the guide's on
        any rank, the guide's. A probe that fails on one rank fails on all of them, with
        that rank's error, so they all fall back to plain SVI together.
        """
        if not is_distributed():
            return super().split_params(*args, **kwargs)
        local: ParamSplit | None = None
        failure: str | None = None
        try:
            local = super().split_params(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 -- reported on every rank below
            failure = f"{type(error).__name__}: {error}"
        sides = None if local is None else {
            name: side for side in ("guide", "model", "other") for name in getattr(local, side)
        }
        gathered: list[Any] = [None] * dist.get_world_size()
        with _collective("the parameter probe"):
            dist.all_gather_object(
                gathered, (failure, sides, None if local is None else local.has_local_latent)
            )
        for other_rank, (other_failure, _, _) in enumerate(gathered):
            if other_failure is not None:
                self._split = None
                raise RankMismatchError(f"the parameter probe failed on rank {other_rank}: {other_failure}")
        names = [set(s) for _, s, _ in gathered]
        if any(n != names[0] for n in names):
            raise RankMismatchError("the ranks' programs have different parameters; they must be the same")
        assert local is not None and sides is not None
        merged = dataclasses.replace(
            local, guide={}, model={}, other={}, has_local_latent=all(has for _, _, has in gathered)
        )
        tensors = {**local.guide, **local.model, **local.other}
        for name in sides:
            votes = {s[name] for _, s, _ in gathered}
            side = "model" if "model" in votes else ("guide" if "guide" in votes else "other")
            getattr(merged, side)[name] = tensors[name]
        self._split = merged
        new = self._unsynced(list(tensors.values()))
        _check_same_tensors(new, "the first use of parameters")
        self._mark_synced(new)
        return merged

    # ------------------------------------------------------------------ mutual information

    def observe_local_mi(self, estimate: MutualInformation | None) -> bool:
        """Reduce this rank's validation MI estimate over ranks (:func:`reduce_mi`) and feed it to the stop rule.

        Every rank must call it at the same point; a rank without validation data passes None.
        Returns whether aggressive mode is still on (the same answer on every rank).
        """
        combined = reduce_mi(estimate)
        return self.observe_mi(combined.value, combined.se)

    def observe_mi(self, value: float, se: float | None = None) -> bool:
        """As :meth:`AggressiveSVI.observe_mi`; the value must be the same on every rank.

        Pass each rank's own estimate to :meth:`observe_local_mi` instead, which reduces them.
        """
        if is_distributed() and not _same_on_all_ranks([float(value), -1.0 if se is None else float(se)]):
            raise RankMismatchError(
                "observe_mi got different (or non-finite) MI values on different ranks; pass each rank's own "
                "estimate to observe_local_mi, which combines them"
            )
        return super().observe_mi(value, se)

    def _check_mi_by_itself(self) -> None:
        """The self-driven MI check (no ``observe_mi`` calls), with each rank's estimate reduced.

        AggressiveSVI estimates MI on this rank's batches and calls ``_apply_rule``,
        which reduces it below. If this rank's estimate failed, AggressiveSVI stopped
        aggressive mode here; the other ranks learn it from the same reduction.
        """
        if not is_distributed():
            return super()._check_mi_by_itself()
        due = (
            self._checks_mi_by_itself()
            and self.mi_every is not None
            and self._steps_since_check + 1 >= self.mi_every
        )
        self._self_check = "due" if due else None
        try:
            super()._check_mi_by_itself()
        finally:
            missed = self._self_check == "due"
            self._self_check = None
        if missed:  # this rank's estimate failed: join the reduction the other ranks are in
            self._reduce_self_check(None)

    def _apply_rule(self, value: float, se: float | None) -> bool:
        if self._self_check == "due":
            self._self_check = "applied"
            reduced = self._reduce_self_check((float(value), 0.0 if se is None else float(se)))
            if reduced is None:
                self.stop_aggressive("MI could not be estimated on every rank; trained as plain SVI since")
                return self.aggressive
            value, se = reduced
        return super()._apply_rule(value, se)

    def _reduce_self_check(self, local: tuple[float, float] | None) -> tuple[float, float] | None:
        """Mean MI and its standard error over ranks (equal weights), or None if a rank had no estimate."""
        value, se = local if local is not None else (0.0, 0.0)
        total, variance, ok = sum_over_ranks([value, se * se, 0.0 if local is None else 1.0])
        world = dist.get_world_size()
        if ok < world:
            return None
        return total / world, math.sqrt(variance) / world

    # ------------------------------------------------------------------ agreement

    def _agree_on_mode(self) -> None:
        """If any rank has left aggressive mode, leave it here too (before the step, on every rank)."""
        (left,) = _max_over_ranks([0.0 if self.aggressive else 1.0])
        if left > 0 and self.aggressive:
            self.stop_aggressive("another rank left aggressive mode")

    def _unsynced(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters that have not been given rank 0's values yet."""
        return [p for p in params if (ref := self._synced.get(id(p))) is None or ref() is not p]

    def _mark_synced(self, new: Sequence[torch.Tensor]) -> None:
        """Give these (new) parameters rank 0's values, once; the caller has checked the ranks agree on them."""
        if new:
            _broadcast(new)
        for p in new:
            self._synced[id(p)] = weakref.ref(p)
