"""The work of ``pyro-lag fit``: check everything, claim the run directory, train, write the results.

Everything the user gave is checked before the run directory is touched: settings,
data files, the model, the device, and that the guide has local latents. Only then is
the directory claimed (refused if it holds another run, unless ``--resume``), and its
run.json says ``running`` until the last result file is written.
"""
from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any, Optional

import click
import pyro
import torch
from rich.console import Console

from pyro_lag.data.batches import to_device
from pyro_lag.training.loop import fit

from . import datasets, scale_out, settings
from .artifacts import (
    MEAN_SPACE_POINTS,
    SAMPLE_COUNT,
    HistoryWriter,
    MeanSpaceRecorder,
    build_report,
    collect_batches,
    diagnostics_of,
    eval_source,
    final_metrics,
    make_samples,
    mean_space_supported,
    write_diagnostics,
    write_history,
)
from .console import make_console
from .pairs import check_local_latents, make_pair
from .progress import AnnouncedSource, LiveMonitor, TrainingDisplay, accepts_keyword, training_progress
from .rundir import (
    CONFIG_FILE,
    DIAGNOSTICS_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    REPORT_FILE,
    RUN_FILE,
    VOCAB_FILE,
    RunDirectory,
    read_json,
    write_json,
)


def _default_out(config: dict[str, Any]) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", config["model"]).strip("-") or "run"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{config['method']}-{stamp}"


def _stored_config(out: Optional[str], resume: bool) -> Optional[dict[str, Any]]:
    """The settings of the run that ``--resume`` continues (refused early when there is none)."""
    if not resume or out is None:
        return None
    run = RunDirectory(Path(out))
    if not run.path.is_dir():
        raise click.UsageError(f"--resume: run directory {run.path} does not exist; nothing to resume")
    if run.marker() is None or not run.file(CONFIG_FILE).is_file():
        raise click.UsageError(f"--resume: {run.path} holds no run ({RUN_FILE} or {CONFIG_FILE} missing); nothing to resume")
    return read_json(run.file(CONFIG_FILE))


def run_fit(model: Optional[str], config_file: Optional[str], out: Optional[str], resume: bool,
            flags: dict[str, Any]) -> None:
    """``pyro-lag fit``: settings from flags, config file and resumed run, then the run itself."""
    console = make_console()
    if resume and out is None:
        raise click.UsageError("--resume needs --out RUN_DIR (the run to continue)")
    flags["model"] = model
    user = settings.load_config_file(config_file) if config_file else {}
    stored = _stored_config(out, resume)
    config = settings.resolve_config(flags, user, stored)
    if stored is not None:
        difference = settings.first_difference(stored, config)
        if difference is not None:
            raise click.UsageError(f"--resume: run {out} was made with {difference}; resume with the same settings")

    if config.get("distributed") is not None:
        _check_distributed(config, out)

    with settings.torch_threads(config["threads"]):
        _run(console, config, out, resume, stored)


def _check_distributed(config: dict[str, Any], out: Optional[str]) -> None:
    """What a multi-process run needs beyond one process: Lightning, and a shared --out across nodes."""
    scale_out.require_lightning()
    if out is None and not scale_out.started_by_lightning():
        nodes = config["distributed"]["num_nodes"]
        if nodes > 1:
            raise click.UsageError(f"--num-nodes {nodes} needs --out RUN_DIR, a folder every node sees "
                                   "(each node runs the same command)")
        if scale_out.launched_elsewhere():
            raise click.UsageError("every process of this launch runs the command: give --out RUN_DIR, "
                                   "a folder they all see")


def _run(console: Console, config: dict[str, Any], out: Optional[str], resume: bool,
         stored: Optional[dict[str, Any]]) -> None:
    """Load and check everything, claim the run directory, train, and write the results.

    In a multi-process run every rank comes here; only global rank 0 claims and writes the run
    directory, the others load the same data and model, train, and return.
    """
    distributed = config.get("distributed")
    writer = distributed is None or scale_out.writes_results()
    if not writer:
        out = scale_out.shared_run_dir(out)
    # ---- load and check everything before the run directory is touched
    resumed_marker = RunDirectory(Path(out)).marker() if stored is not None else None
    splits = datasets.load_splits(config["data"], vocab=_stored_vocab(out) if stored else None)
    kind, seed, device = splits.kind, config["seed"], torch.device(config["device"])
    train = datasets.make_batches(splits.train, kind, config["batch_size"], seed=seed, train=True)
    valid = eval_source(splits, "valid", config["batch_size"], seed)
    test = eval_source(splits, "test", config["batch_size"], seed) if splits.test is not None else valid
    evaluated_on = "test" if splits.test is not None else "valid"
    pyro.set_rng_seed(seed)  # model initialisation is part of the run's seed
    handle = make_pair(config["model"], config["preset"], config["model_options"], kind,
                       len(splits.vocab) if splits.vocab is not None else None,
                       search_path=(resumed_marker or {}).get("model_import_root"))
    has_latents = check_local_latents(handle, next(iter(train.iter_from(0, 0))))
    if distributed is not None and not has_latents:
        raise click.UsageError(f"MODEL '{config['model']}' has no latent variable (a decoder-only baseline): "
                               "train it in one process, without --devices/--strategy/--num-nodes")
    if not writer:
        from .fit_distributed import train_other_rank

        train_other_rank(config, handle, splits.kind, train, valid, out, resume)
        return

    run = RunDirectory(Path(out) if out is not None else _default_out(config))
    resumed = run.claim(resume)
    written: list[str] = []
    try:
        marker = run.start(settings.config_hash(config), config["model"], resumed,
                           model_import_root=handle.import_root)
        written.append(RUN_FILE)
        write_json(run.file(CONFIG_FILE), config)
        written.append(CONFIG_FILE)
        if splits.vocab is not None:
            write_json(run.file(VOCAB_FILE), splits.vocab.to_list())
            written.append(VOCAB_FILE)
        _print_start(console, config, splits, run, marker, resumed is not None)
        if distributed is None:
            result = _train(console, run, config, handle, splits, train, valid, test, evaluated_on, has_latents,
                            device, resume)
        else:
            from .fit_distributed import train as train_distributed

            label = _evaluation_label(evaluated_on, config["fit"].get("iw_samples", 0))
            result, device = train_distributed(console, run, config, handle, splits, train, valid, test, label,
                                               has_latents, resume)
        metrics = final_metrics(result.test, splits, evaluated_on, config["fit"].get("iw_samples", 0))
        extra = {"best_epoch": result.best_epoch, "stopped": result.stopped, "fit_config": result.config,
                 "decoder_only": result.decoder_only}
        write_history(run, result.history, metrics, extra)
        eval_batches = collect_batches(eval_source(splits, evaluated_on, config["batch_size"], seed),
                                       SAMPLE_COUNT, device)
        idata = write_diagnostics(run, diagnostics_of(run, handle, eval_batches[0] if has_latents else None,
                                                      result.history, metrics, result))
        samples = make_samples(handle, splits, eval_batches, SAMPLE_COUNT, seed)
        build_report(run, config, idata, samples, kind)
        run.update_marker(status="complete", finished=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    except BaseException as exc:
        if not run.has_checkpoint() and resumed is None:
            run.release(discard=True, written=written)  # nothing worth keeping: leave no trace
        else:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            run.update_marker(status=status, error=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            run.release()
        raise
    run.release()
    _print_summary(console, run, metrics, result)


def _stored_vocab(out: Optional[str]):
    from pyro_lag.data import Vocabulary

    path = Path(out) / VOCAB_FILE if out is not None else None
    return Vocabulary.from_list(read_json(path)) if path is not None and path.is_file() else None


def _train(console: Console, run: RunDirectory, config: dict[str, Any], handle, splits, train, valid, test,
           evaluated_on: str, has_latents: bool, device: torch.device, resume: bool):
    """Call :func:`pyro_lag.fit` with the progress display and the per-epoch writers."""
    previous = read_json(run.file(METRICS_FILE))["history"] if resume and run.file(METRICS_FILE).is_file() else []
    callbacks: list[Any] = [HistoryWriter(run, previous)]
    monitor, recorder = None, None
    if has_latents:
        monitor_batch = to_device(next(iter(valid.iter_from(0, 0))), device)
        monitor = LiveMonitor(handle.model, handle.guide, monitor_batch)
        if mean_space_supported(handle):
            recorder = MeanSpaceRecorder(run, handle, collect_batches(valid, MEAN_SPACE_POINTS, device))
            callbacks.append(recorder)
    label = _evaluation_label(evaluated_on, config["fit"].get("iw_samples", 0))
    progress = training_progress(console, config["epochs"], len(train), monitor, first_epoch=len(previous) + 1,
                                 evaluation_label=label)
    test, test_hook = _watch_final_pass(test, progress)
    with progress:
        result = fit(
            handle.model, handle.guide, train, valid, test, settings.fit_settings(config, splits.kind),
            device=device, run_dir=run.checkpoints, resume=resume, callbacks=[progress, *callbacks], **test_hook,
        )
    if recorder is not None:
        recorder.final(result.best_epoch)
    return result


def _evaluation_label(split: str, iw_samples: int) -> str:
    """``final evaluation on test, 100 importance samples``: what the final pass's progress shows."""
    return f"final evaluation on {split}" + (f", {iw_samples} importance samples" if iw_samples else "")


def _watch_final_pass(test: Any, progress: TrainingDisplay) -> tuple[Any, dict[str, Any]]:
    """The test source and fit keywords that show the progress of fit's final test pass.

    Where fit has the ``test_progress`` hook, it reports every batch; otherwise the display
    learns only when the pass begins (fit reads ``test`` for nothing else), and shows the
    time elapsed.
    """
    if accepts_keyword(fit, "test_progress"):
        return test, {"test_progress": progress.evaluation_step}
    return AnnouncedSource(test, progress.evaluation_started), {}


def _print_start(console: Console, config: dict[str, Any], splits, run: RunDirectory, marker: dict[str, Any],
                 resumed: bool) -> None:
    method = config["method"] + (" + anneal" if config["anneal"] else "")
    verb = "resuming" if resumed else "run"
    console.print(f"{verb} {marker['run_id']} in {run.path}", markup=False)
    console.print(f"model {config['model']} (preset {config['preset']}), method {method}, "
                  f"{config['epochs']} epochs, batch size {config['batch_size']}, device {config['device']}, "
                  f"seed {config['seed']}", markup=False, soft_wrap=True)
    sizes = " / ".join(f"{count} {split}" for split, count in splits.sizes.items())
    what = "sentences" if splits.kind == "text" else "images"
    console.print(f"data: {datasets.describe(config['data'])} ({sizes} {what})", markup=False, soft_wrap=True)
    if config.get("distributed") is not None:
        console.print(f"distributed: {scale_out.describe(config['distributed'])} through PyTorch Lightning; "
                      "rank 0 writes the run directory", markup=False, soft_wrap=True)


def _print_summary(console: Console, run: RunDirectory, metrics: dict[str, Any], result) -> None:
    keys = [("iw_nll", "IW-NLL"), ("elbo", "ELBO"), ("kl", "KL"), ("mi", "MI"), ("au", "AU")]
    parts = [f"{label} {metrics[k]:.4g}" for k, label in keys if isinstance(metrics.get(k), (int, float))]
    console.print(f"{result.stopped}; best epoch {result.best_epoch}; on {metrics['evaluated_on']}: "
                  + ", ".join(parts), markup=False, soft_wrap=True)
    for name in (REPORT_FILE, DIAGNOSTICS_FILE, METRICS_FILE, HISTORY_FILE, CONFIG_FILE):
        console.print(f"{name:16} {run.file(name)}", markup=False, soft_wrap=True)
    console.print(f"{'checkpoints':16} {run.checkpoints}", markup=False, soft_wrap=True)
