"""The example scripts run as a user runs them (tiny sizes), on the real data, and write what they promise."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ROW_KEYS = {"row", "iw_nll", "ppl", "kl", "mi", "au", "seconds", "total_seconds", "epochs",
            "aggressive_epochs", "history"}


def run_example(script: str, *args: str, cwd: Path) -> str:
    """Run ``examples/<script>`` in a fresh interpreter; fail with its output if it exits non-zero."""
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def check_table(out: Path, rows: list[str]) -> list[dict]:
    """results.json holds one finite result per row in order; table.md names every row."""
    results = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in results] == rows
    for r in results:
        assert set(r) == ROW_KEYS
        assert math.isfinite(r["iw_nll"]) and r["iw_nll"] > 0 and 0 < r["seconds"] < r["total_seconds"]
        assert [h["epoch"] for h in r["history"]] == list(range(1, r["epochs"] + 1))
        assert sum(h["aggressive"] for h in r["history"]) == r["aggressive_epochs"]
    table = (out / "table.md").read_text()
    for row in rows:
        assert f"| {row} |" in table
    by_row = {r["row"]: r for r in results}
    assert by_row["decoder-only"]["kl"] == 0.0 and by_row["decoder-only"]["au"] is None
    return results


def test_ptb_text_rows_in_parallel(tmp_path, shared_data):
    rows = ["decoder-only", "vae", "aggressive"]
    run_example("ptb_text.py", "--data", str(shared_data / "ptb"), "--train-sentences", "64",
                "--valid-sentences", "30", "--test-sentences", "30", "--iw-sentences", "10", "--epochs", "1",
                "--iw-samples", "5", "--rows", ",".join(rows),
                "--jobs", "2", "--out", str(tmp_path / "ptb"), cwd=tmp_path)
    results = {r["row"]: r for r in check_table(tmp_path / "ptb", rows)}
    assert results["aggressive"]["aggressive_epochs"] == 1 and results["vae"]["aggressive_epochs"] == 0
    # perplexity is exp(total NLL / tokens): above 1, and ordered as the NLLs are
    ppl = {row: r["ppl"] for row, r in results.items()}
    assert all(p > 1 for p in ppl.values())
    nll = {row: r["iw_nll"] for row, r in results.items()}
    assert sorted(ppl, key=ppl.get) == sorted(nll, key=nll.get)


def test_omniglot_image_rows(tmp_path, shared_data):
    rows = ["decoder-only", "free-bits"]
    run_example("omniglot_image.py", "--data", str(shared_data / "omniglot28" / "omniglot28.npz"),
                "--train-images", "100", "--eval-images", "20", "--epochs", "1", "--iw-samples", "5",
                "--rows", ",".join(rows), "--out", str(tmp_path / "omniglot"), cwd=tmp_path)
    results = check_table(tmp_path / "omniglot", rows)
    assert all(r["ppl"] is None for r in results)  # no tokens: images report nats per image only


def test_unknown_row_is_one_line(tmp_path, shared_data):
    done = subprocess.run([sys.executable, str(EXAMPLES / "omniglot_image.py"), "--rows", "vae,nonsense",
                           "--data", str(shared_data / "omniglot28" / "omniglot28.npz"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "unknown row(s) nonsense; choose from decoder-only, vae, vae+anneal, beta-vae, cyclical, free-bits, "
        "aggressive, aggressive+anneal, aggressive-mi4, aggressive-fast, aggressive-budget, aggressive-budget+anneal, "
        "aggressive-budget-345"]


def test_synthetic_posterior_mean_space(tmp_path):
    out = tmp_path / "space"
    run_example("synthetic_posterior_mean_space.py", "--train-sentences", "160", "--epochs", "1",
                "--points", "40", "--iterations", "0,4", "--trace-every", "5", "--out", str(out), cwd=tmp_path)
    for name in ("posterior_mean_space.png", "trajectory.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 300
    summary = json.loads((out / "posterior_mean_space.json").read_text())
    assert set(summary) == {"standard", "aggressive"}
    for method, run in summary.items():
        assert set(run["spaces"]) == {"0", "4", "10"}  # 160 sentences / batch 16 = 10 iterations
        for space in run["spaces"].values():
            assert len(space["model"]) == len(space["guide"]) == 40
            assert all(-20 <= m < 20 for m in space["model"])  # a mean over the paper's grid
        assert [step for step, _, _ in run["trajectory"]] == [0, 5, 10]
    assert summary["aggressive"]["aggressive_epochs"] == 1 and summary["standard"]["aggressive_epochs"] == 0


@pytest.mark.parametrize("script", ["ptb_text.py", "omniglot_image.py", "synthetic_posterior_mean_space.py"])
def test_help_names_the_paper_flag(script):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--paper" in done.stdout
