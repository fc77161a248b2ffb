"""``pyro-lag fit``: train a model/guide pair and leave a complete run directory behind.

Everything the user gave is checked before the run directory is touched: settings,
data files, the model, the device, and that the guide has local latents. Only then is
the directory claimed (refused if it holds another run, unless ``--resume``), and its
run.json says ``running`` until the last result file is written.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import click
import pyro
import torch
from rich.console import Console

from pyro_lag.training import METHODS, fit

from . import datasets, settings
from .console import make_console
from .artifacts import (
    HistoryWriter,
    MeanSpaceRecorder,
    build_report,
    collect_batches,
    eval_source,
    final_metrics,
    make_samples,
    mean_space_supported,
    to_device,
    write_diagnostics,
    write_history,
)
from .pairs import check_local_latents, default_model, make_pair
from .progress import LiveMonitor, TrainingProgress
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

# The embedded default run (no MODEL, no data): the paper's synthetic experiment, reduced.
SYNTHETIC_EPOCHS = 10
SYNTHETIC_BATCH_SIZE = 16
SYNTHETIC_THREADS = 1
DEFAULT_IW_SAMPLES = 100
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(device: Any, where: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA only when this machine has it."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise click.UsageError(f"{where}: device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise click.UsageError(f"{where} {device}: CUDA is not available on this machine (no GPU, or torch built without CUDA)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise click.UsageError(f"{where} {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _pick(*values: Any) -> Any:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def resolve_config(flags: dict[str, Any], user: dict[str, Any], stored: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The run's full settings: flags over the config file over the resumed run over defaults."""
    data_flags = {k: flags[k] for k in ("path", "train", "valid", "test") if flags.get(k) is not None}
    user_data = dict(user.get("data") or {})
    if data_flags:
        data = datasets.resolve_data(**data_flags, valid_size=user_data.get("valid_size"))
    elif user_data or user.get("synthetic"):
        data = datasets.resolve_data(**user_data, synthetic=user.get("synthetic"))
    elif stored is not None:
        data = stored["data"]
    else:
        data = datasets.resolve_data()
    kind = datasets.data_kind(data)
    synthetic = data["source"] == "synthetic"
    base = stored or {}

    def setting(key: str, default: Any) -> Any:
        return _pick(flags.get(key), user.get(key), base.get(key), default)

    fit_options = dict(base.get("fit") or {"iw_samples": DEFAULT_IW_SAMPLES})
    fit_options.update(user.get("fit") or {})
    for key in ("beta", "free_bits"):
        if flags.get(key) is not None:
            fit_options[key] = flags[key]
    config = {
        "model": setting("model", default_model(kind, synthetic)),
        "preset": setting("preset", settings.DEFAULTS["preset"]),
        "method": setting("method", settings.DEFAULTS["method"]),
        "anneal": bool(setting("anneal", settings.DEFAULTS["anneal"])),
        "epochs": setting("epochs", SYNTHETIC_EPOCHS if synthetic else settings.DEFAULT_EPOCHS),
        "batch_size": setting("batch_size", SYNTHETIC_BATCH_SIZE if synthetic else settings.DEFAULT_BATCH_SIZE[kind]),
        "device": setting("device", settings.DEFAULTS["device"]),
        "seed": setting("seed", settings.DEFAULTS["seed"]),
        # Small models run fastest on one thread, and a busy second core stalls two.
        "threads": setting("threads", SYNTHETIC_THREADS if synthetic else None),
        "model_options": dict(_pick(user.get("model_options"), base.get("model_options"), {})),
        "fit": fit_options,
        "data": data,
    }
    _check_config(config)
    return config


def _check_int(config: dict[str, Any], key: str, minimum: int) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise click.UsageError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _check_config(config: dict[str, Any]) -> None:
    """Refuse settings that cannot work together, before anything is loaded."""
    if not isinstance(config["model"], str) or not config["model"]:
        raise click.UsageError(f"model must be a name or package.module:factory, got {config['model']!r}")
    if config["method"] not in METHODS:
        raise click.UsageError(f"method must be one of {', '.join(METHODS)}, got {config['method']!r}")
    _check_int(config, "epochs", 1)
    _check_int(config, "batch_size", 1)
    _check_int(config, "seed", 0)
    if config["threads"] is not None:
        _check_int(config, "threads", 1)
    check_device(config["device"], "--device")
    if config["anneal"] and config["method"] != "aggressive":
        raise click.UsageError(
            f"--anneal combines KL annealing with --method aggressive, not {config['method']} "
            "(use --method anneal for annealing alone)"
        )
    fit_options = config["fit"]
    if config["method"] == "beta" and fit_options.get("beta") is None:
        raise click.UsageError("--method beta needs a KL weight: --beta 0.5 (or beta in the [fit] table)")
    if config["method"] == "free-bits" and fit_options.get("free_bits") is None:
        raise click.UsageError("--method free-bits needs a floor in nats: --free-bits 0.5 (or free_bits in [fit])")
    for key in ("beta", "free_bits"):
        value = fit_options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise click.UsageError(f"{key} must be a non-negative number, got {value!r}")
    iw = fit_options.get("iw_samples", 0)
    if isinstance(iw, bool) or not isinstance(iw, int) or iw < 0:
        raise click.UsageError(f"iw_samples must be a non-negative integer, got {iw!r}")


def _default_out(config: dict[str, Any]) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", config["model"]).strip("-") or "run"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{config['method']}-{stamp}"


def _stored_config(out: Optional[str], resume: bool) -> Optional[dict[str, Any]]:
    if not resume or out is None:
        return None
    path = Path(out) / CONFIG_FILE
    return read_json(path) if path.is_file() else None


@click.command("fit")
@click.argument("model", required=False)
@click.option("--data", "path", metavar="PATH", help="Folder with *train*, *valid*, *test* files, or an .npz with train/valid/test arrays.")
@click.option("--train", metavar="FILE", help="Training file (text: one sentence a line; images: .npz/.npy).")
@click.option("--valid", metavar="FILE", help="Validation file (default: held out of the training file).")
@click.option("--test", metavar="FILE", help="Test file for the final evaluation (default: the validation set).")
@click.option("--preset", help="Model size preset of a built-in model (small, paper).")
@click.option("--method", type=click.Choice(METHODS), help="Training method (default: aggressive).")
@click.option("--anneal/--no-anneal", default=None, help="Add KL annealing to the aggressive method.")
@click.option("--beta", type=float, help="KL weight for --method beta.")
@click.option("--free-bits", "free_bits", type=float, help="Nats per latent dimension for --method free-bits.")
@click.option("--epochs", type=int, help="Training epochs.")
@click.option("--batch-size", "batch_size", type=int, help="Batch size (default: 16 synthetic, 32 text, 50 images).")
@click.option("--device", help="cpu or cuda.")
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option("--threads", type=int, help="CPU threads for torch (default: 1 for the synthetic run, else torch's).")
@click.option("--out", metavar="RUN_DIR", help="Run directory (default: runs/<model>-<method>-<time>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--config", "config_file", metavar="FILE", help="TOML settings; command-line flags override them.")
def fit_cmd(model: Optional[str], config_file: Optional[str], out: Optional[str], resume: bool, **flags: Any) -> None:
    """Train MODEL (a built-in name or package.module:factory) and write a run directory.

    With no MODEL and no data, trains the paper's synthetic experiment (a corpus
    generated by code) and writes a report: a few minutes on a laptop CPU.
    """
    console = make_console()
    if resume and out is None:
        raise click.UsageError("--resume needs --out RUN_DIR (the run to continue)")
    flags["model"] = model
    user = settings.load_config_file(config_file) if config_file else {}
    stored = _stored_config(out, resume)
    config = resolve_config(flags, user, stored)
    if stored is not None:
        difference = settings.first_difference(stored, config)
        if difference is not None:
            raise click.UsageError(f"--resume: run {out} was made with {difference}; resume with the same settings")

    with torch_threads(config["threads"]):
        _run(console, config, out, resume, stored)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Use ``threads`` CPU threads in torch for the duration (None: leave torch's setting)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run(console: Console, config: dict[str, Any], out: Optional[str], resume: bool,
         stored: Optional[dict[str, Any]]) -> None:
    """Load and check everything, claim the run directory, train, and write the results."""
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
        result = _train(console, run, config, handle, splits, train, valid, test, has_latents, device, resume)
        metrics = final_metrics(result.test, splits, evaluated_on, config["fit"].get("iw_samples", 0))
        extra = {"best_epoch": result.best_epoch, "stopped": result.stopped, "fit_config": result.config,
                 "decoder_only": result.decoder_only}
        write_history(run, result.history, metrics, extra)
        eval_batches = collect_batches(eval_source(splits, evaluated_on, config["batch_size"], seed),
                                       8, device)
        idata = write_diagnostics(run, handle, eval_batches[0] if has_latents else None, result.history, metrics)
        samples = make_samples(handle, splits, eval_batches, 8, seed)
        build_report(run, config, result.history, metrics, idata, samples, kind)
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
           has_latents: bool, device: torch.device, resume: bool):
    """Call :func:`pyro_lag.fit` with the progress display and the per-epoch writers."""
    previous = read_json(run.file(METRICS_FILE))["history"] if resume and run.file(METRICS_FILE).is_file() else []
    callbacks: list[Any] = [HistoryWriter(run, previous)]
    monitor = None
    if has_latents:
        monitor_batch = to_device(next(iter(valid.iter_from(0, 0))), device)
        monitor = LiveMonitor(handle.model, handle.guide, monitor_batch)
        if mean_space_supported(handle):
            points = collect_batches(valid, 200, device)
            callbacks.append(MeanSpaceRecorder(run, handle, points))
    first_epoch = len(previous) + 1
    progress = TrainingProgress(console, config["epochs"], len(train), monitor, first_epoch=first_epoch)
    with progress:
        return fit(
            handle.model, handle.guide, train, valid, test,
            method=config["method"], anneal=config["anneal"], epochs=config["epochs"], kind=splits.kind,
            device=device, seed=config["seed"], run_dir=run.checkpoints, resume=resume,
            callbacks=[progress, *callbacks], **config["fit"],
        )


def _print_start(console: Console, config: dict[str, Any], splits, run: RunDirectory, marker: dict[str, Any],
                 resumed: bool) -> None:
    method = config["method"] + (" + anneal" if config["anneal"] else "")
    verb = "resuming" if resumed else "run"
    console.print(f"{verb} {marker['run_id']} in {run.path}", markup=False)
    console.print(f"model {config['model']} (preset {config['preset']}), method {method}, "
                  f"{config['epochs']} epochs, batch size {config['batch_size']}, device {config['device']}, "
                  f"seed {config['seed']}", markup=False, soft_wrap=True)
    console.print(f"data: {datasets.describe(config['data'])}", markup=False, soft_wrap=True)


def _print_summary(console: Console, run: RunDirectory, metrics: dict[str, Any], result) -> None:
    keys = [("iw_nll", "IW-NLL"), ("elbo", "ELBO"), ("kl", "KL"), ("mi", "MI"), ("au", "AU")]
    parts = [f"{label} {metrics[k]:.4g}" for k, label in keys if isinstance(metrics.get(k), (int, float))]
    console.print(f"{result.stopped}; best epoch {result.best_epoch}; on {metrics['evaluated_on']}: "
                  + ", ".join(parts), markup=False, soft_wrap=True)
    for name in (REPORT_FILE, DIAGNOSTICS_FILE, METRICS_FILE, HISTORY_FILE, CONFIG_FILE):
        console.print(f"{name:16} {run.file(name)}", markup=False, soft_wrap=True)
    console.print(f"{'checkpoints':16} {run.checkpoints}", markup=False, soft_wrap=True)
