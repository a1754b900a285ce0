"""Experiments: the `adasap run` job, the benchmark grid, the tuning sweep and their configs."""

# the tasks' jobs register themselves (adasap.experiments.job.JOBS)
from adasap.experiments import classification_job, detection_job  # noqa: F401
