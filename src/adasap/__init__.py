"""adasap: Adaptive Sharpness-Aware Pruning for small, robust vision models."""

from adasap.deploy.serialization import load_model, save_model
from adasap.errors import UserError
from adasap.method.optim import SAM, AdaSAP
from adasap.method.pruner import Pruner, PrunerSettings
from adasap.method.schedule import PhaseSchedule
from adasap.method.step import sharpness_aware_step
from adasap.method.whole import register_token_mixer
from adasap.robustness.detection_report import DetectionCorruptionReport
from adasap.robustness.evaluation import CorruptionReport, evaluate_corruptions
from adasap.tasks import TASKS, ClassificationTask, DetectionTask, Task
from adasap.training.pipeline import PruneResult, prune, train
from adasap.training.settings import PruneSettings

load = load_model  # ``adasap.load(path)``: the short name for a saved pruned model

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "TASKS",
    "AdaSAP",
    "ClassificationTask",
    "CorruptionReport",
    "DetectionCorruptionReport",
    "DetectionTask",
    "PhaseSchedule",
    "PruneResult",
    "PruneSettings",
    "Pruner",
    "PrunerSettings",
    "Task",
    "UserError",
    "__version__",
    "evaluate_corruptions",
    "load",
    "load_model",
    "prune",
    "register_token_mixer",
    "save_model",
    "sharpness_aware_step",
    "train",
]
