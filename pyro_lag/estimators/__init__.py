"""Latent-usage estimators: mutual information, active units, KL, IW-NLL, and evaluate."""
