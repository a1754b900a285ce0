"""Inference latency in one import: timing, the per-layer latency table and latency budgets.

- :mod:`adasap.deploy.timing`: :func:`measure_latency`, :func:`machine_info` and
  :class:`TimingSettings`;
- :mod:`adasap.deploy.comparison`: :func:`compare_latency` and :func:`run_latency`, dense
  beside pruned with the pruned/dense ratio (:class:`LatencyRatio`, :mod:`adasap.deploy.ratio`);
- :mod:`adasap.deploy.table`: :class:`LatencyTable` and the layer grids it is made of;
- :mod:`adasap.deploy.budget`: :func:`latency_budget`, :func:`prune_to_latency` and the
  HALP-style prediction and ranking behind them.

None of them imports onnx or onnxruntime until a function needs it.
"""

from adasap.deploy.budget import (
    LatencyBudget,
    LatencyPruneReport,
    default_scores,
    latency_budget,
    latency_predictor,
    latency_ranking,
    prune_to_latency,
)
from adasap.deploy.comparison import LatencyComparison, compare_latency, run_latency
from adasap.deploy.ratio import LatencyRatio
from adasap.deploy.table import LatencyTable, LayerGrid, LayerSpec, default_cache_dir, layer_specs
from adasap.deploy.timing import (
    BACKENDS,
    LatencyResult,
    TimingSettings,
    machine_info,
    measure_latency,
)

__all__ = [
    "BACKENDS",
    "LatencyBudget",
    "LatencyComparison",
    "LatencyPruneReport",
    "LatencyRatio",
    "LatencyResult",
    "LatencyTable",
    "LayerGrid",
    "LayerSpec",
    "TimingSettings",
    "compare_latency",
    "default_cache_dir",
    "default_scores",
    "latency_budget",
    "latency_predictor",
    "latency_ranking",
    "layer_specs",
    "machine_info",
    "measure_latency",
    "prune_to_latency",
    "run_latency",
]
