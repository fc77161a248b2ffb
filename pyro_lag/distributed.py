"""Data-parallel AggressiveSVI: every rank takes the same steps and makes the same decisions.

In data-parallel training each process (rank) holds a copy of the parameters and
trains on its own shard of the data. Plain SGD only needs the gradients averaged.
The aggressive method also makes *decisions* from data: how many guide-only inner
steps to take, and when to leave aggressive mode. If each rank decided from its own
shard, one rank would take 12 inner steps while another took 30; their collective
calls would no longer pair up and the run would hang or silently diverge.

:class:`DistributedAggressiveSVI` is :class:`~pyro_lag.svi.AggressiveSVI` with its
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
class behaves exactly like :class:`~pyro_lag.svi.AggressiveSVI`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyro
import torch
import torch.distributed as dist

from .mutual_information import MutualInformation
from .svi import AggressiveSVI

if TYPE_CHECKING:
    from .svi import ParamSplit

__all__ = [
    "DistributedAggressiveSVI",
    "RankMismatchError",
    "average_gradients",
    "is_distributed",
    "rank",
    "reduce_mi",
    "seed_rank",
    "sum_over_ranks",
    "world_size",
]


class RankMismatchError(RuntimeError):
    """The ranks disagree where they must agree (different parameters, MI values, or a failed probe).

    Raised on every rank at once, from numbers all ranks share, so the run ends instead of hanging.
    """


# --------------------------------------------------------------------------- process group


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def seed_rank(seed: int) -> int:
    """Seed Pyro's random streams with ``seed + rank``: each rank draws its own samples. Returns that seed."""
    own = int(seed) + rank()
    pyro.set_rng_seed(own)
    return own


def _comm_device() -> torch.device:
    """Where small tensors for collectives live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Name the step in a collective's error: a failed peer shows up here as a lost connection."""
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, RankMismatchError):
            raise
        raise RuntimeError(
            f"rank {rank()} of {world_size()}: the collective for {what} failed; another rank has probably "
            f"stopped (its own error is the cause): {str(error).strip().splitlines()[0] if str(error).strip() else error}"
        ) from error


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """``values`` summed elementwise over all ranks, in float64 (the same result on every rank)."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    with _collective("a sum over ranks"):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _max_over_ranks(values: Sequence[float]) -> list[float]:
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    with _collective("an agreement check"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _same_on_all_ranks(values: Sequence[float]) -> bool:
    """Whether every rank passed the same finite ``values`` (one small collective; the same answer everywhere)."""
    encoded = []
    for v in values:
        finite = math.isfinite(v)
        encoded += [v if finite else 0.0, -v if finite else 0.0, 0.0 if finite else 1.0]
    reduced = _max_over_ranks(encoded)
    return all(
        reduced[3 * i] == -reduced[3 * i + 1] and reduced[3 * i + 2] == 0.0 for i in range(len(values))
    )


# --------------------------------------------------------------------------- mutual information


def reduce_mi(estimate: MutualInformation | None) -> MutualInformation:
    """Combine the ranks' MI estimates into one, the same on every rank.

    Each rank estimated MI on its own validation shard. The combined value is the
    points-weighted mean, ``sum_r n_r v_r / N``; the shards' estimates are independent,
    so its standard error is ``sqrt(sum_r (n_r se_r)^2) / N``. A rank with no validation
    data passes None and carries no weight. Without a process group the estimate is
    returned as it is.
    """
    if not is_distributed():
        if estimate is None:
            raise ValueError("mutual information got no validation batch")
        return estimate
    n = 0 if estimate is None else estimate.points
    value = 0.0 if estimate is None else estimate.value
    se = 0.0 if estimate is None else estimate.se
    pairs = 0 if estimate is None else estimate.pairs
    weighted, variance, points, total_pairs = sum_over_ranks([n * value, (n * se) ** 2, n, pairs])
    if points == 0:
        raise ValueError("mutual information got no validation batch on any rank")
    return MutualInformation(weighted / points, math.sqrt(variance) / points, int(points), int(total_pairs))


# --------------------------------------------------------------------------- gradients


def _signature(tensors: Sequence[torch.Tensor]) -> float:
    """A checksum of the tensors' shapes and dtypes, equal on ranks that hold the same parameters."""
    text = ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in tensors)
    return float(zlib.crc32(text.encode()))


def _check_same_tensors(tensors: Sequence[torch.Tensor], what: str, extra: Sequence[float] = ()) -> None:
    """Raise :class:`RankMismatchError` on every rank unless all ranks hold tensors of the same shapes
    (and the same ``extra`` numbers)."""
    if not _same_on_all_ranks([len(tensors), sum(t.numel() for t in tensors), _signature(tensors), *extra]):
        raise RankMismatchError(
            f"the ranks disagree on the parameters for {what} (rank {rank()} has {len(tensors)}): they are out "
            "of step (one rank in an inner step, another in a model step) or their programs' parameters depend "
            "on the data, which data-parallel training cannot follow"
        )


def _broadcast(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    with torch.no_grad(), _collective("the broadcast of parameter values"):
        for t in tensors:
            dist.broadcast(t.data, src=src)


def broadcast_values(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of these tensors to every rank, in place."""
    if not is_distributed():
        return
    _check_same_tensors(tensors, "the broadcast of parameter values")
    _broadcast(tensors, src)


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over all ranks, in place.

    A parameter whose gradient is None on a rank counts as a zero gradient there; it
    keeps None only where it is None on every rank (so an optimizer still skips it).
    """
    if not is_distributed():
        return
    _check_same_tensors(params, "gradient averaging")
    _average(params)


def _average(params: Sequence[torch.Tensor]) -> None:
    """The all-reduce itself: gradients of one dtype and device travel in one flat buffer, with the
    "has a gradient" flags of all parameters appended to the first buffer."""
    world = dist.get_world_size()
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.dtype, p.device), []).append(i)
    flags: list[bool] = []
    with _collective("gradient averaging"):
        for number, ((dtype, device), indices) in enumerate(groups.items()):
            pieces = [
                (params[i].grad if params[i].grad is not None else torch.zeros_like(params[i])).reshape(-1)
                for i in indices
            ]
            if number == 0:
                pieces.append(torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=device))
            flat = torch.cat(pieces)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            if number == 0:
                flags = (flat[-len(params):] > 0).tolist()
                flat = flat[: -len(params)]
            flat.div_(world)
            offset = 0
            for i in indices:
                size = params[i].numel()
                if flags[i]:
                    params[i].grad = flat[offset: offset + size].view_as(params[i])
                offset += size


# --------------------------------------------------------------------------- the SVI


class DistributedAggressiveSVI(AggressiveSVI):
    """:class:`~pyro_lag.svi.AggressiveSVI` for data-parallel training: same arguments, same methods.

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
        due = self._checks_mi_by_itself() and self._steps_since_check + 1 >= self.mi_every  # type: ignore[operator]
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
