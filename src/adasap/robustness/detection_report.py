"""The corrupted-detection report: mAP per corruption x severity, P, mPC, rPC, and its files."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adasap.robustness import corruptions as C
from adasap.robustness.report import SOURCE_RENDERED, SeverityTableReport, _pct, _ratio

# The metrics a report can be headed by: VOC's mAP at IoU 0.5, COCO's mean over 0.50:0.95.
METRICS = ("map_50", "map")
METRIC_NAMES = {"map_50": "mAP@0.5", "map": "mAP@[.5:.95]"}


@dataclass
class DetectionCorruptionReport(SeverityTableReport):
    """mAP on clean and corrupted test images (Michaelis et al. 2019) and the summary numbers.

    ``clean`` and ``results[corruption][severity]`` map each of ``map_50``, ``map`` and
    ``map_75`` to a value in [0, 1]. ``metric`` heads the summary: P (:attr:`performance`,
    clean), mPC (:attr:`mpc`, mean over the 15 benchmark corruptions x 5 severities evaluated)
    and rPC (:attr:`rpc` = mPC / P). The 4 extras and the held-out ``cbar`` family are
    averaged apart.
    """

    title = "Detection robustness"
    file_stem = "detection-corruptions"

    dataset_key: str
    source: str
    metric: str
    clean: dict[str, float]
    results: dict[str, dict[int, dict[str, float]]]
    num_images: int
    params_table: str | None = None
    seed: int | None = None

    def values(self, metric: str | None = None) -> dict[str, dict[int, float]]:
        """``metric`` (default: the report's) per corruption and severity."""
        key = metric or self.metric
        return {n: {s: cell[key] for s, cell in sev.items()} for n, sev in self.results.items()}

    def _clean_value(self) -> float:
        return self.performance

    @property
    def performance(self) -> float:
        """P: the metric on clean images."""
        return self.clean[self.metric]

    @property
    def mpc(self) -> float | None:
        """mPC: the mean of the metric over the benchmark corruptions and severities."""
        return self._mean_of(C.BENCHMARK_CORRUPTIONS)

    @property
    def rpc(self) -> float | None:
        """rPC = mPC / P."""
        return self._relative()

    @property
    def extra_mpc(self) -> float | None:
        return self._mean_of(C.EXTRA_CORRUPTIONS)

    @property
    def cbar_mpc(self) -> float | None:
        return self._mean_of(C.CBAR_CORRUPTIONS)

    def to_dict(self) -> dict[str, Any]:
        """The inputs and every derived number, JSON-ready."""
        return {
            "dataset_key": self.dataset_key,
            "source": self.source,
            "metric": self.metric,
            "clean": self.clean,
            "results": {
                n: {str(s): cell for s, cell in sev.items()} for n, sev in self.results.items()
            },
            "num_images": self.num_images,
            "params_table": self.params_table,
            "seed": self.seed,
            "P": self.performance,
            "mPC": self.mpc,
            "rPC": self.rpc,
            "extra_mPC": self.extra_mpc,
            "cbar_mPC": self.cbar_mpc,
            "per_corruption": self.per_corruption,
            "per_category": self.per_category,
            "is_complete": self.is_complete,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectionCorruptionReport:
        """A report from :meth:`to_dict`'s output (derived numbers are recomputed)."""
        results = {
            n: {int(s): {k: float(v) for k, v in cell.items()} for s, cell in sev.items()}
            for n, sev in data["results"].items()
        }
        return cls(
            dataset_key=data["dataset_key"],
            source=data["source"],
            metric=data["metric"],
            clean={k: float(v) for k, v in data["clean"].items()},
            results=results,
            num_images=int(data["num_images"]),
            params_table=data.get("params_table"),
            seed=data.get("seed"),
        )

    def _summary_rows(self) -> list[tuple[str, str]]:
        n_bench = len(self._entries(C.BENCHMARK_CORRUPTIONS))
        return [
            (f"P: clean {self._metric_label()} (%)", _pct(self.performance)),
            (f"mPC: mean of {n_bench} (%)", _pct(self.mpc)),
            ("rPC: mPC / P", _ratio(self.rpc)),
            *self._apart_rows(),
            *self._category_rows(),
        ]

    def _about_lines(self) -> list[str]:
        return [
            f"Dataset: {self.dataset_key}, {self.num_images} test images ({self.source}); "
            f"corruptions {SOURCE_RENDERED}, boxes unchanged.",
            f"Severity parameters: {self.params_table} table, seed {self.seed}.",
        ]

    def _metric_label(self) -> str:
        return METRIC_NAMES[self.metric]

    def heatmap_png(self) -> bytes:
        """The metric per corruption x severity as a heatmap, PNG bytes."""
        title = (
            f"{self.dataset_key}: P {_pct(self.performance)}, mPC {_pct(self.mpc)}, "
            f"rPC {_ratio(self.rpc)}"
        )
        return self._heatmap(title, f"{self._metric_label()} (%)")
