"""HTML report: verdict, tables, embedded PNG figures, escaping, and the page in a real browser."""
from __future__ import annotations

import base64
import io
import math
import warnings
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pytest
import torch

from pyro_lag.io.inference_data import to_inference_data
from pyro_lag.report import collapse_verdict, perplexity, render_report, write_report
from tests.browser import console_errors, headless_chromium, missing_reason

LATENT = 8
ACTIVE = [0, 2, 5]
INJECTED = '<script>document.title="pwned";window.__pwned=1;</script>'
INJECTED_IMG = "<img src=x onerror=\"window.__pwned=2\">"
TITLE = "Synthetic run <b>&</b> \"quoted\""


def make_history(epochs: int = 12) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {
            "epoch": e,
            "train_loss": 60.0 - 1.5 * e + rng.normal(scale=0.3),
            "elbo": -(62.0 - 1.4 * e),
            "recon": -(58.0 - 1.6 * e),
            "kl": min(0.4 * e, 3.0),
            "mi": min(0.3 * e, 2.1),
            "au": min(e // 2, len(ACTIVE)),
            "aggressive": e <= 4,
            "inner_steps": float(rng.integers(15, 60)) if e <= 4 else 0.0,
            "wall_time": 2.0 * e,
            "lr": 1.0 if e < 10 else 0.5,
        }
        for e in range(1, epochs + 1)
    ]


def make_usage() -> dict:
    variance = np.full(LATENT, 2e-4)
    variance[ACTIVE] = [0.4, 0.9, 0.05]
    kl = np.full(LATENT, 1e-3)
    kl[ACTIVE] = [1.1, 1.5, 0.4]
    return {"kl": torch.tensor(kl), "au_var": torch.tensor(variance)}


def make_metrics() -> dict:
    return {
        "iw_nll": 48.25, "elbo": -50.5, "recon": -47.5, "kl": 3.0, "mi": 2.1, "au": len(ACTIVE),
        "mi_se": 0.0123, "mi_pairs": 10000, "iw_samples": 500, "num_points": 100, "num_tokens": 1100,
    }


def make_idata():
    rng = np.random.default_rng(2)
    loc = np.zeros((5, LATENT))
    loc[:, ACTIVE] = rng.normal(size=(5, len(ACTIVE)))
    scale = np.ones((5, LATENT))
    scale[:, ACTIVE] = 0.3
    draws = {"z": loc + scale * rng.normal(size=(1, 100, 5, LATENT))}
    return to_inference_data(
        posterior_draws=draws, usage=make_usage(), history=make_history(), metrics=make_metrics()
    )


def text_inputs() -> dict:
    rng = np.random.default_rng(3)
    model_means = rng.normal(size=200)
    return {
        "title": TITLE,
        "config": {"model": "lstm-text", "method": "aggressive", "optim": {"lr": 1.0}, "note": INJECTED_IMG},
        "history": make_history(),
        "metrics": make_metrics(),
        "usage": make_usage(),
        "idata": make_idata(),
        "samples": {
            "prior": ["the market fell N % on monday", INJECTED, "it 's \"a\" <unk> & co"],
            "reconstructions": [("the dog ran", "the dog ran away"), (["a", "<b>", "c"], "a b c")],
        },
        "posterior_mean_space": {
            "epoch 1": (model_means, 0.1 * model_means),
            "epoch 12": (model_means, model_means + 0.05 * rng.normal(size=200)),
        },
    }


@pytest.fixture(scope="module")
def text_html() -> str:
    return render_report(**text_inputs())


class _Collector(HTMLParser):
    """Tags and attributes of a page, for checks that must not depend on formatting."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict]]:
    parser = _Collector()
    parser.feed(html)
    return parser.tags


def _decode_png(src: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    raw = base64.b64decode(src[len(prefix):], validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return matplotlib.image.imread(io.BytesIO(raw), format="png")


# ------------------------------------------------------------------ verdict and numbers


def test_verdict_rules():
    usage = make_usage()
    ok = collapse_verdict({"kl": 3.0, "mi": 2.1, "au": 3}, usage)
    assert ok.collapsed is False and ok.active_dims == ACTIVE and ok.latent_dim == LATENT
    assert collapse_verdict({"kl": 3.0, "mi": 2.1, "au": 0}, None).collapsed is True
    low = collapse_verdict({"kl": 0.05, "mi": 0.02, "au": 1}, None)
    assert low.collapsed is True and "KL and MI" in low.headline
    # KL alone small but MI not: the latent still carries information.
    assert collapse_verdict({"kl": 0.05, "mi": 0.5, "au": 1}, None).collapsed is False
    # AU taken from usage when metrics lack it.
    dead = {"au_var": torch.full((4,), 1e-5)}
    assert collapse_verdict({}, dead).collapsed is True
    assert collapse_verdict({}, None).collapsed is None


def test_perplexity_from_iw_nll_and_token_count():
    metrics = {"iw_nll": 48.25, "num_points": 100, "num_tokens": 1100}
    assert perplexity(metrics) == pytest.approx(math.exp(48.25 * 100 / 1100))
    assert perplexity({"perplexity": 87.5}) == 87.5
    assert perplexity({"iw_nll": 1.0}) is None


def test_report_sections_tables_and_numbers(text_html):
    html = text_html
    verdict = html[html.index('id="verdict"'):html.index("</div>", html.index('id="verdict"'))]
    assert "no posterior collapse" in verdict
    assert "Active latent dimensions:" in verdict and "0, 2, 5" in verdict and "(3 of 8)" in verdict
    assert "AU = 3 of 8" in verdict
    for table in ("evaluation", "history", "usage", "reconstructions", "config"):
        assert f'<table class="{table}">' in html, table
    # Evaluation table: IW-NLL, text perplexity from the token count, KL, MI (with B), AU.
    assert ">48.25<" in html
    assert f">{math.exp(48.25 * 100 / 1100):.4g}<" in html
    assert "± 0.012" in html and "10,000 pairs" in html
    # Twelve epochs in the history table, aggressive epochs named in the caption.
    assert html.count("<tr><td class=\"num\">") >= 12
    assert "epochs 1–4" in html
    assert "optim.lr" in html
    for section in ("training", "latent-usage", "posterior", "mean-space", "samples", "config"):
        assert f'id="{section}"' in html, section


def test_every_image_is_an_embedded_png(text_html):
    images = [attrs for tag, attrs in _tags(text_html) if tag == "img"]
    # training curves, latent usage, forest plot, posterior mean space
    assert len(images) == 4
    for attrs in images:
        pixels = _decode_png(attrs["src"])
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0.01  # not a blank canvas
        assert attrs.get("alt")


def test_page_loads_nothing_from_outside(text_html):
    for tag, attrs in _tags(text_html):
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith(("data:", "#")), (tag, key, attrs[key][:60])
        assert tag != "script"
    assert "default-src 'none'" in text_html


def test_user_text_is_escaped(text_html):
    html = text_html
    assert INJECTED not in html and "<script" not in html
    assert "&lt;script&gt;document.title=&#34;pwned&#34;;window.__pwned=1;&lt;/script&gt;" in html
    assert INJECTED_IMG not in html and "&lt;img src=x onerror=" in html
    assert "<title>Synthetic run &lt;b&gt;&amp;&lt;/b&gt; &#34;quoted&#34;</title>" in html
    assert "it &#39;s &#34;a&#34; &lt;unk&gt; &amp; co" in html
    assert "a &lt;b&gt; c" in html  # token lists are joined, then escaped


def test_report_from_inference_data_alone(tmp_path):
    """The netCDF file alone gives the verdict, the tables and the plots (what `pyro-lag report` reads)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

    path = tmp_path / "diagnostics.nc"
    make_idata().to_netcdf(str(path))
    html = render_report(idata=az.from_netcdf(str(path)), kind="text")
    assert "no posterior collapse" in html and "0, 2, 5" in html
    assert '<table class="history">' in html and '<table class="usage">' in html
    assert f">{math.exp(48.25 * 100 / 1100):.4g}<" in html
    assert len([1 for tag, _ in _tags(html) if tag == "img"]) == 3


def test_collapsed_run_without_posterior_or_history():
    usage = {"au_var": np.full(4, 1e-6), "kl": np.full(4, 1e-4)}
    html = render_report(metrics={"kl": 0.0004, "mi": 0.001, "au": 0}, usage=usage)
    assert "Posterior collapsed: no active latent dimension" in html
    assert 'class="verdict collapsed"' in html
    assert "none" in html and "(0 of 4)" in html
    assert 'id="training"' not in html and 'id="posterior"' not in html


def test_image_samples_from_omniglot(shared_data, tmp_path):
    arrays = np.load(shared_data / "omniglot28" / "omniglot28.npz")
    inputs = arrays["test"][:16]  # uint8, 0 = background, 255 = ink
    assert inputs.dtype == np.uint8 and inputs.shape[1:] == (28, 28)
    reconstructions = torch.tensor(inputs / 255.0).clamp(0.05, 0.95).unsqueeze(1)  # [N, 1, H, W]
    out = write_report(
        tmp_path / "report.html",
        title="omniglot",
        metrics={"iw_nll": 89.1, "kl": 2.0, "mi": 1.5, "au": 4},
        usage=make_usage(),
        samples={"prior": inputs[:8].astype(np.float32) / 255.0, "reconstructions": (inputs, reconstructions)},
    )
    html = out.read_text(encoding="utf-8")
    assert "Perplexity" not in html  # images have no tokens
    images = [attrs["src"] for tag, attrs in _tags(html) if tag == "img"]
    assert len(images) == 3  # usage, prior grid, reconstruction grid
    grid = _decode_png(images[-1])
    assert grid.shape[1] > grid.shape[0]  # inputs and reconstructions side by side


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="1-d or 2-d latents"):
        render_report(posterior_mean_space=(np.zeros((5, 3)), np.zeros((5, 3))))
    with pytest.raises(ValueError, match="differ"):
        render_report(posterior_mean_space=(np.zeros(5), np.zeros(4)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing" / "report.html", metrics={})
    with pytest.raises(ValueError, match="is a directory"):
        write_report(tmp_path, metrics={})


# ------------------------------------------------------------------ in a real browser


@pytest.mark.browser
def test_report_in_headless_chromium(tmp_path):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    from selenium.webdriver.common.by import By

    page = write_report(tmp_path / "report.html", **text_inputs())
    with headless_chromium(tmp_path / "profile") as driver:
        driver.get(page.resolve().as_uri())
        errors = console_errors(driver)
        assert errors == [], errors
        # The injected script and the onerror handler did not run.
        assert driver.title == 'Synthetic run <b>&</b> "quoted"'
        assert driver.execute_script("return window.__pwned === undefined")

        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 4
        for image in images:
            loaded = driver.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", image
            )
            assert loaded and loaded > 0, image.get_attribute("alt")

        verdict = driver.find_element(By.ID, "verdict").text
        assert "no posterior collapse" in verdict and "0, 2, 5" in verdict
        for table in ("evaluation", "history", "usage", "reconstructions", "config"):
            assert driver.find_elements(By.CSS_SELECTOR, f"table.{table}"), table
        rows = driver.find_elements(By.CSS_SELECTOR, "table.evaluation tbody tr")
        assert rows[0].text.startswith("IW-NLL 48.25")
        sentences = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "ol.sentences li")]
        assert INJECTED in sentences  # shown as text, verbatim


def test_import_emits_no_warning():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import pyro_lag.report"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
