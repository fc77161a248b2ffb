"""Pyro handlers for the baselines: KL weights (annealing, beta, cyclical) and free bits."""
