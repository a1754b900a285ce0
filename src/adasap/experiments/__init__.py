"""Experiments: the `adasap run` job, the benchmark grid, the tuning sweep and their configs."""
