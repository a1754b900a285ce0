"""Tasks: what classification, detection (and a new kind of problem) supply to the shared
loop, evaluation and drivers (:class:`Task`; registered by name in :data:`TASKS`)."""

from adasap.tasks.base import TASKS, StepOutput, Task, make_task, task_options
from adasap.tasks.classification import ClassificationTask
from adasap.tasks.detection import DetectionTask

__all__ = [
    "TASKS",
    "ClassificationTask",
    "DetectionTask",
    "StepOutput",
    "Task",
    "make_task",
    "task_options",
]
