"""A small timing harness: warm-up, repeats, median and spread, results written as JSON."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def time_call(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20) -> dict:
    """Median and interquartile range of ``fn``'s wall time in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4)
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "repeats": repeats}


def device_description() -> str:
    """Where the figures were measured."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_result(name: str, result: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` and return its path."""
    out = Path(__file__).resolve().parent / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device_description(), "torch": torch.__version__, **result}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
