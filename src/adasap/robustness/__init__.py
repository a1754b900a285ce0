"""Robustness: the corruption suite, official corrupted sets, evaluation and reports (for
classifiers and detectors)."""

from adasap.robustness.detection import evaluate_detection_corruptions
from adasap.robustness.detection_report import DetectionCorruptionReport
from adasap.robustness.evaluation import CorruptionEvaluator, evaluate_corruptions
from adasap.robustness.official import (
    load_cifar_c,
    load_folder_c,
    load_imagenet_c,
    load_imagenet_v2,
    load_tiny_imagenet_c,
    official_sets,
)
from adasap.robustness.report import CorruptionReport
from adasap.tasks.detection import evaluate_detection

__all__ = [
    "CorruptionEvaluator",
    "CorruptionReport",
    "DetectionCorruptionReport",
    "evaluate_corruptions",
    "evaluate_detection",
    "evaluate_detection_corruptions",
    "load_cifar_c",
    "load_folder_c",
    "load_imagenet_c",
    "load_imagenet_v2",
    "load_tiny_imagenet_c",
    "official_sets",
]
