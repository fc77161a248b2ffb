"""AggressiveSVI: Pyro's SVI with the aggressive inference-network training of He et al. (ICLR 2019).

While aggressive, each ``step`` first trains the guide alone on fresh minibatches until
its loss stops improving, then takes one model-only step on the step's own batch.
Once aggressive mode ends (see ``observe_mi``), ``step`` is a plain joint SVI step.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
from pyro import poutine
from pyro.infer import ELBO, SVI
from pyro.ops.jit import CompiledFunction
from pyro.infer.util import torch_item, zero_grads
from pyro.optim import PyroOptim

from .sites import Override, ParamSplit, normalize_batch, probe_param_split

STOP_RULES = ("drop", "patience")


class InnerLoopStopper:
    """The reference code's stop rule for the guide-only inner loop.

    Losses are summed over windows of ``check_every`` steps and normalised (per token
    for text, per example for images); the loop stops when a window's normalised loss
    is above the previous window's, or after ``max_steps`` steps.
    """

    def __init__(self, check_every: int = 15, max_steps: int = 100) -> None:
        if check_every < 1 or max_steps < 1:
            raise ValueError("check_every and max_inner_steps must be positive integers")
        self.check_every = check_every
        self.max_steps = max_steps
        self.steps = 0
        self._previous = math.inf
        self._window_loss = 0.0
        self._window_count = 0.0

    def update(self, loss: float, count: float = 1.0) -> bool:
        """Record one inner step's summed loss over ``count`` units; return True to stop."""
        self.steps += 1
        self._window_loss += loss
        self._window_count += count
        if self.steps % self.check_every == 0:
            current = self._window_loss / max(self._window_count, 1e-12)
            if current > self._previous:
                return True
            self._previous = current
            self._window_loss = 0.0
            self._window_count = 0.0
        return self.steps >= self.max_steps


def _default_normalizer(args: tuple, kwargs: dict) -> float:
    """Examples in a batch: the leading size of its first tensor argument, else 1."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return float(value.shape[0])
    return 1.0


class _BatchSource:
    """Fresh minibatches for inner steps: from a zero-argument callable or a (re-iterable) iterable."""

    def __init__(self, source: Callable[[], Any] | Iterable[Any]) -> None:
        self._source = source
        self._iterator: Iterator[Any] | None = None

    def next(self) -> tuple[tuple, dict]:
        if callable(self._source) and not hasattr(self._source, "__iter__"):
            return normalize_batch(self._source())
        if self._iterator is None:
            self._iterator = iter(self._source)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self._source)
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError("guide_batches yielded no batch") from None
        return normalize_batch(batch)


@contextlib.contextmanager
def _frozen(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Turn off gradients of these leaf tensors for the block, so autograd never computes them.

    ``pyro.module`` skips frozen parameters and warns about it; that warning is ours to
    silence, since freezing them is the point.
    """
    switched = [t for t in tensors if t.requires_grad]
    for t in switched:
        t.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*not registered in the param store because requires_grad=False"
            )
            yield
    finally:
        for t in switched:
            t.requires_grad_(True)


class AggressiveSVI(SVI):
    """A drop-in for :class:`pyro.infer.SVI` with aggressive inference-network training.

    :param model: the model (parameters theta).
    :param guide: the amortized guide (parameters phi).
    :param optim: a PyroOptim; steps the model's parameters, and the guide's unless
        ``guide_optim`` is given.
    :param loss: an ELBO instance (Trace_ELBO, TraceMeanField_ELBO, TraceGraph_ELBO, Jit variants).
    :param guide_batches: fresh random minibatches for inner steps: an iterable (cycled) or a
        zero-argument callable, each batch the positional args or an ``(args, kwargs)`` pair.
        Without it every inner step reuses the step's own batch.
    :param guide_optim: a separate PyroOptim for the guide (the paper: SGD for encoder and decoder).
    :param max_inner_steps: at most this many guide-only steps per model step.
    :param check_every: window length of the inner loop's stop rule.
    :param clip_norm: clip the global gradient norm of the stepped parameters (reference: 5.0).
    :param stop_rule: ``"drop"`` (text: stop at the first validation MI below the previous) or
        ``"patience"`` (images: stop after ``patience`` checks without a new best MI).
    :param inner_loss_normalizer: ``f(args, kwargs) -> float`` units per batch (tokens for text);
        default: examples, the leading size of the first tensor argument.
    :param guide_params, model_params: override the gradient-probed split by parameter name
        (glob patterns allowed) or module.
    :param aggressive: start in aggressive mode (default True). The first step probes the
        program; one with nothing that can lag trains as plain SVI from that step on, with the
        reason in :attr:`plain_reason`: a guide with no local latent (no latent sample site
        inside a vectorized plate), a model with no parameters of its own, or a guide whose
        parameters are all the model's. Such a program trains exactly as under
        ``pyro.infer.SVI``, random draws included.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: PyroOptim,
        loss: Any,
        loss_and_grads: Callable | None = None,
        num_samples: int = 0,
        num_steps: int = 0,
        *,
        guide_batches: Callable[[], Any] | Iterable[Any] | None = None,
        guide_optim: PyroOptim | None = None,
        max_inner_steps: int = 100,
        check_every: int = 15,
        clip_norm: float | None = None,
        stop_rule: str = "drop",
        patience: int = 5,
        inner_loss_normalizer: Callable[[tuple, dict], float] | None = None,
        guide_params: Override = (),
        model_params: Override = (),
        aggressive: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model, guide, optim, loss, loss_and_grads=loss_and_grads,
            num_samples=num_samples, num_steps=num_steps, **kwargs,
        )
        if guide_optim is not None and not isinstance(guide_optim, PyroOptim):
            raise ValueError("guide_optim must be a pyro.optim.PyroOptim, like optim")
        if stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {STOP_RULES}, got {stop_rule!r}")
        if patience < 1:
            raise ValueError("patience must be a positive integer")
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError("clip_norm must be positive or None")
        InnerLoopStopper(check_every, max_inner_steps)  # validates the two counts
        self.guide_optim = guide_optim
        self.guide_batches = _BatchSource(guide_batches) if guide_batches is not None else None
        self.max_inner_steps = max_inner_steps
        self.check_every = check_every
        self.clip_norm = clip_norm
        self.stop_rule = stop_rule
        self.patience = patience
        self.inner_loss_normalizer = inner_loss_normalizer or _default_normalizer
        self.guide_params_override = tuple(guide_params)
        self.model_params_override = tuple(model_params)
        self.aggressive = bool(aggressive)
        self.last_inner_steps = 0
        self.mi_history: list[float] = []
        self._best_mi = 0.0
        self._previous_mi = 0.0
        self._checks_without_best = 0
        self._split: ParamSplit | None = None
        # Inner and model-only steps freeze different parameters; a JIT loss compiles the set of
        # parameters it sees, so each kind of step gets its own copy of the ELBO object.
        self._elbo = loss if isinstance(loss, ELBO) and loss_and_grads is None else None
        self._loss_object = loss
        self.plain_reason: str | None = None
        self._step_losses: dict[str, Callable] = {}

    # ------------------------------------------------------------------ mode

    def stop_aggressive(self) -> None:
        """Leave aggressive mode for good: later steps are plain joint SVI steps."""
        self.aggressive = False

    def observe_mi(self, value: float) -> bool:
        """Feed one validation MI (per epoch) to the stop rule; return whether still aggressive.

        ``drop``: stop at the first value below the previous one (the first is compared
        with 0, as in the reference). ``patience``: stop after ``patience`` values in a
        row without a new best.
        """
        value = float(value)
        self.mi_history.append(value)
        if not self.aggressive:
            return False
        if self.stop_rule == "drop":
            if value < self._previous_mi:
                self.stop_aggressive()
            self._previous_mi = value
        else:
            if value > self._best_mi:
                self._best_mi = value
                self._checks_without_best = 0
            else:
                self._checks_without_best += 1
                if self._checks_without_best >= self.patience:
                    self.stop_aggressive()
        return self.aggressive

    def state_dict(self) -> dict:
        """The small state a checkpoint needs to resume the schedule (optimizer states live in the optims)."""
        return {
            "aggressive": self.aggressive,
            "mi_history": list(self.mi_history),
            "best_mi": self._best_mi,
            "previous_mi": self._previous_mi,
            "checks_without_best": self._checks_without_best,
            "last_inner_steps": self.last_inner_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.aggressive = bool(state["aggressive"])
        self.mi_history = [float(v) for v in state["mi_history"]]
        self._best_mi = float(state["best_mi"])
        self._previous_mi = float(state["previous_mi"])
        self._checks_without_best = int(state["checks_without_best"])
        self.last_inner_steps = int(state.get("last_inner_steps", 0))

    # --------------------------------------------------------------- params

    @property
    def param_split(self) -> ParamSplit | None:
        """The guide/model/other parameter split found by the gradient probe (None before the first probe)."""
        return self._split

    def split_params(self, *args: Any, **kwargs: Any) -> ParamSplit:
        """Probe (or re-probe) which parameters are the guide's and which the model's, on one batch."""
        self._split = probe_param_split(
            self.model, self.guide, args, kwargs,
            guide_params=self.guide_params_override,
            model_params=self.model_params_override,
            loss=self._loss_object,
        )
        return self._split

    def _ensure_split(self, names: Iterable[str], args: tuple, kwargs: dict) -> ParamSplit:
        if self._split is None or not self._split.known(names):
            self.split_params(*args, **kwargs)
        return self._split  # type: ignore[return-value]

    # ---------------------------------------------------------------- steps

    def _loss_for(self, kind: str) -> Callable:
        """The loss_and_grads function for a kind of step ("joint", "inner", "model")."""
        if kind == "joint" or self._elbo is None:
            return self.loss_and_grads
        if kind not in self._step_losses:
            elbo = copy.copy(self._elbo)
            for name, value in list(vars(elbo).items()):
                if isinstance(value, CompiledFunction):
                    delattr(elbo, name)
            self._step_losses[kind] = elbo.loss_and_grads
        return self._step_losses[kind]

    def _loss_and_grads(
        self, args: tuple, kwargs: dict, kind: str = "joint"
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        with poutine.trace(param_only=True) as capture:
            loss = self._loss_for(kind)(self.model, self.guide, *args, **kwargs)
        params = {
            name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()
        }
        return loss, params

    def _apply(self, optim: PyroOptim, params: list[torch.Tensor]) -> None:
        if params:
            optim(params)

    def _clip(self, params: Iterable[torch.Tensor]) -> None:
        if self.clip_norm is not None:
            with_grad = [p for p in params if p.grad is not None]
            if with_grad:
                torch.nn.utils.clip_grad_norm_(with_grad, self.clip_norm)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """One model step: the inner guide-only loop and a model-only step while aggressive,
        a joint step otherwise. Returns the loss of the model step's batch, as SVI does."""
        if self.aggressive and self._split is None:
            return self._first_step(args, kwargs)
        if not self.aggressive:
            self.last_inner_steps = 0
            return self._joint_step(args, kwargs)
        self.last_inner_steps = self._inner_loop(args, kwargs)
        return self._model_step(args, kwargs)

    def _first_step(self, args: tuple, kwargs: dict) -> Any:
        """The first step: the loss and gradients exactly as SVI computes them, then the probe decides.

        Computing SVI's step first means an invalid program fails with Pyro's own error, the
        loss warns as it would under SVI, and lazily initialized parameters (AutoGuides,
        ``pyro.param`` with a callable) draw the same random numbers. A program with nothing
        that can lag, or one the probe cannot run, then takes that very step and trains as
        plain SVI from then on, identically to ``pyro.infer.SVI``; the reason is kept in
        :attr:`plain_reason`. Otherwise the gradients are dropped unapplied and the aggressive
        step runs.
        """
        loss, params = self._loss_and_grads(args, kwargs)
        try:
            reason = _nothing_to_lag(self.split_params(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 -- a program SVI runs must keep running
            reason = f"the parameter probe failed ({type(error).__name__}: {error})"
        if reason is None:
            zero_grads(params.values())
            self.last_inner_steps = self._inner_loop(args, kwargs)
            return self._model_step(args, kwargs)
        self.plain_reason = reason
        self.stop_aggressive()
        self.last_inner_steps = 0
        return self._apply_joint(loss, params, args, kwargs)

    def _joint_step(self, args: tuple, kwargs: dict) -> Any:
        if self.guide_optim is None and self.clip_norm is None:
            return super().step(*args, **kwargs)
        loss, params = self._loss_and_grads(args, kwargs)
        return self._apply_joint(loss, params, args, kwargs)

    def _apply_joint(self, loss: Any, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """Step every parameter with its optimizer, after optional clipping, as SVI's step does."""
        self._clip(params.values())
        if self.guide_optim is None:
            self._apply(self.optim, list(params.values()))
        else:
            split = self._ensure_split(params, args, kwargs)
            model_side = [p for n, p in params.items() if split.side_of(n) == "model"]
            guide_side = [p for n, p in params.items() if split.side_of(n) != "model"]
            self._apply(self.optim, model_side)
            self._apply(self.guide_optim, guide_side)
        zero_grads(params.values())
        return _item(loss)

    def inner_step(self, *args: Any, **kwargs: Any) -> float:
        """One guide-only step: model parameters are frozen, so no gradient is computed for them."""
        split = self._split if self._split is not None else self.split_params(*args, **kwargs)
        with _frozen(split.model.values()):
            loss, params = self._loss_and_grads(args, kwargs, "inner")
        if not split.known(params):
            split = self.split_params(*args, **kwargs)
        stepped = [p for n, p in params.items() if split.side_of(n) != "model"]
        self._clip(stepped)
        self._apply(self.guide_optim or self.optim, stepped)
        _drop_grads(params.values())
        return _item(loss)

    def _inner_loop(self, args: tuple, kwargs: dict) -> int:
        stopper = InnerLoopStopper(self.check_every, self.max_inner_steps)
        batch_args, batch_kwargs = args, kwargs
        while True:
            loss = self.inner_step(*batch_args, **batch_kwargs)
            count = self.inner_loss_normalizer(batch_args, batch_kwargs)
            if stopper.update(float(loss), count):
                return stopper.steps
            if self.guide_batches is not None:
                batch_args, batch_kwargs = self.guide_batches.next()

    def _model_step(self, args: tuple, kwargs: dict) -> Any:
        split = self._split
        assert split is not None
        with _frozen(list(split.guide.values()) + list(split.other.values())):
            loss, params = self._loss_and_grads(args, kwargs, "model")
        if not split.known(params):
            split = self.split_params(*args, **kwargs)
        stepped = [p for n, p in params.items() if split.side_of(n) == "model"]
        self._clip(stepped)
        self._apply(self.optim, stepped)
        _drop_grads(params.values())
        return _item(loss)


def _drop_grads(params: Iterable[torch.Tensor]) -> None:
    """Set gradients to None after an inner or model step (``zero_grad(set_to_none=True)``, as the
    reference's optimizers do): no zero tensors to allocate and fill, and the next backward writes
    its gradients instead of adding them to zeros. Joint steps keep SVI's ``zero_grads``."""
    for p in params:
        p.grad = None


def _nothing_to_lag(split: ParamSplit) -> str | None:
    """Why a program has no inference network that can lag behind its model, or None if it has one."""
    if not split.has_local_latent:
        return "the guide has no local latent (no latent site inside a vectorized plate)"
    if not split.model:
        return "the model has no parameters of its own: there is no generator for the guide to lag behind"
    if not split.guide:
        return "the guide has no parameters apart from the model's: inner steps would have nothing to train"
    return None


def _item(loss: Any) -> Any:
    if isinstance(loss, tuple):
        return type(loss)(map(torch_item, loss))
    return torch_item(loss)
