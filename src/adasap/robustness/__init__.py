"""Robustness: the corruption suite, official corrupted sets, evaluation and reports."""

from adasap.robustness.evaluation import CorruptionReport, evaluate_corruptions

__all__ = ["CorruptionReport", "evaluate_corruptions"]
