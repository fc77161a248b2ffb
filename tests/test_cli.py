"""The `pyro-lag` command line: every command end to end, run directories, and one-line user errors.

Runs through click's CliRunner (in process) and through the installed `pyro-lag` entry
point (a subprocess). Training runs are tiny (a few dozen sentences, 8-unit LSTMs, one
epoch) so the whole file stays fast; the full default `pyro-lag fit` is marked slow.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from pyro_lag.cli.main import main
from pyro_lag.models import list_models, sample_corpus

from pyro_lag.data import Vocabulary

TINY_TEXT = """
epochs = {epochs}
threads = 1
[synthetic]
train = 48
valid = 16
test = 16
[model_options]
ni = 8
enc_nh = 8
dec_nh = 8
[fit]
max_inner_steps = 3
iw_samples = 3
"""

TINY_IMAGE = """
epochs = 1
threads = 1
batch_size = 40
[data]
valid_size = 40
[model_options]
latent_dim = 4
hidden = 16
[fit]
max_inner_steps = 3
iw_samples = 3
"""

USER_PAIRS = '''
"""Model/guide factories as a user would write them, for `pyro-lag fit module:factory`."""
import os

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoDiagonalNormal

from pyro_lag.models import build


def make_pair(vocab_size):
    return build("synthetic", "small", vocab_size=vocab_size, ni=8, enc_nh=8, dec_nh=8)


def tuple_pair(vocab_size):
    pair = make_pair(vocab_size)
    return pair.model, pair.guide


def not_a_pair():
    return 42


def interrupted_pair(vocab_size):
    """A pair whose training is interrupted (Ctrl-C) once the file named by CLI_TEST_STOP_WHEN exists."""
    pair = make_pair(vocab_size)
    stop = os.environ.get("CLI_TEST_STOP_WHEN")

    def model(x):
        if stop and os.path.exists(stop) and torch.is_grad_enabled():
            raise KeyboardInterrupt
        return pair.model(x)

    return model, pair.guide


def global_only(vocab_size):
    def model(x):
        logits = pyro.sample("logits", dist.Normal(torch.zeros(vocab_size), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("first", dist.Categorical(logits=logits), obs=x[:, 1])

    return model, AutoDiagonalNormal(model)
'''

RUN_FILES = ("run.json", "config.json", "vocab.json", "metrics.json", "history.csv", "diagnostics.nc", "report.html")


# ------------------------------------------------------------------------------ helpers


def invoke(*args) -> Result:
    """Run `pyro-lag ARGS` in process."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"


def assert_user_error(result, *fragments: str, code: int | None = None) -> str:
    """A handled user error: non-zero exit, exactly one `Error: ...` line on stderr, no traceback."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.stderr
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_config(folder: Path, text: str, name: str = "config.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def load_netcdf(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

    return az.from_netcdf(str(path))


def entry_point() -> str:
    """The installed console script (beside the interpreter, else on PATH)."""
    script = Path(sys.executable).with_name("pyro-lag")
    if script.is_file():
        return str(script)
    found = shutil.which("pyro-lag")
    if found is None:
        pytest.skip("the pyro-lag console script is not installed")
    return found


def run_entry_point(*args, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([entry_point(), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two stall whenever the second core is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    write_config(folder, TINY_TEXT.format(epochs=1), "tiny.toml")
    write_config(folder, TINY_TEXT.format(epochs=2), "tiny2.toml")
    user = TINY_TEXT.format(epochs=1).replace("[model_options]\nni = 8\nenc_nh = 8\ndec_nh = 8\n", "")
    assert "ni = 8" not in user
    write_config(folder, user, "tiny-user.toml")  # user factories take no model options here
    (folder / "userpairs_cli_test.py").write_text(USER_PAIRS, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def text_run(workdir) -> Path:
    """One tiny aggressive run on the embedded synthetic corpus, shared by the read-only tests."""
    out = workdir / "text-run"
    result = invoke("fit", "--config", workdir / "tiny.toml", "--out", out)
    assert_ok(result)
    return out


@pytest.fixture(scope="module")
def standard_run(workdir) -> tuple[Path, Result]:
    """A tiny run of the standard method, flags overriding the config file."""
    out = workdir / "standard-run"
    result = invoke("fit", "--config", workdir / "tiny.toml", "--out", out, "--method", "standard", "--seed", 5,
                    "--policy", "budget")
    assert_ok(result)
    return out, result


@pytest.fixture(scope="module")
def omniglot_slice(workdir) -> Path:
    """120 training and 40 test OMNIGLOT images (from the shared data) in one .npz."""
    source = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot28" / "omniglot28.npz"
    if not source.is_file():
        pytest.skip(f"shared OMNIGLOT data not found: {source}")
    with np.load(source) as data:
        train, test = data["train"][:120], data["test"][:40]
    path = workdir / "omniglot-slice.npz"
    np.savez(path, train=train, test=test)
    return path


@pytest.fixture(scope="module")
def image_run(workdir, omniglot_slice) -> Path:
    config = write_config(workdir, TINY_IMAGE, "image.toml")
    out = workdir / "image-run"
    assert_ok(invoke("fit", "mlp-image", "--data", omniglot_slice, "--config", config, "--out", out,
                     "--method", "standard"))
    return out


@pytest.fixture
def user_module(workdir, monkeypatch) -> str:
    monkeypatch.syspath_prepend(str(workdir))
    return "userpairs_cli_test"


# ------------------------------------------------------------------------------ models, data synthetic


def test_models_lists_every_registered_pair():
    result = invoke("models")
    assert_ok(result)
    for name in list_models():
        assert name in result.stdout
    assert "text" in result.stdout and "image" in result.stdout
    assert "package.module:factory" in result.stdout


def test_data_synthetic_writes_the_generators_corpus(tmp_path):
    out = tmp_path / "syn"
    result = invoke("data", "synthetic", "--out", out, "--n", 50, "--seed", 3)
    assert_ok(result)
    expected = sample_corpus(50, seed=3).tolist()
    lines = []
    for split, count in (("train", 40), ("valid", 5), ("test", 5)):
        text = (out / f"synthetic.{split}.txt").read_text().splitlines()
        assert len(text) == count
        lines.extend(text)
    rows = [[int(t) for t in line.split()] for line in lines]
    assert rows == expected
    assert all(len(r) == 10 and all(0 <= t < 1000 for t in r) for r in rows)

    again = invoke("data", "synthetic", "--out", out, "--n", 50)
    assert_user_error(again, "exists", "--force")
    assert_ok(invoke("data", "synthetic", "--out", out, "--n", 20, "--force"))
    assert len((out / "synthetic.train.txt").read_text().splitlines()) == 16


# ------------------------------------------------------------------------------ fit


def test_fit_writes_a_complete_run_directory(text_run):
    for name in RUN_FILES:
        assert (text_run / name).is_file(), name
    assert (text_run / "checkpoints" / "best.pt").is_file()
    assert (text_run / "checkpoints" / "last.pt").is_file()

    marker = read_json(text_run / "run.json")
    config = read_json(text_run / "config.json")
    assert marker["status"] == "complete" and marker["finished"]
    assert len(marker["run_id"]) == 12 and marker["config_hash"]
    assert config["model"] == "synthetic" and config["method"] == "aggressive"
    assert config["data"] == {"source": "synthetic", "train": 48, "valid": 16, "test": 16, "seed": 0}
    assert config["model_options"] == {"ni": 8, "enc_nh": 8, "dec_nh": 8}
    assert config["fit"]["max_inner_steps"] == 3

    vocab = Vocabulary.from_list(read_json(text_run / "vocab.json"))
    assert len(vocab) > 4
    metrics = read_json(text_run / "metrics.json")
    assert [row["epoch"] for row in metrics["history"]] == [1]
    assert metrics["history"][0]["aggressive"] is True
    final = metrics["final"]
    assert final["evaluated_on"] == "test" and final["iw_samples"] == 3
    assert final["num_tokens"] == 16 * 11  # 10 words and </s> per test sentence
    for key in ("iw_nll", "elbo", "kl", "mi", "au"):
        assert np.isfinite(final[key]), key
    rows = list(csv.DictReader(io.StringIO((text_run / "history.csv").read_text())))
    assert len(rows) == 1 and float(rows[0]["elbo"]) == pytest.approx(metrics["history"][0]["elbo"])

    idata = load_netcdf(text_run / "diagnostics.nc")
    assert {"posterior", "latent_usage", "training"} <= set(idata.groups())
    assert idata.posterior["z"].shape[:2] == (1, 200)
    assert idata.attrs["iw_nll"] == pytest.approx(final["iw_nll"])

    html = (text_run / "report.html").read_text(encoding="utf-8")
    assert 'id="verdict"' in html and "Evaluation" in html
    assert "data:image/png;base64," in html  # plots embedded, nothing fetched
    assert "Posterior mean space" in html
    spaces = read_json(text_run / "posterior_mean_space.json")
    assert spaces["points"] == 16 and list(spaces["snapshots"]) == ["epoch 1", "end"]
    assert spaces["snapshots"]["epoch 1"]["label"] == "epoch 1 (aggressive)"


def test_fit_prints_progress_summary_and_paths(standard_run):
    out, result = standard_run
    assert "epoch 1/1" in result.stdout and "val ELBO" in result.stdout and "MI" in result.stdout
    assert str(out / "report.html") in result.stdout
    assert str(out / "diagnostics.nc") in result.stdout
    history = read_json(out / "metrics.json")["history"]
    assert history[0]["aggressive"] is False and history[0]["inner_steps"] == 0


def test_fit_prints_plain_progress_lines_into_a_log(standard_run):
    _, result = standard_run  # CliRunner's output is not a terminal: lines, not a bar
    lines = result.stdout.splitlines()
    assert any(line.startswith("epoch 1/1  batch 1/") and "elapsed" in line for line in lines)
    assert any(line.startswith("final evaluation on test, 3 importance samples: ") for line in lines)
    assert any(line.startswith("final evaluation on test, 3 importance samples: done in ") for line in lines)


def test_flags_override_the_config_file(standard_run):
    out, _ = standard_run
    saved = read_json(out / "config.json")
    assert saved["method"] == "standard" and saved["seed"] == 5  # from flags
    assert saved["epochs"] == 1 and saved["fit"]["iw_samples"] == 3  # from the file
    assert saved["fit"]["policy"] == "budget" and saved["fit"]["max_inner_steps"] == 3  # a flag beside the file's


def test_fit_user_factory_returning_a_tuple(workdir, user_module):
    out = workdir / "user-tuple"
    result = invoke("fit", f"{user_module}:tuple_pair", "--config", workdir / "tiny-user.toml", "--out", out)
    assert_ok(result)
    assert read_json(out / "run.json")["status"] == "complete"
    assert read_json(out / "config.json")["model"] == f"{user_module}:tuple_pair"
    assert (out / "report.html").is_file() and (out / "diagnostics.nc").is_file()


def test_fit_images_and_sample_grid(image_run, tmp_path):
    config = read_json(image_run / "config.json")
    assert config["data"]["kind"] == "image"
    assert config["data"]["train"]["key"] == "train" and config["data"]["test"]["key"] == "test"
    assert config["data"]["valid"] is None and config["data"]["valid_size"] == 40
    final = read_json(image_run / "metrics.json")["final"]
    assert final["evaluated_on"] == "test" and np.isfinite(final["iw_nll"])

    target = tmp_path / "grid.png"
    result = invoke("sample", image_run, "--n", 6, "--from", "reconstruction", "--out", target)
    assert_ok(result)
    from matplotlib import image as mpimg

    grid = mpimg.imread(target)
    assert grid.shape[0] == 2 * 30 + 2 and grid.shape[1] == 6 * 30 + 2  # inputs over reconstructions
    result = invoke("sample", image_run, "--n", 4)
    assert_ok(result)
    assert Path(result.stdout.strip()) == image_run / "samples-prior.png"
    assert mpimg.imread(image_run / "samples-prior.png").shape[:2] == (32, 4 * 30 + 2)


# ------------------------------------------------------------------------------ eval, report, sample, compare


def test_eval_reports_iw_nll_and_saves_it(text_run):
    result = invoke("eval", text_run, "--iw-samples", 7)
    assert_ok(result)
    for label in ("IW-NLL", "PPL", "-ELBO", "KL", "MI", "AU"):
        assert label in result.stdout
    saved = read_json(text_run / "eval.json")
    metrics = saved["metrics"]
    assert saved["iw_samples"] == 7 and saved["data"] == "test"
    assert np.isfinite(metrics["iw_nll"]) and metrics["num_points"] == 16
    # the importance-weighted bound is (in expectation) tighter than the ELBO
    assert metrics["iw_nll"] <= -metrics["elbo"] + 0.5


def test_eval_on_another_file_uses_the_runs_vocabulary(text_run, tmp_path):
    data = tmp_path / "extra.txt"
    data.write_text("1 2 3 4 5\nword never seen\n", encoding="utf-8")
    result = invoke("eval", text_run, "--data", data, "--iw-samples", 2)
    assert_ok(result)
    saved = read_json(text_run / "eval.json")
    assert saved["data"] == str(data.resolve()) and saved["metrics"]["num_points"] == 2
    assert saved["metrics"]["num_tokens"] == 6 + 4


def test_report_rebuilds_the_page(text_run):
    report = text_run / "report.html"
    report.unlink()
    result = invoke("report", text_run)
    assert_ok(result)
    assert result.stdout.strip() == str(report)
    html = report.read_text(encoding="utf-8")
    assert 'id="verdict"' in html and 'id="samples"' in html and "Posterior mean space" in html


def test_sample_prints_sentences_from_the_runs_vocabulary(text_run):
    vocab = set(read_json(text_run / "vocab.json"))
    result = invoke("sample", text_run, "--n", 5, "--seed", 1)
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    assert all(word in vocab for line in lines for word in line.split())
    assert invoke("sample", text_run, "--n", 5, "--seed", 1).stdout == result.stdout  # seeded

    result = invoke("sample", text_run, "--n", 3, "--from", "reconstruction")
    assert_ok(result)
    pairs = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(pairs) == 3 and all(len(p) == 2 and len(p[0].split()) == 10 for p in pairs)


def test_compare_prints_and_writes_the_table(text_run, standard_run, tmp_path):
    other = standard_run[0]
    csv_path, md_path = tmp_path / "table.csv", tmp_path / "table.md"
    result = invoke("compare", text_run, other, "--csv", csv_path, "--markdown", md_path)
    assert_ok(result)
    for header in ("IW-NLL", "PPL", "-ELBO", "KL", "MI", "AU", "rel. time"):
        assert header in result.stdout

    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [r["run"] for r in rows] == ["text-run", "standard-run"]
    assert [r["method"] for r in rows] == ["aggressive", "standard"]
    first = read_json(text_run / "metrics.json")["final"]
    if (text_run / "eval.json").is_file() and read_json(text_run / "eval.json")["data"] == "test":
        first = read_json(text_run / "eval.json")["metrics"]  # a later eval of the test set wins
    assert float(rows[0]["iw_nll"]) == pytest.approx(first["iw_nll"])
    assert float(rows[1]["kl"]) == pytest.approx(read_json(other / "metrics.json")["final"]["kl"])
    times = [read_json(p / "metrics.json")["training_time"] for p in (text_run, other)]
    assert float(rows[0]["relative_time"]) == 1.0
    assert float(rows[1]["relative_time"]) == pytest.approx(times[1] / times[0])

    lines = md_path.read_text().splitlines()
    assert lines[0].startswith("| run | model | method | IW-NLL | PPL | -ELBO | KL | MI | AU |")
    assert set(lines[1].replace("|", "")) <= {"-", ":"}
    assert len(lines) == 4 and lines[3].startswith("| standard-run | synthetic | standard |")


# ------------------------------------------------------------------------------ run directory ownership


def test_second_fit_into_a_run_directory_refuses(workdir, text_run):
    before = (text_run / "run.json").read_text()
    result = invoke("fit", "--config", workdir / "tiny.toml", "--out", text_run)
    assert_user_error(result, "already holds run", "--resume")
    assert (text_run / "run.json").read_text() == before


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX advisory locks")
def test_a_run_in_training_refuses_a_second_process_even_with_resume(text_run):
    import fcntl

    before = (text_run / "run.json").read_text()
    with open(text_run / ".lock", "a+") as handle:  # as a training process holds it
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_user_error(invoke("fit", "--out", text_run, "--resume"), "is in use")
    assert (text_run / "run.json").read_text() == before


def test_fit_refuses_a_folder_that_is_not_a_run(workdir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke("fit", "--config", workdir / "tiny.toml", "--out", tmp_path)
    assert_user_error(result, "not empty", "no pyro-lag run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_continues_exactly_and_checks_settings(workdir, tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert_ok(invoke("fit", "--config", workdir / "tiny.toml", "--out", resumed))
    run_id = read_json(resumed / "run.json")["run_id"]

    changed = invoke("fit", "--config", workdir / "tiny.toml", "--out", resumed, "--resume", "--batch-size", 8)
    assert_user_error(changed, "--resume", "batch_size=16")

    assert_ok(invoke("fit", "--out", resumed, "--resume", "--epochs", 2))
    marker = read_json(resumed / "run.json")
    assert marker["run_id"] == run_id and marker["status"] == "complete"
    assert [r["epoch"] for r in read_json(resumed / "metrics.json")["history"]] == [1, 2]

    assert_ok(invoke("fit", "--config", workdir / "tiny2.toml", "--out", straight))
    a = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["params"]["params"]
    b = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["params"]["params"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_an_interrupted_run_says_so_keeps_its_checkpoint_and_resumes(workdir, user_module, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    config = write_config(tmp_path, TINY_TEXT.format(epochs=2).replace(
        "[model_options]\nni = 8\nenc_nh = 8\ndec_nh = 8\n", ""))
    monkeypatch.setenv("CLI_TEST_STOP_WHEN", str(out / "checkpoints" / "last.pt"))  # Ctrl-C in epoch 2
    result = invoke("fit", f"{user_module}:interrupted_pair", "--config", config, "--out", out)
    assert_user_error(result, "aborted", code=130)
    marker = read_json(out / "run.json")
    assert marker["status"] == "interrupted"
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / "report.html").exists()
    assert [r["epoch"] for r in read_json(out / "metrics.json")["history"]] == [1]
    assert read_json(out / "metrics.json")["final"] is None

    monkeypatch.delenv("CLI_TEST_STOP_WHEN")
    assert_ok(invoke("fit", "--out", out, "--resume"))
    resumed = read_json(out / "run.json")
    assert resumed["status"] == "complete" and resumed["run_id"] == marker["run_id"]
    assert [r["epoch"] for r in read_json(out / "metrics.json")["history"]] == [1, 2]


def test_resume_needs_a_run(workdir, tmp_path):
    assert_user_error(invoke("fit", "--out", tmp_path / "nothing", "--resume"), "does not exist", "nothing to resume")
    assert not (tmp_path / "nothing").exists()
    assert_user_error(invoke("fit", "--resume"), "--resume needs --out")


# ------------------------------------------------------------------------------ user errors: one line, no traceback


def test_unknown_model(workdir, tmp_path):
    result = invoke("fit", "no-such-model", "--config", workdir / "tiny.toml", "--out", tmp_path / "r")
    assert_user_error(result, "unknown model 'no-such-model'", "synthetic", "package.module:factory")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "factory, message",
    [
        ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        ("{module}:missing", "has no attribute 'missing'"),
        ("{module}:not_a_pair", "returned a int, not a model/guide pair"),
        ("{module}:global_only", "no local latent"),
    ],
)
def test_bad_user_factories(workdir, user_module, tmp_path, factory, message):
    out = tmp_path / "r"
    result = invoke("fit", factory.format(module=user_module), "--config", workdir / "tiny-user.toml", "--out", out)
    assert_user_error(result, message)
    assert not out.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "data file is empty"),
        (b"a b c\n\x00\x01\x02\n", "looks binary"),
        (b"caf\xe9 au lait\n", "not UTF-8"),
        (b"\n\n   \n", "no sentences"),
        (b"x " * 2000 + b"\n", "max_tokens"),
    ],
    ids=["empty", "binary", "latin-1", "blank", "long-line"],
)
def test_bad_text_files(tmp_path, content, message):
    train = tmp_path / "bad.train.txt"
    train.write_bytes(content)
    out = tmp_path / "r"
    result = invoke("fit", "--train", train, "--out", out, "--epochs", 1)
    line = assert_user_error(result, message)
    assert str(train) in line
    assert not out.exists()


def test_missing_data_files(tmp_path):
    assert_user_error(invoke("fit", "--train", tmp_path / "nope.txt"), "not found", "nope.txt")
    assert_user_error(invoke("fit", "--data", tmp_path / "nowhere"), "no such file or folder")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    assert_user_error(invoke("fit", "--data", empty), "no file named *train*")
    assert_user_error(invoke("fit", "--train", empty), "is a directory, not a file")


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((10, 5, 5), dtype=np.uint8), "must be 28 x 28"),
        (np.full((10, 28, 28), 2.0, dtype=np.float32), "must lie in [0, 1]"),
        (np.zeros((10, 28), dtype=np.uint8), "N x H x W"),
    ],
    ids=["shape", "range", "dims"],
)
def test_bad_image_files(tmp_path, array, message):
    data = tmp_path / "images.npz"
    np.savez(data, train=array)
    result = invoke("fit", "mlp-image", "--data", data, "--out", tmp_path / "r")
    assert_user_error(result, message, str(data))
    assert not (tmp_path / "r").exists()


def test_model_and_data_kind_must_match(tmp_path):
    data = tmp_path / "images.npz"
    np.savez(data, train=np.zeros((20, 28, 28), dtype=np.uint8))
    assert_user_error(invoke("fit", "lstm-text", "--data", data), "reads text but the data are image")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu(workdir, tmp_path):
    result = invoke("fit", "--config", workdir / "tiny.toml", "--device", "cuda", "--out", tmp_path / "r")
    assert_user_error(result, "--device cuda", "CUDA is not available")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "d", "--train", "t.txt"], "--data cannot be combined with --train"),
        (["--valid", "v.txt"], "--valid and --test need --train"),
        (["--anneal", "--method", "standard"], "anneal=True combines KL annealing with method aggressive"),
        (["--method", "beta"], "method 'beta' needs the KL weight beta"),
        (["--method", "free-bits"], "method 'free-bits' needs free_bits"),
        (["--epochs", "0"], "epochs must be an integer >= 1"),
        (["--method", "sideways"], "Invalid value for '--method'"),
        (["--policy", "fast"], "Invalid value for '--policy'"),
        (["--device", "tpu"], "device must be cpu or cuda"),
    ],
)
def test_conflicting_or_invalid_flags(args, message):
    assert_user_error(invoke("fit", *args), message)


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs = = 3\n", "is not valid TOML"),
        ("epoch = 3\n", "unknown key 'epoch'"),
        ("[fit]\nlearning_rate = 1.0\n", "[fit]: unknown key 'learning_rate'"),
        ("epochs = 'ten'\n", "epochs must be an integer"),
        ("data = 'folder'\n", "'data' must be a table"),
        ("[fit]\npolicy = 'fast'\n", "policy must be one of paper, budget, got 'fast'"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    config = write_config(tmp_path, text)
    assert_user_error(invoke("fit", "--config", config, "--out", tmp_path / "r"), message)
    assert not (tmp_path / "r").exists()
    assert_user_error(invoke("fit", "--config", tmp_path / "absent.toml"), "config file not found")


def test_failure_inside_training_leaves_no_run_directory(workdir, tmp_path):
    config = write_config(tmp_path, TINY_TEXT.format(epochs=1).replace("[fit]\n", "[fit]\nlr = -1.0\n"))
    out = tmp_path / "r"
    assert_user_error(invoke("fit", "--config", config, "--out", out), "lr must be")
    assert not out.exists()


def test_commands_on_something_that_is_not_a_run(tmp_path):
    (tmp_path / "other").mkdir()
    for command in ("eval", "report", "sample"):
        assert_user_error(invoke(command, tmp_path / "other"), "not a pyro-lag run directory")
        assert_user_error(invoke(command, tmp_path / "absent"), "run directory not found")
    assert_user_error(invoke("compare", tmp_path / "other"), "not a pyro-lag run directory")


def test_compare_refuses_an_unfinished_run(workdir, text_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(text_run, unfinished)
    metrics = read_json(unfinished / "metrics.json")
    metrics["final"] = None
    (unfinished / "metrics.json").write_text(json.dumps(metrics))
    assert_user_error(invoke("compare", text_run, unfinished), "no final metrics")


# ------------------------------------------------------------------------------ the installed entry point


def test_entry_point_reports_errors_in_one_line():
    result = run_entry_point("fit", "no-such-model")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("Error: unknown model 'no-such-model'")


def test_entry_point_fits_a_user_factory_from_the_current_folder(workdir):
    out = workdir / "entry-point-run"
    result = run_entry_point("fit", "userpairs_cli_test:make_pair", "--config", "tiny-user.toml", "--out", out,
                             cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert read_json(out / "run.json")["status"] == "complete"
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert read_json(out / "run.json")["model_import_root"] == str(workdir.resolve())
    sampled = run_entry_point("sample", out, "--n", 2)  # from another folder: the module is found again
    assert sampled.returncode == 0, sampled.stderr
    assert len(sampled.stdout.splitlines()) == 2


@pytest.mark.slow
def test_default_fit_trains_the_synthetic_experiment(tmp_path):
    """`pyro-lag fit` with no argument: the embedded synthetic corpus, a report, a latent in use."""
    out = tmp_path / "default"
    result = run_entry_point("fit", "--out", out, timeout=1800)
    assert result.returncode == 0, result.stderr
    final = read_json(out / "metrics.json")["final"]
    assert read_json(out / "run.json")["status"] == "complete"
    assert final["au"] == 1 and final["mi"] > 0.1 and final["kl"] > 0.1
    assert (out / "report.html").is_file()


# ------------------------------------------------------------------------------ several processes (PyTorch Lightning)

DDP_TIMEOUT = 240  # seconds for a two-process `pyro-lag fit` (about 15-20 s on two busy cores)
TWO_CPU_PROCESSES = ("--devices", 2, "--accelerator", "cpu")
DDP_SETUP = "2 processes (ddp; 2 cpu devices x 1 node)"


@pytest.fixture(scope="module")
def ddp_run(workdir) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny run on two CPU processes with `--strategy ddp`, through the installed command: Lightning
    starts rank 1 by running the same command again (the way `ddp` works outside pytest too)."""
    pytest.importorskip("lightning.pytorch")
    out = workdir / "ddp-run"
    result = run_entry_point("fit", "--config", "tiny.toml", "--out", out, *TWO_CPU_PROCESSES, "--strategy", "ddp",
                             cwd=workdir, timeout=DDP_TIMEOUT)
    return out, result


@pytest.mark.timeout(DDP_TIMEOUT + 60)
def test_fit_on_two_processes_with_ddp_writes_one_run_directory(ddp_run, workdir):
    out, result = ddp_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Error" not in result.stderr
    assert result.stdout.count(f"distributed: {DDP_SETUP}") == 1  # rank 0 alone prints
    assert result.stdout.count("epoch 1/1  train loss") == 1
    assert not (workdir / "runs").exists()  # rank 1 made no run directory of its own

    config = read_json(out / "config.json")
    assert config["distributed"] == {"accelerator": "cpu", "devices": 2, "num_nodes": 1, "strategy": "ddp",
                                     "world_size": 2}
    assert read_json(out / "run.json")["status"] == "complete"
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    metrics = read_json(out / "metrics.json")
    history, final = metrics["history"], metrics["final"]
    assert [row["epoch"] for row in history] == [1]
    assert history[0]["ranks"] == 2 and history[0]["aggressive"] is True and history[0]["lr"] == 1.0
    assert final["evaluated_on"] == "test" and final["iw_samples"] == 3 and final["num_points"] == 16
    for key in ("iw_nll", "elbo", "kl", "mi", "au"):
        assert np.isfinite(final[key]), key
    assert metrics["fit_config"]["world_size"] == 2 and metrics["fit_config"]["optim"] == "sgd"
    meta = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["meta"]
    assert meta["world_size"] == 2 and len(meta["ranks"]) == 2

    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="distributed-setup"' in html and f"Trained on {DDP_SETUP}" in html
    assert "data:image/png;base64," in html


def test_runs_of_several_processes_read_like_any_run(ddp_run, text_run, tmp_path):
    out, result = ddp_run
    assert result.returncode == 0, result.stderr
    md_path, csv_path = tmp_path / "table.md", tmp_path / "table.csv"
    assert_ok(invoke("compare", text_run, out, "--markdown", md_path, "--csv", csv_path))
    lines = md_path.read_text().splitlines()
    assert "| AU | procs | strategy | time (s) |" in lines[0]
    assert lines[2].startswith("| text-run |") and "| 1 | – |" in lines[2]
    assert lines[3].startswith("| ddp-run |") and "| 2 | ddp |" in lines[3]
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [(r["world_size"], r["strategy"]) for r in rows] == [("1", ""), ("2", "ddp")]

    (out / "report.html").unlink()
    assert_ok(invoke("report", out))  # rebuilt in one process from best.pt
    assert f"Trained on {DDP_SETUP}" in (out / "report.html").read_text(encoding="utf-8")
    result = invoke("eval", out, "--iw-samples", 2)
    assert_ok(result)
    assert np.isfinite(read_json(out / "eval.json")["metrics"]["iw_nll"])


def test_one_process_flags_keep_the_one_process_path(workdir, text_run, tmp_path):
    """`--devices 1`, `--num-nodes 1` and `--accelerator cpu` change nothing: pyro_lag.fit, the same files, bitwise."""
    out = tmp_path / "one"
    assert_ok(invoke("fit", "--config", workdir / "tiny.toml", "--out", out, "--devices", 1, "--num-nodes", 1,
                     "--accelerator", "cpu"))
    assert read_json(out / "config.json") == read_json(text_run / "config.json")
    assert "distributed" not in read_json(out / "config.json")
    a = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(text_run / "checkpoints" / "last.pt", weights_only=True)
    assert "state" in a["meta"]  # pyro_lag.fit's checkpoint, not Lightning's
    for name in b["params"]["params"]:
        assert torch.equal(a["params"]["params"][name], b["params"]["params"][name]), name
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "trained on 1 process" in html and 'id="distributed-setup"' not in html


@pytest.mark.timeout(DDP_TIMEOUT)
def test_forked_processes_resume_exactly(workdir, tmp_path):
    """`--strategy ddp_fork` (in this process, as pytest runs it): a run resumed after epoch 1 ends bitwise where
    a straight two-epoch run ends, with the stored setup carried on; a different setup is refused."""
    pytest.importorskip("lightning.pytorch")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = (*TWO_CPU_PROCESSES, "--strategy", "ddp_fork")
    assert_ok(invoke("fit", "--config", workdir / "tiny2.toml", "--out", straight, *flags))
    assert_ok(invoke("fit", "--config", workdir / "tiny.toml", "--out", resumed, *flags))
    assert_ok(invoke("fit", "--out", resumed, "--resume", "--epochs", 2))
    assert "PYRO_LAG_DDP_RUN_DIR" not in os.environ

    assert read_json(resumed / "config.json")["distributed"]["strategy"] == "ddp_fork"
    assert [r["epoch"] for r in read_json(resumed / "metrics.json")["history"]] == [1, 2]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert drop(read_json(resumed / "metrics.json")["history"]) == drop(read_json(straight / "metrics.json")["history"])
    a = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["params"]["params"]
    b = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["params"]["params"]
    for name in b:
        assert torch.equal(a[name], b[name]), name
    assert_user_error(invoke("fit", "--out", resumed, "--resume", "--epochs", 3, "--devices", 1), "--resume", "distributed=")


@pytest.mark.timeout(DDP_TIMEOUT)
def test_user_factory_trains_on_two_processes(workdir, user_module):
    pytest.importorskip("lightning.pytorch")
    out = workdir / "user-two-processes"
    assert_ok(invoke("fit", f"{user_module}:make_pair", "--config", workdir / "tiny-user.toml", "--out", out,
                     *TWO_CPU_PROCESSES, "--strategy", "ddp_fork"))
    assert read_json(out / "run.json")["status"] == "complete"
    assert read_json(out / "config.json")["distributed"]["world_size"] == 2
    assert read_json(out / "metrics.json")["history"][0]["ranks"] == 2
    assert (out / "report.html").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--devices", "0"], "Invalid value for '--devices': 0 is not in the range x>=1"),
        (["--num-nodes", "0"], "Invalid value for '--num-nodes'"),
        (["--strategy", "fsdp"], "Invalid value for '--strategy': 'fsdp' is not one of 'ddp', 'ddp_spawn', 'ddp_fork'"),
        (["--accelerator", "tpu"], "Invalid value for '--accelerator'"),
        (["--devices", "2", "--device", "cuda:1"], "--device cuda:1 picks one GPU for one process"),
        (["--accelerator", "cpu", "--device", "cuda"], "--accelerator cpu and --device cuda disagree"),
    ],
)
def test_bad_distributed_flags(workdir, tmp_path, args, message):
    assert_user_error(invoke("fit", "--config", workdir / "tiny.toml", "--out", tmp_path / "r", *args), message)
    assert not (tmp_path / "r").exists()


def test_several_nodes_need_a_shared_run_directory(workdir):
    pytest.importorskip("lightning.pytorch")
    assert_user_error(invoke("fit", "--config", workdir / "tiny.toml", "--num-nodes", 2), "--num-nodes 2 needs --out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_accelerator_without_cuda(workdir, tmp_path):
    for extra in ((), ("--devices", 2), ("--strategy", "ddp")):
        result = invoke("fit", "--config", workdir / "tiny.toml", "--out", tmp_path / "r", "--accelerator", "gpu", *extra)
        assert_user_error(result, "--accelerator gpu: CUDA is not available")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("[distributed]\ndevices = 0\n", "devices must be an integer >= 1, got 0"),
        ("[distributed]\nstrategy = 'fsdp'\n", "strategy must be one of ddp, ddp_spawn, ddp_fork"),
        ("[distributed]\nnodes = 2\n", "[distributed]: unknown key 'nodes'"),
        ("[distributed]\ndevices = 2\n[fit]\ncheckpoint_every = 2\n", "checkpoint_every (mid-epoch checkpoints) is not available"),
    ],
)
def test_bad_distributed_config_files(tmp_path, text, message):
    config = write_config(tmp_path, text)
    assert_user_error(invoke("fit", "--config", config, "--out", tmp_path / "r"), message)
    assert not (tmp_path / "r").exists()


def test_several_processes_without_lightning_say_what_to_install(workdir, tmp_path, monkeypatch):
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    for name in ("pyro_lag.lightning", "pyro_lag.lightning.module", "pyro_lag.lightning.strategy"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    result = invoke("fit", "--config", workdir / "tiny.toml", "--out", tmp_path / "r", "--devices", 2)
    assert_user_error(result, "train through PyTorch Lightning", "pip install 'pyro-lag[lightning]'")
    assert not (tmp_path / "r").exists()


FAILING_PAIR = '''
"""A pair whose model raises once the file named by CLI_TEST_FAIL_WHEN exists (after epoch 1's checkpoint)."""
import os

import torch

from pyro_lag.models import build


def failing_pair(vocab_size):
    pair = build("synthetic", "small", vocab_size=vocab_size, ni=8, enc_nh=8, dec_nh=8)
    stop = os.environ.get("CLI_TEST_FAIL_WHEN")

    def model(x):
        if stop and os.path.exists(stop) and torch.is_grad_enabled():
            raise ValueError("forced failure in the model")
        return pair.model(x)

    return model, pair.guide
'''


@pytest.mark.timeout(DDP_TIMEOUT)
def test_a_rank_that_fails_ends_the_run_with_one_line(workdir, tmp_path, monkeypatch):
    """A forked rank's error reaches this process as that rank's traceback: the user sees its last line."""
    pytest.importorskip("lightning.pytorch")
    (tmp_path / "failing_pair_cli_test.py").write_text(FAILING_PAIR, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "failing"
    monkeypatch.setenv("CLI_TEST_FAIL_WHEN", str(out / "checkpoints" / "last.pt"))
    config = write_config(tmp_path, TINY_TEXT.format(epochs=2).replace(
        "[model_options]\nni = 8\nenc_nh = 8\ndec_nh = 8\n", ""))
    result = invoke("fit", "failing_pair_cli_test:failing_pair", "--config", config, "--out", out,
                    *TWO_CPU_PROCESSES, "--strategy", "ddp_fork")
    line = assert_user_error(result, "failed: ValueError: forced failure in the model")
    assert line.startswith("Error: rank ")
    marker = read_json(out / "run.json")
    assert marker["status"] == "failed" and "forced failure" in marker["error"]
    assert (out / "checkpoints" / "last.pt").is_file()  # epoch 1 is kept for --resume
