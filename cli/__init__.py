"""The ``pyro-lag`` command line (installed as ``pyro_lag.cli``); the entry point is ``pyro_lag.cli.main:main``."""
