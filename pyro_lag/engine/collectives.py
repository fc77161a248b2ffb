"""The collectives under :mod:`pyro_lag.engine.distributed`: process-group queries, sums and agreement
checks over ranks, the MI reduction, and gradient averaging.

Every function works without a process group (or with one rank), where it is the identity.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import pyro
import torch
import torch.distributed as dist

from pyro_lag.estimators.mutual_info import MutualInformation

__all__ = [
    "gather_from_ranks",
    "RankMismatchError",
    "average_gradients",
    "broadcast_values",
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


def _flat_grad(param: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient (zeros when it has none), flattened."""
    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    return grad.reshape(-1)


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
            pieces = [_flat_grad(params[i]) for i in indices]
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


def gather_from_ranks(value: Any) -> list[Any]:
    """``value`` (any picklable object) from every rank, in rank order; ``[value]`` without a process group."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
