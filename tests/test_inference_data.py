"""to_inference_data / posterior_draws: shapes, latent usage, training group, netCDF round trip."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from torch import nn

from pyro_lag.io.inference_data import (
    history_from_inference_data,
    posterior_draws,
    to_inference_data,
    usage_from_inference_data,
)

LATENT = 3


class TinyVAE(nn.Module):
    """A small amortized Gaussian VAE on real-valued vectors, enough to exercise the guide path."""

    def __init__(self, data_dim: int = 5, latent_dim: int = LATENT):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Linear(data_dim, 2 * latent_dim)
        self.decoder = nn.Linear(latent_dim, data_dim)

    def encode(self, x):
        loc, raw = self.encoder(x).chunk(2, dim=-1)
        return loc, nn.functional.softplus(raw) + 1e-3

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent_dim]).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def synthetic_history(epochs: int = 6) -> list[dict]:
    """Per-epoch dicts in the shape pyro_lag.fit produces."""
    return [
        {
            "epoch": e,
            "train_loss": 100.0 - e,
            "elbo": -(100.0 - e),
            "recon": 95.0 - e,
            "kl": 0.5 * e,
            "mi": 0.3 * e,
            "au": min(e, LATENT),
            "aggressive": e <= 3,
            "inner_steps": 12.5 if e <= 3 else 0.0,
            "wall_time": 1.5 * e,
            "lr": 1.0 if e < 5 else 0.5,
        }
        for e in range(1, epochs + 1)
    ]


def synthetic_usage() -> dict:
    return {
        "kl": torch.tensor([1.2, 0.004, 0.3]),
        "au_var": torch.tensor([0.5, 0.0001, 0.02]),
    }


def test_posterior_draws_shape_and_matches_encoder():
    vae = TinyVAE()
    x = torch.randn(10, 5)
    draws = posterior_draws(vae.guide, x, num_draws=4000, max_obs=4)
    assert list(draws) == ["z"]
    z = draws["z"]
    assert z.shape == (1, 4000, 4, LATENT)
    assert not z.requires_grad
    loc, scale = vae.encode(x[:4])
    # Mean and spread of the draws are the guide's q(z|x) for each of the first 4 observations.
    torch.testing.assert_close(z[0].mean(0), loc.detach(), atol=5 * scale.max().item() / 60, rtol=0)
    torch.testing.assert_close(z[0].std(0), scale.detach(), rtol=0.1, atol=0)


def test_posterior_draws_batch_as_tuple_and_scalar_latent():
    def guide(x, y):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("u", dist.Normal(x, 0.1))  # one scalar latent per observation

    x = torch.arange(6.0)
    draws = posterior_draws(guide, (x, None), num_draws=50)
    assert draws["u"].shape == (1, 50, 6, 1)
    torch.testing.assert_close(draws["u"][0, :, :, 0].mean(0), x, atol=0.1, rtol=0)


def test_posterior_draws_moves_data_plate_first():
    # Data plate at dim -2, a per-dimension plate inside it: values are [obs, latent] batch dims.
    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            with pyro.plate("dims", 2, dim=-1):
                pyro.sample("z", dist.Normal(x.unsqueeze(-1).expand(-1, 2), 1e-3))

    x = torch.tensor([0.0, 10.0, 20.0])
    z = posterior_draws(guide, x, num_draws=3)["z"]
    assert z.shape == (1, 3, 3, 2)
    torch.testing.assert_close(z[0, 0, :, 0], x, atol=0.05, rtol=0)


def test_posterior_draws_autonormal_local_latents_under_subsampling():
    data = torch.randn(20, 2)

    def model(idx):
        with pyro.plate("data", 20, subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=data[idx])

    guide = AutoNormal(model)
    idx = torch.arange(5)
    guide(idx)  # initialise parameters
    draws = posterior_draws(guide, idx, num_draws=10)
    # The constrained site 'z', not AutoNormal's auxiliary 'z_unconstrained'.
    assert list(draws) == ["z"]
    assert draws["z"].shape == (1, 10, 5, 2)


def test_posterior_draws_rejects_guide_without_local_latents():
    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    guide = AutoDiagonalNormal(model)
    x = torch.randn(4)
    guide(x)
    with pytest.raises(ValueError, match="no local latent site"):
        posterior_draws(guide, x, num_draws=2)
    with pytest.raises(ValueError, match="num_draws"):
        posterior_draws(guide, x, num_draws=0)


def test_inference_data_groups_dims_and_usage():
    vae = TinyVAE()
    x = torch.randn(12, 5)
    metrics = {"elbo": -90.0, "kl": torch.tensor(1.5), "mi": 0.9, "au": 2, "iw_nll": 88.5}
    idata = to_inference_data(
        guide=vae.guide,
        batch=x,
        num_draws=30,
        max_obs=4,
        usage=synthetic_usage(),
        history=synthetic_history(),
        metrics=metrics,
    )
    assert {"posterior", "latent_usage", "training"} <= set(idata.groups())
    assert idata.posterior["z"].dims == ("chain", "draw", "obs", "latent_dim")
    assert idata.posterior["z"].shape == (1, 30, 4, LATENT)

    usage = idata.latent_usage
    assert usage["kl"].dims == ("latent_dim",)
    np.testing.assert_allclose(usage["posterior_mean_variance"], [0.5, 0.0001, 0.02], rtol=1e-6)
    # Active at the 0.01 threshold on the posterior-mean variance.
    assert usage["active"].values.tolist() == [True, False, True]
    assert usage.attrs["active_threshold"] == 0.01

    training = idata.training
    assert training["elbo"].dims == ("epoch",)
    assert training["epoch"].values.tolist() == [1, 2, 3, 4, 5, 6]
    assert training["aggressive"].dtype == bool
    assert training["aggressive"].values.tolist() == [True] * 3 + [False] * 3
    assert idata.attrs["iw_nll"] == 88.5
    assert idata.attrs["kl"] == pytest.approx(1.5)
    assert idata.attrs["au"] == 2


def test_usage_taken_from_evaluate_style_metrics():
    metrics = {
        "elbo": -10.0,
        "kl": 0.2,
        "mi": 0.1,
        "au": 1,
        "au_var": torch.tensor([0.009, 0.011]),
        "kl_dim": torch.tensor([0.05, 0.15]),
    }
    idata = to_inference_data(metrics=metrics)
    assert idata.groups() == ["latent_usage"]
    assert idata.latent_usage["active"].values.tolist() == [False, True]
    np.testing.assert_allclose(idata.latent_usage["kl"], [0.05, 0.15], rtol=1e-6)
    assert "au_var" not in idata.attrs and idata.attrs["au"] == 1


def test_history_with_missing_keys_nested_lr_and_no_epoch():
    history = [
        {"train_loss": 3.0, "lr": {"encoder": 1.0, "decoder": 1.0}, "aggressive": True},
        {"train_loss": 2.0, "lr": {"encoder": 0.5, "decoder": 1.0}, "aggressive": False, "mi": 0.4},
    ]
    training = to_inference_data(history=history).training
    assert training["epoch"].values.tolist() == [1, 2]
    assert training["lr_encoder"].values.tolist() == [1.0, 0.5]
    assert np.isnan(training["mi"].values[0]) and training["mi"].values[1] == 0.4
    with pytest.raises(ValueError, match="column 'note'"):
        to_inference_data(history=[{"note": "a"}, {"note": 1.0}])


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"posterior_draws\['z'\]"):
        to_inference_data(posterior_draws={"z": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="au_var"):
        to_inference_data(usage={"kl": [1.0, 2.0]})
    with pytest.raises(ValueError, match="needs a batch"):
        to_inference_data(guide=TinyVAE().guide)
    with pytest.raises(ValueError, match="'data' is not a latent sample site"):
        posterior_draws(TinyVAE().guide, torch.randn(3, 5), num_draws=1, sites=["data"])


def test_netcdf_round_trip(tmp_path):
    """Written with to_netcdf and read back with arviz.from_netcdf, every group is unchanged."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

    rng = np.random.default_rng(0)
    draws = {"z": rng.normal(size=(1, 40, 5, LATENT))}
    history = synthetic_history()
    metrics = {"elbo": -90.25, "kl": 1.5, "mi": 0.75, "au": 2, "iw_nll": 88.5, "mi_batch_size": 16}
    idata = to_inference_data(
        posterior_draws=draws, usage=synthetic_usage(), history=history, metrics=metrics
    )
    path = tmp_path / "diagnostics.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))

    assert set(back.groups()) == {"posterior", "latent_usage", "training"}
    for group in ("posterior", "latent_usage", "training"):
        original, loaded = idata[group], back[group]
        assert set(loaded.data_vars) == set(original.data_vars), group
        for name in original.data_vars:
            assert loaded[name].dims == original[name].dims, (group, name)
            assert loaded[name].dtype == original[name].dtype, (group, name)
            np.testing.assert_array_equal(loaded[name].values, original[name].values)
    np.testing.assert_array_equal(back.posterior["z"].values, draws["z"])
    assert back.attrs == metrics
    assert back.latent_usage.attrs["active_threshold"] == 0.01
    # The helpers that feed the report read the same history and usage back.
    assert history_from_inference_data(back) == history
    usage = usage_from_inference_data(back)
    assert usage["active"].tolist() == [True, False, True]
    np.testing.assert_allclose(usage["kl"], [1.2, 0.004, 0.3], rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_posterior_draws_on_cuda():
    vae = TinyVAE().cuda()
    x = torch.randn(6, 5, device="cuda")
    idata = to_inference_data(guide=vae.guide, batch=x, num_draws=5, usage=synthetic_usage())
    assert idata.posterior["z"].shape == (1, 5, 6, LATENT)


def test_import_emits_no_warning():
    code = "import pyro_lag.io.inference_data as m; m._arviz()"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
