"""Random streams left as they were: a probe or an estimate that must not change what training draws next."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from pyro.util import get_rng_state, set_rng_state

__all__ = ["preserved_rng"]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave the random streams (torch, CUDA, Python, NumPy) as they were, so a probe draws nothing from them."""
    state = get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        set_rng_state(state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
