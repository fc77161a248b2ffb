"""Render the self-contained HTML report of a fitted model (Jinja2, autoescaped).

Inputs are plain data: the run's config, the per-epoch history of :func:`pyro_lag.fit`, the
metrics of :func:`pyro_lag.evaluate`, per-dimension latent usage, an optional InferenceData
(whose groups fill in whatever was not passed), samples and the posterior-mean-space
snapshots. Every figure is an embedded PNG; the page loads nothing from the network.
"""
from __future__ import annotations

import datetime as _dt
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
import torch

from pyro_lag.io.inference_data import (
    ACTIVE_THRESHOLD,
    history_from_inference_data,
    usage_from_inference_data,
)
from pyro_lag.io.mean_space import mean_space_from_inference_data
from pyro_lag.report import plots

if TYPE_CHECKING:
    import arviz

KL_COLLAPSE = 0.1
"""Below this KL (nats per data point), together with MI below MI_COLLAPSE, the latent is unused."""
MI_COLLAPSE = 0.1


@dataclass(frozen=True)
class Verdict:
    """Whether the posterior collapsed, and the numbers behind the call."""

    collapsed: bool | None  # None: not enough numbers to tell
    headline: str
    reasons: list[str]
    active_dims: list[int] = field(default_factory=list)
    latent_dim: int | None = None


def _float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return float(value) if value.numel() == 1 else None
    if isinstance(value, (numbers.Real, np.generic)):
        return float(value)
    return None


def collapse_verdict(
    metrics: Mapping[str, Any],
    usage: Mapping[str, Any] | None,
    kl_threshold: float = KL_COLLAPSE,
    mi_threshold: float = MI_COLLAPSE,
) -> Verdict:
    """Collapsed when no latent dimension is active, or when both KL and MI are below threshold."""
    active_dims: list[int] = []
    latent_dim = None
    au = _float(metrics.get("au"))
    if usage is not None:
        flags = usage.get("active")
        if flags is None:
            variance = np.asarray(plots.as_array(usage["au_var"])).reshape(-1)
            flags = variance >= float(usage.get("threshold", ACTIVE_THRESHOLD))
        flags = np.asarray(plots.as_array(flags)).reshape(-1).astype(bool)
        active_dims = [int(d) for d in np.flatnonzero(flags)]
        latent_dim = int(flags.size)
        if au is None:
            au = float(len(active_dims))
    kl, mi = _float(metrics.get("kl")), _float(metrics.get("mi"))

    reasons = []
    if au is not None:
        of = f" of {latent_dim}" if latent_dim is not None else ""
        reasons.append(f"active units AU = {au:g}{of} (posterior-mean variance >= {ACTIVE_THRESHOLD:g})")
    if kl is not None:
        reasons.append(f"KL = {kl:.4g} nats per data point (collapse below {kl_threshold:g})")
    if mi is not None:
        reasons.append(f"MI = {mi:.4g} nats (collapse below {mi_threshold:g})")

    if au is None and (kl is None or mi is None):
        return Verdict(None, "Not enough metrics to tell whether the posterior collapsed", reasons,
                       active_dims, latent_dim)
    low_kl_mi = kl is not None and mi is not None and kl < kl_threshold and mi < mi_threshold
    if (au is not None and au == 0) or low_kl_mi:
        why = "no active latent dimension" if au == 0 else "KL and MI are both near zero"
        return Verdict(True, f"Posterior collapsed: {why}", reasons, active_dims, latent_dim)
    return Verdict(False, "Latent variable in use: no posterior collapse", reasons, active_dims,
                   latent_dim)


def _fmt(value: Any, digits: int = 4) -> str:
    """A number formatted for a table cell; other values as text."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    number = _float(value)
    if number is None:
        return "" if value is None else str(value)
    if math.isnan(number):
        return "–"
    if float(number).is_integer() and abs(number) < 1e9:
        return str(int(number))
    return f"{number:.{digits}g}"


def perplexity(metrics: Mapping[str, Any]) -> float | None:
    """Per-token perplexity for text: given as ``perplexity``, or exp(IW-NLL * sentences / tokens).

    The computed form needs ``iw_nll`` (nats per sentence), ``num_tokens`` and ``num_points``
    (or ``num_sentences``) of the evaluated set.
    """
    given = _float(metrics.get("perplexity", metrics.get("ppl")))
    if given is not None:
        return given
    nll = _float(metrics.get("iw_nll"))
    tokens = _float(metrics.get("num_tokens"))
    sentences = _float(metrics.get("num_sentences", metrics.get("num_points")))
    if nll is None or not tokens or not sentences:
        return None
    return math.exp(nll * sentences / tokens)


def evaluation_rows(metrics: Mapping[str, Any], kind: str | None) -> list[tuple[str, str, str]]:
    """(measure, value, note) rows of the evaluation table, for the metrics that are present."""
    rows = []
    iw = metrics.get("iw_samples")
    if metrics.get("iw_nll") is not None:
        note = f"importance-weighted, K = {_fmt(iw)} samples" if iw is not None else "importance-weighted"
        rows.append(("IW-NLL", _fmt(metrics["iw_nll"]), f"nats per data point, {note}"))
    ppl = perplexity(metrics) if kind == "text" else None
    if ppl is not None:
        rows.append(("Perplexity", _fmt(ppl), "per token, exp(IW-NLL x sentences / tokens)"))
    if metrics.get("elbo") is not None:
        rows.append(("ELBO", _fmt(metrics["elbo"]), "nats per data point (recon - KL)"))
    if metrics.get("recon") is not None:
        rows.append(("Reconstruction", _fmt(metrics["recon"]), "E_q log p(x | z), nats per data point"))
    if metrics.get("kl") is not None:
        rows.append(("KL", _fmt(metrics["kl"]), "KL(q(z|x) || p(z)), nats per data point"))
    if metrics.get("mi") is not None:
        se, pairs = metrics.get("mi_se"), metrics.get("mi_pairs")
        value = _fmt(metrics["mi"]) + (f" ± {_fmt(se, 2)}" if se is not None else "")
        note = "I_q(x; z), nats, ± its standard error" + (f", over {int(pairs):,} pairs" if pairs else "")
        rows.append(("MI", value, note))
    if metrics.get("au") is not None:
        rows.append(("AU", _fmt(metrics["au"]), f"active units (posterior-mean variance >= {ACTIVE_THRESHOLD:g})"))
    return rows


def training_setup(config: Mapping[str, Any] | None) -> str | None:
    """How many processes trained the run, from the ``distributed`` entry of its config (None: no config)."""
    if config is None:
        return None
    setup = config.get("distributed")
    if not isinstance(setup, Mapping):
        return "1 process"
    world, devices, nodes = setup.get("world_size"), setup.get("devices"), setup.get("num_nodes", 1)
    return (f"{world} processes ({setup.get('strategy')}; {devices} {setup.get('accelerator')} "
            f"device{'s' if devices != 1 else ''} x {nodes} node{'s' if nodes != 1 else ''})")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, _fmt(value, 6) if _float(value) is not None else str(value)))
    return rows


HISTORY_COLUMNS = (
    ("epoch", "epoch"),
    ("train_loss", "train loss"),
    ("elbo", "ELBO"),
    ("kl", "KL"),
    ("mi", "MI"),
    ("au", "AU"),
    ("aggressive", "aggressive"),
    ("inner_steps", "inner steps"),
    ("lr", "lr"),
    ("wall_time", "time (s)"),
)


def _history_table(history: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    columns = [(k, label) for k, label in HISTORY_COLUMNS if any(k in h for h in history)]
    rows = [[_fmt(h.get(k)) for k, _ in columns] for h in history]
    return [label for _, label in columns], rows


def _sample_kind(samples: Mapping[str, Any] | None) -> str | None:
    """"text" when samples are sentences, "image" when they are arrays."""
    if not samples:
        return None
    prior = samples.get("prior")
    if prior is None:
        recon = samples.get("reconstructions")
        prior = recon[0] if isinstance(recon, (list, tuple)) and recon else recon
    if isinstance(prior, (list, tuple)) and prior and isinstance(prior[0], (str, list, tuple)):
        return "text"
    if isinstance(prior, (np.ndarray, torch.Tensor)):
        return "image"
    return None


def _sentence(value: Any) -> str:
    """A sentence from text or from a list of tokens."""
    if isinstance(value, str):
        return value
    return " ".join(str(t) for t in value)


def _samples_context(samples: Mapping[str, Any] | None, kind: str | None) -> dict[str, Any]:
    if not samples:
        return {}
    if kind == "text":
        prior = [_sentence(s) for s in samples.get("prior") or []]
        pairs = [(_sentence(a), _sentence(b)) for a, b in samples.get("reconstructions") or []]
        return {"prior_sentences": prior, "reconstruction_pairs": pairs}
    if kind == "image":
        images = {}
        if samples.get("prior") is not None:
            images["prior_grid"] = plots.image_grid({"samples from the prior": samples["prior"]})
        if samples.get("reconstructions") is not None:
            inputs, recons = samples["reconstructions"]
            images["reconstruction_grid"] = plots.image_grid(
                {"inputs": inputs, "reconstructions": recons}
            )
        return images
    raise ValueError("samples: expected sentences (text) or image arrays under 'prior' / 'reconstructions'")


def _forest_dims(usage: Mapping[str, Any] | None, max_dims: int) -> list[int] | None:
    """The latent dimensions worth showing: most used first (posterior-mean variance)."""
    if usage is None:
        return None
    variance = np.asarray(plots.as_array(usage["au_var"])).reshape(-1)
    return [int(d) for d in np.argsort(-variance, kind="stable")[:max_dims]]


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("pyro_lag.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_report(
    *,
    title: str = "pyro-lag report",
    config: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    metrics: Mapping[str, Any] | None = None,
    usage: Mapping[str, Any] | None = None,
    idata: "arviz.InferenceData | None" = None,
    samples: Mapping[str, Any] | None = None,
    posterior_mean_space: tuple[Any, Any] | Mapping[str, tuple[Any, Any]] | None = None,
    kind: str | None = None,
    forest_obs: int = 4,
    forest_dims: int = 6,
) -> str:
    """The report as one HTML string.

    - ``config``: the run's resolved settings (nested dicts are flattened to ``a.b``);
    - ``history``: per-epoch dicts from :func:`pyro_lag.fit` (epoch, elbo, kl, mi, au,
      aggressive, inner_steps, lr, wall_time, ...);
    - ``metrics``: final evaluation (iw_nll, elbo, recon, kl, mi, mi_se, mi_pairs, au, iw_samples;
      for text perplexity or num_tokens with num_points);
    - ``usage``: per-dimension ``au_var``, optional ``kl`` and ``active``;
    - ``idata``: from :func:`pyro_lag.to_inference_data` (or ``FitResult.to_inference_data``):
      enough on its own. Its posterior draws give the ArviZ forest plot, and its groups
      (training, latent usage, posterior mean space, attrs) stand in for the arguments below
      when they are not given;
    - ``samples``: text ``{"prior": [sentence, ...], "reconstructions": [(input, output), ...]}``
      (sentences as strings or token lists) or images ``{"prior": [N, H, W],
      "reconstructions": (inputs, outputs)}``;
    - ``posterior_mean_space``: ``(model_means, guide_means)`` or ``{label: (model, guide)}``
      for 1-d or 2-d latents.
    """
    if idata is not None:
        if history is None:
            history = history_from_inference_data(idata)
        if usage is None:
            usage = usage_from_inference_data(idata)
        if metrics is None:
            metrics = dict(idata.attrs)
        if posterior_mean_space is None:
            posterior_mean_space = mean_space_from_inference_data(idata)
    history = list(history or [])
    metrics = dict(metrics or {})
    if usage is None and metrics.get("au_var") is not None:
        usage = {"au_var": metrics["au_var"], "kl": metrics.get("kl_dim")}
    kind = kind or _sample_kind(samples) or (metrics.get("kind") if isinstance(metrics.get("kind"), str) else None)
    if posterior_mean_space is not None and not isinstance(posterior_mean_space, Mapping):
        posterior_mean_space = {"after training": posterior_mean_space}

    threshold = float((usage or {}).get("threshold", ACTIVE_THRESHOLD))
    verdict = collapse_verdict(metrics, usage)
    history_header, history_rows = _history_table(history)
    usage_rows = []
    if usage is not None:
        variance = np.asarray(plots.as_array(usage["au_var"])).reshape(-1)
        kl = usage.get("kl")
        kl = None if kl is None else np.asarray(plots.as_array(kl)).reshape(-1)
        active = set(verdict.active_dims)
        usage_rows = [
            (d, _fmt(kl[d]) if kl is not None else "", _fmt(variance[d]), d in active)
            for d in range(variance.size)
        ]
    aggressive_epochs = [h.get("epoch", i + 1) for i, h in enumerate(history) if h.get("aggressive")]
    context = {
        "title": title,
        "generated": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "kind": kind,
        "verdict": verdict,
        "config_rows": _flatten(config or {}),
        "setup": training_setup(config),
        "distributed": isinstance((config or {}).get("distributed"), Mapping),
        "evaluation_rows": evaluation_rows(metrics, kind),
        "history_header": history_header,
        "history_rows": history_rows,
        "aggressive_epochs": aggressive_epochs,
        "usage_rows": usage_rows,
        "usage_has_kl": usage is not None and usage.get("kl") is not None,
        "threshold": threshold,
        "training_plot": plots.training_curves(history),
        "usage_plot": plots.latent_usage(usage, threshold) if usage is not None else None,
        "forest_plot": plots.posterior_forest(
            idata, dims=_forest_dims(usage, forest_dims), max_obs=forest_obs, max_dims=forest_dims
        )
        if idata is not None
        else None,
        "mean_space_plot": plots.posterior_mean_space(posterior_mean_space) if posterior_mean_space else None,
        **_samples_context(samples, kind),
    }
    context.setdefault("prior_sentences", [])
    context.setdefault("reconstruction_pairs", [])
    context.setdefault("prior_grid", None)
    context.setdefault("reconstruction_grid", None)
    return _environment().get_template("report.html").render(**context)


def write_report(out_path: str | Path, **inputs: Any) -> Path:
    """Render the report (``inputs`` as for :func:`render_report`) and write it as UTF-8 HTML."""
    out = Path(out_path)
    if out.is_dir():
        raise ValueError(f"out_path: {out} is a directory; give the report's file name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"out_path: folder {out.parent} does not exist")
    html = render_report(**inputs)
    out.write_text(html, encoding="utf-8")
    return out
