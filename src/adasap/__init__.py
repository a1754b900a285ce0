"""adasap: Adaptive Sharpness-Aware Pruning for small, robust vision models."""

from adasap.errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__"]
