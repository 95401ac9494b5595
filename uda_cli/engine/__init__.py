"""The training core: one loop, checkpoints, metrics, logging."""
