"""Introspection of a program's trace: local latent sites, the data plate, masks, densities."""
