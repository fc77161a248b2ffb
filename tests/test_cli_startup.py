"""`pyro-lag --help` and `pyro-lag CMD --help` answer without importing torch or pyro.

Each check runs in a fresh interpreter (a subprocess), since this test process has long
imported torch. The library's public names stay importable, only later.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

COMMANDS = ("fit", "eval", "report", "sample", "compare", "models", "data")
HEAVY = ("torch", "pyro", "numpy", "pyro_lag.training.loop", "pyro_lag.estimators.diagnostics")

# Calls the command line in-process, once per argument list, and reports after each call the
# help text it printed and which heavy modules are loaded by then.
HELP_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from pyro_lag.cli.main import main

    heavy, report = json.loads(sys.argv[1]), []
    for args in json.loads(sys.argv[2]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(args, standalone_mode=False)
            except SystemExit:
                pass
        report.append({"args": args, "help": out.getvalue(), "loaded": [m for m in heavy if m in sys.modules]})
    print(json.dumps(report))
    """
)


def run_python(*args: str) -> subprocess.CompletedProcess:
    """Run this interpreter on ``args`` in a fresh process; it must succeed."""
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_help_of_every_command_imports_neither_torch_nor_pyro():
    arguments = [["--help"]] + [[command, "--help"] for command in COMMANDS] + [["data", "synthetic", "--help"]]
    result = run_python("-c", HELP_SCRIPT, json.dumps(HEAVY), json.dumps(arguments))
    for entry in json.loads(result.stdout):
        assert entry["help"].startswith("Usage: "), entry
        assert entry["loaded"] == [], f"{entry['args']} loaded {entry['loaded']}"
    fit_help = json.loads(result.stdout)[1]["help"]
    assert "aggressive|standard|anneal|beta|cyclical|free-bits" in fit_help


def test_console_script_help_imports_neither_torch_nor_pyro():
    script = Path(sys.executable).parent / "pyro-lag"
    if not script.is_file():
        pytest.skip("the pyro-lag console script is not installed next to this interpreter")
    result = run_python("-X", "importtime", str(script), "fit", "--help")
    assert "Usage: pyro-lag fit" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "click" in imported  # the import log was read
    assert not {"torch", "pyro"} & imported


def test_cli_method_names_equal_the_library_methods():
    from pyro_lag.cli.methods import METHODS

    from pyro_lag.training.settings import METHODS as LIBRARY_METHODS

    assert METHODS == LIBRARY_METHODS


def test_fit_config_cannot_set_the_progress_hook():
    from pyro_lag.cli.settings import fit_option_names

    assert "test_progress" not in fit_option_names()
    assert "iw_samples" in fit_option_names()


def test_package_import_is_lazy_and_every_public_name_resolves():
    script = textwrap.dedent(
        """
        import sys, json
        import pyro_lag
        light = "torch" not in sys.modules and "pyro" not in sys.modules
        names = {name: type(getattr(pyro_lag, name)).__name__ for name in pyro_lag.__all__}
        print(json.dumps({"light": light, "names": names}))
        """
    )
    result = json.loads(run_python("-c", script).stdout)
    assert result["light"]
    expected = {
        "AggressiveSVI", "Batches", "FitResult", "FitSettings", "InnerLoopStopper", "NoLocalLatentError", "MutualInformation", "active_units",
        "estimate_mutual_information", "evaluate", "fit", "iw_log_likelihood", "mutual_information",
        "to_inference_data",
    }
    assert set(result["names"]) == expected
    assert result["names"]["mutual_information"] == "function"
    assert result["names"]["estimate_mutual_information"] == "function"


def test_mutual_information_is_the_function_after_the_estimator_modules_are_imported():
    import pyro_lag
    import pyro_lag.estimators.diagnostics  # imports pyro_lag.estimators.mutual_info, the estimator module
    from pyro_lag import mutual_information

    assert mutual_information is pyro_lag.estimators.diagnostics.mutual_information
    assert pyro_lag.mutual_information is pyro_lag.estimators.diagnostics.mutual_information
    assert pyro_lag.MutualInformation is pyro_lag.estimators.diagnostics.MutualInformation
    with pytest.raises(AttributeError):
        getattr(pyro_lag, "no_such_name")
