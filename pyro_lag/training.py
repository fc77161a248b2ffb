"""The epoch loop: training steps, validation, end of aggressive mode, lr decay, checkpoints, test pass.

``fit`` runs every method of He et al. (2019) and its baselines on any Pyro
model/guide pair: ``aggressive`` (optionally with KL annealing, the paper's
"+ anneal" rows), ``standard``, ``anneal``, ``beta``, ``cyclical`` and
``free-bits``; a guide with no latent (decoder-only language model or
PixelCNN) trains as a plain likelihood model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .checkpoint import (
    capture_param_store,
    capture_training_state,
    load_checkpoint,
    nonfinite_params,
    restore_param_store,
    restore_training_state,
    save_checkpoint,
)
from .diagnostics import eval_mode, evaluate
from .handlers import FreeBits, KLSchedule, KLWeight, beta as beta_schedule, cyclical, linear_annealing
from .sites import find_data_plate, is_latent, normalize_batch, raw_log_prob
from .svi import AggressiveSVI

__all__ = ["fit", "FitResult", "TrainingDivergedError", "METHODS", "LAST_CHECKPOINT", "BEST_CHECKPOINT"]

METHODS = ("aggressive", "standard", "anneal", "beta", "cyclical", "free-bits")
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"

# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = (
    "method", "anneal", "optim", "lr", "seed", "kl_start", "warm_up", "beta", "cycles", "cycle_ratio",
    "free_bits", "stop_rule", "patience", "clip_norm", "max_inner_steps", "check_every", "max_aggressive_epochs", "lr_decay",
    "decay_patience", "decay_after", "max_decays", "steps_per_epoch", "decoder_only",
)


class TrainingDivergedError(FloatingPointError):
    """A NaN or infinite loss or parameter stopped training; no checkpoint was written after it."""


@dataclass
class FitResult:
    """What :func:`fit` returns.

    ``history``: one dict per epoch (epoch, train_loss, val_loss, elbo, recon, kl, mi,
    au, aggressive, inner_steps, kl_weight, lr, decayed, wall_time); ``test``: the
    final test metrics of the best parameters (with ``iw_nll`` when asked for), or
    None without test data; ``stopped``: why training ended.
    """

    history: List[Dict[str, Any]]
    test: Optional[Dict[str, Any]]
    best_epoch: Optional[int]
    best_val_loss: float
    stopped: str
    decoder_only: bool
    run_dir: Optional[Path] = None
    config: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _modules_of(*fns: Callable) -> List[torch.nn.Module]:
    """The torch modules behind callables (modules themselves or their bound methods)."""
    found: List[torch.nn.Module] = []
    for fn in fns:
        owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module) and all(owner is not m for m in found):
            found.append(owner)
    return found


def _to_device(batch: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple):
        return tuple(_to_device(b, device) for b in batch)
    if isinstance(batch, list):
        return [_to_device(b, device) for b in batch]
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _num_points(args: tuple) -> int:
    """Data points in a batch: the leading size of its first tensor argument (1 if none)."""
    for value in args:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def _nonfinite_argument(args: tuple, kwargs: dict) -> Optional[str]:
    """Which floating-point argument of a batch holds a NaN or infinity, if any."""
    named = [(f"argument {i}", v) for i, v in enumerate(args)] + [(f"argument '{k}'", v) for k, v in kwargs.items()]
    for label, value in named:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return label
    return None


def _iterate(source: Any, epoch: int, position: int) -> Iterator[Any]:
    """Batches ``position, ...`` of ``epoch``: a batch source's ``iter_from`` or a sequence's slice."""
    if hasattr(source, "iter_from"):
        return iter(source.iter_from(epoch, position))
    if position == 0:
        return iter(source)
    return iter(list(source)[position:])


def _eval_batches(source: Any) -> Iterable[Any]:
    """The same batches at every validation: epoch 0 of a batch source, or the sequence itself."""
    if hasattr(source, "iter_from"):
        return source.iter_from(0, 0)
    return source


class _SiteRecorder(Messenger):
    """Keeps a reference to each sample site of the last model/guide run, to name a NaN's source.

    Nothing is computed per step; the sites are examined only after a non-finite loss.
    ``sites`` also remembers which program ran last (``"running"``), for errors raised
    while a distribution is being built.
    """

    def __init__(self, role: str, sites: Dict[Any, Any]) -> None:
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


def _find_bad_site(sites: Dict[Any, Any]) -> Optional[str]:
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


def _latent_sites(guide: Callable, args: tuple, kwargs: dict) -> List[str]:
    trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(*args, **kwargs)
    if not any(is_latent(site) for site in trace.nodes.values()):
        return []
    find_data_plate(trace)  # raises NoLocalLatentError for a guide with only global latents
    return [name for name, site in trace.nodes.items() if is_latent(site)]


def _exact_metrics(model: Callable, batches: Iterable[Any]) -> Dict[str, Any]:
    """Per-data-point log-likelihood of a model without latents: its ELBO is log p(x) exactly."""
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            args, kwargs = normalize_batch(batch)
            trace = poutine.trace(model).get_trace(*args, **kwargs)
            for site in trace.nodes.values():
                if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
                    total += float(raw_log_prob(site).sum())
            count += _num_points(args)
    if count == 0:
        raise ValueError("evaluation got no batch")
    ll = total / count
    return {"elbo": ll, "recon": ll, "kl": 0.0, "mi": None, "au": None, "au_var": None, "num_points": count}


def _plain(value: Any) -> Any:
    """Metrics as plain Python data (tensors to lists), for history rows and checkpoints."""
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.dim() > 0 else value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _make_optim(optim: Union[str, Callable[[float], Any]], lr: float) -> Any:
    if callable(optim):
        return optim(lr)
    if optim == "sgd":
        return pyro.optim.SGD({"lr": lr})
    return pyro.optim.Adam({"lr": lr})


def _call_epoch_callbacks(callbacks: Sequence[Any], row: Dict[str, Any]) -> None:
    for cb in callbacks:
        if hasattr(cb, "on_epoch_end"):
            cb.on_epoch_end(dict(row))
        elif callable(cb) and not hasattr(cb, "on_batch_end"):
            cb(dict(row))


def _call_batch_callbacks(callbacks: Sequence[Any], info: Dict[str, Any]) -> None:
    for cb in callbacks:
        if hasattr(cb, "on_batch_end"):
            cb.on_batch_end(dict(info))


def _check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        kind = "an integer" if integer else "a number"
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {kind} {relation} {minimum}, got {value!r}")


# --------------------------------------------------------------------------- fit


def fit(
    model: Callable,
    guide: Callable,
    train: Any,
    valid: Any,
    test: Any = None,
    *,
    method: str = "aggressive",
    epochs: int = 10,
    kind: Optional[str] = None,
    optim: Union[str, Callable[[float], Any], None] = None,
    lr: Optional[float] = None,
    loss: Any = None,
    clip_norm: Optional[float] = 5.0,
    anneal: bool = False,
    kl_start: float = 0.1,
    warm_up: float = 10,
    beta: Optional[float] = None,
    cycles: int = 4,
    cycle_ratio: float = 0.5,
    free_bits: Optional[float] = None,
    stop_rule: Optional[str] = None,
    patience: int = 5,
    max_inner_steps: int = 100,
    check_every: int = 15,
    max_aggressive_epochs: Optional[int] = None,
    lr_decay: Optional[float] = 0.5,
    decay_patience: Optional[int] = None,
    decay_after: Optional[int] = None,
    max_decays: int = 5,
    device: Union[str, torch.device, None] = None,
    seed: Optional[int] = 0,
    run_dir: Union[str, Path, None] = None,
    resume: bool = False,
    checkpoint_every: Optional[int] = None,
    callbacks: Sequence[Any] = (),
    iw_samples: int = 0,
    iw_chunk_size: int = 100,
) -> FitResult:
    """Train a model/guide pair with aggressive inference or a baseline; validate every epoch.

    :param model, guide: Pyro programs taking the positional args of a batch. Their
        ``torch.nn.Module`` owners (when they are bound methods) are moved to ``device``.
    :param train, valid, test: batch sources (``pyro_lag.data``) or sequences of batches,
        each batch a tuple of positional args (a bare tensor is one argument). ``train``
        needs ``len()``; with ``sample()``, aggressive inner steps draw fresh batches from it.
    :param method: ``aggressive``, ``standard``, ``anneal`` (KL weight from ``kl_start`` to 1
        over ``warm_up`` epochs), ``beta`` (constant KL weight ``beta``), ``cyclical``
        (``cycles`` ramps over ``cycle_ratio`` of each cycle), ``free-bits`` (floor
        ``free_bits`` nats per latent dimension). ``anneal=True`` adds annealing to
        ``aggressive`` (the paper's "+ anneal" rows).
    :param kind: ``text`` or ``image`` (default: the model owner's ``.kind``); picks the
        reference defaults: text uses SGD lr 1.0, the ``drop`` stop rule and lr decay
        after 2 epochs without improvement from the 16th epoch on; images use Adam lr
        1e-3, the ``patience`` stop rule and a decay patience of 20 epochs.
    :param stop_rule, patience: how validation MI ends aggressive mode (see ``AggressiveSVI``);
        ``max_aggressive_epochs`` ends it after that many epochs at the latest.
    :param optim: ``"sgd"``, ``"adam"`` or ``lr -> PyroOptim``; the guide and the model get
        separate optimizers with the same learning rate.
    :param lr_decay: on a plateau, multiply lr by this and reload the best parameters,
        at most ``max_decays`` times, then stop (None: never decay).
    :param seed: seeds every RNG at the start (None leaves them alone). The param store is
        cleared first, so build model and guide with the same seed for reproducible runs.
    :param run_dir: where ``last.pt`` and ``best.pt`` go (atomically); ``resume=True``
        continues from ``last.pt`` exactly where it stopped, bitwise on CPU.
    :param checkpoint_every: also write ``last.pt`` every this many steps within an epoch.
    :param callbacks: objects with ``on_epoch_end(row)`` and/or ``on_batch_end(info)``, or
        plain callables called with each epoch's history row.
    :param iw_samples: importance samples for the final test pass's IW-NLL (0: none).
    :raises TrainingDivergedError: on a NaN or infinite loss or parameter, naming the epoch,
        step and site; checkpoints written before it are kept.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_number("epochs", epochs, minimum=1, integer=True)
    if anneal and method not in ("aggressive", "anneal", "standard"):
        raise ValueError(f"anneal=True combines with method aggressive or standard, not {method!r}")
    if method == "beta":
        if beta is None:
            raise ValueError("method 'beta' needs the KL weight beta")
        _check_number("beta", beta)
    if method == "free-bits":
        if free_bits is None:
            raise ValueError("method 'free-bits' needs free_bits (nats per latent dimension)")
        _check_number("free_bits", free_bits)
    for name, value in (("iw_samples", iw_samples), ("max_decays", max_decays)):
        _check_number(name, value, integer=True)
    if max_aggressive_epochs is not None:
        _check_number("max_aggressive_epochs", max_aggressive_epochs, minimum=1, integer=True)
    if checkpoint_every is not None:
        _check_number("checkpoint_every", checkpoint_every, minimum=1, integer=True)
    if clip_norm is not None:
        _check_number("clip_norm", clip_norm, strict=True)
    if lr_decay is not None and not 0.0 < lr_decay < 1.0:
        raise ValueError(f"lr_decay must lie in (0, 1) or be None, got {lr_decay!r}")
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir, the directory holding the checkpoint")
    try:
        steps_per_epoch = len(train)
    except TypeError:
        raise ValueError("train must have a length (a batch source or a sequence of batches)") from None
    if steps_per_epoch == 0:
        raise ValueError("train has no batch")

    if kind is None:
        for module in _modules_of(model, guide):
            kind = getattr(module, "kind", None) or kind
    if kind not in (None, "text", "image"):
        raise ValueError(f"kind must be 'text' or 'image', got {kind!r}")
    text = kind == "text"
    optim = optim or ("sgd" if text else "adam")
    if isinstance(optim, str) and optim not in ("sgd", "adam"):
        raise ValueError(f"optim must be 'sgd', 'adam' or a callable lr -> PyroOptim, got {optim!r}")
    if lr is None:
        lr = 1.0 if optim == "sgd" else 1e-3
    _check_number("lr", lr, strict=True)
    stop_rule = stop_rule or ("drop" if text else "patience")
    decay_patience = decay_patience if decay_patience is not None else (2 if text else 20)
    decay_after = decay_after if decay_after is not None else (15 if text else 0)
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available")

    run_path = Path(run_dir) if run_dir is not None else None
    last_path = run_path / LAST_CHECKPOINT if run_path else None
    best_path = run_path / BEST_CHECKPOINT if run_path else None
    resuming = bool(resume and last_path is not None and last_path.exists())
    if last_path is not None and last_path.exists() and not resume:
        raise ValueError(
            f"run directory {run_path} already holds a training checkpoint; pass resume=True to continue it"
        )

    # ------------------------------------------------------------------ set up
    pyro.clear_param_store()
    if seed is not None:
        pyro.set_rng_seed(seed)
    modules = _modules_of(model, guide)
    for module in modules:
        if device is not None:
            module.to(device)
        module.train()

    first_args, first_kwargs = normalize_batch(_to_device(next(_iterate(train, 0, 0)), device))
    latent_names = _latent_sites(guide, first_args, first_kwargs)
    decoder_only = not latent_names

    schedule: Optional[KLSchedule] = None
    free_bits_handler: Optional[FreeBits] = None
    if not decoder_only:
        if method == "anneal" or anneal:
            schedule = linear_annealing(kl_start, warm_up, steps_per_epoch)
        elif method == "beta":
            schedule = beta_schedule(float(beta))
        elif method == "cyclical":
            schedule = cyclical(cycles, cycle_ratio, int(epochs), steps_per_epoch)
        elif method == "free-bits":
            free_bits_handler = FreeBits(float(free_bits))

    recorded: Dict[Any, Any] = {}
    train_model = _SiteRecorder("model", recorded)(model)
    train_guide = _SiteRecorder("guide", recorded)(guide)
    if schedule is not None:
        weight = KLWeight(schedule)
        train_model, train_guide = weight(train_model), weight(train_guide)
    if free_bits_handler is not None:
        train_model, train_guide = free_bits_handler.model(train_model), free_bits_handler.guide(train_guide)

    def guide_batch() -> Any:
        """A random training batch for an aggressive inner step."""
        if hasattr(train, "sample"):
            return _to_device(train.sample(), device)
        index = int(torch.randint(steps_per_epoch, ()))
        if hasattr(train, "__getitem__"):
            return _to_device(train[index], device)
        return _to_device(next(_iterate(train, 0, index)), device)

    normalizer = None
    if hasattr(train, "normalizer"):
        normalizer = lambda args, kwargs: float(train.normalizer(args))  # noqa: E731

    current_lr = float(lr)
    model_optim = _make_optim(optim, current_lr)
    guide_optim = _make_optim(optim, current_lr)
    svi = AggressiveSVI(
        train_model, train_guide, model_optim, loss if loss is not None else Trace_ELBO(),
        guide_batches=guide_batch, guide_optim=guide_optim, max_inner_steps=max_inner_steps,
        check_every=check_every, clip_norm=clip_norm, stop_rule=stop_rule, patience=patience,
        inner_loss_normalizer=normalizer, aggressive=(method == "aggressive" and not decoder_only),
    )
    # Probe the guide/model parameter split now (it draws random numbers), so that an
    # uninterrupted run and a resumed one never probe at different moments.
    svi.split_params(*first_args, **first_kwargs)

    config = {
        "method": method, "anneal": bool(anneal), "epochs": int(epochs), "kind": kind,
        "optim": optim if isinstance(optim, str) else getattr(optim, "__name__", "custom"),
        "lr": float(lr), "seed": seed, "clip_norm": clip_norm, "kl_start": kl_start, "warm_up": warm_up,
        "beta": beta, "cycles": cycles, "cycle_ratio": cycle_ratio, "free_bits": free_bits,
        "stop_rule": stop_rule, "patience": patience, "max_inner_steps": max_inner_steps,
        "check_every": check_every, "max_aggressive_epochs": max_aggressive_epochs, "lr_decay": lr_decay, "decay_patience": decay_patience,
        "decay_after": decay_after, "max_decays": max_decays, "steps_per_epoch": steps_per_epoch,
        "decoder_only": decoder_only, "iw_samples": iw_samples,
    }

    # training position and bookkeeping (all of it goes into checkpoints)
    pos = {
        "epoch": 0, "step": 0, "history": [], "best_val_loss": math.inf, "best_epoch": None,
        "plateau_loss": 1e4, "not_improved": 0, "decays": 0, "lr": current_lr, "stopped": None,
        "acc": {"loss": 0.0, "points": 0, "inner": 0, "steps": 0, "time": 0.0},
    }
    best_params: Optional[Dict[str, Any]] = None

    def optims() -> Dict[str, Any]:
        return {"model": svi.optim, "guide": svi.guide_optim}

    def set_lr(value: float, fresh: bool) -> None:
        nonlocal current_lr
        current_lr = value
        if fresh:  # the reference builds new optimizers after each decay
            svi.optim = _make_optim(optim, value)
            svi.guide_optim = _make_optim(optim, value)

    if resuming:
        state = load_checkpoint(last_path)
        meta = state["meta"]
        old = meta.get("config", {})
        for key in _RESUME_KEYS:
            if key in old and old[key] != config[key]:
                raise ValueError(
                    f"run directory {run_path} was trained with {key}={old[key]!r}, not {config[key]!r}; "
                    "resume with the same settings or use another run directory"
                )
        set_lr(float(meta["pos"]["lr"]), fresh=True)
        restore_training_state(state, optims(), device=device)
        svi.load_state_dict(meta["svi"])
        if hasattr(train, "load_state_dict") and meta.get("train_source") is not None:
            train.load_state_dict(meta["train_source"])
        pos.update(meta["pos"])
        if best_path is not None and best_path.exists():
            best_params = load_checkpoint(best_path)["params"]

    def checkpoint_meta() -> Dict[str, Any]:
        return {
            "config": config,
            "pos": _plain(pos),
            "svi": _plain(svi.state_dict()),
            "train_source": train.state_dict() if hasattr(train, "state_dict") else None,
        }

    def write_last() -> None:
        if last_path is None:
            return
        bad = nonfinite_params()
        if bad:  # never replace a good checkpoint with broken parameters
            raise TrainingDivergedError(
                f"parameter '{bad[0]}' is not finite at epoch {pos['epoch'] + 1}; checkpoint not written"
            )
        save_checkpoint(last_path, capture_training_state(optims(), checkpoint_meta()))

    def diverged(epoch: int, step: int, loss_value: float) -> TrainingDivergedError:
        where = f"epoch {epoch + 1}, step {step + 1} of {steps_per_epoch}"
        kept = f"; last good checkpoint kept at {last_path}" if last_path is not None and last_path.exists() else ""
        if not math.isfinite(loss_value):
            site = _find_bad_site(recorded) or "no single site found (check the loss's inputs)"
            return TrainingDivergedError(f"non-finite loss ({loss_value}) at {where}: {site}{kept}")
        bad = nonfinite_params()
        name = bad[0] if bad else "?"
        return TrainingDivergedError(
            f"non-finite gradient at {where}: parameter '{name}' became NaN or infinite "
            f"(the loss, {loss_value:.6g}, was finite){kept}"
        )

    def invalid_distribution(epoch: int, step: int, exc: ValueError) -> Exception:
        text = str(exc)
        if "found invalid values" not in text and "within the support" not in text:
            return exc  # not a numerical fault: let the original error through
        role, after = recorded.get("running", ("program", None))
        place = f"in the {role}" + (f" after site '{after}'" if after else " before its first sample site")
        first = text.strip().splitlines()[0].rstrip(":")
        return TrainingDivergedError(
            f"invalid (NaN or out-of-support) values at epoch {epoch + 1}, step {step + 1} of {steps_per_epoch}, "
            f"{place}: {first}"
        )

    def params_finite() -> bool:
        values = [p.detach() for _, p in pyro.get_param_store().named_parameters()]
        if not values:
            return True
        return bool(torch.stack([torch.isfinite(v).all() for v in values]).all())

    def validate() -> Dict[str, Any]:
        batches = _eval_batches(valid)
        if decoder_only:
            return _exact_metrics(model, batches)
        return evaluate(model, guide, batches)

    # ------------------------------------------------------------------ epochs
    while pos["stopped"] is None and pos["epoch"] < epochs:
        epoch = pos["epoch"]
        acc = pos["acc"]
        aggressive_this_epoch = svi.aggressive
        started = time.perf_counter()
        start = pos["step"]
        for step_offset, batch in enumerate(_iterate(train, epoch, start)):
            step = start + step_offset
            args, kwargs = normalize_batch(_to_device(batch, device))
            if schedule is not None:
                schedule.update(epoch, step)
            bad_input = _nonfinite_argument(args, kwargs)
            if bad_input is not None:
                raise ValueError(
                    f"training batch {step + 1} of epoch {epoch + 1} holds NaN or infinite values in {bad_input}"
                )
            recorded.clear()
            try:
                loss_value = float(svi.step(*args, **kwargs))
            except ValueError as exc:
                raise invalid_distribution(epoch, step, exc) from None
            if not math.isfinite(loss_value) or not params_finite():
                raise diverged(epoch, step, loss_value)
            acc["loss"] += loss_value
            acc["points"] += _num_points(args)
            acc["inner"] += svi.last_inner_steps
            acc["steps"] += 1
            _call_batch_callbacks(callbacks, {
                "epoch": epoch + 1, "step": step + 1, "steps": steps_per_epoch, "loss": loss_value,
                "inner_steps": svi.last_inner_steps, "aggressive": svi.aggressive,
                "kl_weight": schedule.value if schedule is not None else 1.0,
            })
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps_per_epoch:
                acc["time"] += time.perf_counter() - started
                started = time.perf_counter()
                pos["step"] = step + 1
                write_last()
        recorded.clear()

        metrics = validate()
        mi = metrics.get("mi")
        if svi.aggressive and mi is not None:
            svi.observe_mi(mi)
        if svi.aggressive and max_aggressive_epochs is not None and epoch + 1 >= max_aggressive_epochs:
            svi.stop_aggressive()
        val_loss = -float(metrics["elbo"])
        if not math.isfinite(val_loss):
            raise TrainingDivergedError(f"non-finite validation loss at epoch {epoch + 1}")

        improved = val_loss < pos["best_val_loss"]
        if improved:
            pos["best_val_loss"] = val_loss
            pos["best_epoch"] = epoch + 1
            best_params = capture_param_store()
            if best_path is not None:
                save_checkpoint(best_path, {"params": best_params, "meta": {"epoch": epoch + 1, "val_loss": val_loss}})

        # learning-rate decay on a plateau, as in the reference (text.py)
        decayed = False
        lr_used = current_lr
        if lr_decay is not None:
            if val_loss > pos["plateau_loss"]:
                pos["not_improved"] += 1
                if pos["not_improved"] >= decay_patience and epoch >= decay_after:
                    pos["plateau_loss"] = val_loss
                    pos["not_improved"] = 0
                    pos["decays"] += 1
                    pos["lr"] = current_lr * lr_decay
                    if best_params is not None:
                        restore_param_store(best_params)
                    set_lr(pos["lr"], fresh=True)
                    decayed = True
            else:
                pos["not_improved"] = 0
                pos["plateau_loss"] = val_loss

        acc["time"] += time.perf_counter() - started
        row = {
            "epoch": epoch + 1,
            "train_loss": acc["loss"] / max(acc["points"], 1),
            "val_loss": val_loss,
            "elbo": float(metrics["elbo"]),
            "recon": float(metrics["recon"]),
            "kl": float(metrics["kl"]),
            "mi": None if mi is None else float(mi),
            "au": metrics.get("au"),
            "aggressive": aggressive_this_epoch,
            "inner_steps": acc["inner"] / max(acc["steps"], 1),
            "kl_weight": schedule.value if schedule is not None else 1.0,
            "lr": lr_used,
            "decayed": decayed,
            "wall_time": acc["time"],
        }
        pos["history"].append(row)
        pos["epoch"] = epoch + 1
        pos["step"] = 0
        pos["acc"] = {"loss": 0.0, "points": 0, "inner": 0, "steps": 0, "time": 0.0}
        if lr_decay is not None and pos["decays"] >= max_decays:
            pos["stopped"] = f"learning rate decayed {max_decays} times"
        write_last()
        _call_epoch_callbacks(callbacks, row)

    stopped = pos["stopped"] or f"completed {epochs} epochs"

    # ------------------------------------------------------------------ test pass
    test_metrics = None
    if best_params is not None:
        restore_param_store(best_params)
    if test is not None:
        batches = _eval_batches(test)
        if decoder_only:
            test_metrics = _exact_metrics(model, batches)
            test_metrics["iw_nll"] = -test_metrics["elbo"]  # no latent: the likelihood is exact
        else:
            test_metrics = _plain(evaluate(model, guide, batches, iw_samples=iw_samples, iw_chunk_size=iw_chunk_size))
    return FitResult(
        history=[dict(r) for r in pos["history"]],
        test=test_metrics,
        best_epoch=pos["best_epoch"],
        best_val_loss=pos["best_val_loss"],
        stopped=stopped,
        decoder_only=decoder_only,
        run_dir=run_path,
        config=config,
    )
