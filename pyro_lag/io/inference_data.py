"""ArviZ InferenceData of a fitted model: guide posterior draws, latent usage, training history.

One object (and one netCDF file, ``diagnostics.nc``) holds everything the report and a user
need to judge posterior collapse:

- ``posterior``: draws of the guide's local latents for a few observations, dims
  ``(chain, draw, obs, latent_dim)``;
- ``latent_usage``: per latent dimension, the KL to the prior, the variance of the posterior
  mean across the data (the active-unit statistic) and the active flag, dim ``latent_dim``;
- ``training``: the per-epoch history of :func:`pyro_lag.fit`, dim ``epoch`` (a custom group,
  added with ``add_groups`` because ``az.from_dict`` drops groups it does not know);
- ``attrs``: the final evaluation metrics (scalars), e.g. ``iw_nll``, ``kl``, ``mi``, ``au``.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyro_lag.estimators.active_units import ACTIVE_THRESHOLD
from pyro_lag.io.mean_space import MEAN_SPACE_GROUP, mean_space_dataset
from pyro_lag.trace.densities import SiteDensity
from pyro_lag.trace.sites import (
    find_data_plate,
    is_latent,
    local_latent_sites,
    normalize_batch,
    site_frame,
)

if TYPE_CHECKING:  # arviz warns on import: import it lazily, see _arviz()
    import arviz
    import xarray


USAGE_GROUP = "latent_usage"
TRAINING_GROUP = "training"


def _arviz():
    """Import arviz without its import-time FutureWarning (importing pyro_lag must stay silent)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _local_latent_values(trace, data_plate: str, sites: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """``{site: value as [obs, latent_dim]}`` for the local latents of one guide trace.

    Defaults to every non-auxiliary latent site in the data plate (for AutoNormal the
    constrained sites the model sees, not the auxiliary ``*_unconstrained`` ones). Entries
    masked out for a data point (padded time steps) are NaN.
    """
    if sites is None:
        local = local_latent_sites(trace, data_plate, include_delta=True)
        names = [
            s.name
            for s in local
            if not trace.nodes[s.name]["infer"].get("is_auxiliary")
            and not site_is_subsample(trace.nodes[s.name])  # a nested plate's own site
        ]
    else:
        names = list(sites)
    values = {}
    for name in names:
        site = trace.nodes.get(name)
        if site is None or not is_latent(site) or site_is_subsample(site):
            raise ValueError(f"sites: {name!r} is not a latent sample site of the guide")
        frame = site_frame(site, data_plate)
        if frame is None:
            raise ValueError(f"sites: {name!r} is not inside the data plate {data_plate!r}")
        density = SiteDensity.of(name, site, frame.dim)
        value = site["value"].to(torch.get_default_dtype()) if not site["value"].is_floating_point() else site["value"]
        if density.mask is not None:
            event = value.dim() - density.mask.dim()
            present = density.mask.reshape(density.mask.shape + (1,) * event).expand(value.shape)
            value = value.masked_fill(~present, math.nan)
        value = value.movedim(density.position, 0)
        values[name] = value.reshape(value.shape[0], -1)
    return values


def posterior_draws(
    guide: Callable,
    batch: Any,
    num_draws: int = 200,
    sites: Sequence[str] | None = None,
    max_obs: int | None = None,
    data_plate: str | None = None,
    model: Callable | None = None,
) -> dict[str, torch.Tensor]:
    """Sample the guide's local latents for the observations of one batch.

    Runs the guide ``num_draws`` times under ``poutine.trace`` without gradients and returns
    ``{site: Tensor[1, num_draws, obs, latent_dim]}`` (one chain: guide draws are independent).
    ``batch`` is a tuple of positional args, a bare tensor or an ``(args, kwargs)`` pair.
    ``sites`` defaults to the non-auxiliary latent sites in the data plate: the plate that
    holds the model's observations when ``model`` is given, or the one named ``data_plate``;
    ``max_obs`` keeps the first observations.
    """
    if num_draws < 1:
        raise ValueError(f"num_draws must be at least 1, got {num_draws}")
    if max_obs is not None and max_obs < 1:
        raise ValueError(f"max_obs must be at least 1, got {max_obs}")
    args, kwargs = normalize_batch(batch)
    draws: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for _ in range(num_draws):
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
            if data_plate is None:
                model_trace = None
                if model is not None:
                    model_trace = poutine.trace(poutine.replay(model, trace=trace)).get_trace(*args, **kwargs)
                data_plate = find_data_plate(trace, model_trace=model_trace, batch=(args, kwargs))
            for name, value in _local_latent_values(trace, data_plate, sites).items():
                draws.setdefault(name, []).append(value[:max_obs])
    return {name: torch.stack(values).unsqueeze(0) for name, values in draws.items()}


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _posterior_dataset_inputs(
    draws: Mapping[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, list[str]], dict[str, np.ndarray]]:
    """Arrays, dims and coords for ``az.from_dict`` from ``{site: [chain, draw, obs, latent]}``."""
    arrays, dims, coords = {}, {}, {}
    single = len(draws) == 1
    for name, value in draws.items():
        array = _to_numpy(value)
        if array.ndim == 3:  # scalar latent per observation
            array = array[..., None]
        if array.ndim != 4:
            raise ValueError(
                f"posterior_draws[{name!r}]: expected shape [chain, draw, obs, latent_dim], "
                f"got {tuple(array.shape)}"
            )
        latent = "latent_dim" if single else f"{name}_dim"
        arrays[name] = array
        dims[name] = ["obs", latent]
        coords["obs"] = np.arange(array.shape[2])
        coords[latent] = np.arange(array.shape[3])
    return arrays, dims, coords


def _vector(usage: Mapping[str, Any], *keys: str) -> np.ndarray | None:
    for key in keys:
        if key in usage and usage[key] is not None:
            return _to_numpy(usage[key]).reshape(-1)
    return None


def usage_dataset(usage: Mapping[str, Any], threshold: float = ACTIVE_THRESHOLD) -> "xarray.Dataset":
    """Per-dimension latent usage as a Dataset on dim ``latent_dim``.

    ``usage`` holds ``au_var`` (variance of the posterior mean per dimension; also accepted
    as ``posterior_mean_variance``), optionally ``kl`` or ``kl_dim`` (per-dimension KL in nats)
    and ``active`` (bool per dimension; computed as ``au_var >= threshold`` when absent).
    """
    import xarray as xr

    variance = _vector(usage, "au_var", "posterior_mean_variance")
    if variance is None:
        raise ValueError("usage: needs 'au_var', the per-dimension variance of the posterior mean")
    kl = _vector(usage, "kl_dim", "kl")
    if kl is not None and kl.size == 1 and variance.size > 1:
        kl = None  # a scalar total KL is a metric, not per-dimension usage
    active = _vector(usage, "active")
    if active is None:
        active = variance >= threshold
    for key, vec in (("kl", kl), ("active", active)):
        if vec is not None and vec.shape != variance.shape:
            raise ValueError(
                f"usage[{key!r}] has {vec.size} dimensions but au_var has {variance.size}"
            )
    data = {
        "posterior_mean_variance": ("latent_dim", variance.astype(np.float64)),
        "active": ("latent_dim", active.astype(bool)),
    }
    if kl is not None:
        data["kl"] = ("latent_dim", kl.astype(np.float64))
    return xr.Dataset(
        data,
        coords={"latent_dim": np.arange(variance.size)},
        attrs={"active_threshold": float(threshold), "kl_units": "nats"},
    )


def _scalar(value: Any) -> Any:
    """A plain Python scalar from tensors/numpy scalars; None stays None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _flatten_record(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten one history entry: nested dicts and sequences become ``key_sub`` / ``key_i``."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        value = _scalar(value)
        if isinstance(value, Mapping):
            flat.update(_flatten_record(value, prefix=f"{name}_"))
        elif isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
            items = _to_numpy(value).reshape(-1).tolist()
            flat.update({f"{name}_{i}": item for i, item in enumerate(items)})
        else:
            flat[name] = value
    return flat


def _column(name: str, values: list[Any]) -> np.ndarray:
    """One history column as a numpy array: bool, int, float (None -> NaN) or str."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (bool, np.bool_)) for v in present):
        if len(present) == len(values):
            return np.array(values, dtype=bool)
        return np.array([math.nan if v is None else float(v) for v in values])
    if all(isinstance(v, numbers.Real) for v in present):
        if len(present) == len(values) and all(isinstance(v, numbers.Integral) for v in present):
            return np.array(values, dtype=np.int64)
        return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    if all(isinstance(v, str) for v in present):
        return np.array(["" if v is None else v for v in values], dtype=str)
    kinds = sorted({type(v).__name__ for v in present})
    raise ValueError(f"history: column {name!r} mixes unsupported value types {kinds}")


def training_dataset(history: Sequence[Mapping[str, Any]]) -> "xarray.Dataset":
    """The per-epoch training history as a Dataset on dim ``epoch``.

    Each entry is one epoch's dict (``epoch``, ``train_loss``, ``elbo``, ``kl``, ``mi``, ``au``,
    ``aggressive``, ``inner_steps``, ``wall_time``, ``lr``, ...); keys missing in some epochs
    become NaN. ``epoch`` gives the coordinate (1, 2, ... when absent).
    """
    import xarray as xr

    if len(history) == 0:
        raise ValueError("history: no epochs recorded")
    records = [_flatten_record(entry) for entry in history]
    epochs = [r.pop("epoch", None) for r in records]
    if any(e is None for e in epochs):
        epochs = list(range(1, len(records) + 1))
    names: list[str] = []
    for record in records:
        names.extend(k for k in record if k not in names)
    data = {name: ("epoch", _column(name, [r.get(name) for r in records])) for name in names}
    return xr.Dataset(data, coords={"epoch": np.asarray(epochs, dtype=np.int64)})


def _metric_attrs(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """netCDF-safe attrs from final metrics: numbers, strings and 1-d numeric arrays; bool -> int."""
    attrs: dict[str, Any] = {}
    for key, value in metrics.items():
        value = _scalar(value)
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)):
            attrs[key] = int(value)
        elif isinstance(value, (numbers.Real, str)):
            attrs[key] = value
        elif isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
            array = _to_numpy(value).reshape(-1)
            if array.dtype == bool:
                array = array.astype(np.int8)
            if array.dtype.kind not in "iuf":
                raise ValueError(f"metrics[{key!r}]: arrays must be numeric, got {array.dtype}")
            attrs[key] = array
        else:
            raise ValueError(f"metrics[{key!r}]: unsupported value type {type(value).__name__}")
    return attrs


def to_inference_data(
    *,
    posterior_draws: Mapping[str, Any] | None = None,
    guide: Callable | None = None,
    batch: Any = None,
    num_draws: int = 200,
    max_obs: int | None = 8,
    usage: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    metrics: Mapping[str, Any] | None = None,
    threshold: float = ACTIVE_THRESHOLD,
    model: Callable | None = None,
    data_plate: str | None = None,
    posterior_mean_space: Mapping[str, tuple[Any, Any]] | None = None,
) -> "arviz.InferenceData":
    """Collect posterior draws, latent usage, training history and metrics in one InferenceData.

    Draws come either from ``posterior_draws`` (``{site: [chain, draw, obs, latent_dim]}``) or
    are sampled from ``guide`` on ``batch`` (``num_draws`` draws of the first ``max_obs``
    observations; ``model`` or ``data_plate`` tell the data plate where the guide alone cannot).
    ``usage`` defaults to the per-dimension entries of ``metrics`` (``au_var``
    and ``kl_dim``, as :func:`pyro_lag.evaluate` returns). Scalar metrics go to ``idata.attrs``.
    ``posterior_mean_space`` (label -> (model means, guide means)) becomes the group of that
    name (see :mod:`pyro_lag.io.mean_space`).
    """
    az = _arviz()
    if posterior_draws is not None and guide is not None:
        raise ValueError("to_inference_data: pass posterior_draws or guide, not both")
    if guide is not None:
        if batch is None:
            raise ValueError("to_inference_data: guide needs a batch to draw the posterior for")
        posterior_draws = _sample_posterior(guide, batch, num_draws=num_draws, max_obs=max_obs,
                                            data_plate=data_plate, model=model)
    if usage is None and metrics is not None and "au_var" in metrics:
        usage = metrics

    if posterior_draws:
        arrays, dims, coords = _posterior_dataset_inputs(posterior_draws)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            idata = az.from_dict(posterior=arrays, dims=dims, coords=coords)
    else:
        idata = az.InferenceData()

    groups = {}
    if usage is not None:
        groups[USAGE_GROUP] = usage_dataset(usage, threshold=threshold)
    if history:
        groups[TRAINING_GROUP] = training_dataset(history)
    if posterior_mean_space:
        groups[MEAN_SPACE_GROUP] = mean_space_dataset(posterior_mean_space)
    if groups:
        idata.add_groups(groups)
    if metrics is not None:
        idata.attrs = _metric_attrs(
            {k: v for k, v in metrics.items() if k not in ("au_var", "kl_dim", "active")}
        )
    return idata


_sample_posterior = posterior_draws  # to_inference_data's keyword of the same name shadows it


def history_from_inference_data(idata: "arviz.InferenceData") -> list[dict[str, Any]]:
    """The training history back as a list of per-epoch dicts (empty without a training group)."""
    if TRAINING_GROUP not in idata.groups():
        return []
    data = idata[TRAINING_GROUP]
    history = []
    for i, epoch in enumerate(data["epoch"].values.tolist()):
        entry: dict[str, Any] = {"epoch": epoch}
        for name, variable in data.data_vars.items():
            entry[str(name)] = variable.values[i].item()
        history.append(entry)
    return history


def usage_from_inference_data(idata: "arviz.InferenceData") -> dict[str, np.ndarray] | None:
    """The latent usage back as ``{au_var, active[, kl], threshold}`` (None without that group)."""
    if USAGE_GROUP not in idata.groups():
        return None
    data = idata[USAGE_GROUP]
    usage: dict[str, Any] = {
        "au_var": data["posterior_mean_variance"].values,
        "active": data["active"].values.astype(bool),
        "threshold": float(data.attrs.get("active_threshold", ACTIVE_THRESHOLD)),
    }
    if "kl" in data:
        usage["kl"] = data["kl"].values
    return usage
