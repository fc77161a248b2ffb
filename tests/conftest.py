"""Shared pytest fixtures: the real data sets beside the project, and a clean Pyro state."""
from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch

# One thread: the tests' models are small, and several threads on a busy machine only wait on each other.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real data sets (../shared/data); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def clean_pyro_state():
    """Every test starts with an empty param store and fixed seeds."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
