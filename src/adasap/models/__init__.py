"""Models by name: CIFAR ResNets, torchvision and timm classifiers, through one registry."""

from adasap.models.builders import build_model, find_classifier, list_models
from adasap.models.registry import ModelRequest, register_family

__all__ = ["ModelRequest", "build_model", "find_classifier", "list_models", "register_family"]
