"""The posterior-mean-space picture (He et al., Fig. 1) as an InferenceData group.

Each snapshot pairs, for the same data points, the model's true posterior mean and the
guide's; a lagging guide shows as points off the diagonal. The group
``posterior_mean_space`` has variables ``model_mean`` and ``guide_mean`` on dims
``(snapshot, point, latent_dim)``, the snapshot coordinate being its label ("epoch 2 (aggressive)").
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import arviz
    import xarray

__all__ = ["MEAN_SPACE_GROUP", "mean_space_dataset", "mean_space_from_inference_data"]

MEAN_SPACE_GROUP = "posterior_mean_space"


def _points_by_dims(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return array[:, None] if array.ndim == 1 else array


def mean_space_dataset(snapshots: Mapping[str, tuple[Any, Any]]) -> xarray.Dataset:
    """``{label: (model means, guide means)}``, each ``[N]`` or ``[N, D]``, as a Dataset (shorter
    snapshots padded with NaN)."""
    import xarray as xr

    if not snapshots:
        raise ValueError("posterior_mean_space: no snapshot")
    pairs = [(_points_by_dims(m), _points_by_dims(g)) for m, g in snapshots.values()]
    for label, (m, g) in zip(snapshots, pairs):
        if m.ndim != 2 or m.shape != g.shape:
            raise ValueError(f"posterior_mean_space[{label!r}]: model means {m.shape} and guide means {g.shape} "
                             "must both be [N] or [N, D], the same shape")
    if len({m.shape[1] for m, _ in pairs}) != 1:
        raise ValueError("posterior_mean_space: every snapshot needs the same number of latent dimensions")
    points, dims = max(m.shape[0] for m, _ in pairs), pairs[0][0].shape[1]
    model, guide = np.full((len(pairs), points, dims), np.nan), np.full((len(pairs), points, dims), np.nan)
    for i, (m, g) in enumerate(pairs):
        model[i, : len(m)], guide[i, : len(g)] = m, g
    axes = ("snapshot", "point", "latent_dim")
    return xr.Dataset(
        {"model_mean": (axes, model), "guide_mean": (axes, guide)},
        coords={"snapshot": np.asarray(list(snapshots), dtype=str), "point": np.arange(points),
                "latent_dim": np.arange(dims)},
    )


def mean_space_from_inference_data(idata: arviz.InferenceData) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The snapshots back as ``{label: (model means, guide means)}``, ``[N]`` for a 1-d latent
    (None without the group)."""
    if MEAN_SPACE_GROUP not in idata.groups():
        return None
    data = idata[MEAN_SPACE_GROUP]
    snapshots = {}
    for i, label in enumerate(data["snapshot"].values.tolist()):
        model, guide = data["model_mean"].values[i], data["guide_mean"].values[i]
        keep = ~(np.isnan(model).all(axis=1) & np.isnan(guide).all(axis=1))
        model, guide = model[keep], guide[keep]
        if model.shape[1] == 1:
            model, guide = model[:, 0], guide[:, 0]
        snapshots[str(label)] = (model, guide)
    return snapshots
