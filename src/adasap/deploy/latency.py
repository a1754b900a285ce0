"""Inference latency in one import: timing, the per-layer latency table and latency budgets.

- :mod:`adasap.deploy.runtimes`: the runtimes models are timed in (:data:`RUNTIMES`,
  :func:`get_runtime`, :data:`DEFAULT_RUNTIME`);
- :mod:`adasap.deploy.timing`: :func:`measure_latency`, :func:`machine_info` and
  :class:`TimingSettings`;
- :mod:`adasap.deploy.comparison`: :func:`compare_latency` and :func:`run_latency`, dense
  beside pruned with the pruned/dense ratio (:class:`LatencyRatio`, :mod:`adasap.deploy.ratio`);
- :mod:`adasap.deploy.table`: :class:`LatencyTable` and the layer grids it is made of;
- :mod:`adasap.deploy.budget`: :func:`latency_budget`, :func:`prune_to_latency` and the
  HALP-style prediction and ranking behind them.

None of them imports onnx, onnxruntime or openvino until a function needs it.
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
from adasap.deploy.runtimes import DEFAULT_RUNTIME, RUNTIMES, get_runtime
from adasap.deploy.table import LatencyTable, LayerGrid, LayerSpec, default_cache_dir, layer_specs
from adasap.deploy.timing import (
    LatencyResult,
    TimingSettings,
    machine_info,
    measure_latency,
)

__all__ = [
    "DEFAULT_RUNTIME",
    "RUNTIMES",
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
    "get_runtime",
    "latency_budget",
    "latency_predictor",
    "latency_ranking",
    "layer_specs",
    "machine_info",
    "measure_latency",
    "prune_to_latency",
    "run_latency",
]
