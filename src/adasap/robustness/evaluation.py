"""Corruption evaluation: :class:`CorruptionEvaluator`, the one loop over the (corruption,
severity) cells of every task; a task supplies a :class:`TaskImages` (classification's here,
detection's in :mod:`.detection`). :func:`evaluate_corruptions` evaluates a classifier.

Published ImageNet-C / CIFAR-10-C numbers are only comparable on the official pre-rendered files
(hendrycks/robustness#16); every classification result therefore carries a ``source`` string
saying whether it came from those files (:mod:`.official`) or from corruptions rendered on the fly
by :mod:`.corruptions`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from statistics import median
from typing import Any

import torch
from torch import Tensor, nn

from adasap.data.detection import DetectionBundle, DetectionSet, FileDetectionSet
from adasap.data.image_sets import TensorImageSet
from adasap.data.sources import evaluation_source
from adasap.distributed import gather_values, is_distributed, is_main, rank, world_size
from adasap.errors import UserError
from adasap.robustness import corruptions as C
from adasap.robustness.corruptions import (
    SEVERITIES,
    get_corruption,
    image_fingerprint,
    render_cached,
    resolve_param_table,
)
from adasap.robustness.corruptions.apply import check_severity
from adasap.robustness.report import SOURCE_RENDERED, CorruptionReport
from adasap.tasks.evaluate import Normalization, count_correct, model_device
from adasap.training.progress import cell_progress

# A cell's supplier of corrupted data: (corruption, severity) -> data a task scores.
Supplier = Callable[[str, int], Any]


@dataclass(frozen=True)
class RenderPart:
    """Clean images rendered by one :func:`render_cached` call: float NCHW in [0, 1], or uint8
    (converted a part at a time, so a detection set is held as uint8 only); ``suffix`` follows
    the dataset key in the cache key."""

    images: Tensor
    suffix: str
    fingerprint: str


class TaskImages(ABC):
    """A task's side of the cell loop: its test data gathered once, re-batched after
    rendering, and scored. ``batch_size`` images are scored (and gathered) at a time."""

    def __init__(self, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch size {batch_size!r} is invalid: use a positive integer")
        self.batch_size = batch_size

    @abstractmethod
    def clean(self) -> Any:
        """The clean test data, as :meth:`score` takes it."""

    @abstractmethod
    def parts(self) -> list[RenderPart]:
        """The clean images to render, in parts (each its own render-cache entry)."""

    @abstractmethod
    def corrupted(self, rendered: Sequence[Tensor]) -> Any:
        """The data :meth:`score` takes, from the :meth:`parts` rendered (uint8, in order)."""

    @abstractmethod
    def score(
        self, model: nn.Module, data: Any, *, device: torch.device, sharded: bool = False
    ) -> tuple[dict[str, float], int]:
        """The metrics of ``model`` on ``data`` and the number of images scored; ``sharded``:
        every torchrun rank scores its part of ``data`` and gets the whole result."""


@dataclass
class CellScores:
    """What the cell loop found: the clean metrics, the metrics per corruption and severity
    (in the order asked), the number of clean images, the severity table (None when the cells
    were supplied) and each cell's data's ``source`` attribute (None where it has none)."""

    clean: dict[str, float]
    results: dict[str, dict[int, dict[str, float]]]
    num_images: int
    params_table: str | None
    sources: set[str | None]


@dataclass(frozen=True)
class CorruptionEvaluator:
    """The corruption evaluation of every task, its options set once; called with a model and a
    :class:`TaskImages` (any number of models on the same images).

    The model is scored on the clean images, then on every (corruption, severity) cell in
    order (corruption-major). A cell's images are rendered by :func:`render_cached`, once per
    (dataset key, corruption, severity, seed), so every model sees identical images; with
    ``corrupted``, ``corrupted(name, severity)`` supplies them instead. ``corruptions``
    defaults to the benchmark and extra ones (``CORRUPTIONS``); ``params`` ("auto": by the
    median shorter side of the images) picks one severity table for all of them.
    """

    dataset_key: str
    corruptions: Sequence[str] | None = None
    severities: Sequence[int] = SEVERITIES
    seed: int = 0
    cache_dir: str | Path | None = None
    params: str = "auto"
    progress: bool = True
    console: Any = None

    def __post_init__(self) -> None:
        names = C.CORRUPTIONS if self.corruptions is None else tuple(self.corruptions)
        for name in names:
            get_corruption(name)
        for s in self.severities:
            check_severity(s)
        object.__setattr__(self, "corruptions", names)

    def __call__(
        self,
        model: nn.Module,
        images: TaskImages,
        *,
        device: torch.device | str | None = None,
        corrupted: Supplier | None = None,
        sharded: bool = False,
    ) -> CellScores:
        """Score ``model`` on the clean ``images`` and every cell. ``sharded`` (every rank of a
        torchrun job calls it with the same model): the clean images are split over the ranks
        if the task adds its scores up, the cells too (each rank renders and scores its own);
        every rank returns all scores and rank 0 alone shows progress."""
        sharded = sharded and is_distributed()
        device = torch.device(device) if device is not None else model_device(model)
        table, parts = None, []
        if corrupted is None:
            parts = images.parts()
            # one table for all images, by the median shorter side (image by image)
            side = int(median(min(p.images.shape[-2:]) for p in parts for _ in p.images))
            table = resolve_param_table(self.params, side, side)
        cells = [(name, s) for name in self.corruptions for s in self.severities]
        if sharded:
            cells = cells[rank() :: world_size()]
        found: dict[tuple[str, int], dict[str, float]] = {}
        sources: set[str | None] = set()
        with cell_progress(self.console, disable=not self.progress or not is_main()) as bar:
            task = bar.add_task("clean", total=1 + len(cells))
            clean, num_images = images.score(model, images.clean(), device=device, sharded=sharded)
            bar.advance(task)
            for name, s in cells:
                bar.update(task, description=f"{name} s{s}")
                if corrupted is None:
                    data = images.corrupted(
                        [self._render(part, name, s, table, device) for part in parts]
                    )
                else:
                    data = corrupted(name, s)
                sources.add(getattr(data, "source", None))
                found[name, s], _ = images.score(model, data, device=device)
                bar.advance(task)
        if sharded:  # every rank's cells, on every rank
            for their_found, their_sources in gather_values((found, sources)):
                found.update(their_found)
                sources |= their_sources
        results = {name: {s: found[name, s] for s in self.severities} for name in self.corruptions}
        return CellScores(clean, results, num_images, table, sources)

    def _render(
        self, part: RenderPart, name: str, severity: int, table: str, device: torch.device
    ) -> Tensor:
        pixels = part.images
        if not pixels.is_floating_point():
            pixels = pixels.float().div_(255)
        return render_cached(
            pixels,
            self.dataset_key + part.suffix,
            name,
            severity,
            self.seed,
            self.cache_dir,
            params=table,
            device=device,
            fingerprint=part.fingerprint,
        )


class ClassificationImages(TaskImages):
    """Classification's side of the cell loop: images with labels, top-1 accuracy.

    The clean data is scored as given (split over torchrun's ranks when sharded); its images
    are gathered (float, CPU) only when cells are rendered from them. ``normalize=(mean, std)``
    is applied after corrupting, for a model that expects normalised inputs.
    """

    def __init__(
        self,
        data: Any,
        labels: Tensor | None = None,
        *,
        batch_size: int = 256,
        normalize: Normalization | None = None,
    ) -> None:
        super().__init__(batch_size)
        self.data, self.normalize = _clean_data(data, labels), normalize

    @cached_property
    def _gathered(self) -> tuple[Tensor, Tensor]:
        return _gather(self.data, self.batch_size)

    def clean(self) -> Any:
        return self.data

    def parts(self) -> list[RenderPart]:
        images = self._gathered[0]
        return [RenderPart(images, "", image_fingerprint(images))]

    def corrupted(self, rendered: Sequence[Tensor]) -> TensorImageSet:
        return TensorImageSet(rendered[0], self._gathered[1], source=SOURCE_RENDERED)

    def score(
        self, model: nn.Module, data: Any, *, device: torch.device, sharded: bool = False
    ) -> tuple[dict[str, float], int]:
        correct, total = count_correct(
            model,
            data,
            batch_size=self.batch_size,
            device=device,
            channels_last=device.type == "cpu",
            normalize=self.normalize,
            sharded=sharded,
        )
        if total == 0:
            raise UserError("no images to evaluate: the test set is empty")
        return {"accuracy": correct / total}, total


def _names_imagenet(dataset_key: str) -> bool:
    return re.sub(r"[^a-z0-9]", "", dataset_key.lower()).startswith(("imagenet", "ilsvrc"))


def _clean_data(test_data: Any, labels: Tensor | None) -> Any:
    """``test_data`` as evaluate_accuracy takes it: a tensor of images is paired with labels."""
    if not isinstance(test_data, Tensor):
        return test_data
    if labels is None or labels.shape != (test_data.shape[0],):
        got = None if labels is None else tuple(labels.shape)
        raise UserError(
            f"labels must have shape ({test_data.shape[0]},) to match the images, got {got}"
        )
    return (test_data, labels)


def _gather(data: Any, batch_size: int) -> tuple[Tensor, Tensor]:
    """All images (float in [0, 1], CPU) and labels of ``data``, in order, to render from."""
    if isinstance(data, TensorImageSet):
        return data.float_images().cpu(), data.labels.cpu()
    pairs = [(x.cpu(), y.cpu()) for x, y in evaluation_source(data, batch_size=batch_size).epoch(0)]
    if not pairs:
        raise UserError("no images to evaluate: the test set is empty")
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def evaluate_corruptions(
    model: nn.Module,
    test_data: Any,
    labels: Tensor | None = None,
    *,
    dataset_key: str,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    source: str | None = None,
    corrupted: Supplier | None = None,
    params: str = "auto",
    imagenet: bool | None = None,
    normalize: Normalization | None = None,
    progress: bool = True,
    console: Any = None,
    sharded: bool = False,
) -> CorruptionReport:
    """Accuracy of a classifier on the clean test set and on every corruption x severity
    (a detector: :func:`~adasap.robustness.detection.evaluate_detection_corruptions`).

    ``test_data`` is any kind of data :func:`adasap.tasks.evaluate.evaluate_accuracy` takes:
    an adasap image set, a map-style Dataset, a DataLoader or list of ``(images, labels)``
    batches, or an images tensor (uint8, or float NCHW in [0, 1]) with ``labels``. Its images
    must lie in [0, 1] (uint8 counts as /255): corruptions act on raw pixels. A model that
    expects normalised inputs gets ``normalize=(mean, std)``, applied after corrupting.

    Without ``corrupted``, each corruption is rendered from all clean images with
    :func:`adasap.robustness.corruptions.render_cached`, once per (dataset_key, corruption,
    severity, seed), so every model sees identical images. With ``corrupted`` (e.g.
    :func:`adasap.robustness.official.official_sets`), ``corrupted(name, severity)`` supplies
    the images (any kind of data) instead.

    The model runs in eval mode under ``torch.inference_mode`` (its mode is restored), with
    channels-last inputs on the CPU. ``imagenet`` (default: ``dataset_key`` starts with
    "imagenet") enables mCE against AlexNet. ``corruptions`` defaults to the benchmark and extra
    corruptions (``CORRUPTIONS``); a held-out family such as ``CBAR_CORRUPTIONS`` is evaluated
    only when named, and the report averages it separately (``cbar_accuracy``).

    ``sharded`` (every rank of a torchrun job calls it with the same model): the clean images
    and the cells are split over the ranks (:class:`CorruptionEvaluator`); each gets the report.
    """
    if isinstance(test_data, DetectionSet | FileDetectionSet | DetectionBundle):
        raise UserError(
            "evaluate_corruptions scores classifiers: score a detector on a detection set with "
            "adasap.robustness.evaluate_detection_corruptions(model, data, dataset_key=...)"
        )
    evaluator = CorruptionEvaluator(
        dataset_key, corruptions, severities, seed, cache_dir, params, progress, console
    )
    images = ClassificationImages(test_data, labels, batch_size=batch_size, normalize=normalize)
    found = evaluator(model, images, device=device, corrupted=corrupted, sharded=sharded)
    if source is None:
        named = {s or "user-provided images" for s in found.sources}
        source = " + ".join(sorted(named)) if named else SOURCE_RENDERED
    return CorruptionReport(
        dataset_key=dataset_key,
        source=source,
        clean_accuracy=found.clean["accuracy"],
        accuracy={
            n: {s: c["accuracy"] for s, c in sev.items()} for n, sev in found.results.items()
        },
        num_images=found.num_images,
        params_table=found.params_table,
        seed=seed if corrupted is None else None,
        imagenet=_names_imagenet(dataset_key) if imagenet is None else imagenet,
    )
