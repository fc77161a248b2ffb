"""The report's figures, drawn with matplotlib's Agg canvas and returned as PNG data URIs.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot), so drawing a report
neither changes the user's backend nor leaks figures. Each function returns a
``data:image/png;base64,...`` string ready for an ``<img src>``.
"""
from __future__ import annotations

import base64
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from pyro_lag.estimators.active_units import ACTIVE_THRESHOLD

if TYPE_CHECKING:
    import arviz

AGGRESSIVE_COLOR = "#f6d9a5"
ACTIVE_COLOR = "#2a7ab0"
INACTIVE_COLOR = "#b8c2cc"
LINE_COLOR = "#1f4e79"
THRESHOLD_COLOR = "#c0392b"
DPI = 110


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_data_uri(fig: Figure) -> str:
    """Encode a figure as a base64 PNG data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def aggressive_spans(epochs: Sequence[int], aggressive: Sequence[Any]) -> list[tuple[float, float]]:
    """Contiguous runs of aggressive epochs as ``(start, end)`` x-intervals (epoch +- 0.5)."""
    spans: list[tuple[float, float]] = []
    start = previous = None
    for epoch, flag in zip(epochs, aggressive):
        on = bool(flag) if flag is not None and not _is_nan(flag) else False
        if on and start is None:
            start = epoch
        if not on and start is not None and previous is not None:
            spans.append((start - 0.5, previous + 0.5))
            start = None
        previous = epoch
    if start is not None and previous is not None:
        spans.append((start - 0.5, previous + 0.5))
    return spans


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


TRAINING_PANELS = (
    # key, title, lowest top of the y axis (None: free axis, may be negative)
    ("elbo", "ELBO (validation, nats)", None),
    ("kl", "KL(q(z|x) || p(z)) (nats)", 0.25),
    ("mi", "mutual information I_q(x; z) (nats)", 0.25),
    ("au", "active units", 1.0),
    ("inner_steps", "guide steps per model step", 1.0),
    ("lr", "learning rate", 0.0),
)
COLLAPSE_PANELS = ("kl", "mi")


def _series(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array(
        [np.nan if h.get(key) is None else float(h[key]) for h in history], dtype=np.float64
    )


def training_curves(history: Sequence[Mapping[str, Any]], collapse_line: float | None = 0.1) -> str | None:
    """ELBO, KL, MI, AU, inner steps and learning rate per epoch, aggressive epochs shaded.

    Non-negative quantities start at 0 so that a collapsed run looks flat at the bottom;
    KL and MI panels mark ``collapse_line``. Panels whose key never appears in the history
    are left out; None when none appears.
    """
    if not history:
        return None
    panels = [p for p in TRAINING_PANELS if any(h.get(p[0]) is not None for h in history)]
    if not panels:
        return None
    epochs = [int(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    spans = aggressive_spans(epochs, [h.get("aggressive") for h in history])
    ncols = 3 if len(panels) > 4 else 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(4.0 * ncols, 2.9 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    marked_collapse = False
    for ax, (key, label, min_top) in zip(axes, panels):
        values = _series(history, key)
        for start, end in spans:
            ax.axvspan(start, end, color=AGGRESSIVE_COLOR, zorder=0, lw=0)
        ax.plot(epochs, values, marker="o", ms=3, color=LINE_COLOR, lw=1.6)
        if key == "elbo" and any(h.get("train_loss") is not None for h in history):
            ax.plot(epochs, -_series(history, "train_loss"), color="#7f8c8d", lw=1.2, ls="--",
                    label="\u2212 training loss")
            ax.legend(loc="lower right", fontsize=8, frameon=False)
        if key in COLLAPSE_PANELS and collapse_line is not None:
            ax.axhline(collapse_line, color=THRESHOLD_COLOR, ls=":", lw=1.2)
            marked_collapse = True
        low, high = np.nanmin(values), np.nanmax(values)
        if key == "lr" and low > 0 and high / low > 10:
            ax.set_yscale("log")
        elif min_top is not None and low >= 0:
            top = max(high * 1.08, min_top)
            ax.set_ylim(0, top if top > 0 else 1.0)
        if key in ("au", "inner_steps"):
            ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, lw=0.5)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles: list[Artist] = []
    if spans:
        handles.append(Patch(color=AGGRESSIVE_COLOR, label="aggressive phase"))
    if marked_collapse:
        handles.append(Line2D([], [], color=THRESHOLD_COLOR, ls=":", lw=1.2,
                              label=f"collapse threshold {collapse_line:g} nats"))
    if handles:
        fig.legend(handles=handles, loc="outside upper right", fontsize=9, frameon=False, ncols=2)
    return to_data_uri(fig)


def _log_floor(values: np.ndarray, threshold: float | None = None) -> float:
    positive = values[values > 0]
    floor = positive.min() / 3 if positive.size else 1e-6
    if threshold is not None:
        floor = min(floor, threshold / 10)
    return max(floor, 1e-12)


def latent_usage(usage: Mapping[str, Any], threshold: float = ACTIVE_THRESHOLD) -> str:
    """Per-dimension bars of KL and posterior-mean variance (log scale), the threshold marked.

    Active dimensions are coloured; values of zero are drawn at the bottom of the log axis.
    """
    variance = as_array(usage["au_var"]).reshape(-1).astype(np.float64)
    active = usage.get("active")
    active = variance >= threshold if active is None else as_array(active).reshape(-1).astype(bool)
    kl = usage.get("kl")
    kl = None if kl is None else as_array(kl).reshape(-1).astype(np.float64)
    dims = np.arange(variance.size)
    colors = [ACTIVE_COLOR if a else INACTIVE_COLOR for a in active]
    panels: list[tuple[str, np.ndarray, float | None]] = [
        ("variance of the posterior mean E_q[z_d | x]", variance, threshold)
    ]
    if kl is not None:
        panels.insert(0, ("KL(q(z_d|x) || p(z_d)) per dimension (nats)", kl, None))
    width = min(max(4.5, 0.28 * variance.size + 2.5), 7.5)
    fig = _new_figure(width * len(panels), 3.2)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, (label, values, line) in zip(axes, panels):
        floor = _log_floor(values, line)
        top = max(float(np.nanmax(values)) if values.size else 0.0, line or 0.0, floor * 100) * 2.5
        ax.bar(dims, np.maximum(values, floor), color=colors, width=0.8, bottom=0)
        ax.set_yscale("log")
        ax.set_ylim(floor, top)
        ax.yaxis.set_minor_formatter(NullFormatter())  # decade labels only
        if line is not None:
            ax.axhline(line, color=THRESHOLD_COLOR, ls="--", lw=1.2)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("latent dimension", fontsize=9)
        ax.set_xticks(dims if dims.size <= 32 else dims[:: math.ceil(dims.size / 32)])
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3, lw=0.5)
    handles = [
        Patch(color=ACTIVE_COLOR, label="active"),
        Patch(color=INACTIVE_COLOR, label="inactive"),
        Line2D([], [], color=THRESHOLD_COLOR, ls="--", lw=1.2, label=f"active threshold {threshold:g}"),
    ]
    fig.legend(handles=handles, loc="outside upper right", fontsize=9, frameon=False, ncols=3)
    return to_data_uri(fig)


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def posterior_forest(
    idata: "arviz.InferenceData",
    dims: Sequence[int] | None = None,
    max_obs: int = 4,
    max_dims: int = 6,
) -> str | None:
    """ArviZ forest plot of q(z_d | x) for the first observations and a few latent dimensions.

    ``dims`` picks the dimensions (default the first ``max_dims``); one panel per observation,
    94% HDI bars, the prior mean 0 and the prior's 94% interval marked for reference.
    """
    if "posterior" not in idata.groups():
        return None
    posterior = idata["posterior"]
    if not posterior.data_vars:
        return None
    az = _arviz()
    site = next(iter(posterior.data_vars))
    variable = posterior[site]
    obs_dim, latent_dim = variable.dims[2], variable.dims[3]
    n_obs = min(max_obs, variable.sizes[obs_dim])
    chosen = list(range(variable.sizes[latent_dim]))[:max_dims] if dims is None else list(dims)[:max_dims]
    fig = _new_figure(2.6 * n_obs + 0.8, 0.42 * len(chosen) + 1.3)
    # Not sharey: a shared y axis shares its tick formatter, and arviz sets labels per panel.
    axes = fig.subplots(1, n_obs, sharex=True, squeeze=False).ravel()
    half = 1.881  # prior N(0, 1): central 94% interval
    for i, ax in enumerate(axes):
        ax.axvspan(-half, half, color="#eef2f6", zorder=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            az.plot_forest(
                idata,
                var_names=[site],
                coords={obs_dim: [i], latent_dim: chosen},
                combined=True,
                hdi_prob=0.94,
                colors=LINE_COLOR,
                ax=ax,
                textsize=8,
            )
        ax.axvline(0.0, color="#7f8c8d", lw=0.8, ls=":")
        ax.set_title(f"observation {i}", fontsize=9)
        if i == 0:  # arviz labels rows "z[3]", "[1]", ...: keep the index, say what it is
            labels = [t.get_text().rsplit("[", 1)[-1].rstrip("]") for t in ax.get_yticklabels()]
            ax.set_yticks(ax.get_yticks(), [f"dim {label}" for label in labels])
        else:
            ax.tick_params(labelleft=False)
    return to_data_uri(fig)


def _as_2d(values: Any) -> np.ndarray:
    array = as_array(values).astype(np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"posterior_mean_space: expected means of shape [N] or [N, D], got {array.shape}")
    return array


def posterior_mean_space(snapshots: Mapping[str, tuple[Any, Any]]) -> str:
    """Model posterior mean against guide posterior mean per data point (He et al., Figs. 1 and 3).

    ``snapshots`` maps a label (e.g. ``"epoch 5"``) to ``(model_means, guide_means)``, each
    ``[N]`` or ``[N, D]`` with D <= 2; one panel per snapshot and latent dimension. Points on
    the diagonal mean the guide has caught up with the model's posterior; points near 0 on
    both axes mean collapse.
    """
    pairs: list[tuple[str, int, np.ndarray, np.ndarray, int]] = []
    for label, (model_means, guide_means) in snapshots.items():
        m, g = _as_2d(model_means), _as_2d(guide_means)
        if m.shape != g.shape:
            raise ValueError(
                f"posterior_mean_space[{label!r}]: model means {m.shape} and guide means {g.shape} differ"
            )
        if m.shape[1] > 2:
            raise ValueError(f"posterior_mean_space[{label!r}]: drawn for 1-d or 2-d latents only, got {m.shape[1]}")
        pairs.extend((label, d, m[:, d], g[:, d], m.shape[1]) for d in range(m.shape[1]))
    ncols = min(len(pairs), 4)
    nrows = math.ceil(len(pairs) / ncols)
    fig = _new_figure(3.3 * ncols, 3.3 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (label, d, m, g, width) in zip(axes, pairs):
        finite = np.concatenate([m, g])
        finite = finite[np.isfinite(finite)]
        lim = max(float(np.abs(finite).max()) * 1.1, 0.5) if finite.size else 1.0
        ax.plot([-lim, lim], [-lim, lim], color=THRESHOLD_COLOR, lw=1, ls="--", label="x = y")
        ax.axhline(0, color="#bbbbbb", lw=0.6)
        ax.axvline(0, color="#bbbbbb", lw=0.6)
        ax.scatter(m, g, s=9, alpha=0.55, color=LINE_COLOR, edgecolors="none")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(label if width == 1 else f"{label}, dimension {d}", fontsize=9)
        ax.set_xlabel(r"model posterior mean $\mu_{x,\theta}$", fontsize=8)
        ax.set_ylabel(r"guide posterior mean $\mu_{x,\phi}$", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    return to_data_uri(fig)


def _image_stack(images: Any) -> np.ndarray:
    """``[N, H, W]`` floats from ``[N, H, W]`` or ``[N, 1, H, W]`` arrays (uint8 scaled to [0, 1])."""
    array = as_array(images)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"samples: images must be [N, H, W] or [N, 1, H, W], got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return array.astype(np.float64)


def _montage(images: np.ndarray, ncols: int) -> np.ndarray:
    n, h, w = images.shape
    nrows = math.ceil(n / ncols)
    pad = 2
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad), np.nan)
    for k in range(n):
        r, c = divmod(k, ncols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top:top + h, left:left + w] = images[k]
    return canvas


def image_grid(panels: Mapping[str, Any], ncols: int = 8) -> str:
    """Image grids side by side, one per ``{title: images}``, ink dark on white.

    Images of the same index line up across panels (input next to its reconstruction).
    """
    stacks = {title: _image_stack(images) for title, images in panels.items()}
    montages = {title: _montage(s, min(ncols, len(s))) for title, s in stacks.items()}
    height = max(m.shape[0] for m in montages.values())
    total_width = sum(m.shape[1] for m in montages.values())
    scale = 2.0 / DPI  # two figure pixels per image pixel: 28x28 glyphs stay legible
    fig = _new_figure(max(total_width * scale, 3.0) + 0.3 * len(montages), height * scale + 0.5)
    axes = fig.subplots(1, len(montages), squeeze=False).ravel()
    cmap = _gray_with_background()
    for ax, (title, montage) in zip(axes, montages.items()):
        ax.imshow(montage, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return to_data_uri(fig)


def _gray_with_background():
    from matplotlib import colormaps

    return colormaps["gray_r"].with_extremes(bad="#dfe4ea")  # bad (NaN): gaps between images
