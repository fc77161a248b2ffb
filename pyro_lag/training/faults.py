"""Numerical faults in training, said in words: which epoch, step and site went NaN, and why.

:class:`SiteRecorder` keeps a reference to every sample site of the last model and guide
run (nothing is computed per step); only after a fault does :class:`FaultDiagnosis` look
at them to name the site whose value or log-density is not finite.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_lag.io.checkpoint import nonfinite_params
from pyro_lag.trace.sites import raw_log_prob

__all__ = [
    "TrainingDivergedError", "NonFiniteBatchError", "SiteRecorder", "FaultDiagnosis", "nonfinite_argument",
    "params_finite",
]


class TrainingDivergedError(FloatingPointError):
    """A NaN or infinite loss or parameter stopped training; no checkpoint was written after it."""


class NonFiniteBatchError(TrainingDivergedError, ValueError):
    """A training batch holds NaN or infinite values: a fault of the data, refused before the step.

    A :class:`TrainingDivergedError` (training stopped on a non-finite number) and a ``ValueError``
    (the input is bad), so either ``except`` clause catches it, in ``fit`` and in Lightning alike.
    """


class SiteRecorder(Messenger):
    """Keeps a reference to each sample site of the last model/guide run, to name a NaN's source.

    ``sites`` also remembers which program ran last (``"running"``), for errors raised while a
    distribution is being built.
    """

    def __init__(self, role: str, sites: dict[Any, Any]) -> None:
        super().__init__()
        self.role = role
        self.sites = sites

    def __enter__(self):
        self.sites["running"] = (self.role, None)
        return super().__enter__()

    def _postprocess_message(self, msg) -> None:
        if msg["type"] == "sample" and not site_is_subsample(msg):
            self.sites[(self.role, msg["name"])] = {
                "fn": msg["fn"], "value": msg["value"], "mask": msg.get("mask"), "is_observed": msg["is_observed"],
            }
            self.sites["running"] = (self.role, msg["name"])


def find_bad_site(sites: dict[Any, Any]) -> str | None:
    """The first recorded site whose value or log-density is NaN or infinite, described in words."""
    with torch.no_grad():
        for key, site in sites.items():
            if key == "running":
                continue
            role, name = key
            value = site["value"]
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"site '{name}' in the {role} has a non-finite value"
            try:
                log_p = raw_log_prob(site)
            except Exception:  # a distribution that cannot even score its value
                return f"site '{name}' in the {role} cannot compute its log-density"
            if not bool(torch.isfinite(log_p).all()):
                return f"site '{name}' in the {role} has a non-finite log-density"
    return None


def nonfinite_argument(args: tuple, kwargs: dict) -> str | None:
    """Which floating-point argument of a batch holds a NaN or infinity, if any."""
    named = [(f"argument {i}", v) for i, v in enumerate(args)] + [(f"argument '{k}'", v) for k, v in kwargs.items()]
    for label, value in named:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return label
    return None


def params_finite() -> bool:
    """Whether every parameter in the store is finite (one device sync for all of them)."""
    values = [p.detach() for _, p in pyro.get_param_store().named_parameters() if p.numel() > 0]
    # min and max of each tensor are finite exactly when all of it is: one small stack, one sync.
    extremes = [torch.stack(torch.aminmax(v)).double() for v in values if v.is_floating_point()]
    return not extremes or bool(torch.isfinite(torch.stack(extremes)).all())


class FaultDiagnosis:
    """Turns a fault at a training step into a :class:`TrainingDivergedError` that names its source."""

    def __init__(self, steps_per_epoch: int, last_checkpoint: Path | None) -> None:
        self.recorded: dict[Any, Any] = {}
        self.steps_per_epoch = steps_per_epoch
        self.last_checkpoint = last_checkpoint

    def recorders(self) -> tuple[SiteRecorder, SiteRecorder]:
        """Handlers to wrap the model and the guide with."""
        return SiteRecorder("model", self.recorded), SiteRecorder("guide", self.recorded)

    def where(self, epoch: int, step: int) -> str:
        return f"epoch {epoch + 1}, step {step + 1} of {self.steps_per_epoch}"

    def kept(self) -> str:
        if self.last_checkpoint is not None and self.last_checkpoint.exists():
            return f"; last good checkpoint kept at {self.last_checkpoint}"
        return ""

    def diverged(self, epoch: int, step: int, loss_value: float) -> TrainingDivergedError:
        """A non-finite loss (naming the site) or a finite loss that left a parameter non-finite."""
        if not math.isfinite(loss_value):
            site = find_bad_site(self.recorded) or "no single site found (check the loss's inputs)"
            return TrainingDivergedError(
                f"non-finite loss ({loss_value}) at {self.where(epoch, step)}: {site}{self.kept()}"
            )
        bad = nonfinite_params()
        return TrainingDivergedError(
            f"non-finite gradient at {self.where(epoch, step)}: parameter '{bad[0] if bad else '?'}' became "
            f"NaN or infinite (the loss, {loss_value:.6g}, was finite){self.kept()}"
        )

    def invalid_distribution(self, epoch: int, step: int, exc: ValueError) -> Exception:
        """Pyro's argument validation caught a NaN before any loss existed: say where."""
        text = str(exc)
        if "found invalid values" not in text and "within the support" not in text:
            return exc  # not a numerical fault: let the original error through
        role, after = self.recorded.get("running", ("program", None))
        place = f"in the {role}" + (f" after site '{after}'" if after else " before its first sample site")
        first = text.strip().splitlines()[0].rstrip(":")
        return TrainingDivergedError(
            f"invalid (NaN or out-of-support) values at {self.where(epoch, step)}, {place}: {first}{self.kept()}"
        )

    def checked_step(self, svi: Any, epoch: int, step: int, args: tuple, kwargs: dict) -> float:
        """``svi.step`` on one batch, refusing bad input and stopping on any non-finite number.

        The one step every trainer takes (``fit`` and the Lightning module alike), so the same
        fault gets the same error: :class:`NonFiniteBatchError` for a NaN in the batch, a
        :class:`TrainingDivergedError` naming the site for a NaN loss, parameter or distribution.
        """
        bad_input = nonfinite_argument(args, kwargs)
        if bad_input is not None:
            raise NonFiniteBatchError(
                f"training batch {step + 1} of epoch {epoch + 1} holds NaN or infinite values in {bad_input}"
            )
        self.recorded.clear()
        try:
            loss_value = float(svi.step(*args, **kwargs))
        except ValueError as exc:
            raise self.invalid_distribution(epoch, step, exc) from None
        if not math.isfinite(loss_value) or not params_finite():
            raise self.diverged(epoch, step, loss_value)
        return loss_value
