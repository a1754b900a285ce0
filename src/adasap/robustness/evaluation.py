"""Corruption and distribution-shift evaluation: official -C sets, accuracy tables, reports.

Published ImageNet-C / CIFAR-10-C numbers are only comparable on the official pre-rendered files
(hendrycks/robustness#16); every result therefore carries a ``source`` string saying whether it
came from those files or from corruptions rendered on the fly by :mod:`.corruptions`.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from adasap.checks import check_input, check_labels
from adasap.errors import UserError
from adasap.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from adasap.robustness.corruptions import (
    BENCHMARK_CORRUPTIONS,
    CATEGORIES,
    CATEGORY_OF,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    image_fingerprint,
    render_cached,
    resolve_param_table,
)

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

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".gif")
OFFICIAL_DATASETS = ("cifar10-c", "cifar100-c", "tinyimagenet-c", "imagenet-c")


# --------------------------------------------------------------------------- image sources


@dataclass(eq=False)
class LabeledImages:
    """Images in memory (uint8, or float in [0, 1], NCHW), int64 labels, and their origin."""

    images: Tensor
    labels: Tensor
    source: str

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.labels.shape != (self.images.shape[0],):
            raise UserError(
                f"{tuple(self.images.shape)} images do not fit labels of shape "
                f"{tuple(self.labels.shape)}: pass NCHW images and one label per image"
            )
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(images, labels)`` slices of ``batch_size``, in order."""
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size], self.labels[start : start + batch_size]


class FolderImages(torch.utils.data.Dataset):
    """Lazily decoded images of ``<root>/<class>/<image>``, as uint8 CHW tensors.

    Labels follow the sorted class folder names (ImageNet order for WordNet ids). Folders named
    only by digits ("0".."999", ImageNet-V2) are read as the class index itself. ``resize``
    scales the shorter side, then ``crop`` takes the centre square; images of different sizes
    need at least ``crop`` to be batched. ``num_workers`` processes decode for :meth:`batches`.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        source: str,
        resize: int | None = None,
        crop: int | None = None,
        channels: int = 3,
        num_workers: int = 0,
    ) -> None:
        self.root = Path(root)
        self.source = source
        self.resize = resize
        self.crop = crop
        self.channels = channels
        self.num_workers = num_workers
        if not self.root.is_dir():
            raise UserError(f"missing image folder {self.root}: check the dataset path")
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not classes:
            raise UserError(f"no class folders in {self.root}: expected <root>/<class>/<image>")
        numeric = all(c.isdigit() for c in classes)
        if numeric:
            classes.sort(key=int)
        self.classes = classes
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(classes):
            label = int(name) if numeric else index
            files = sorted((self.root / name).iterdir())
            self.samples += [(f, label) for f in files if f.suffix.lower() in _IMAGE_SUFFIXES]
        if not self.samples:
            raise UserError(f"no images in the class folders of {self.root}: expected JPEG or PNG")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.v2 import functional as TF

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB" if self.channels == 3 else "L"))
        except (OSError, UnidentifiedImageError) as exc:
            raise UserError(f"cannot decode {path}: {exc}") from exc
        image = torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)
        if self.resize is not None:
            image = TF.resize(image, [self.resize], antialias=True)
        if self.crop is not None:
            image = TF.center_crop(image, [self.crop, self.crop])
        return image, label

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(uint8 NCHW images, int64 labels)`` in order."""
        loader = torch.utils.data.DataLoader(
            self, batch_size=batch_size, shuffle=False, num_workers=self.num_workers
        )
        try:
            yield from loader
        except RuntimeError as exc:
            if "stack expects each tensor to be equal size" not in str(exc):
                raise
            raise UserError(
                f"images in {self.root} differ in size: pass crop= (and resize=) to batch them"
            ) from exc


ImageSource = LabeledImages | FolderImages


def _check_corruption(name: str) -> None:
    if name not in CORRUPTIONS:
        raise UserError(f"unknown corruption {name!r}: choose one of {', '.join(CORRUPTIONS)}")


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise UserError(f"severity must be an integer from 1 to 5, got {severity!r}")


def load_cifar_c(
    root: str | Path, corruption: str, severity: int, *, name: str = "CIFAR-10-C"
) -> LabeledImages:
    """One severity of CIFAR-10-C / CIFAR-100-C from ``<root>/<corruption>.npy`` and ``labels.npy``.

    Each ``.npy`` holds the test set once per severity, severity-major (rows
    ``[(s-1)*n, s*n)``); only that block is read, through a memory map.
    """
    _check_corruption(corruption)
    _check_severity(severity)
    root = Path(root)
    data_path, labels_path = root / f"{corruption}.npy", root / "labels.npy"
    for path in (data_path, labels_path):
        if not path.is_file():
            raise UserError(f"missing {path}: download {name} from Zenodo and pass its folder")
    data = np.load(data_path, mmap_mode="r", allow_pickle=False)
    if (
        data.ndim != 4
        or data.shape[-1] not in (1, 3)
        or data.shape[0] % 5
        or data.dtype != np.uint8
    ):
        raise UserError(
            f"{data_path} holds {data.dtype} {data.shape}, not uint8 (5*n, H, W, 3): "
            f"is it a {name} file?"
        )
    n = data.shape[0] // 5
    block = np.array(data[(severity - 1) * n : severity * n])  # a writable copy of one block
    labels = np.load(labels_path, allow_pickle=False)
    if labels.shape == (5 * n,):
        labels = labels[(severity - 1) * n : severity * n]
    elif labels.shape != (n,):
        raise UserError(
            f"{labels_path} has shape {labels.shape}, expected ({5 * n},) or ({n},) "
            f"to match {data_path}"
        )
    images = torch.from_numpy(block).permute(0, 3, 1, 2).contiguous()
    return LabeledImages(
        images, torch.from_numpy(labels.astype(np.int64)), f"{name} official files"
    )


def load_folder_c(
    root: str | Path,
    corruption: str,
    severity: int,
    *,
    name: str,
    crop: int | None = None,
    num_workers: int = 0,
) -> FolderImages:
    """One severity of an ImageNet-C tree: ``<root>/<corruption>/<severity>/<class>/<image>``."""
    _check_corruption(corruption)
    _check_severity(severity)
    folder = Path(root) / corruption / str(severity)
    if not folder.is_dir():
        raise UserError(
            f"missing {folder}: download {name} and pass the folder holding {corruption}/"
        )
    return FolderImages(folder, source=f"{name} official files", crop=crop, num_workers=num_workers)


def load_imagenet_c(
    root: str | Path, corruption: str, severity: int, *, crop: int = 224, num_workers: int = 0
) -> FolderImages:
    """ImageNet-C; the official evaluation centre-crops 224 px, as ``crop`` does here."""
    return load_folder_c(
        root, corruption, severity, name="ImageNet-C", crop=crop, num_workers=num_workers
    )


def load_tiny_imagenet_c(
    root: str | Path, corruption: str, severity: int, *, num_workers: int = 0
) -> FolderImages:
    """Tiny-ImageNet-C (64 px, 200 classes)."""
    return load_folder_c(
        root, corruption, severity, name="Tiny-ImageNet-C", num_workers=num_workers
    )


def load_imagenet_v2(
    root: str | Path,
    *,
    resize: int = 256,
    crop: int = 224,
    name: str = "ImageNet-V2",
    num_workers: int = 0,
) -> FolderImages:
    """An ImageNet-V2 style test folder ``<root>/<class index>/<image>``, resized and cropped."""
    source = f"{name} official files"
    return FolderImages(root, source=source, resize=resize, crop=crop, num_workers=num_workers)


def official_sets(
    root: str | Path, dataset: str, *, num_workers: int = 0
) -> Callable[[str, int], ImageSource]:
    """A loader ``(corruption, severity) -> images`` for an official -C dataset at ``root``.

    ``dataset`` is one of "cifar10-c", "cifar100-c", "tinyimagenet-c", "imagenet-c"; pass the
    result as ``corrupted=`` to :func:`evaluate_corruptions`. ``num_workers`` processes decode
    the JPEG folders.
    """
    loaders: dict[str, Callable[[str, int], ImageSource]] = {
        "cifar10-c": lambda c, s: load_cifar_c(root, c, s, name="CIFAR-10-C"),
        "cifar100-c": lambda c, s: load_cifar_c(root, c, s, name="CIFAR-100-C"),
        "tinyimagenet-c": lambda c, s: load_tiny_imagenet_c(root, c, s, num_workers=num_workers),
        "imagenet-c": lambda c, s: load_imagenet_c(root, c, s, num_workers=num_workers),
    }
    if dataset not in OFFICIAL_DATASETS:
        raise UserError(
            f"unknown official dataset {dataset!r}: choose one of {', '.join(OFFICIAL_DATASETS)}"
        )
    return loaders[dataset]


# --------------------------------------------------------------------------- report


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


@dataclass
class CorruptionReport:
    """Accuracy on clean and corrupted test images, and the summary numbers derived from it.

    ``accuracy[corruption][severity]`` is top-1 accuracy in [0, 1]. The headline
    (:attr:`corruption_accuracy`) is the mean over the 15 benchmark corruptions x 5 severities;
    the 4 extras are averaged separately. mCE (AlexNet-normalised, in [0, inf)) is only defined
    for ImageNet data with all 15 x 5 entries.
    """

    dataset_key: str
    source: str
    clean_accuracy: float
    accuracy: dict[str, dict[int, float]]
    num_images: int
    params_table: str | None = None
    seed: int | None = None
    imagenet: bool = False

    def _names(self) -> list[str]:
        """Evaluated corruptions in the standard order, any others after them."""
        known = [n for n in CORRUPTIONS if n in self.accuracy]
        return known + [n for n in self.accuracy if n not in CORRUPTIONS]

    def _entries(self, names: Sequence[str]) -> list[float]:
        return [a for n in names for a in self.accuracy.get(n, {}).values()]

    @property
    def is_complete(self) -> bool:
        """All 15 benchmark corruptions at all 5 severities were evaluated."""
        return all(set(self.accuracy.get(n, {})) == set(SEVERITIES) for n in BENCHMARK_CORRUPTIONS)

    @property
    def corruption_accuracy(self) -> float | None:
        """The headline: mean accuracy over the benchmark corruptions and severities evaluated."""
        return _mean(self._entries(BENCHMARK_CORRUPTIONS))

    @property
    def extra_accuracy(self) -> float | None:
        return _mean(self._entries(EXTRA_CORRUPTIONS))

    @property
    def relative_robustness(self) -> float | None:
        """Corruption accuracy / clean accuracy."""
        if self.corruption_accuracy is None or self.clean_accuracy <= 0:
            return None
        return self.corruption_accuracy / self.clean_accuracy

    @property
    def per_corruption(self) -> dict[str, float]:
        return {n: sum(s.values()) / len(s) for n, s in self.accuracy.items() if s}

    @property
    def per_category(self) -> dict[str, float]:
        """Mean accuracy of each category's benchmark corruptions (extras excluded)."""
        means = {c: _mean(self._entries(names)) for c, names in CATEGORIES.items()}
        return {c: m for c, m in means.items() if m is not None}

    @property
    def per_severity(self) -> dict[int, float]:
        """Mean accuracy over the benchmark corruptions at each severity."""
        out = {}
        for s in SEVERITIES:
            values = [
                self.accuracy[n][s] for n in BENCHMARK_CORRUPTIONS if s in self.accuracy.get(n, {})
            ]
            if values:
                out[s] = sum(values) / len(values)
        return out

    @property
    def corruption_errors(self) -> dict[str, float] | None:
        """CE per corruption: mean error over severities / AlexNet's (ImageNet only)."""
        if not (self.imagenet and self.is_complete):
            return None
        return {n: (1 - self.per_corruption[n]) / ALEXNET_ERRORS[n] for n in BENCHMARK_CORRUPTIONS}

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
        n_bench = len(self._entries(BENCHMARK_CORRUPTIONS))
        n_extra = len(self._entries(EXTRA_CORRUPTIONS))
        rows = [
            ("clean accuracy (%)", _pct(self.clean_accuracy)),
            (f"corruption accuracy, mean of {n_bench} (%)", _pct(self.corruption_accuracy)),
            (f"extra corruptions, mean of {n_extra} (%)", _pct(self.extra_accuracy)),
            ("relative robustness (corruption / clean)", _ratio(self.relative_robustness)),
        ]
        if self.imagenet:
            rows.append(("mCE vs AlexNet (%)", _pct(self.mce)))
        rows += [(f"{c} (%)", _pct(a)) for c, a in self.per_category.items()]
        return rows

    def _corruption_rows(self) -> list[list[str]]:
        errors = self.corruption_errors or {}
        rows = []
        for name in self._names():
            sev = self.accuracy[name]
            cells = [_pct(sev.get(s)) if s in sev else "-" for s in SEVERITIES]
            extra = "" if name in BENCHMARK_CORRUPTIONS else " (extra)"
            ce = _pct(errors[name]) if name in errors else "-"
            rows.append(
                [
                    name + extra,
                    CATEGORY_OF.get(name, "-"),
                    *cells,
                    _pct(self.per_corruption[name]),
                    ce,
                ]
            )
        return rows

    def _header_lines(self) -> list[str]:
        lines = [f"Dataset: {self.dataset_key}, {self.num_images} images. Source: {self.source}."]
        if self.source == SOURCE_RENDERED:
            lines.append(
                "Rendered corruptions are not comparable with published numbers, which use the "
                "official pre-rendered files."
            )
        if self.params_table:
            lines.append(f"Severity parameters: {self.params_table} table, seed {self.seed}.")
        if not self.is_complete:
            lines.append("Not all 15 benchmark corruptions x 5 severities were evaluated.")
        return lines

    def to_markdown(self) -> str:
        """A Markdown report: summary, accuracy per corruption x severity, per category."""
        out = [f"# Corruption robustness: {self.dataset_key}", ""]
        out += self._header_lines()
        out += ["", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in self._summary_rows()]
        header = ["corruption", "category", *(f"s{s}" for s in SEVERITIES), "mean", "CE"]
        out += ["", "## Accuracy (%) per corruption and severity", ""]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(row) + " |" for row in self._corruption_rows()]
        if self.mce is not None:
            out += ["", f"CE and mCE are normalised by AlexNet's errors ({ALEXNET_SOURCE})."]
        return "\n".join(out) + "\n"

    def heatmap_png(self) -> bytes:
        """A corruption x severity accuracy heatmap as PNG bytes (matplotlib, Agg canvas)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = self._names()
        grid = np.full((max(len(names), 1), len(SEVERITIES)), np.nan)
        for i, name in enumerate(names):
            for j, s in enumerate(SEVERITIES):
                grid[i, j] = self.accuracy[name].get(s, np.nan)
        fig = Figure(figsize=(6.5, 1.6 + 0.32 * len(grid)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        image = ax.imshow(100 * grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not math.isnan(value):
                colour = "white" if value < 0.6 else "black"
                ax.text(
                    j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=7, color=colour
                )
        ax.set_xticks(range(len(SEVERITIES)), [f"severity {s}" for s in SEVERITIES], fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(
            f"{self.dataset_key}: clean {_pct(self.clean_accuracy)}%, "
            f"corrupted {_pct(self.corruption_accuracy)}%",
            fontsize=9,
        )
        fig.colorbar(image, ax=ax, label="top-1 accuracy (%)")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        return buffer.getvalue()

    def save(self, directory: str | Path, stem: str = "corruptions") -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` atomically into ``directory``."""
        directory = Path(directory)
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
        table = Table(title=f"Accuracy (%) on {self.dataset_key}")
        for col in ["corruption", "category", *(f"s{s}" for s in SEVERITIES), "mean", "CE"]:
            table.add_column(col, justify="left" if col in ("corruption", "category") else "right")
        for row in self._corruption_rows():
            table.add_row(*row)
        console.print(table)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------- evaluation


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _count_correct(model: nn.Module, images: Tensor, labels: Tensor, device: torch.device) -> int:
    x = images.to(device, non_blocking=True)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    if device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        logits = model(x)
    except (RuntimeError, ValueError):
        check_input(model, x)  # a clear error when the images do not fit the model
        raise
    check_labels(labels, logits.shape[-1])
    return int((logits.argmax(dim=1) == labels.to(device)).sum())


def _batches(
    data: ImageSource | tuple[Tensor, Tensor], batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(data, LabeledImages | FolderImages):
        return data.batches(batch_size)
    images, labels = data
    return LabeledImages(images, labels, "").batches(batch_size)


def evaluate_accuracy(
    model: nn.Module,
    data: ImageSource | tuple[Tensor, Tensor],
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy of ``model`` (eval mode, no grad) on images with labels.

    ``data`` is a :class:`LabeledImages`, a :class:`FolderImages` (e.g. from
    :func:`load_imagenet_v2`) or ``(images, labels)`` with uint8 or float [0, 1] images.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.inference_mode():
            for x, y in _batches(data, batch_size):
                correct += _count_correct(model, x, y, device)
                total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise UserError("no images to evaluate: the test set is empty")
    return correct / total


def _names_imagenet(dataset_key: str) -> bool:
    return re.sub(r"[^a-z0-9]", "", dataset_key.lower()).startswith(("imagenet", "ilsvrc"))


def _as_source(item: ImageSource | tuple[Tensor, Tensor], source: str | None) -> ImageSource:
    if isinstance(item, LabeledImages | FolderImages):
        return item
    images, labels = item
    return LabeledImages(images, labels, source or "user-provided images")


def evaluate_corruptions(
    model: nn.Module,
    images: Tensor | ImageSource,
    labels: Tensor | None = None,
    *,
    dataset_key: str,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    source: str | None = None,
    corrupted: Callable[[str, int], ImageSource | tuple[Tensor, Tensor]] | None = None,
    params: str = "auto",
    imagenet: bool | None = None,
    progress: bool = True,
    console: Any = None,
) -> CorruptionReport:
    """Accuracy of ``model`` on the clean test set and on every corruption x severity.

    Without ``corrupted``, each corruption is rendered from the clean ``images`` (float NCHW in
    [0, 1], or uint8) with :func:`adasap.corruptions.render_cached`, once per (dataset_key,
    corruption, severity, seed), so every model sees identical images. With ``corrupted`` (e.g.
    :func:`official_sets`), ``corrupted(name, severity)`` supplies the images instead and
    ``images`` is only the clean set.

    The model runs in eval mode under ``torch.inference_mode`` (its mode is restored), with
    channels-last inputs on the CPU. ``imagenet`` (default: ``dataset_key`` starts with
    "imagenet") enables mCE against AlexNet.
    """
    for name in corruptions:
        _check_corruption(name)
    for s in severities:
        _check_severity(s)
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} is invalid: use a positive integer")
    if isinstance(images, Tensor):
        if labels is None or labels.shape != (images.shape[0],):
            got = None if labels is None else tuple(labels.shape)
            raise UserError(
                f"labels must have shape ({images.shape[0]},) to match the images, got {got}"
            )
        clean: ImageSource = _as_source((images, labels), "clean test images")
    else:
        clean = images
    table = None
    if corrupted is None:
        if not isinstance(images, Tensor):
            raise UserError(
                "rendering corruptions needs the clean images as a tensor: pass images=Tensor "
                "or give corrupted= with pre-rendered sets"
            )
        if images.dim() != 4:
            raise UserError(f"images must be NCHW, got shape {tuple(images.shape)}")
        floats = images.float().div(255) if images.dtype == torch.uint8 else images
        table = resolve_param_table(params, images.shape[-2], images.shape[-1])
        fingerprint = image_fingerprint(floats)
    device = torch.device(device) if device is not None else _model_device(model)

    steps = 1 + len(corruptions) * len(severities)
    accuracy: dict[str, dict[int, float]] = {}
    sources: set[str] = set()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=True,
    ) as bar:
        task = bar.add_task("clean", total=steps)
        clean_accuracy = evaluate_accuracy(model, clean, batch_size=batch_size, device=device)
        bar.advance(task)
        for name in corruptions:
            accuracy[name] = {}
            for s in severities:
                bar.update(task, description=f"{name} s{s}")
                if corrupted is None:
                    rendered = render_cached(
                        floats,
                        dataset_key,
                        name,
                        s,
                        seed,
                        cache_dir,
                        params=table,
                        device=device,
                        fingerprint=fingerprint,
                    )
                    data: ImageSource = LabeledImages(rendered, labels, SOURCE_RENDERED)
                else:
                    data = _as_source(corrupted(name, s), source)
                sources.add(data.source)
                accuracy[name][s] = evaluate_accuracy(
                    model, data, batch_size=batch_size, device=device
                )
                bar.advance(task)
    if source is None:
        source = " + ".join(sorted(sources)) if sources else SOURCE_RENDERED
    return CorruptionReport(
        dataset_key=dataset_key,
        source=source,
        clean_accuracy=clean_accuracy,
        accuracy=accuracy,
        num_images=len(clean),
        params_table=table,
        seed=seed if corrupted is None else None,
        imagenet=_names_imagenet(dataset_key) if imagenet is None else imagenet,
    )
