"""Models by name: CIFAR ResNets and torchvision classifiers adapted to small images."""

from adasap.models.builders import build_model, find_classifier, list_models

__all__ = ["build_model", "find_classifier", "list_models"]
