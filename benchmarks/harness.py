"""Where a benchmark ran and where its result goes: device description and the JSON writer."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


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
