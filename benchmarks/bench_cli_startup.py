"""Start-up time of the ``pyro-lag`` command line: help answers without importing torch and pyro.

Times ``pyro-lag --help``, ``pyro-lag CMD --help`` for every command and ``pyro-lag models``
(which does load the model zoo, hence torch), each in a fresh process, against two
baselines run in the same session: ``python -c pass`` (the interpreter's own start) and
``python -c "import torch, pyro"`` (what every help used to cost). The runs are
interleaved, so a change in the machine's load touches every case alike.

    python benchmarks/bench_cli_startup.py [--repeats 5] [--out benchmarks/results/cli_startup.json]

Writes the JSON and prints a Markdown table of median seconds and ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "cli_startup.json"
COMMANDS = ("fit", "eval", "report", "sample", "compare", "models", "data")
INTERPRETER, TORCH_PYRO = "python -c pass", 'python -c "import torch, pyro"'


def pyro_lag_command() -> list[str]:
    """The installed console script beside this interpreter, else the module run by it."""
    script = Path(sys.executable).parent / "pyro-lag"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pyro_lag.cli.main"]


def cases() -> dict[str, list[str]]:
    """Name -> command line, baselines first."""
    cli = pyro_lag_command()
    named = {
        INTERPRETER: [sys.executable, "-c", "pass"],
        TORCH_PYRO: [sys.executable, "-c", "import torch, pyro"],
        "pyro-lag --help": cli + ["--help"],
    }
    named.update({f"pyro-lag {command} --help": cli + [command, "--help"] for command in COMMANDS})
    named["pyro-lag models"] = cli + ["models"]
    return named


def time_once(command: list[str], env: dict[str, str]) -> float:
    """Wall-clock seconds of one fresh process running ``command`` (which must succeed)."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return elapsed


def measure(named: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    """``repeats`` timings of every case, interleaved, after one untimed warm-up run of each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for command in named.values():  # warm the file cache and the bytecode
        time_once(command, env)
    runs: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(repeats):
        for name, command in named.items():
            runs[name].append(time_once(command, env))
    return runs


def summary(seconds: list[float]) -> dict[str, Any]:
    """Median and quartiles of a case's runs."""
    q1, _, q3 = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else (seconds[0],) * 3
    return {"median_s": statistics.median(seconds), "q1_s": q1, "q3_s": q3, "runs_s": seconds}


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """One row per case: median seconds, and the ratios to the two baselines."""
    start = results[INTERPRETER]["median_s"]
    heavy = results[TORCH_PYRO]["median_s"]
    rows = ["| command | median s | q1 - q3 s | × `python -c pass` | × `import torch, pyro` |",
            "|---|---:|---:|---:|---:|"]
    for name, stats in results.items():
        median = stats["median_s"]
        rows.append(f"| `{name}` | {median:.3f} | {stats['q1_s']:.3f} - {stats['q3_s']:.3f} | "
                    f"{median / start:.1f} | {median / heavy:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs of every case (default 5).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Where to write the JSON.")
    args = parser.parse_args(argv)

    named = cases()
    runs = measure(named, args.repeats)
    results = {name: {"command": named[name], **summary(runs[name])} for name in named}
    report = {
        "benchmark": "cli_startup",
        "what": "start-up of pyro-lag help and models, each a fresh process, against the interpreter's start "
                "and importing torch and pyro",
        "device": f"CPU ({platform.machine()}), {os.cpu_count()} cores",
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "repeats": args.repeats,
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown(results))
    print(f"\nload average {report['load_average']}; written to {args.out}")


if __name__ == "__main__":
    main()
