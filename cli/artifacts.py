"""What a finished run leaves behind: metrics, history, diagnostics.nc, report.html.

Shared by ``fit`` (at the end of training) and ``report`` (rebuilt from a run directory),
so both write the same files from the same inputs.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from pyro_lag.data.batches import to_device
from pyro_lag.trace.sites import normalize_batch

from .datasets import Splits, make_batches, token_count
from .pairs import PairHandle
from .rundir import (
    DIAGNOSTICS_FILE,
    HISTORY_FILE,
    MEAN_SPACE_FILE,
    METRICS_FILE,
    REPORT_FILE,
    RunDirectory,
    history_csv,
    read_json,
    write_json,
    write_text_atomic,
)

MEAN_SPACE_POINTS = 100  # data points in the posterior-mean-space picture
# Grid for the model's true posterior mean: the prior N(0, 1) keeps posterior means well inside it.
MEAN_SPACE_GRID = (-10.0, 10.0, 0.1)
SAMPLE_COUNT = 8  # sentences or images from the prior, and reconstructions, in a report


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def first_tensor(batch: Any) -> torch.Tensor:
    args, _ = normalize_batch(batch)
    return args[0]


def eval_source(splits: Splits, split: str, batch_size: int, seed: int) -> Any:
    """Unshuffled batches of one split (fixed binarisation for images)."""
    return make_batches(getattr(splits, split), splits.kind, batch_size, seed=seed, train=False)


def collect_batches(source: Any, points: int, device: torch.device) -> list[Any]:
    """The first batches of ``source`` holding at least ``points`` data points (fewer if it runs out)."""
    batches, total = [], 0
    for batch in source.iter_from(0, 0):
        batches.append(to_device(batch, device))
        total += int(first_tensor(batch).shape[0])
        if total >= points:
            break
    return batches


# ------------------------------------------------------------------------------ metrics


def final_metrics(test_metrics: Mapping[str, Any], splits: Splits, evaluated_on: str, iw_samples: int) -> dict[str, Any]:
    """The evaluation of the best parameters, with what the report and ``compare`` need beside it."""
    metrics = dict(test_metrics)
    metrics["evaluated_on"] = evaluated_on
    metrics["kind"] = splits.kind
    if iw_samples and "iw_nll" in metrics:
        metrics["iw_samples"] = iw_samples
    corpus = getattr(splits, evaluated_on)
    if splits.kind == "text" and corpus is not None:
        metrics["num_tokens"] = token_count(corpus)
    return metrics


def write_history(run: RunDirectory, history: Sequence[Mapping[str, Any]], final: Optional[Mapping[str, Any]],
                  extra: Optional[Mapping[str, Any]] = None) -> None:
    """metrics.json (history + final metrics) and history.csv, both replaced atomically."""
    training_time = float(sum(float(r.get("wall_time") or 0.0) for r in history))
    write_json(run.file(METRICS_FILE), {"history": list(history), "final": final, "training_time": training_time,
                                         **dict(extra or {})})
    write_text_atomic(run.file(HISTORY_FILE), history_csv(history))


class HistoryWriter:
    """A fit callback that keeps metrics.json and history.csv current after every epoch."""

    def __init__(self, run: RunDirectory, previous: Sequence[Mapping[str, Any]] = ()) -> None:
        self.run = run
        self.rows = {int(r["epoch"]): dict(r) for r in previous}

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        self.rows[int(row["epoch"])] = dict(row)
        write_history(self.run, [self.rows[k] for k in sorted(self.rows)], None)


# ------------------------------------------------------------------------------ posterior mean space


def mean_space_supported(handle: PairHandle) -> bool:
    """The picture needs the model's true posterior mean: built-in pairs with a 1-d latent."""
    from pyro_lag.models import LatentPair

    return isinstance(handle.pair, LatentPair) and handle.pair.latent_dim == 1


def posterior_means(handle: PairHandle, batches: Sequence[Any], limit: int = MEAN_SPACE_POINTS) -> tuple[list, list]:
    """(model posterior means by integration, guide posterior means) for up to ``limit`` points."""
    from pyro_lag.models import true_posterior_mean

    pair = handle.pair
    grid = torch.arange(*MEAN_SPACE_GRID)
    model_means, guide_means, total = [], [], 0
    for batch in batches:
        x = first_tensor(batch)[: limit - total]
        model_means.append(true_posterior_mean(pair, x, grid=grid).cpu())
        with pair.evaluating():
            guide_means.append(pair.encode(x)[0][:, 0].cpu())
        total += x.shape[0]
        if total >= limit:
            break
    return torch.cat(model_means).tolist(), torch.cat(guide_means).tolist()


class MeanSpaceRecorder:
    """Model vs. guide posterior means (He et al., Fig. 1) while the guide catches up, and at the end.

    As a fit callback it records after every aggressive epoch and the first epoch after
    them (each snapshot decodes the points at every grid value, so not every epoch);
    :meth:`final` adds the trained model's snapshot.
    """

    def __init__(self, run: RunDirectory, handle: PairHandle, batches: Sequence[Any]) -> None:
        self.run, self.handle, self.batches = run, handle, batches
        path = run.file(MEAN_SPACE_FILE)
        self.snapshots: dict[str, Any] = read_json(path)["snapshots"] if path.is_file() else {}
        self._was_aggressive = True

    def _record(self, key: str, label: str) -> None:
        model, guide = posterior_means(self.handle, self.batches)
        self.snapshots[key] = {"label": label, "model": model, "guide": guide}
        write_json(self.run.file(MEAN_SPACE_FILE), {"points": len(model), "snapshots": self.snapshots})

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        aggressive = bool(row.get("aggressive"))
        if aggressive or self._was_aggressive:
            self._record(f"epoch {row['epoch']}", f"epoch {row['epoch']}" + (" (aggressive)" if aggressive else ""))
        self._was_aggressive = aggressive

    def final(self, best_epoch: Optional[int]) -> None:
        """The snapshot of the parameters training ended with (the best ones)."""
        label = f"end (best epoch {best_epoch})" if best_epoch is not None else "end of training"
        self._record("end", label)


def mean_space_panels(run: RunDirectory) -> Optional[dict[str, tuple]]:
    """Up to four snapshots for the report: first, last aggressive, first after, end of training."""
    path = run.file(MEAN_SPACE_FILE)
    if not path.is_file():
        return None
    snapshots = read_json(path)["snapshots"]
    keys = list(snapshots)
    if not keys:
        return None
    aggressive = [k for k in keys if snapshots[k]["label"].endswith("(aggressive)")]
    after = [k for k in keys if k.startswith("epoch") and k not in aggressive]
    chosen = [keys[0], *(aggressive[-1:]), *(after[:1]), *(["end"] if "end" in snapshots else keys[-1:])]
    picked = list(dict.fromkeys(chosen))[:4]
    return {snapshots[k]["label"]: (np.asarray(snapshots[k]["model"]), np.asarray(snapshots[k]["guide"]))
            for k in picked}


# ------------------------------------------------------------------------------ samples


def text_samples(handle: PairHandle, splits: Splits, batches: Sequence[Any], n: int, seed: int,
                 source: str = "both") -> dict[str, Any]:
    """Sentences from the prior and (input, reconstruction) pairs, as words."""
    vocab = splits.vocab
    words = lambda ids: " ".join(vocab.decode(ids, skip_special=True))  # noqa: E731
    generator = torch.Generator().manual_seed(seed)
    samples: dict[str, Any] = {}
    if source in ("both", "prior"):
        samples["prior"] = [words(ids) for ids in handle.pair.sample_prior(n, generator=generator)]
    if source in ("both", "reconstruction"):
        pairs = []
        for batch in batches:
            x = first_tensor(batch)[: n - len(pairs)]
            outputs = handle.pair.reconstruct(x, generator=generator)
            pairs.extend((words(x[i].tolist()), words(out)) for i, out in enumerate(outputs))
            if len(pairs) >= n:
                break
        samples["reconstructions"] = pairs
    return samples


def image_samples(handle: PairHandle, batches: Sequence[Any], n: int, seed: int, source: str = "both") -> dict[str, Any]:
    """Images ([N, H, W] in [0, 1]) from the prior and (inputs, reconstructions)."""
    generator = torch.Generator().manual_seed(seed)
    samples: dict[str, Any] = {}
    if source in ("both", "prior"):
        samples["prior"] = handle.pair.sample_prior(n, generator=generator).detach().cpu().numpy()[:, 0]
    if source in ("both", "reconstruction"):
        x = torch.cat([first_tensor(b) for b in batches])[:n]
        recon = handle.pair.reconstruct(x, generator=generator)
        samples["reconstructions"] = (x.cpu().numpy()[:, 0], recon.detach().cpu().numpy()[:, 0])
    return samples


def make_samples(handle: PairHandle, splits: Splits, batches: Sequence[Any], n: int, seed: int,
                 source: str = "both") -> Optional[dict[str, Any]]:
    """Samples for the report or ``sample`` command; None when the pair cannot generate."""
    if not (handle.can("sample_prior") and handle.can("reconstruct")):
        return None
    if splits.kind == "text":
        return text_samples(handle, splits, batches, n, seed, source)
    return image_samples(handle, batches, n, seed, source)


# ------------------------------------------------------------------------------ diagnostics and report


def diagnostics_of(run: RunDirectory, handle: PairHandle, batch: Optional[Any], history: Sequence[Mapping[str, Any]],
                   metrics: Mapping[str, Any], result: Any = None) -> Any:
    """The run's InferenceData: posterior draws on ``batch`` (None: no latent), latent usage, history,
    final metrics and the posterior-mean-space snapshots; from the fit result when there is one."""
    from pyro_lag.training.result import FitResult

    if result is None:  # rebuilt from the run directory's files
        result = FitResult(history=list(history), test=None, best_epoch=None, best_val_loss=float("nan"),
                           stopped="", decoder_only=batch is None)
    return result.to_inference_data(handle.guide, batch, model=handle.model, metrics=metrics,
                                    posterior_mean_space=mean_space_panels(run))


def write_diagnostics(run: RunDirectory, idata: Any) -> Any:
    """diagnostics.nc, replaced atomically."""
    target = run.file(DIAGNOSTICS_FILE)
    tmp = target.with_name(f".{target.name}.tmp")
    idata.to_netcdf(str(tmp))
    os.replace(tmp, target)
    return idata


def read_diagnostics(run: RunDirectory) -> Any:
    path = run.file(DIAGNOSTICS_FILE)
    if not path.is_file():
        return None
    return _arviz().from_netcdf(str(path))


def build_report(run: RunDirectory, config: Mapping[str, Any], idata: Any, samples: Optional[Mapping[str, Any]],
                 kind: str) -> Path:
    """report.html from the run's InferenceData (and the generated samples), written beside it."""
    from pyro_lag.report import write_report  # matplotlib: imported only when a report is made

    method = config["method"] + (" + anneal" if config.get("anneal") else "")
    return write_report(
        run.file(REPORT_FILE),
        title=f"pyro-lag: {config['model']} ({method})",
        config=config,
        idata=idata,
        samples=samples,
        kind=kind,
    )
