"""The commands that read run directories (``eval``, ``report``, ``sample``, ``compare``) and the
helpers ``models`` and ``data synthetic``.

``pyro-lag CMD --help`` must answer without importing torch or pyro, so the modules that
load them (``.artifacts``, ``.datasets``, ``.loading``, the library) are imported inside
the command functions, not here.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import click
from rich.console import Console
from rich.table import Table

from . import compare as comparing
from .console import make_console
from .progress import EvaluationProgress, progress_keyword
from .rundir import EVAL_FILE, write_json, write_text_atomic

if TYPE_CHECKING:
    import numpy as np


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


# ------------------------------------------------------------------------------ eval


def _evaluate(loaded, batches: Any, iw_samples: int, progress: EvaluationProgress) -> dict[str, Any]:
    """Every metric of the run's model on ``batches``; ``progress`` hears of each batch where the library can say."""
    from pyro_lag.estimators.diagnostics import evaluate
    from pyro_lag.trace.sites import NoLocalLatentError

    try:
        return evaluate(loaded.handle.model, loaded.handle.guide, batches, iw_samples=iw_samples,
                        **progress_keyword(evaluate, progress))
    except NoLocalLatentError:
        # A decoder-only run: its ELBO is the exact log-likelihood.
        from pyro_lag.estimators.decoder_only import exact_metrics

        metrics = exact_metrics(loaded.handle.model, batches, **progress_keyword(exact_metrics, progress))
        metrics["iw_nll"] = -metrics["elbo"]
        metrics["exact"] = True
        return metrics


@click.command("eval")
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--data", "data_path", metavar="PATH", help="Evaluate on this file (default: the run's test set).")
@click.option("--iw-samples", type=click.IntRange(min=1), default=500, show_default=True,
              help="Importance samples per data point for the IW-NLL.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Evaluation batch size (default: the run's).")
@click.option("--device", help="cpu or cuda (default: the run's device when available).")
def eval_cmd(run_dir: str, data_path: Optional[str], iw_samples: int, batch_size: Optional[int], device: Optional[str]) -> None:
    """Evaluate a run's best parameters: IW-NLL, ELBO, KL, MI, active units (and perplexity for text)."""
    from .datasets import load_eval_file, make_batches, token_count
    from .loading import open_run

    with open_run(run_dir, device) as loaded:
        size = batch_size or loaded.config["batch_size"]
        if data_path is not None:
            data = load_eval_file(data_path, loaded.kind, loaded.splits.vocab)
            label = str(Path(data_path).resolve())
        else:
            split = loaded.eval_split
            data, label = getattr(loaded.splits, split), split
        batches = make_batches(data, loaded.kind, size, seed=loaded.config["seed"], train=False)
        device_batches = _on_device(batches, loaded.device)
        console = make_console()
        with EvaluationProgress(console, f"evaluating on {label} with {iw_samples} importance samples") as progress:
            progress.start(len(device_batches))
            metrics = _evaluate(loaded, device_batches, iw_samples, progress)
        metrics = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in metrics.items()}
        metrics.update(iw_samples=iw_samples, kind=loaded.kind, evaluated_on=label)
        if loaded.kind == "text":
            metrics["num_tokens"] = token_count(data)
        write_json(loaded.run.file(EVAL_FILE), {"data": label, "iw_samples": iw_samples, "metrics": metrics})
        _print_metrics(make_console(), metrics, loaded.kind, title=f"{loaded.run.path} on {label}")


def _on_device(source: Any, device: Any) -> list[Any]:
    from pyro_lag.data.batches import to_device

    return [to_device(batch, device) for batch in source.iter_from(0, 0)]


def _print_metrics(console: Console, metrics: dict[str, Any], kind: str, title: str) -> None:
    from pyro_lag.estimators.active_units import ACTIVE_THRESHOLD
    from pyro_lag.report import perplexity

    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("note")
    rows = [
        ("IW-NLL", metrics.get("iw_nll"), "nats per data point, exact (no latent)" if metrics.get("exact")
         else f"nats per data point, K = {metrics.get('iw_samples')}"),
        ("PPL", perplexity(metrics) if kind == "text" else None, "per token, from IW-NLL"),
        ("-ELBO", -metrics["elbo"] if metrics.get("elbo") is not None else None, "nats per data point"),
        ("KL", metrics.get("kl"), "KL(q(z|x) || p(z)), nats per data point"),
        ("MI", metrics.get("mi"), f"I_q(x; z) ± {_fmt(metrics.get('mi_se'), 2)} (standard error), "
                                  f"{_fmt(metrics.get('mi_pairs'), 6)} pairs"),
        ("AU", metrics.get("au"), f"active units (posterior-mean variance >= {ACTIVE_THRESHOLD:g})"),
    ]
    for name, value, note in rows:
        if value is not None:
            table.add_row(name, _fmt(value), note)
    console.print(table)


# ------------------------------------------------------------------------------ report


@click.command("report")
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--device", help="cpu or cuda (default: the run's device when available).")
def report_cmd(run_dir: str, device: Optional[str]) -> None:
    """Rebuild RUN_DIR/report.html from the run's files (verdict, curves, usage, samples)."""
    from .artifacts import (
        SAMPLE_COUNT,
        build_report,
        collect_batches,
        diagnostics_of,
        make_samples,
        read_diagnostics,
        write_diagnostics,
    )
    from .datasets import SPLITS
    from .loading import open_run

    with open_run(run_dir, device) as loaded:
        saved = loaded.metrics_file()
        if saved is None or saved.get("final") is None:
            raise click.UsageError(f"run {loaded.run.path} has no final metrics yet (status {loaded.marker.get('status')}); "
                                   "finish or resume it first")
        history, metrics = saved["history"], saved["final"]
        split = metrics.get("evaluated_on") if metrics.get("evaluated_on") in SPLITS else loaded.eval_split
        batches = collect_batches(loaded.source(split), SAMPLE_COUNT, loaded.device)
        idata = read_diagnostics(loaded.run)
        if idata is None:
            has_latents = loaded.handle.latent_dim != 0 and not saved.get("decoder_only")
            idata = write_diagnostics(loaded.run, diagnostics_of(
                loaded.run, loaded.handle, batches[0] if has_latents else None, history, metrics))
        samples = make_samples(loaded.handle, loaded.splits, batches, SAMPLE_COUNT, loaded.config["seed"])
        path = build_report(loaded.run, loaded.config, idata, samples, loaded.kind)
        click.echo(str(path))


# ------------------------------------------------------------------------------ sample


def _image_grid_png(path: Path, rows: list[np.ndarray]) -> None:
    """Save image rows (each [N, H, W] in [0, 1]) as one PNG grid, ink dark on white."""
    import numpy as np
    from matplotlib import image as mpimg  # writes through Pillow: no plotting backend involved

    pad = 2
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[1:]
    canvas = np.ones((len(rows) * (h + pad) + pad, n * (w + pad) + pad))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top:top + h, left:left + w] = 1.0 - np.clip(img, 0.0, 1.0)
    mpimg.imsave(path, canvas, cmap="gray", vmin=0.0, vmax=1.0)


@click.command("sample")
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--n", "n", type=click.IntRange(min=1), default=10, show_default=True, help="How many samples.")
@click.option("--from", "source", type=click.Choice(["prior", "reconstruction"]), default="prior", show_default=True,
              help="Decode z drawn from the prior, or reconstruct test data from their posterior mean.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@click.option("--out", metavar="FILE", help="Image runs: where to write the PNG grid (default: in RUN_DIR).")
@click.option("--device", help="cpu or cuda (default: the run's device when available).")
def sample_cmd(run_dir: str, n: int, source: str, seed: int, out: Optional[str], device: Optional[str]) -> None:
    """Print sentences (text runs) or write an image grid PNG (image runs) from a trained model."""
    from .artifacts import collect_batches, make_samples
    from .loading import open_run

    with open_run(run_dir, device) as loaded:
        if not loaded.handle.can("sample_prior") or not loaded.handle.can("reconstruct"):
            raise click.UsageError(f"model '{loaded.config['model']}' has no sample_prior/reconstruct methods to sample with")
        if loaded.handle.latent_dim == 0 and source == "reconstruction":
            raise click.UsageError("a decoder-only model has no latent to reconstruct from; use --from prior")
        batches = collect_batches(loaded.source(loaded.eval_split), n, loaded.device) if source == "reconstruction" else []
        samples = make_samples(loaded.handle, loaded.splits, batches, n, seed, source=source)
        if loaded.kind == "text":
            if source == "prior":
                for sentence in samples["prior"]:
                    click.echo(sentence)
            else:
                for original, output in samples["reconstructions"]:
                    click.echo(f"{original}\t{output}")
            return
        target = Path(out) if out is not None else loaded.run.file(f"samples-{source}.png")
        if target.suffix.lower() != ".png":
            raise click.UsageError(f"--out {target}: the image grid is written as .png")
        if not target.parent.is_dir():
            raise FileNotFoundError(f"--out {target}: folder {target.parent} does not exist")
        rows = [samples["prior"]] if source == "prior" else list(samples["reconstructions"])
        _image_grid_png(target, rows)
        click.echo(str(target))


# ------------------------------------------------------------------------------ compare


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--csv", "csv_path", metavar="FILE", help="Also write the table as CSV.")
@click.option("--markdown", "markdown_path", metavar="FILE", help="Also write the table as Markdown.")
def compare_cmd(run_dirs: tuple[str, ...], csv_path: Optional[str], markdown_path: Optional[str]) -> None:
    """The paper's table for several runs: IW-NLL, -ELBO, KL, MI, AU and training time.

    Time is relative to the first RUN_DIR (put the baseline first). The numbers come from
    a run's latest `pyro-lag eval` of its test split, else from its final evaluation.
    """
    rows = [comparing.row_of(path) for path in run_dirs]
    comparing.relative_times(rows)
    for target in (csv_path, markdown_path):
        if target is not None and not Path(target).resolve().parent.is_dir():
            raise FileNotFoundError(f"folder of {target} does not exist")
    make_console().print(comparing.rich_table(rows))
    if csv_path is not None:
        write_text_atomic(Path(csv_path), comparing.to_csv(rows))
        click.echo(f"CSV written to {csv_path}")
    if markdown_path is not None:
        write_text_atomic(Path(markdown_path), comparing.to_markdown(rows))
        click.echo(f"Markdown written to {markdown_path}")


# ------------------------------------------------------------------------------ models


@click.command("models")
def models_cmd() -> None:
    """List the built-in model/guide pairs (use a name as MODEL in `pyro-lag fit`)."""
    from pyro_lag.models import MODELS, list_models

    table = Table(title="built-in model/guide pairs", title_justify="left")
    for column in ("name", "data", "latent dim", "presets", "description"):
        table.add_column(column, overflow="fold")
    for name in list_models():
        entry = MODELS[name]
        dims = sorted({str(p.get("latent_dim", "?")) for p in entry.presets.values()})
        table.add_row(name, entry.kind, "/".join(dims), ", ".join(entry.presets), entry.description)
    make_console().print(table)
    click.echo("Your own pair: pyro-lag fit package.module:factory")


# ------------------------------------------------------------------------------ data


@click.group("data")
def data_cmd() -> None:
    """Write data sets that pyro-lag can generate."""


@data_cmd.command("synthetic")
@click.option("--out", default="synthetic-data", show_default=True, metavar="DIR", help="Folder for the three files.")
@click.option("--n", "n", type=click.IntRange(min=10), default=20000, show_default=True,
              help="Sentences in all (80% train, 10% valid, 10% test).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Sampling seed.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def synthetic_cmd(out: str, n: int, seed: int, force: bool) -> None:
    """The paper's synthetic corpus (He et al. 2019, Sec. 4): token ids, 10 per line."""
    from pyro_lag.models import sample_corpus

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise click.UsageError(f"--out {folder} is a file, not a folder")
    n_train, n_valid = int(n * 0.8), int(n * 0.1)
    sizes = {"train": n_train, "valid": n_valid, "test": n - n_train - n_valid}
    paths = {split: folder / f"synthetic.{split}.txt" for split in sizes}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise click.UsageError(f"{existing[0]} exists; pass --force to overwrite")
    with make_console().status(f"sampling {n} sentences from the generator…"):
        rows = sample_corpus(n, seed=seed).tolist()
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, size in sizes.items():
        lines = "".join(" ".join(map(str, row)) + "\n" for row in rows[start:start + size])
        write_text_atomic(paths[split], lines)
        start += size
        click.echo(f"{paths[split]}  {size} sentences")
