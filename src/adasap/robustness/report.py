"""The corruption reports: what every task's report shares (:class:`SeverityTableReport`: the
means, the tables, the heatmap, the files) and the classification report (accuracy, mCE)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adasap.errors import UserError
from adasap.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from adasap.robustness import corruptions as C
from adasap.robustness.corruptions import SEVERITIES
from adasap.robustness.heatmap import heatmap_png

SOURCE_RENDERED = "rendered on the fly by adasap"

# AlexNet's top-1 error on ImageNet-C, averaged over severities 1..5: the mCE denominators.
# Per-severity errors: hendrycks/robustness issue #10 (their means are these values); the same
# 15 numbers are ALEXNET_ERR in google-research/augmix imagenet.py ("taken from
# hendrycks/robustness"). jpeg_compression's row was cut off in #10 and comes from augmix and
# Table 2 of Hendrycks & Dietterich (ICLR 2019).
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
ALEXNET_SOURCE = (
    "https://github.com/hendrycks/robustness/issues/10 and "
    "https://github.com/google-research/augmix/blob/master/imagenet.py (ALEXNET_ERR)"
)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


class SeverityTableReport(ABC):
    """What a corruption report shares, whatever its metric: the means over the benchmark
    corruptions, the extras and the held-out family, the ratio to the clean value, the means per
    corruption, category and severity; the Markdown, the rich table, the heatmap and the files.

    A subclass gives :meth:`values` (its metric per corruption x severity, in [0, 1]), the clean
    value, ``to_dict``, its summary and header lines, and the names below.
    """

    title = ""  # the Markdown heading: "Corruption robustness", "Detection robustness"
    file_stem = ""  # the saved files' default stem
    dataset_key: str

    @abstractmethod
    def values(self) -> dict[str, dict[int, float]]:
        """The metric per corruption and severity."""

    @abstractmethod
    def _clean_value(self) -> float: ...

    @abstractmethod
    def _metric_label(self) -> str: ...

    @abstractmethod
    def _about_lines(self) -> list[str]:
        """The lines above the summary: the data, where the images came from, the parameters."""

    @abstractmethod
    def _summary_rows(self) -> list[tuple[str, str]]: ...

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def heatmap_png(self) -> bytes: ...

    def _extra_columns(self) -> dict[str, Mapping[str, float]]:
        """Columns after the mean: header -> value per corruption ("-" where absent)."""
        return {}

    def _footer_lines(self) -> list[str]:
        return []

    def _names(self) -> list[str]:
        """Evaluated corruptions in the standard order, then held-out ones, any others after."""
        values = self.values()
        order = (*C.CORRUPTIONS, *C.HELD_OUT_CORRUPTIONS)
        return [n for n in order if n in values] + [n for n in values if n not in order]

    def _entries(self, names: Sequence[str]) -> list[float]:
        values = self.values()
        return [v for n in names for v in values.get(n, {}).values()]

    def _mean_of(self, names: Sequence[str]) -> float | None:
        return _mean(self._entries(names))

    def _relative(self) -> float | None:
        """The benchmark mean over the clean value (None without either)."""
        mean, clean = self._mean_of(C.BENCHMARK_CORRUPTIONS), self._clean_value()
        return None if mean is None or clean <= 0 else mean / clean

    @property
    def is_complete(self) -> bool:
        """All 15 benchmark corruptions at all 5 severities were evaluated."""
        values = self.values()
        return all(set(values.get(n, {})) == set(SEVERITIES) for n in C.BENCHMARK_CORRUPTIONS)

    @property
    def per_corruption(self) -> dict[str, float]:
        return {n: sum(s.values()) / len(s) for n, s in self.values().items() if s}

    @property
    def per_category(self) -> dict[str, float]:
        """The mean of each category's benchmark corruptions (extras excluded)."""
        means = {c: self._mean_of(names) for c, names in C.CATEGORIES.items()}
        return {c: m for c, m in means.items() if m is not None}

    @property
    def per_severity(self) -> dict[int, float]:
        """The mean over the benchmark corruptions at each severity."""
        values = self.values()
        means = {
            s: _mean(values[n][s] for n in C.BENCHMARK_CORRUPTIONS if s in values.get(n, {}))
            for s in SEVERITIES
        }
        return {s: m for s, m in means.items() if m is not None}

    def _apart_rows(self) -> list[tuple[str, str]]:
        """Summary rows of the means kept out of the headline: the extras, the held-out family."""
        rows = [
            (
                f"extra corruptions, mean of {len(self._entries(C.EXTRA_CORRUPTIONS))} (%)",
                _pct(self._mean_of(C.EXTRA_CORRUPTIONS)),
            )
        ]
        n_cbar = len(self._entries(C.CBAR_CORRUPTIONS))
        if n_cbar:
            label = f"held-out cbar corruptions, mean of {n_cbar} (%)"
            rows.append((label, _pct(self._mean_of(C.CBAR_CORRUPTIONS))))
        return rows

    def _category_rows(self) -> list[tuple[str, str]]:
        return [(f"{c} (%)", _pct(v)) for c, v in self.per_category.items()]

    def _header_lines(self) -> list[str]:
        lines = self._about_lines()
        if not self.is_complete:
            lines.append("Not all 15 benchmark corruptions x 5 severities were evaluated.")
        return lines

    def _table_header(self) -> list[str]:
        severities = [f"s{s}" for s in SEVERITIES]
        return ["corruption", "category", *severities, "mean", *self._extra_columns()]

    def _corruption_rows(self) -> list[list[str]]:
        values, means, extra = self.values(), self.per_corruption, self._extra_columns()
        rows = []
        for name in self._names():
            sev = values[name]
            rows.append(
                [
                    name + _kind_suffix(name),
                    _category(name),
                    *(_pct(sev[s]) if s in sev else "-" for s in SEVERITIES),
                    _pct(means.get(name)),
                    *(_pct(column[name]) if name in column else "-" for column in extra.values()),
                ]
            )
        return rows

    def _heatmap(self, title: str, label: str) -> bytes:
        values = self.values()
        return heatmap_png({n: values[n] for n in self._names()}, title, label)

    def to_markdown(self) -> str:
        """A Markdown report: summary, the metric per corruption x severity."""
        out = [f"# {self.title}: {self.dataset_key}", "", *self._header_lines()]
        out += ["", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in self._summary_rows()]
        header = self._table_header()
        out += ["", f"## {self._metric_label()} (%) per corruption and severity", ""]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(row) + " |" for row in self._corruption_rows()]
        footer = self._footer_lines()
        return "\n".join(out + ([""] + footer if footer else [])) + "\n"

    def save(self, directory: str | Path, stem: str | None = None) -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` atomically into ``directory``."""
        directory, stem = Path(directory), stem or self.file_stem
        return {
            "json": atomic_write_json(directory / f"{stem}.json", self.to_dict()),
            "markdown": atomic_write_text(directory / f"{stem}.md", self.to_markdown()),
            "heatmap": atomic_write_bytes(directory / f"{stem}.png", self.heatmap_png()),
        }

    def print_table(self, console: Any = None) -> None:
        """Print the summary and the corruption x severity table with rich."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        for line in self._header_lines():
            console.print(line)
        summary = Table(show_header=False, box=None)
        for key, value in self._summary_rows():
            summary.add_row(key, value)
        console.print(summary)
        table = Table(title=f"{self._metric_label()} (%) on {self.dataset_key}")
        for col in self._table_header():
            table.add_column(col, justify="left" if col in ("corruption", "category") else "right")
        for row in self._corruption_rows():
            table.add_row(*row)
        console.print(table)


@dataclass
class CorruptionReport(SeverityTableReport):
    """Accuracy on clean and corrupted test images, and the summary numbers derived from it.

    ``accuracy[corruption][severity]`` is top-1 accuracy in [0, 1]. The headline
    (:attr:`corruption_accuracy`) is the mean over the 15 benchmark corruptions x 5 severities;
    the 4 extras and the held-out ``cbar`` family (when evaluated) are averaged separately. mCE
    (AlexNet-normalised, in [0, inf)) is only defined for ImageNet data with all 15 x 5 entries.
    """

    title = "Corruption robustness"
    file_stem = "corruptions"

    dataset_key: str
    source: str
    clean_accuracy: float
    accuracy: dict[str, dict[int, float]]
    num_images: int
    params_table: str | None = None
    seed: int | None = None
    imagenet: bool = False

    def values(self) -> dict[str, dict[int, float]]:
        """:attr:`accuracy` itself."""
        return self.accuracy

    def _clean_value(self) -> float:
        return self.clean_accuracy

    @property
    def corruption_accuracy(self) -> float | None:
        """The headline: mean accuracy over the benchmark corruptions and severities evaluated."""
        return self._mean_of(C.BENCHMARK_CORRUPTIONS)

    @property
    def extra_accuracy(self) -> float | None:
        return self._mean_of(C.EXTRA_CORRUPTIONS)

    @property
    def cbar_accuracy(self) -> float | None:
        """Mean over the held-out ImageNet-C-bar / CIFAR-10-C-bar corruptions evaluated."""
        return self._mean_of(C.CBAR_CORRUPTIONS)

    @property
    def relative_robustness(self) -> float | None:
        """Corruption accuracy / clean accuracy."""
        return self._relative()

    @property
    def corruption_errors(self) -> dict[str, float] | None:
        """CE per corruption: mean error over severities / AlexNet's (ImageNet only)."""
        if not (self.imagenet and self.is_complete):
            return None
        return {
            n: (1 - self.per_corruption[n]) / ALEXNET_ERRORS[n] for n in C.BENCHMARK_CORRUPTIONS
        }

    @property
    def mce(self) -> float | None:
        """Mean corruption error over the 15 benchmark corruptions, AlexNet-normalised."""
        errors = self.corruption_errors
        return None if errors is None else sum(errors.values()) / len(errors)

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data: the inputs plus every derived number."""
        data = asdict(self)
        data["accuracy"] = {
            n: {str(s): a for s, a in sev.items()} for n, sev in self.accuracy.items()
        }
        data.update(
            corruption_accuracy=self.corruption_accuracy,
            extra_accuracy=self.extra_accuracy,
            cbar_accuracy=self.cbar_accuracy,
            relative_robustness=self.relative_robustness,
            per_corruption=self.per_corruption,
            per_category=self.per_category,
            per_severity={str(s): a for s, a in self.per_severity.items()},
            is_complete=self.is_complete,
            corruption_errors=self.corruption_errors,
            mce=self.mce,
            mce_reference=ALEXNET_SOURCE if self.mce is not None else None,
        )
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CorruptionReport:
        """Rebuild a report from :meth:`to_dict` output (derived numbers are recomputed)."""
        accuracy = {
            n: {int(s): float(a) for s, a in sev.items()} for n, sev in data["accuracy"].items()
        }
        return cls(
            dataset_key=data["dataset_key"],
            source=data["source"],
            clean_accuracy=float(data["clean_accuracy"]),
            accuracy=accuracy,
            num_images=int(data["num_images"]),
            params_table=data.get("params_table"),
            seed=data.get("seed"),
            imagenet=bool(data.get("imagenet", False)),
        )

    def _summary_rows(self) -> list[tuple[str, str]]:
        n_bench = len(self._entries(C.BENCHMARK_CORRUPTIONS))
        rows = [
            ("clean accuracy (%)", _pct(self.clean_accuracy)),
            (f"corruption accuracy, mean of {n_bench} (%)", _pct(self.corruption_accuracy)),
            *self._apart_rows(),
            ("relative robustness (corruption / clean)", _ratio(self.relative_robustness)),
        ]
        if self.imagenet:
            rows.append(("mCE vs AlexNet (%)", _pct(self.mce)))
        return rows + self._category_rows()

    def _about_lines(self) -> list[str]:
        lines = [f"Dataset: {self.dataset_key}, {self.num_images} images. Source: {self.source}."]
        if self.source == SOURCE_RENDERED:
            lines.append(
                "Rendered corruptions are not comparable with published numbers, which use the "
                "official pre-rendered files."
            )
        if self.params_table:
            lines.append(f"Severity parameters: {self.params_table} table, seed {self.seed}.")
        return lines

    def _metric_label(self) -> str:
        return "Accuracy"

    def _extra_columns(self) -> dict[str, Mapping[str, float]]:
        return {"CE": self.corruption_errors or {}}

    def _footer_lines(self) -> list[str]:
        if self.mce is None:
            return []
        return [f"CE and mCE are normalised by AlexNet's errors ({ALEXNET_SOURCE})."]

    def heatmap_png(self) -> bytes:
        """A corruption x severity accuracy heatmap as PNG bytes (matplotlib, Agg canvas)."""
        title = (
            f"{self.dataset_key}: clean {_pct(self.clean_accuracy)}%, "
            f"corrupted {_pct(self.corruption_accuracy)}%"
        )
        return self._heatmap(title, "top-1 accuracy (%)")


def _kind_suffix(name: str) -> str:
    if name in C.BENCHMARK_CORRUPTIONS:
        return ""
    return " (held out)" if name in C.HELD_OUT_CORRUPTIONS else " (extra)"


def _category(name: str) -> str:
    """The corruption's family, "-" for a name that is not registered (e.g. from an old file)."""
    try:
        return C.get_corruption(name).family
    except UserError:
        return "-"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
