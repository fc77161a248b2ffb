"""The training core: the epoch, its settings, checkpoints, faults and result."""
