"""Atomic checkpoints, exact state round trips, and refusal of checkpoints that would run code."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO

import pyro_lag.io.checkpoint as ckpt
from pyro_lag.io.checkpoint import (
    CheckpointError,
    capture_rng_state,
    capture_training_state,
    load_checkpoint,
    restore_rng_state,
    restore_training_state,
    save_checkpoint,
)


class _WritesFile:
    """Unpickling this runs code that writes a file: the attack a safe loader must stop."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (exec, (f"with open({self.target!r}, 'w') as f: f.write('pwned')",))


# --------------------------------------------------------------------------- files


def test_save_and_load_round_trip(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"epoch": 3, "mi": [0.1, 0.2], "flag": True, "x": None}}
    path = save_checkpoint(tmp_path / "run" / "last.pt", state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"])
    assert loaded["meta"] == state["meta"]
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": torch.tensor(1)})
    before = path.read_bytes()

    def half_written_then_crash(obj, handle):
        handle.write(b"PK\x03\x04 partial bytes of a zip")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", half_written_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": torch.tensor(2)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert int(load_checkpoint(path)["step"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_unsavable_value_is_rejected_before_writing(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(TypeError, match=r"state\['meta'\]\['arr'\] is a ndarray"):
        save_checkpoint(path, {"meta": {"arr": np.zeros(2)}})
    assert load_checkpoint(path) == {"step": 1}


def test_stale_temporary_file_from_a_killed_write_is_cleaned(tmp_path):
    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path / "last.pt", {"a": 1})
    assert not stale.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    payload = {"params": _WritesFile(str(target))}
    with open(evil, "wb") as handle:
        if how == "torch.save":
            torch.save(payload, handle)
        else:
            pickle.dump(payload, handle)
    # the payload is real: a plain unpickler would write the file
    assert not target.exists()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(evil)
    assert not target.exists()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"refusing to load checkpoint {evil}")
    if how == "torch.save":
        assert "'exec'" in message
    # sanity: the payload does execute when loaded unsafely
    with open(evil, "rb") as handle:
        if how == "pickle.dump":
            pickle.load(handle)
            assert target.read_text() == "pwned"


def test_truncated_and_missing_checkpoints_have_clear_errors(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.ones(100)})
    broken = tmp_path / "broken.pt"
    broken.write_bytes(good.read_bytes()[:60])
    with pytest.raises(CheckpointError, match=r"^cannot read checkpoint .*broken\.pt: ") as info:
        load_checkpoint(broken)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


# --------------------------------------------------------------------------- state capture


def test_rng_state_round_trip_covers_every_generator(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()  # and one in numpy's
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})

    def draws():
        return (
            torch.rand(3).tolist(),
            np.random.standard_normal(3).tolist(),
            [random.random(), random.gauss(0, 1)],
            pyro.sample("s", dist.Normal(0.0, 1.0)).item(),
        )

    expected = draws()
    draws()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draws() == expected


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(3, 2)
        self.dec = torch.nn.Linear(2, 3)

    def model(self, x):
        pyro.module("decoder", self.dec)
        scale = pyro.param("obs_scale", torch.tensor(0.7), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), scale).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.enc)
        width = pyro.param("q_scale", torch.full((2,), 0.5), constraint=constraints.interval(0.01, 2.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.enc(x), width).to_event(1))


def _svi(net):
    return SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())


def _store_snapshot():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def test_training_state_resume_is_bitwise_exact(tmp_path):
    data = torch.randn(8, 3)
    # uninterrupted: 6 steps
    pyro.set_rng_seed(0)
    net = _Net()
    svi = _svi(net)
    for _ in range(6):
        svi.step(data)
    expected = _store_snapshot()

    # interrupted after 3 steps: checkpoint, then a fresh "process" resumes
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    net = _Net()
    svi = _svi(net)
    for _ in range(3):
        svi.step(data)
    save_checkpoint(tmp_path / "last.pt", capture_training_state({"optim": svi.optim}, {"step": 3}))

    pyro.clear_param_store()
    pyro.set_rng_seed(123)  # anything: the checkpoint brings back every generator
    net = _Net()  # different initial weights
    svi = _svi(net)
    pyro.poutine.trace(net.guide).get_trace(data)  # register module params so they are restored in place
    pyro.poutine.trace(net.model).get_trace(data)
    meta = restore_training_state(load_checkpoint(tmp_path / "last.pt"), {"optim": svi.optim})
    assert meta == {"step": 3}
    for _ in range(3):
        svi.step(data)
    got = _store_snapshot()
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # the module's own tensors are the store's: training really moved them
    assert torch.equal(net.enc.weight, pyro.param("encoder$$$weight"))


def test_param_store_constraints_survive_a_checkpoint(tmp_path):
    net = _Net()
    pyro.poutine.trace(net.guide).get_trace(torch.zeros(2, 3))
    pyro.param("bounds", torch.tensor([0.5, 1.5]), constraint=constraints.interval(torch.zeros(2), torch.full((2,), 2.0)))
    pyro.param("ind", torch.ones(3), constraint=constraints.independent(constraints.positive, 1))
    save_checkpoint(tmp_path / "p.pt", capture_training_state())
    before = {k: pyro.param(k).detach().clone() for k in pyro.get_param_store().keys()}
    pyro.clear_param_store()
    restore_training_state(load_checkpoint(tmp_path / "p.pt"), rng=False)
    store = pyro.get_param_store()
    for name, value in before.items():
        assert torch.allclose(pyro.param(name), value), name
    assert isinstance(store._constraints["q_scale"], type(constraints.interval(0.0, 1.0)))
    assert store._constraints["q_scale"].upper_bound == 2.0
    assert torch.equal(store._constraints["bounds"].upper_bound, torch.full((2,), 2.0))
    assert store._constraints["ind"].reinterpreted_batch_ndims == 1


def test_restore_rejects_shape_mismatch(tmp_path):
    pyro.param("w", torch.zeros(3))
    state = capture_training_state()
    pyro.clear_param_store()
    pyro.param("w", torch.zeros(4))
    with pytest.raises(CheckpointError, match="parameter 'w' has shape"):
        restore_training_state(state, rng=False)


def test_restore_into_live_optimizer_applies_state_now():
    data = torch.randn(4, 3)
    net = _Net()
    svi = _svi(net)
    svi.step(data)
    state = capture_training_state({"optim": svi.optim})
    svi.step(data)
    svi.step(data)
    restore_training_state(state, {"optim": svi.optim})
    for param, opt in svi.optim.optim_objs.items():
        saved = state["optim"]["optim"][pyro.get_param_store().param_name(param)]
        assert int(opt.state_dict()["state"][0]["step"]) == int(saved["state"][0]["step"]) == 1
    assert ckpt.nonfinite_params() == []
    with torch.no_grad():
        pyro.get_param_store()["obs_scale"]  # touch
        next(iter(pyro.get_param_store().named_parameters()))[1].fill_(float("nan"))
    assert len(ckpt.nonfinite_params()) == 1


def test_checkpoint_directory_holds_only_plain_data(tmp_path):
    net = _Net()
    svi = _svi(net)
    svi.step(torch.randn(4, 3))
    path = save_checkpoint(tmp_path / "c.pt", capture_training_state({"optim": svi.optim}, {"lr": [0.05]}))
    # weights_only load succeeds: nothing in it needs an unpickler allowlist
    state = torch.load(path, weights_only=True)
    assert state["meta"]["lr"] == [0.05]
    assert os.path.getsize(path) > 0
