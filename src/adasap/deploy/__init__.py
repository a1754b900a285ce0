"""Deployment: model files, ONNX export, latency measurement and latency budgets."""
