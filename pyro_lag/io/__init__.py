"""Input and output: atomic weights-only checkpoints and ArviZ InferenceData."""
