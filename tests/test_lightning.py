"""Data-parallel aggressive training through PyTorch Lightning: two CPU processes on gloo.

The two-process runs use Lightning's ``ddp_fork`` launch (processes start in well under
a second; ``ddp_spawn`` re-imports torch, Pyro and Lightning in every child, about 20 s
here, and is covered by a slow test). Rank 1 trains on harder data than rank 0, so any
decision a rank took from its own numbers alone would differ between the ranks.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import socket
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed
import torch.multiprocessing
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from pyro_lag import fit
from pyro_lag.engine.collectives import reduce_mi, seed_rank
from pyro_lag.engine.distributed import DistributedAggressiveSVI
from pyro_lag.engine.svi import AggressiveSVI
from pyro_lag.estimators.diagnostics import estimate_mutual_information
from pyro_lag.estimators.mutual_info import MutualInformation
from pyro_lag.handlers.kl_weight import linear_annealing
from pyro_lag.io.checkpoint import load_checkpoint
from pyro_lag.lightning import (
    AggressiveLightningModule,
    EpochBatches,
    EpochShardSampler,
    LightningSettings,
    PyroDDPStrategy,
    fit_lightning,
    resolve_strategy,
)
from pyro_lag.training.faults import NonFiniteBatchError, TrainingDivergedError
from pyro_lag.training.lr_plateau import Plateau
from pyro_lag.training.result import FitResult
from pyro_lag.training.settings import FitSettings

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

X_DIM, Z_DIM = 6, 2
EASY, HARD = 0.3, 2.0  # observation noise of rank 0's and rank 1's data
QUIET = {"enable_progress_bar": False}


# --------------------------------------------------------------------------- a tiny Gaussian VAE


class TinyVAE(nn.Module):
    """x (6-d) from z (2-d) through small MLPs; the guide is an amortized diagonal Gaussian."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(X_DIM, hidden), nn.Tanh(), nn.Linear(hidden, 2 * Z_DIM))
        self.decoder = nn.Sequential(nn.Linear(Z_DIM, hidden), nn.Tanh(), nn.Linear(hidden, X_DIM))

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def _points(n: int, noise: float, seed: int) -> torch.Tensor:
    """x = z W + noise: a latent the model can use; more noise is harder to fit."""
    weights = torch.randn(Z_DIM, X_DIM, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, Z_DIM, generator=g) @ weights + noise * torch.randn(n, X_DIM, generator=g)


def corpus() -> tuple[list[tuple[torch.Tensor]], list[tuple[torch.Tensor]]]:
    """8 training batches of 32, odd positions (rank 1's shard) hard; 4 validation batches of 64.

    Validation batches mix easy and hard points, so both ranks' validation shards come from
    one distribution, as random shards do. (With shards of different distributions the
    size-weighted MI is the mean MI within shards, lower than the union's by I(shard; z).)
    """
    train = [(_points(32, HARD if i % 2 else EASY, seed=i),) for i in range(8)]
    valid = [(torch.cat([_points(32, EASY, seed=100 + i), _points(32, HARD, seed=200 + i)]),) for i in range(4)]
    return train, valid


def new_vae() -> TinyVAE:
    torch.manual_seed(0)
    return TinyVAE()


SMALL = {"lr": 3e-3, "max_inner_steps": 30, "check_every": 5, "mi_samples": 4}


# --------------------------------------------------------------------------- callbacks run on every rank


class RankRecorder(pl.Callback):
    """Saves what each rank saw and ended with: per-step log, history, parameters."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def on_fit_end(self, trainer, module) -> None:
        params = {n: p.detach().cpu().clone() for n, p in pyro.get_param_store().named_parameters()}
        torch.save(
            {"step_log": module.step_log, "history": module.history, "params": params},
            self.out / f"rank{trainer.global_rank}.pt",
        )


class RankZeroLog:
    """A fit-style callback: appends what it hears, with the rank that heard it, to a file per process."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def _write(self, kind: str, data: dict) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(self.out / f"fit_callbacks.rank{rank}.jsonl", "a") as handle:
            handle.write(json.dumps({"kind": kind, **data}) + "\n")

    def on_batch_end(self, info: dict) -> None:
        self._write("batch", info)

    def on_epoch_end(self, row: dict) -> None:
        self._write("epoch", row)


class FailOnRank(pl.Callback):
    """Raises on one rank before a given training step, while the other rank goes on to its collectives."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and len(module.step_log) == self.step:
            raise RuntimeError(f"forced failure on rank {self.rank} before step {self.step + 1}")


# --------------------------------------------------------------------------- the two-process run


def _two_rank_fit(out: Path, strategy: str, epochs: int = 3):
    """Two ranks; after aggressive mode, plain-SVI joint steps (no clipping, one optimizer: the path that
    would bypass the gradient hook); KL annealing over the first epoch; checkpoints in ``out/run``."""
    out.mkdir(parents=True, exist_ok=True)
    train, valid = corpus()
    vae = new_vae()
    result = fit_lightning(
        vae.model, vae.guide, train, valid, epochs=epochs, accelerator="cpu", devices=2, strategy=strategy,
        run_dir=out / "run", callbacks=[RankRecorder(out)], fit_callbacks=[RankZeroLog(out)],
        trainer_options=QUIET,
        clip_norm=None, separate_guide_optim=False, kl_weight=functools.partial(linear_annealing, 0.5, 1),
        stop_rule="patience", patience=1, max_aggressive_epochs=2,  # MI rule; epoch 2 at the latest
        **SMALL,
    )
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    return result, ranks, vae, valid


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    started = time.perf_counter()
    result, ranks, vae, valid = _two_rank_fit(out, "ddp_fork")
    return {"result": result, "ranks": ranks, "vae": vae, "valid": valid, "out": out,
            "seconds": time.perf_counter() - started}


@pytest.mark.timeout(120)
def test_ranks_finish_with_bitwise_identical_parameters(two_ranks):
    first, second = (r["params"] for r in two_ranks["ranks"])
    assert sorted(first) == sorted(second) and first
    for name in first:
        assert torch.equal(first[name], second[name]), name
    # the parent process ends with the same parameters (read back from rank 0's checkpoint)
    vae = two_ranks["vae"]
    here = {f"{side}$$${n}": p for side in ("encoder", "decoder") for n, p in getattr(vae, side).named_parameters()}
    assert sorted(here) == sorted(first)
    for name in first:
        assert torch.equal(here[name].detach(), first[name]), name


@pytest.mark.timeout(120)
def test_inner_step_counts_are_equal_per_step_though_the_ranks_data_differ(two_ranks):
    counts = [[s["inner_steps"] for s in r["step_log"]] for r in two_ranks["ranks"]]
    assert counts[0] == counts[1]
    assert len(counts[0]) == 3 * 4  # 8 batches over 2 ranks, 3 epochs
    assert sum(counts[0][:4]) > 0  # the first epoch was aggressive

    # Control: each rank's shard on its own, with AggressiveSVI's local stop rule, stops elsewhere.
    train, _ = corpus()
    alone = []
    for shard in (train[0::2], train[1::2]):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = new_vae()
        svi = AggressiveSVI(
            vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), TraceMeanField_ELBO(), mi_every=None,
            guide_batches=lambda shard=shard: shard[int(torch.randint(len(shard), ()))],
            max_inner_steps=30, check_every=5,
        )
        steps = []
        for batch in shard:
            svi.step(*batch)
            steps.append(svi.last_inner_steps)
        alone.append(steps)
    assert alone[0] != alone[1], "the ranks' data should lead to different local decisions"


@pytest.mark.timeout(120)
def test_aggressive_mode_ends_on_both_ranks_at_the_same_step(two_ranks):
    modes = [[s["aggressive"] for s in r["step_log"]] for r in two_ranks["ranks"]]
    assert modes[0] == modes[1]
    assert True in modes[0] and False in modes[0]
    assert modes[0].index(False) in (4, 8)  # at an epoch's end: after its MI check
    assert two_ranks["result"].aggressive is False
    # the numbers the stop rule read were the same on both ranks
    keys = ("mi", "mi_se", "mi_points", "val_loss", "aggressive", "inner_steps", "kl_weight")
    rows = [[{k: row[k] for k in keys} for row in r["history"]] for r in two_ranks["ranks"]]
    assert rows[0] == rows[1]


@pytest.mark.timeout(120)
def test_two_process_mi_agrees_with_single_process_mi_over_the_union(two_ranks):
    """The reduced MI (size-weighted over the ranks' shards) estimates the MI of the union.

    The two numbers are separate estimates, each with its own draws; the shard estimate
    also pools 128 points per rank instead of 256 (its aggregate posterior is a little
    noisier, which biases it slightly low). Measured over 20 draws of the single-process
    estimate: difference -0.048 +- 0.019 nats (about one standard error of either
    estimate), at most 0.087 in size. The bound, two standard errors of the difference,
    is 0.11 here.
    """
    final = two_ranks["result"].history[-1]
    vae = two_ranks["vae"]  # holds rank 0's final parameters (read back after the run)
    pyro.set_rng_seed(1)
    single = estimate_mutual_information(vae.guide, two_ranks["valid"], model=vae.model, num_samples=8)
    assert final["mi_points"] == single.points == 256
    assert final["mi"] > 0.3  # a latent in use, not a collapsed 0 = 0
    assert abs(final["mi"] - single.value) <= 2 * math.hypot(final["mi_se"], single.se), (final, single)


@pytest.mark.timeout(120)
def test_rank_zero_writes_one_atomic_checkpoint(two_ranks):
    run = two_ranks["out"] / "run"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left
    state = load_checkpoint(run / "last.pt")
    meta = state["meta"]
    assert meta["epoch"] == 3 and meta["world_size"] == 2 and len(meta["ranks"]) == 2
    rank0 = two_ranks["ranks"][0]["params"]
    for name, value in state["params"]["params"].items():
        assert torch.equal(value, rank0[name]), name
    assert two_ranks["seconds"] < 60


@pytest.mark.timeout(120)
def test_fit_callbacks_hear_every_step_and_epoch_on_rank_zero_only(two_ranks):
    out = two_ranks["out"]
    assert sorted(p.name for p in out.glob("fit_callbacks.*")) == ["fit_callbacks.rank0.jsonl"]
    heard = [json.loads(line) for line in (out / "fit_callbacks.rank0.jsonl").read_text().splitlines()]
    batches = [h for h in heard if h["kind"] == "batch"]
    epochs = [h for h in heard if h["kind"] == "epoch"]
    expected = [(epoch, step, 4) for epoch in (1, 2, 3) for step in (1, 2, 3, 4)]
    assert [(b["epoch"], b["step"], b["steps"]) for b in batches] == expected
    assert [b["inner_steps"] for b in batches] == [s["inner_steps"] for s in two_ranks["ranks"][0]["step_log"]]
    history = two_ranks["result"].history
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert [e["elbo"] for e in epochs] == [row["elbo"] for row in history] == [-row["val_loss"] for row in history]
    assert all(row["lr"] == 3e-3 and row["decayed"] is False for row in history)  # lr decay is off by default
    result = two_ranks["result"]
    losses = [row["val_loss"] for row in history]
    assert result.best_epoch == losses.index(min(losses)) + 1 and result.best_val_loss == min(losses)
    assert result.stopped == "completed 3 epochs"  # as fit says it


@pytest.mark.timeout(120)
def test_a_failure_on_one_rank_ends_the_run_with_one_clear_error(tmp_path):
    train, valid = corpus()
    vae = new_vae()
    started = time.perf_counter()
    with pytest.raises(Exception, match="forced failure on rank 1 before step 3"):
        fit_lightning(
            vae.model, vae.guide, train, valid, epochs=2, accelerator="cpu", devices=2, strategy="ddp_fork",
            callbacks=[FailOnRank(rank=1, step=2)], trainer_options=QUIET, **SMALL,
        )
    assert time.perf_counter() - started < 60  # rank 0, waiting in a collective, was ended


# --------------------------------------------------------------------------- without Lightning


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drop_in_worker(rank: int, port: int, out: str) -> None:
    """DistributedAggressiveSVI as a literal drop-in: no guide batches, no observe_mi (MI checked by itself)."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        shard = corpus()[0][rank::2]
        pyro.clear_param_store()
        torch.manual_seed(rank)  # different initial values on each rank: rank 0's must win
        vae = TinyVAE()
        seed_rank(0)
        svi = DistributedAggressiveSVI(
            vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), TraceMeanField_ELBO(),
            max_inner_steps=30, check_every=5, mi_every=2, patience=1,
        )
        log = []
        for _ in range(3):
            for batch in shard:
                svi.step(*batch)
                log.append((svi.last_inner_steps, svi.aggressive))
        params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
        torch.save(
            {"log": log, "mi": svi.mi_history, "reason": svi.stop_reason, "params": params},
            os.path.join(out, f"drop_in{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_distributed_svi_as_a_drop_in_keeps_the_ranks_in_step(tmp_path):
    torch.multiprocessing.start_processes(
        _drop_in_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork"
    )
    first, second = (torch.load(tmp_path / f"drop_in{r}.pt") for r in range(2))
    assert first["log"] == second["log"]
    assert first["mi"] == second["mi"] and len(first["mi"]) >= 1  # its own MI checks, reduced
    assert any(inner > 0 for inner, _ in first["log"])
    # the stop rule, fed the reduced MI, ended aggressive mode on both ranks at the same step
    assert first["reason"] == second["reason"] and first["reason"].startswith("stop rule")
    assert [aggressive for _, aggressive in first["log"]].count(False) > 0
    for name in first["params"]:
        assert torch.equal(first["params"][name], second["params"][name]), name


# --------------------------------------------------------------------------- one process


@pytest.mark.timeout(120)
def test_single_process_lightning_reaches_the_mi_band_of_fit():
    train, valid = corpus()
    options = {"epochs": 3, "lr": 3e-3, "max_inner_steps": 30, "check_every": 5, "mi_samples": 2, "seed": 0}
    vae = new_vae()
    by_fit = fit(vae.model, vae.guide, train, valid, **options).history[-1]
    vae = new_vae()
    by_lightning = fit_lightning(
        vae.model, vae.guide, train, valid, accelerator="cpu", devices=1, trainer_options=QUIET, **options
    ).history[-1]
    assert by_fit["mi"] > 0.3 and by_lightning["mi"] > 0.3  # the latent is in use in both
    noise = math.hypot(by_fit["mi_se"], by_lightning["mi_se"])
    assert abs(by_fit["mi"] - by_lightning["mi"]) <= max(0.25, 4 * noise), (by_fit, by_lightning)


@pytest.mark.timeout(120)
def test_max_aggressive_steps_ends_aggressive_mode_at_the_same_step_as_fit():
    train, valid = corpus()
    steps_per_epoch = len(list(train))
    budget = steps_per_epoch + 2  # inside the second epoch
    options = {**SMALL, "epochs": 3, "max_inner_steps": 3, "max_aggressive_steps": budget, "mi_samples": 2,
               "stop_rule": "patience", "patience": 10}  # the MI rule never ends it first
    vae = new_vae()
    by_fit = fit(vae.model, vae.guide, train, valid, **options).history
    vae = new_vae()
    by_lightning = fit_lightning(vae.model, vae.guide, train, valid, accelerator="cpu", devices=1,
                                 trainer_options=QUIET, **options).history
    expected = [steps_per_epoch, 2, 0]
    assert [r["aggressive_steps"] for r in by_fit] == expected
    assert [r["aggressive_steps"] for r in by_lightning] == expected
    assert [r["aggressive"] for r in by_lightning] == [True, True, False]


@pytest.mark.timeout(120)
def test_resume_continues_where_the_run_stopped(tmp_path):
    train, valid = corpus()
    options = {"accelerator": "cpu", "devices": 1, "trainer_options": QUIET, **SMALL}

    vae = new_vae()
    straight = fit_lightning(vae.model, vae.guide, train, valid, epochs=2, run_dir=tmp_path / "a", **options)
    expected = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}

    vae = new_vae()
    fit_lightning(vae.model, vae.guide, train, valid, epochs=1, run_dir=tmp_path / "b", **options)
    with pytest.raises(ValueError, match="resume=True"):
        fit_lightning(vae.model, vae.guide, train, valid, epochs=2, run_dir=tmp_path / "b", **options)
    vae = new_vae()
    resumed = fit_lightning(vae.model, vae.guide, train, valid, epochs=2, run_dir=tmp_path / "b", resume=True, **options)

    assert [r["epoch"] for r in resumed.history] == [1, 2]
    def drop(row):
        return {k: v for k, v in row.items() if k != "wall_time"}
    assert [drop(r) for r in resumed.history] == [drop(r) for r in straight.history]
    for name, value in expected.items():
        assert torch.equal(pyro.get_param_store()[name].detach(), value), name


@pytest.mark.timeout(120)
def test_lr_decays_on_a_plateau_from_the_best_parameters_and_stops_after_max_decays(tmp_path, monkeypatch):
    """The reference's rule, as fit applies it: the validation loss (scripted here) rises for
    ``decay_patience`` epochs, so lr halves and the best parameters come back; after
    ``max_decays`` decays training stops, and a rerun does not train further."""
    scripted = iter([3.0, 4.0, 5.0, 6.0, 7.0])
    validate = AggressiveLightningModule._validate

    def scripted_validate(self):
        _, mi, usage = validate(self)
        return next(scripted), mi, usage

    monkeypatch.setattr(AggressiveLightningModule, "_validate", scripted_validate)
    snapshots = []

    def snapshot(row):
        snapshots.append({n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()})

    train, valid = corpus()
    vae = new_vae()
    options = {"accelerator": "cpu", "devices": 1, "trainer_options": QUIET, "run_dir": tmp_path / "run", **SMALL,
               "lr_decay": 0.5, "decay_patience": 1, "decay_after": 0, "max_decays": 2}
    result = fit_lightning(vae.model, vae.guide, train, valid, epochs=5, fit_callbacks=[snapshot], **options)
    assert [row["lr"] for row in result.history] == [3e-3, 3e-3, 1.5e-3]  # the lr each epoch trained with
    assert [row["decayed"] for row in result.history] == [False, True, True]
    assert result.stopped == "learning rate decayed 2 times" and result.best_epoch == 1
    for later in snapshots[1:]:  # each decay put the best (epoch 1) parameters back
        for name, value in snapshots[0].items():
            assert torch.equal(later[name], value), name
    meta = load_checkpoint(tmp_path / "run" / "last.pt")["meta"]
    assert meta["plateau"] == {"lr": 7.5e-4, "plateau_loss": 5.0, "not_improved": 0, "decays": 2}
    assert meta["stopped"] == result.stopped
    again = fit_lightning(vae.model, vae.guide, train, valid, epochs=5, resume=True, **options)
    assert len(again.history) == 3 and again.stopped == result.stopped  # stopped for good


def test_plateau_follows_fits_rule():
    import pyro_lag.lightning.module
    import pyro_lag.training.state

    # one rule for both paths: fit's state and the Lightning module hold the same class
    assert pyro_lag.training.state.Plateau is Plateau and pyro_lag.lightning.module.Plateau is Plateau
    losses = [5, 4, 6, 7, 8, 9, 3]
    settings = LightningSettings(lr=1.0, lr_decay=0.5, decay_patience=2, decay_after=3)
    plateau = Plateau(1.0)
    decisions = [plateau.should_decay(settings, epoch, loss) for epoch, loss in enumerate(losses)]
    # fit's settings with the same rule decide the same
    fit_rule = FitSettings(lr=1.0, lr_decay=0.5, decay_patience=2, decay_after=3)
    again = Plateau(1.0)
    assert decisions == [again.should_decay(fit_rule, epoch, loss) for epoch, loss in enumerate(losses)]
    # epoch 3 is the second above the plateau (4) and decay_after allows it; the plateau restarts at 7
    assert decisions == [False, False, False, True, False, True, False]
    assert plateau.lr == 0.25 and plateau.decays == 2 and plateau.plateau_loss == 3
    assert not Plateau(1.0).should_decay(LightningSettings(), 0, 1e9)  # lr_decay None: never
    assert plateau.exhausted(LightningSettings(lr_decay=0.5, max_decays=2))
    with pytest.raises(ValueError, match="lr_decay"):
        LightningSettings(lr_decay=1.5)


def test_lightning_settings_from_fit_are_fits_resolved_settings():
    fit_settings = FitSettings(method="beta", beta=0.5, epochs=4).resolved("text")
    settings = LightningSettings.from_fit(fit_settings)
    assert (settings.optim, settings.lr, settings.stop_rule, settings.lr_decay) == ("sgd", 1.0, "drop", 0.5)
    assert settings.kl_schedule(10).value == 0.5  # the method's KL weight, as fit builds it
    assert LightningSettings.for_kind("text").aggressive and not LightningSettings(method="standard").aggressive


# --------------------------------------------------------------------------- small pieces


def test_shards_have_equal_length_and_cover_every_batch():
    batches = EpochBatches([(torch.zeros(1),)] * 5)
    shards = [list(EpochShardSampler(batches, 2, r, first_epoch=3)) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    assert {p for s in shards for _, p in s} == set(range(5))
    assert all(epoch == 3 for s in shards for epoch, _ in s)


def test_batch_sources_are_addressed_by_epoch_and_position():
    import numpy as np

    from pyro_lag.data import ImageBatches

    source = ImageBatches(np.random.default_rng(0).random((40, 3, 3)), 8, seed=1)
    batches = EpochBatches(source)
    for epoch in (0, 2):
        expected = list(source.iter_from(epoch, 0))
        for position in range(len(source)):
            assert torch.equal(batches[(epoch, position)][0], expected[position][0])


def test_reduce_mi_without_a_process_group_is_the_estimate():
    estimate = MutualInformation(0.5, 0.1, 100, 10000)
    assert reduce_mi(estimate) is estimate
    with pytest.raises(ValueError, match="no validation batch"):
        reduce_mi(None)


def test_ddp_names_become_the_unwrapped_strategy():
    assert isinstance(resolve_strategy("ddp"), PyroDDPStrategy)
    assert resolve_strategy("ddp_spawn")._start_method == "spawn"
    assert isinstance(resolve_strategy("auto", "cpu", 2), PyroDDPStrategy)
    assert resolve_strategy("auto", "cpu", 1) == "auto"
    assert isinstance(resolve_strategy("auto", "cpu", "0,1"), PyroDDPStrategy)
    assert LightningSettings.for_kind("text").optim == "sgd"
    assert LightningSettings.for_kind("image", lr=3e-3).lr == 3e-3
    with pytest.raises(ValueError, match="optim"):
        LightningSettings(optim="rmsprop")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_spawned_processes_train_like_forked_ones(tmp_path):
    """``ddp_spawn`` (fresh interpreters, as on macOS or with CUDA) gives the same run as ``ddp_fork``."""
    spawned, ranks, _, _ = _two_rank_fit(tmp_path / "spawn", "ddp_spawn", epochs=2)
    forked, _, _, _ = _two_rank_fit(tmp_path / "fork", "ddp_fork", epochs=2)
    def drop(row):
        return {k: v for k, v in row.items() if k != "wall_time"}
    assert [drop(r) for r in spawned.history] == [drop(r) for r in forked.history]
    for name in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])


@pytest.mark.timeout(180)
def test_scaling_benchmark_runs_at_tiny_size(shared_data, tmp_path):
    from benchmarks import bench_scaling

    if not (shared_data / "ptb" / "ptb.train.txt").is_file():
        pytest.skip("PTB not found")
    result = bench_scaling.main(["--size", "tiny", "--per-length", "64", "--inner-steps", "1", "--repeats", "1",
                                 "--data", str(shared_data / "ptb"), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "scaling.json").read_text())
    for kind in ("standard", "aggressive"):
        throughput = saved["kinds"][kind]["throughput"]
        assert throughput["1"] > 0 and throughput["2"] > 0
        assert saved["kinds"][kind]["efficiency"] == pytest.approx(throughput["2"] / (2 * throughput["1"]))
    assert result["table"].startswith("| step | 1 process (sentences/s) | 2 processes (sentences/s) |")


# --------------------------------------------------------------------------- one core, two drivers


def _nan_batch_run(trainer: str, **options) -> BaseException:
    """The error ``fit`` or ``fit_lightning`` stops with when training batch 4 holds a NaN."""
    train, valid = corpus()
    bad = train[3][0].clone()
    bad[5, 2] = float("nan")
    train[3] = (bad,)
    vae = new_vae()
    with pytest.raises(Exception) as caught:
        if trainer == "fit":
            fit(vae.model, vae.guide, train, valid, epochs=1, **options)
        else:
            fit_lightning(vae.model, vae.guide, train, valid, epochs=1, accelerator="cpu", devices=1,
                          trainer_options=QUIET, **options)
    return caught.value


def test_fit_and_lightning_return_the_same_result_with_the_same_history_keys(tmp_path):
    train, valid = corpus()
    vae = new_vae()
    single = fit(vae.model, vae.guide, train, valid, valid, epochs=2, **SMALL)
    vae = new_vae()
    lit = fit_lightning(vae.model, vae.guide, train, valid, valid, epochs=2, accelerator="cpu", devices=1,
                        run_dir=tmp_path / "lit", trainer_options=QUIET, **SMALL)
    assert type(lit) is type(single) is FitResult
    assert (lit.rank, lit.world_size) == (0, 1)
    assert [set(row) for row in lit.history] == [set(row) for row in single.history]
    for row in lit.history:
        assert row["au"] is not None and math.isfinite(row["kl"]) and math.isfinite(row["recon"])
        assert row["ranks"] == 1
    assert lit.test is not None and set(lit.test) == set(single.test or {})
    assert lit.stopped == single.stopped == "completed 2 epochs"


def test_a_nan_batch_gets_the_same_error_from_fit_and_lightning(tmp_path):
    from_fit, from_lightning = _nan_batch_run("fit", **SMALL), _nan_batch_run("lightning", **SMALL)
    # an inner step draws the bad batch first: the guide's distribution meets the NaN
    assert type(from_fit) is type(from_lightning) is TrainingDivergedError
    # the same message, but for the step: each driver draws its inner batches from its own stream
    assert [re.sub(r"step \d+", "step N", str(e)) for e in (from_fit, from_lightning)] == [
        re.sub(r"step \d+", "step N", str(from_fit))
    ] * 2
    assert "invalid (NaN or out-of-support) values at epoch 1, step" in str(from_fit)


def test_a_nan_in_the_steps_own_batch_is_refused_alike_by_fit_and_lightning(tmp_path):
    """Without inner steps the model step meets the batch itself: refused before the step."""
    errors = [_nan_batch_run(trainer, method="standard", lr=3e-3) for trainer in ("fit", "lightning")]
    assert all(isinstance(e, NonFiniteBatchError) for e in errors)
    assert all(isinstance(e, TrainingDivergedError) and isinstance(e, ValueError) for e in errors)
    assert str(errors[0]) == str(errors[1]) == "training batch 4 of epoch 1 holds NaN or infinite values in argument 0"


def test_lightning_reduces_kl_and_active_units_over_ranks_as_one_process_measures_them(two_ranks):
    """Two ranks' shards, merged, give the AU and KL that one process computes over the union."""
    rows = [r["history"] for r in two_ranks["ranks"]]
    assert rows[0] == rows[1] or [
        {k: row[k] for k in ("kl", "recon", "au")} for row in rows[0]
    ] == [{k: row[k] for k in ("kl", "recon", "au")} for row in rows[1]]
    assert all(row["au"] is not None and row["kl"] >= 0.0 for row in rows[0])


# --------------------------------------------------------------------------- parameters made on first call


class LazyPair(nn.Module):
    """A global latent ``w`` with an AutoNormal guide beside an amortized local ``z``, and a
    ``pyro.param`` with a random initial value: every guide parameter is created on the first call."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(Z_DIM, 16), nn.Tanh(), nn.Linear(16, X_DIM))
        self.encoder = nn.Sequential(nn.Linear(X_DIM, 16), nn.Tanh(), nn.Linear(16, 2 * Z_DIM))
        self.global_guide = AutoNormal(pyro.poutine.block(self.model, expose=["w"]))

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        w = pyro.sample("w", dist.Normal(x.new_zeros(X_DIM), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z) + w, 0.5).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        self.global_guide(x)
        pyro.module("encoder", self.encoder)
        shift = pyro.param("shift", lambda: 0.1 * torch.randn(Z_DIM))  # random, drawn on first call
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc + shift, log_scale.exp()).to_event(1))


@pytest.mark.timeout(180)
def test_parameters_created_on_first_call_stay_bitwise_equal_on_two_ranks(tmp_path):
    train, valid = corpus()
    torch.manual_seed(0)
    pair = LazyPair()
    fit_lightning(pair.model, pair.guide, train, valid, epochs=2, accelerator="cpu", devices=2,
                  strategy="ddp_fork", run_dir=tmp_path / "run", callbacks=[RankRecorder(tmp_path)],
                  trainer_options=QUIET, **SMALL)
    first, second = (torch.load(tmp_path / f"rank{r}.pt")["params"] for r in range(2))
    assert {"shift", "AutoNormal.locs.w", "AutoNormal.scales.w"} <= set(first) and set(first) == set(second)
    for name in first:
        assert torch.equal(first[name], second[name]), name
