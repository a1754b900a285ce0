"""Deployment: model files, runtimes, ONNX export (fp32 and INT8), latency measurement and
latency budgets."""

from adasap.deploy.runtimes import DEFAULT_RUNTIME, RUNTIMES, get_runtime

__all__ = ["DEFAULT_RUNTIME", "RUNTIMES", "get_runtime"]
