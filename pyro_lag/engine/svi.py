"""AggressiveSVI: Pyro's SVI with the aggressive inference-network training of He et al. (ICLR 2019).

While aggressive, each ``step`` first trains the guide alone on fresh minibatches until
its loss stops improving, then takes one model-only step on the step's own batch.
Once aggressive mode ends (see ``observe_mi``), ``step`` is a plain joint SVI step.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterable

import torch
from pyro import poutine
from pyro.infer import ELBO, SVI
from pyro.infer.util import zero_grads
from pyro.optim import PyroOptim

from pyro_lag.compat import validation_disabled, validation_is_enabled, without_compiled_functions
from pyro_lag.data.batches import examples_in
from pyro_lag.engine.clipping import GradientClipper
from pyro_lag.engine.guide_batches import GuideBatches, SeenBatches
from pyro_lag.engine.inner_loop import make_stopper
from pyro_lag.engine.losses import loss_item
from pyro_lag.engine.param_split import Override, ParamSplit, drop_grads, probe_param_split
from pyro_lag.engine.side_gradients import differentiable_loss_of, loss_and_grads_without
from pyro_lag.engine.stop_rules import MIStopRule
from pyro_lag.trace.sites import site_value

__all__ = ["AggressiveSVI"]


class AggressiveSVI(SVI):
    """A drop-in for :class:`pyro.infer.SVI` with aggressive inference-network training.

    :param model: the model (parameters theta).
    :param guide: the amortized guide (parameters phi).
    :param optim: a PyroOptim; steps the model's parameters, and the guide's unless
        ``guide_optim`` is given.
    :param loss: an ELBO (Trace_ELBO, TraceMeanField_ELBO, TraceGraph_ELBO, Jit variants);
        TraceMeanField_ELBO's closed-form KL, as the paper's, is far less noisy.
    :param guide_batches: fresh random minibatches for inner steps: an iterable (cycled) or a
        zero-argument callable, each batch the positional args or an ``(args, kwargs)`` pair.
        Without it, batches of the step's own kind from a uniform sample of those seen.
    :param guide_optim: a separate PyroOptim for the guide (the paper: SGD for encoder and decoder).
    :param max_inner_steps: at most this many guide-only steps per model step.
    :param inner_rule: when the inner loop stops: ``"paper"`` (the reference's: windows of 15
        steps, stop when a window's loss rises; about 50 steps per model step) or ``"noise"``
        (windows of 5, stop when a window's improvement is within its noise; at least 10).
        See :mod:`pyro_lag.engine.inner_loop`.
    :param check_every: window length of the inner loop's rule (None: the rule's own, 15 or 5).
    :param clip_norm: clip the global gradient norm (reference: 5.0; None: no clipping).
    :param clip_scope: how ``clip_norm`` applies, with the reference's semantics by default:
        ``"joint-exact"``: one norm over guide and model gradients together, as the paper's
        code, so a one-sided step computes the other side's gradients too (a full backward
        pass; only its own side is stepped). ``"joint"``: the same norm with the other side's
        part taken from its latest computed gradient, so a guide-only step never computes the
        model's gradients; cheaper, but measured to steer differently (see the README).
        ``"separate"``: each side's gradients are clipped alone.
    :param stop_rule: how MI estimates end aggressive mode: ``"drop"`` (default: MI fell below its
        best by more than ``mi_noise`` standard errors, or has not risen by that margin for
        ``patience`` checks), ``"paper"`` (the reference's text rule: the first MI below the
        previous) or ``"patience"`` (the reference's image rule: ``patience`` checks without a
        new best). See :class:`pyro_lag.engine.stop_rules.MIStopRule`.
    :param mi_every: without calls to :meth:`observe_mi`, estimate MI every this many steps on
        ``mi_batches`` (or on batches ``step`` has seen) and apply the stop rule, so a literal
        drop-in leaves aggressive mode by itself. None: only :meth:`observe_mi` ends it.
    :param inner_loss_normalizer: ``f(args, kwargs) -> float`` units per batch (tokens for text);
        default: examples, the leading size of the first tensor argument. A pair ``(weight,
        units)`` also weights the loss (a loss averaged over B examples: weight B), so a window
        is its summed loss over its summed units, as the reference's.
    :param guide_params, model_params: override the gradient-probed split by name (glob) or module.
    :param data_plate: the name of the data plate, where the estimators cannot find it alone.
    :param aggressive: start in aggressive mode (default True). A program with nothing that can
        lag (no local latent, no model parameter, or no guide parameter of its own) trains
        exactly as under ``pyro.infer.SVI`` from its first step; :attr:`plain_reason` says why.
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
        check_every: int | None = None,
        inner_rule: str = "paper",
        clip_norm: float | None = None,
        clip_scope: str = "joint-exact",
        stop_rule: str = "drop",
        patience: int = 2,
        mi_noise: float = 2.0,
        mi_every: int | None = 25,
        mi_batches: Iterable[Any] | None = None,
        inner_loss_normalizer: Callable[[tuple, dict], float | tuple[float, float]] | None = None,
        guide_params: Override = (),
        model_params: Override = (),
        data_plate: str | None = None,
        aggressive: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model, guide, optim, loss, loss_and_grads=loss_and_grads,
            num_samples=num_samples, num_steps=num_steps, **kwargs,
        )
        if guide_optim is not None and not isinstance(guide_optim, PyroOptim):
            raise ValueError("guide_optim must be a pyro.optim.PyroOptim, like optim")
        if mi_every is not None and (not isinstance(mi_every, int) or mi_every < 1):
            raise ValueError(f"mi_every must be a positive integer or None, got {mi_every!r}")
        make_stopper(inner_rule, check_every, max_inner_steps)  # validates the rule and the two counts
        self.inner_rule = inner_rule
        self.rule = MIStopRule(stop_rule, patience, mi_noise)
        self.clipper = GradientClipper(clip_norm, clip_scope)
        self.guide_optim = guide_optim
        self.guide_batches = GuideBatches(guide_batches) if guide_batches is not None else None
        self.max_inner_steps = max_inner_steps
        self.check_every = check_every
        self.mi_every = mi_every
        self.mi_batches = list(mi_batches) if mi_batches is not None else None
        self.inner_loss_normalizer = inner_loss_normalizer or examples_in
        self.guide_params_override = tuple(guide_params)
        self.model_params_override = tuple(model_params)
        self.data_plate = data_plate
        self.aggressive = bool(aggressive)
        self.last_inner_steps = 0
        self.mi_history: list[float] = []
        self.mi_se_history: list[float | None] = []
        self.plain_reason: str | None = None
        self.stop_reason: str | None = None
        self._seen = SeenBatches()
        self._user_observes = False
        self._steps_since_check = 0
        self._split: ParamSplit | None = None
        # One-sided steps take Pyro's own loss apart (see one_sided) or freeze the other side; a JIT
        # loss compiles the parameters it sees, so each kind of step gets its own copy of the ELBO.
        self._differentiable_loss = differentiable_loss_of(loss, loss_and_grads)
        self._elbo = loss if isinstance(loss, ELBO) and loss_and_grads is None else None
        self._loss_object = loss
        self._step_losses: dict[str, Callable] = {}

    @property
    def clip_norm(self) -> float | None:
        return self.clipper.max_norm

    @property
    def stop_rule(self) -> str:
        return self.rule.rule

    @property
    def patience(self) -> int:
        return self.rule.patience

    # ------------------------------------------------------------------ mode

    def stop_aggressive(self, reason: str | None = None) -> None:
        """Leave aggressive mode for good: later steps are plain joint SVI steps."""
        if self.aggressive:
            self.stop_reason = reason or "stop_aggressive() was called"
        self.aggressive = False

    def observe_mi(self, value: float, se: float | None = None) -> bool:
        """Feed one validation MI (and its standard error, ``evaluate``'s ``mi_se``) to the stop rule.

        Returns whether aggressive mode is still on. Calling it hands the schedule to the
        caller: AggressiveSVI stops estimating MI by itself. A non-finite value is refused.
        """
        self._user_observes = True
        return self._apply_rule(value, se)

    def _apply_rule(self, value: float, se: float | None) -> bool:
        value = float(value)
        keeps_going = self.rule.keeps_going(value, se)  # refuses NaN before anything is recorded
        self.mi_history.append(value)
        self.mi_se_history.append(None if se is None else float(se))
        if self.aggressive and not keeps_going:
            best = f"; best {self.rule.best:.4g}" if self.stop_rule != "paper" else ""
            self.stop_aggressive(
                f"stop rule '{self.stop_rule}' after MI check {len(self.mi_history)}: MI {value:.4g}"
                + (f" (se {se:.2g})" if se is not None else "") + best
            )
        return self.aggressive

    def _checks_mi_by_itself(self) -> bool:
        return self.aggressive and not self._user_observes and self.mi_every is not None

    def _check_mi_by_itself(self) -> None:
        """Without observe_mi calls: estimate MI every ``mi_every`` steps and apply the stop rule."""
        if not self._checks_mi_by_itself() or self.mi_every is None:
            return
        self._steps_since_check += 1
        if self._steps_since_check < self.mi_every:
            return
        self._steps_since_check = 0
        from pyro_lag.estimators.diagnostics import quiet_mi_estimate

        batches = self.mi_batches if self.mi_batches is not None else self._seen.most_seen()
        try:
            estimate = quiet_mi_estimate(self.guide, batches, model=self.model, data_plate=self.data_plate)
        except ValueError as error:  # a program shape the estimator refuses: say so, train on
            self.stop_aggressive(f"MI cannot be estimated on this program ({error}); trained as plain SVI since")
            return
        self._apply_rule(estimate.value, estimate.se)

    def state_dict(self) -> dict:
        """The small state a checkpoint needs to resume the schedule (optimizer states live in the optims)."""
        return {"aggressive": self.aggressive, "mi_history": list(self.mi_history),
                "mi_se_history": list(self.mi_se_history), "rule": self.rule.state_dict(),
                "clip_norms": self.clipper.state_dict(), "last_inner_steps": self.last_inner_steps,
                "stop_reason": self.stop_reason}

    def load_state_dict(self, state: dict) -> None:
        self.aggressive = bool(state["aggressive"])
        self.mi_history = [float(v) for v in state["mi_history"]]
        self.mi_se_history = list(state.get("mi_se_history", [None] * len(self.mi_history)))
        self.rule.load_state_dict(state["rule"])
        self.clipper.load_state_dict(state.get("clip_norms", {}))
        self.last_inner_steps = int(state.get("last_inner_steps", 0))
        self.stop_reason = state.get("stop_reason")

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
            return self.split_params(*args, **kwargs)
        return self._split

    # ---------------------------------------------------------------- steps

    def _loss_for(self, kind: str) -> Callable:
        """The loss_and_grads function for a kind of step ("joint", "inner", "model")."""
        if kind == "joint" or self._elbo is None:
            return self.loss_and_grads
        if kind not in self._step_losses:
            elbo = copy.copy(self._elbo)
            without_compiled_functions(elbo)
            # Pyro's ELBO base class does not declare loss_and_grads; every concrete ELBO defines it.
            self._step_losses[kind] = elbo.loss_and_grads  # type: ignore[attr-defined]
        return self._step_losses[kind]

    def _loss_and_grads(
        self, args: tuple, kwargs: dict, kind: str = "joint", without: Iterable[torch.Tensor] = ()
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """The loss, with gradients in the ``.grad`` of the parameters it read, by name; ``without``
        (a one-sided step's other side) gets no gradient and is left out, as if not read."""
        without = list(without)
        if without:
            loss, params = loss_and_grads_without(without, self._differentiable_loss, self._loss_for(kind),
                                                  self.model, self.guide, args, kwargs)
        else:
            with poutine.trace(param_only=True) as capture:
                loss = self._loss_for(kind)(self.model, self.guide, *args, **kwargs)
            params = {name: site_value(site).unconstrained() for name, site in capture.trace.nodes.items()}
        self._reduce_grads(list(params.values()))
        return loss, params

    def _reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Hook after every backward pass (data-parallel training averages gradients across ranks here)."""

    def _reduce_inner_loss(self, loss: float, count: float) -> tuple[float, float]:
        """Hook for the inner loop's stop decision (data-parallel training sums across ranks here)."""
        return loss, count

    def _apply(self, optim: PyroOptim, params: list[torch.Tensor]) -> None:
        if params:
            optim(params)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """One model step: the inner guide-only loop and a model-only step while aggressive,
        a joint step otherwise. Returns the loss of the model step's batch, as SVI does."""
        if self.aggressive and self._split is None:
            loss = self._first_step(args, kwargs)
        elif not self.aggressive:
            self.last_inner_steps = 0
            return self._joint_step(args, kwargs)
        else:
            self.last_inner_steps = self._inner_loop(args, kwargs)
            loss = self._model_step(args, kwargs)
        self._check_mi_by_itself()
        return loss

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
            reason = self.split_params(*args, **kwargs).nothing_to_lag()
        except Exception as error:  # noqa: BLE001 -- a program SVI runs must keep running
            reason = f"the parameter probe failed ({type(error).__name__}: {error})"
        if reason is None:
            zero_grads(params.values())
            self.last_inner_steps = self._inner_loop(args, kwargs)
            return self._model_step(args, kwargs)
        self.plain_reason = reason
        self.stop_aggressive(f"nothing can lag: {reason}")
        self.last_inner_steps = 0
        return self._apply_joint(loss, params, args, kwargs)

    def _joint_step(self, args: tuple, kwargs: dict) -> Any:
        if self.guide_optim is None and self.clip_norm is None:
            return super().step(*args, **kwargs)
        loss, params = self._loss_and_grads(args, kwargs)
        return self._apply_joint(loss, params, args, kwargs)

    def _apply_joint(self, loss: Any, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """Step every parameter with its optimizer, after optional clipping, as SVI's step does."""
        self.clipper.clip_all(params.values())
        if self.guide_optim is None:
            self._apply(self.optim, list(params.values()))
        else:
            split = self._ensure_split(params, args, kwargs)
            model_side = [p for n, p in params.items() if split.side_of(n) == "model"]
            guide_side = [p for n, p in params.items() if split.side_of(n) != "model"]
            self._apply(self.optim, model_side)
            self._apply(self.guide_optim, guide_side)
        zero_grads(params.values())
        return loss_item(loss)

    def _one_sided_step(self, side: str, args: tuple, kwargs: dict) -> Any:
        """A guide-only (``side="guide"``) or model-only step: the other side's gradients are not
        computed unless the clipping scope needs their norm; only ``side``'s parameters are stepped."""
        split = self._split if self._split is not None else self.split_params(*args, **kwargs)
        if side == "guide":
            other_side = list(split.model.values())
        else:
            other_side = list(split.guide.values()) + list(split.other.values())
        without = [] if self.clipper.needs_other_side(side) else other_side  # joint-exact clipping: both sides
        kind = ("inner" if side == "guide" else "model") if without else "joint"
        loss, params = self._loss_and_grads(args, kwargs, kind, without)
        if not split.known(params):
            split = self.split_params(*args, **kwargs)

        def on_side(name: str) -> bool:
            return (split.side_of(name) == "model") == (side == "model")

        stepped = [p for n, p in params.items() if on_side(n)]
        other = [p for n, p in params.items() if not on_side(n) and split.side_of(n) != "other"]
        self.clipper.clip_side(side, stepped, other)
        optim = self.optim if side == "model" else (self.guide_optim or self.optim)
        self._apply(optim, stepped)
        drop_grads(params.values())
        return loss_item(loss)

    def inner_step(self, *args: Any, **kwargs: Any) -> float:
        """One guide-only step: no gradient is computed for the model's parameters."""
        return self._one_sided_step("guide", args, kwargs)

    def _model_step(self, args: tuple, kwargs: dict) -> Any:
        return self._one_sided_step("model", args, kwargs)

    def _inner_loop(self, args: tuple, kwargs: dict) -> int:
        """Guide-only steps until the stop rule ends the loop; returns how many were taken.

        Pyro's validation, when on, checks the loop's first step and every model step; later steps,
        the same program on batches of the same data, skip its pass over every distribution argument.
        """
        stopper = make_stopper(self.inner_rule, self.check_every, self.max_inner_steps)
        if self.guide_batches is None or self._checks_mi_by_itself():
            self._seen.add(args, kwargs)
        batch_args, batch_kwargs = args, kwargs
        unchecked = validation_disabled if validation_is_enabled() else contextlib.nullcontext
        while True:
            with contextlib.nullcontext() if stopper.steps == 0 else unchecked():
                loss = self.inner_step(*batch_args, **batch_kwargs)
            units = self.inner_loss_normalizer(batch_args, batch_kwargs)
            weight, count = units if isinstance(units, tuple) else (1.0, units)
            if stopper.update(*self._reduce_inner_loss(float(loss) * weight, count)):
                return stopper.steps
            if self.guide_batches is not None:
                batch_args, batch_kwargs = self.guide_batches.next()
            else:
                batch_args, batch_kwargs = self._seen.draw(args, kwargs)

