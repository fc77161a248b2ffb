"""The names of the training methods of :func:`pyro_lag.fit`, without importing torch.

``pyro-lag fit --help`` lists them, and help must answer without loading torch or pyro;
``tests/test_cli_startup.py`` checks that this tuple equals ``pyro_lag.training.loop.METHODS``.
"""
from __future__ import annotations

METHODS: tuple[str, ...] = ("aggressive", "standard", "anneal", "beta", "cyclical", "free-bits")
