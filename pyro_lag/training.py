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
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Union,
)

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .checkpoint import (
    capture_param_store,
    capture_training_state,
    load_checkpoint,
    nonfinite_params,
    plain_data,
    restore_param_store,
    restore_training_state,
    save_checkpoint,
)
from .diagnostics import eval_mode, evaluate
from .handlers import FreeBits, KLWeight, cyclical, linear_annealing
from .handlers import beta as beta_schedule
from .losses import make_loss
from .sites import is_latent, normalize_batch, raw_log_prob, require_local_latent
from .svi import AggressiveSVI

__all__ = ["fit", "FitResult", "TrainingDivergedError", "METHODS", "LAST_CHECKPOINT", "BEST_CHECKPOINT"]

METHODS = ("aggressive", "standard", "anneal", "beta", "cyclical", "free-bits")
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"

# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = (
    "method", "anneal", "optim", "lr", "seed", "kl_start", "warm_up", "beta", "cycles", "cycle_ratio",
    "free_bits", "stop_rule", "patience", "mi_noise", "clip_norm", "clip_scope", "loss", "max_inner_steps", "check_every",
    "max_aggressive_epochs", "lr_decay", "decay_patience", "decay_after", "max_decays", "steps_per_epoch",
    "decoder_only",
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


def _per_example(fn: Callable) -> Callable:
    """Scale a program's log-densities by 1/batch size, so the loss is a per-example mean.

    The reference averages the loss over the batch; with SGD at lr 1.0 a summed loss
    would take steps batch-size times too long.
    """

    def scaled(*args: Any, **kwargs: Any) -> Any:
        with poutine.scale(scale=1.0 / _num_points(args)):
            return fn(*args, **kwargs)

    return scaled


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
    require_local_latent(trace)  # a guide with only global latents is a clear error
    return [name for name, site in trace.nodes.items() if is_latent(site)]


def exact_metrics(model: Callable, batches: Iterable[Any], progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """Per-data-point log-likelihood of a model without latents: its ELBO is log p(x) exactly."""
    total, count = 0.0, 0
    batches = list(batches)
    if progress is not None:
        progress(0, len(batches))
    with torch.no_grad(), eval_mode(model):
        for done, batch in enumerate(batches, 1):
            args, kwargs = normalize_batch(batch)
            trace = poutine.trace(model).get_trace(*args, **kwargs)
            for site in trace.nodes.values():
                if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
                    total += float(raw_log_prob(site).sum())
            count += _num_points(args)
            if progress is not None:
                progress(done, len(batches))
    if count == 0:
        raise ValueError("evaluation got no batch")
    ll = total / count
    return {"elbo": ll, "recon": ll, "kl": 0.0, "mi": None, "au": None, "au_var": None, "num_points": count}



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


# --------------------------------------------------------------------------- settings


def resolve_settings(options: Dict[str, Any], kind: Optional[str], steps_per_epoch: int) -> Dict[str, Any]:
    """Check ``fit``'s options (one-line ValueErrors) and fill in the per-kind reference defaults."""
    o = dict(options)
    method = o["method"]
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_number("epochs", o["epochs"], minimum=1, integer=True)
    if o["anneal"] and method not in ("aggressive", "anneal", "standard"):
        raise ValueError(f"anneal=True combines with method aggressive or standard, not {method!r}")
    if method == "beta":
        if o["beta"] is None:
            raise ValueError("method 'beta' needs the KL weight beta")
        _check_number("beta", o["beta"])
    if method == "free-bits":
        if o["free_bits"] is None:
            raise ValueError("method 'free-bits' needs free_bits (nats per latent dimension)")
        _check_number("free_bits", o["free_bits"])
    for name in ("iw_samples", "max_decays"):
        _check_number(name, o[name], integer=True)
    _check_number("mi_samples", o["mi_samples"], minimum=1, integer=True)
    for name in ("max_aggressive_epochs", "checkpoint_every"):
        if o[name] is not None:
            _check_number(name, o[name], minimum=1, integer=True)
    if o["clip_norm"] is not None:
        _check_number("clip_norm", o["clip_norm"], strict=True)
    if o["lr_decay"] is not None and not 0.0 < o["lr_decay"] < 1.0:
        raise ValueError(f"lr_decay must lie in (0, 1) or be None, got {o['lr_decay']!r}")
    if kind not in (None, "text", "image"):
        raise ValueError(f"kind must be 'text' or 'image', got {kind!r}")
    text = kind == "text"
    optim = o["optim"] or ("sgd" if text else "adam")
    if isinstance(optim, str) and optim not in ("sgd", "adam"):
        raise ValueError(f"optim must be 'sgd', 'adam' or a callable lr -> PyroOptim, got {optim!r}")
    o["optim"] = optim
    if o["lr"] is None:
        o["lr"] = 1.0 if optim == "sgd" else 1e-3
    _check_number("lr", o["lr"], strict=True)
    o["lr"] = float(o["lr"])
    o["kind"] = kind
    o["stop_rule"] = o["stop_rule"] or ("drop" if text else "patience")
    if o["patience"] is None:
        o["patience"] = 5 if o["stop_rule"] == "patience" else 2
    if o["decay_patience"] is None:
        o["decay_patience"] = 2 if text else 20
    if o["decay_after"] is None:
        o["decay_after"] = 15 if text else 0
    o["steps_per_epoch"] = steps_per_epoch
    return o


def _config_record(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The settings as plain data, for checkpoints and the result."""
    record = dict(settings)
    if callable(record["optim"]):
        record["optim"] = getattr(record["optim"], "__name__", "custom")
    return record


def _check_resumable(old: Dict[str, Any], new: Dict[str, Any], run_path: Path) -> None:
    for key in _RESUME_KEYS:
        if key in old and old[key] != new.get(key):
            raise ValueError(
                f"run directory {run_path} was trained with {key}={old[key]!r}, not {new.get(key)!r}; "
                "resume with the same settings or use another run directory"
            )


def _kl_handlers(settings: Dict[str, Any]) -> tuple:
    """The KL schedule and free-bits handler that the method asks for (None where not used)."""
    method, steps = settings["method"], settings["steps_per_epoch"]
    if method == "anneal" or settings["anneal"]:
        return linear_annealing(settings["kl_start"], settings["warm_up"], steps), None
    if method == "beta":
        return beta_schedule(float(settings["beta"])), None
    if method == "cyclical":
        return cyclical(settings["cycles"], settings["cycle_ratio"], int(settings["epochs"]), steps), None
    if method == "free-bits":
        return None, FreeBits(float(settings["free_bits"]))
    return None, None


# --------------------------------------------------------------------------- the run


def _new_position(lr: float) -> Dict[str, Any]:
    """Where training stands; all of it is plain data and goes into every checkpoint."""
    return {
        "epoch": 0, "step": 0, "history": [], "best_val_loss": math.inf, "best_epoch": None,
        "plateau_loss": 1e4, "not_improved": 0, "decays": 0, "lr": lr, "stopped": None,
        "acc": _new_accumulator(),
    }


def _new_accumulator() -> Dict[str, Any]:
    return {"loss": 0.0, "points": 0, "inner": 0, "steps": 0, "time": 0.0}


class _Run:
    """One training run: the SVI object and its optimizers, the position, and the checkpoints."""

    def __init__(self, model, guide, train, valid, settings, *, loss, device, run_path, callbacks) -> None:
        self.model, self.guide = model, guide
        self.train_source, self.valid = train, valid
        self.settings = settings
        self.device = device
        self.callbacks = list(callbacks)
        self.steps_per_epoch = settings["steps_per_epoch"]
        self.last_path = run_path / LAST_CHECKPOINT if run_path is not None else None
        self.best_path = run_path / BEST_CHECKPOINT if run_path is not None else None
        self.pos = _new_position(settings["lr"])
        self.best_params: Optional[Dict[str, Any]] = None

        first_args, first_kwargs = normalize_batch(_to_device(next(_iterate(train, 0, 0)), device))
        self.decoder_only = not _latent_sites(guide, first_args, first_kwargs)
        self.schedule, free_bits = (None, None) if self.decoder_only else _kl_handlers(settings)

        # the programs SVI runs: site recorder (to name a NaN's source), then KL weight / free bits
        self.recorded: Dict[Any, Any] = {}
        train_model = _SiteRecorder("model", self.recorded)(model)
        train_guide = _SiteRecorder("guide", self.recorded)(guide)
        if self.schedule is not None:
            weight = KLWeight(self.schedule)
            train_model, train_guide = weight(train_model), weight(train_guide)
        if free_bits is not None:
            train_model, train_guide = free_bits.model(train_model), free_bits.guide(train_guide)

        train_model, train_guide = _per_example(train_model), _per_example(train_guide)
        # Inner-loop windows compare the summed loss per token (text) or per example (images),
        # as the reference; the step's loss is a per-example mean, so it is weighted by B.
        def normalizer(args: tuple, kwargs: dict) -> tuple[float, float]:
            points = _num_points(args)
            units = float(train.normalizer(args)) if hasattr(train, "normalizer") else float(points)
            return float(points), units
        elbo = make_loss(loss, model, guide, (first_args, first_kwargs))
        self.svi = AggressiveSVI(
            train_model, train_guide, self._make_optim(settings["lr"]), elbo,
            guide_batches=self._guide_batch, guide_optim=self._make_optim(settings["lr"]),
            max_inner_steps=settings["max_inner_steps"], check_every=settings["check_every"],
            clip_norm=settings["clip_norm"], clip_scope=settings["clip_scope"], stop_rule=settings["stop_rule"],
            patience=settings["patience"], mi_noise=settings["mi_noise"], mi_every=None,
            inner_loss_normalizer=normalizer, aggressive=settings["method"] == "aggressive" and not self.decoder_only,
        )
        # Probe the guide/model parameter split now (it draws random numbers), so that an
        # uninterrupted run and a resumed one never probe at different moments.
        self.svi.split_params(*first_args, **first_kwargs)

    # ------------------------------------------------------------------ pieces

    def _make_optim(self, lr: float) -> Any:
        optim = self.settings["optim"]
        if callable(optim):
            return optim(lr)
        return pyro.optim.SGD({"lr": lr}) if optim == "sgd" else pyro.optim.Adam({"lr": lr})

    def _guide_batch(self) -> Any:
        """A random training batch for an aggressive inner step."""
        train = self.train_source
        if hasattr(train, "sample"):
            return _to_device(train.sample(), self.device)
        index = int(torch.randint(self.steps_per_epoch, ()))
        if hasattr(train, "__getitem__"):
            return _to_device(train[index], self.device)
        return _to_device(next(_iterate(train, 0, index)), self.device)

    def optims(self) -> Dict[str, Any]:
        return {"model": self.svi.optim, "guide": self.svi.guide_optim}

    def set_lr(self, lr: float) -> None:
        """Fresh optimizers with learning rate ``lr`` (the reference rebuilds them after each decay)."""
        self.pos["lr"] = lr
        self.svi.optim = self._make_optim(lr)
        self.svi.guide_optim = self._make_optim(lr)

    def kl_weight(self) -> float:
        return self.schedule.value if self.schedule is not None else 1.0

    # ------------------------------------------------------------------ checkpoints

    def restore(self, state: Dict[str, Any]) -> None:
        """Continue from a ``last.pt`` state: parameters, optimizers, RNGs, data order, position."""
        meta = state["meta"]
        _check_resumable(meta.get("config", {}), self.config, self.last_path.parent)
        self.set_lr(float(meta["pos"]["lr"]))
        restore_training_state(state, self.optims(), device=self.device)
        self.svi.load_state_dict(meta["svi"])
        if hasattr(self.train_source, "load_state_dict") and meta.get("train_source") is not None:
            self.train_source.load_state_dict(meta["train_source"])
        self.pos.update(meta["pos"])
        if self.best_path is not None and self.best_path.exists():
            self.best_params = load_checkpoint(self.best_path)["params"]

    @property
    def config(self) -> Dict[str, Any]:
        return {**_config_record(self.settings), "decoder_only": self.decoder_only}

    def write_last(self) -> None:
        if self.last_path is None:
            return
        bad = nonfinite_params()
        if bad:  # never replace a good checkpoint with broken parameters
            raise TrainingDivergedError(
                f"parameter '{bad[0]}' is not finite at epoch {self.pos['epoch'] + 1}; checkpoint not written"
            )
        meta = {
            "config": self.config,
            "pos": plain_data(self.pos),
            "svi": plain_data(self.svi.state_dict()),
            "train_source": self.train_source.state_dict() if hasattr(self.train_source, "state_dict") else None,
        }
        save_checkpoint(self.last_path, capture_training_state(self.optims(), meta))

    def write_best(self, epoch: int, val_loss: float) -> None:
        self.best_params = capture_param_store()
        if self.best_path is not None:
            save_checkpoint(self.best_path, {"params": self.best_params, "meta": {"epoch": epoch + 1, "val_loss": val_loss}})

    # ------------------------------------------------------------------ numerical faults

    def _where(self, epoch: int, step: int) -> str:
        return f"epoch {epoch + 1}, step {step + 1} of {self.steps_per_epoch}"

    def _kept(self) -> str:
        if self.last_path is not None and self.last_path.exists():
            return f"; last good checkpoint kept at {self.last_path}"
        return ""

    def diverged(self, epoch: int, step: int, loss_value: float) -> TrainingDivergedError:
        if not math.isfinite(loss_value):
            site = _find_bad_site(self.recorded) or "no single site found (check the loss's inputs)"
            return TrainingDivergedError(
                f"non-finite loss ({loss_value}) at {self._where(epoch, step)}: {site}{self._kept()}"
            )
        bad = nonfinite_params()
        return TrainingDivergedError(
            f"non-finite gradient at {self._where(epoch, step)}: parameter '{bad[0] if bad else '?'}' became "
            f"NaN or infinite (the loss, {loss_value:.6g}, was finite){self._kept()}"
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
            f"invalid (NaN or out-of-support) values at {self._where(epoch, step)}, {place}: {first}{self._kept()}"
        )

    # ------------------------------------------------------------------ training

    def step(self, epoch: int, step: int, batch: Any) -> float:
        """One training step, refusing bad input and stopping on any non-finite number."""
        args, kwargs = normalize_batch(_to_device(batch, self.device))
        if self.schedule is not None:
            self.schedule.update(epoch, step)
        bad_input = _nonfinite_argument(args, kwargs)
        if bad_input is not None:
            raise ValueError(
                f"training batch {step + 1} of epoch {epoch + 1} holds NaN or infinite values in {bad_input}"
            )
        self.recorded.clear()
        try:
            loss_value = float(self.svi.step(*args, **kwargs))
        except ValueError as exc:
            raise self.invalid_distribution(epoch, step, exc) from None
        if not math.isfinite(loss_value) or not _params_finite():
            raise self.diverged(epoch, step, loss_value)
        acc = self.pos["acc"]
        acc["loss"] += loss_value * _num_points(args)
        acc["points"] += _num_points(args)
        acc["inner"] += self.svi.last_inner_steps
        acc["steps"] += 1
        return loss_value

    def train_epoch(self, epoch: int) -> None:
        """The epoch's remaining steps, from ``pos["step"]``, with mid-epoch checkpoints."""
        every = self.settings["checkpoint_every"]
        started = time.perf_counter()
        start = self.pos["step"]
        for offset, batch in enumerate(_iterate(self.train_source, epoch, start)):
            step = start + offset
            loss_value = self.step(epoch, step, batch)
            _call_batch_callbacks(self.callbacks, {
                "epoch": epoch + 1, "step": step + 1, "steps": self.steps_per_epoch, "loss": loss_value,
                "inner_steps": self.svi.last_inner_steps, "aggressive": self.svi.aggressive,
                "kl_weight": self.kl_weight(),
            })
            if every and (step + 1) % every == 0 and step + 1 < self.steps_per_epoch:
                now = time.perf_counter()
                self.pos["acc"]["time"] += now - started
                started = now
                self.pos["step"] = step + 1
                self.write_last()
        self.recorded.clear()
        self.pos["acc"]["time"] += time.perf_counter() - started

    def evaluate(self, batches: Iterable[Any], iw_samples: int = 0, iw_chunk_size: int = 100,
                 progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
        if self.decoder_only:
            metrics = exact_metrics(self.model, batches, progress)
            if iw_samples > 0:
                metrics["iw_nll"] = -metrics["elbo"]  # no latent: the likelihood is exact
            return metrics
        return plain_data(evaluate(self.model, self.guide, batches, iw_samples=iw_samples, iw_chunk_size=iw_chunk_size,
                               mi_samples=self.settings["mi_samples"], progress=progress))

    def decay_on_plateau(self, epoch: int, val_loss: float) -> bool:
        """The reference's rule: after ``decay_patience`` epochs above the plateau loss (from epoch
        ``decay_after`` on), scale lr by ``lr_decay``, reload the best parameters, new optimizers."""
        s, pos = self.settings, self.pos
        if s["lr_decay"] is None:
            return False
        if val_loss <= pos["plateau_loss"]:
            pos["not_improved"] = 0
            pos["plateau_loss"] = val_loss
            return False
        pos["not_improved"] += 1
        if pos["not_improved"] < s["decay_patience"] or epoch < s["decay_after"]:
            return False
        pos["plateau_loss"] = val_loss
        pos["not_improved"] = 0
        pos["decays"] += 1
        if self.best_params is not None:
            restore_param_store(self.best_params)
        self.set_lr(pos["lr"] * s["lr_decay"])
        return True

    def end_epoch(self, epoch: int) -> Dict[str, Any]:
        """Validate, update aggressive mode, best parameters and lr; record and checkpoint the epoch."""
        s, pos, acc = self.settings, self.pos, self.pos["acc"]
        started = time.perf_counter()
        aggressive = self.svi.aggressive
        metrics = self.evaluate(_eval_batches(self.valid))
        mi = metrics.get("mi")
        if self.svi.aggressive and mi is not None:
            self.svi.observe_mi(mi, metrics.get("mi_se"))
        if self.svi.aggressive and s["max_aggressive_epochs"] is not None and epoch + 1 >= s["max_aggressive_epochs"]:
            self.svi.stop_aggressive()
        val_loss = -float(metrics["elbo"])
        if not math.isfinite(val_loss):
            raise TrainingDivergedError(f"non-finite validation loss at epoch {epoch + 1}{self._kept()}")
        if val_loss < pos["best_val_loss"]:
            pos["best_val_loss"], pos["best_epoch"] = val_loss, epoch + 1
            self.write_best(epoch, val_loss)
        lr_used = pos["lr"]
        decayed = self.decay_on_plateau(epoch, val_loss)
        row = {
            "epoch": epoch + 1,
            "train_loss": acc["loss"] / max(acc["points"], 1),
            "val_loss": val_loss,
            "elbo": float(metrics["elbo"]),
            "recon": float(metrics["recon"]),
            "kl": float(metrics["kl"]),
            "mi": None if mi is None else float(mi),
            "mi_se": None if metrics.get("mi_se") is None else float(metrics["mi_se"]),
            "au": metrics.get("au"),
            "aggressive": aggressive,
            "inner_steps": acc["inner"] / max(acc["steps"], 1),
            "kl_weight": self.kl_weight(),
            "lr": lr_used,
            "decayed": decayed,
            "wall_time": acc["time"] + time.perf_counter() - started,
        }
        pos["history"].append(row)
        pos["epoch"], pos["step"], pos["acc"] = epoch + 1, 0, _new_accumulator()
        if s["lr_decay"] is not None and pos["decays"] >= s["max_decays"]:
            pos["stopped"] = f"learning rate decayed {s['max_decays']} times"
        self.write_last()
        return row

    def run(self) -> None:
        while self.pos["stopped"] is None and self.pos["epoch"] < self.settings["epochs"]:
            epoch = self.pos["epoch"]
            self.train_epoch(epoch)
            row = self.end_epoch(epoch)
            _call_epoch_callbacks(self.callbacks, row)


def _params_finite() -> bool:
    """Whether every parameter in the store is finite (one device sync for all of them)."""
    values = [p.detach() for _, p in pyro.get_param_store().named_parameters() if p.numel() > 0]
    if not values:
        return True
    # min and max of each tensor are finite exactly when all of it is: one small stack, one sync.
    extremes = [torch.stack(torch.aminmax(v)).double() for v in values if v.is_floating_point()]
    return not extremes or bool(torch.isfinite(torch.stack(extremes)).all())


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
    loss: Any = "exact",
    clip_norm: Optional[float] = 5.0,
    clip_scope: str = "joint-exact",
    anneal: bool = False,
    kl_start: float = 0.1,
    warm_up: float = 10,
    beta: Optional[float] = None,
    cycles: int = 4,
    cycle_ratio: float = 0.5,
    free_bits: Optional[float] = None,
    stop_rule: Optional[str] = None,
    patience: Optional[int] = None,
    mi_noise: float = 2.0,
    mi_samples: int = 4,
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
    test_progress: Optional[Callable[[int, int], None]] = None,
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
        ``aggressive`` (the paper's "+ anneal" rows). A guide without latent variables
        (decoder-only baseline) trains as plain SVI whatever the method.
    :param kind: ``text`` or ``image`` (default: the model owner's ``.kind``); picks the
        reference defaults: text uses SGD lr 1.0, the ``drop`` stop rule and lr decay
        after 2 epochs without improvement from the 16th epoch on; images use Adam lr
        1e-3, the ``patience`` stop rule and a decay patience of 20 epochs.
    :param optim: ``"sgd"``, ``"adam"`` or ``lr -> PyroOptim``; the guide and the model get
        separate optimizers with the same learning rate.
    :param stop_rule, patience: how validation MI ends aggressive mode (see ``AggressiveSVI``);
        ``max_aggressive_epochs`` ends it after that many epochs at the latest.
    :param lr_decay: on a plateau, multiply lr by this and reload the best parameters,
        at most ``max_decays`` times, then stop (None: never decay).
    :param seed: seeds every RNG at the start (None leaves them alone). The param store is
        cleared first, so build model and guide with the same seed for reproducible runs.
    :param run_dir: where ``last.pt`` and ``best.pt`` go (atomically); ``resume=True``
        continues from ``last.pt`` exactly where it stopped, bitwise on CPU.
    :param checkpoint_every: also write ``last.pt`` every this many steps within an epoch.
    :param callbacks: objects with ``on_epoch_end(row)`` and/or ``on_batch_end(info)``, or
        plain callables called with each epoch's history row.
    :param test_progress: ``f(done, total)`` called as the final test pass goes through its batches.
    :param iw_samples: importance samples for the final test pass's IW-NLL (0: none). The
        test pass evaluates the best parameters, which stay in the param store afterwards.
    :raises TrainingDivergedError: on a NaN or infinite loss or parameter, naming the epoch,
        step and site; checkpoints written before it are kept.
    """
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
    settings = resolve_settings(
        dict(
            method=method, epochs=epochs, optim=optim, lr=lr, clip_norm=clip_norm, anneal=bool(anneal),
            kl_start=kl_start, warm_up=warm_up, beta=beta, cycles=cycles, cycle_ratio=cycle_ratio,
            free_bits=free_bits, stop_rule=stop_rule, patience=patience, mi_noise=mi_noise, mi_samples=mi_samples,
            loss=loss if isinstance(loss, (str, type(None))) else type(loss).__name__, clip_scope=clip_scope,
            max_inner_steps=max_inner_steps,
            check_every=check_every, max_aggressive_epochs=max_aggressive_epochs, lr_decay=lr_decay,
            decay_patience=decay_patience, decay_after=decay_after, max_decays=max_decays, seed=seed,
            checkpoint_every=checkpoint_every, iw_samples=iw_samples,
        ),
        kind,
        steps_per_epoch,
    )
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available")
    run_path = Path(run_dir) if run_dir is not None else None
    last_path = run_path / LAST_CHECKPOINT if run_path is not None else None
    if last_path is not None and last_path.exists() and not resume:
        raise ValueError(
            f"run directory {run_path} already holds a training checkpoint; pass resume=True to continue it"
        )

    pyro.clear_param_store()
    if seed is not None:
        pyro.set_rng_seed(seed)
    for module in _modules_of(model, guide):
        if device is not None:
            module.to(device)
        module.train()
    run = _Run(model, guide, train, valid, settings, loss=loss, device=device, run_path=run_path,
               callbacks=callbacks)
    if resume and last_path is not None and last_path.exists():
        run.restore(load_checkpoint(last_path))
    run.run()

    if run.best_params is not None:
        restore_param_store(run.best_params)
    test_metrics = None
    if test is not None:
        test_metrics = run.evaluate(_eval_batches(test), iw_samples=iw_samples, iw_chunk_size=iw_chunk_size,
                                    progress=test_progress)
    return FitResult(
        history=[dict(r) for r in run.pos["history"]],
        test=test_metrics,
        best_epoch=run.pos["best_epoch"],
        best_val_loss=run.pos["best_val_loss"],
        stopped=run.pos["stopped"] or f"completed {epochs} epochs",
        decoder_only=run.decoder_only,
        run_dir=run_path,
        config=run.config,
    )
