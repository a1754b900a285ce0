"""Training: the epoch loop, checkpoints, and the built-in pruning pipeline."""
