"""Corruption and distribution-shift evaluation of a model on any kind of test data.

Published ImageNet-C / CIFAR-10-C numbers are only comparable on the official pre-rendered files
(hendrycks/robustness#16); every result therefore carries a ``source`` string saying whether it
came from those files (:mod:`.official`) or from corruptions rendered on the fly by
:mod:`.corruptions`. The report lives in :mod:`.report`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adasap.data.detection import DetectionSet, FileDetectionSet
from adasap.data.image_sets import TensorImageSet
from adasap.data.sources import evaluation_source
from adasap.distributed import gather_values, is_distributed, is_main, rank, world_size
from adasap.errors import UserError
from adasap.robustness.corruptions import (
    SEVERITIES,
    image_fingerprint,
    render_cached,
    resolve_param_table,
)
from adasap.robustness.detection import evaluate_detection_corruptions
from adasap.robustness.detection_report import DetectionCorruptionReport
from adasap.robustness.official import check_request
from adasap.robustness.report import SOURCE_RENDERED, CorruptionReport
from adasap.training.evaluate import Normalization, count_correct, model_device
from adasap.training.progress import cell_progress


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
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    source: str | None = None,
    corrupted: Callable[[str, int], Any] | None = None,
    params: str = "auto",
    imagenet: bool | None = None,
    normalize: Normalization | None = None,
    progress: bool = True,
    console: Any = None,
    sharded: bool = False,
    task: str | None = None,
) -> CorruptionReport | DetectionCorruptionReport:
    """Accuracy of ``model`` on the clean test set and on every corruption x severity.

    ``task="detection"`` (the default for a detection set of :mod:`adasap.data.detection`)
    evaluates a detector instead: mAP, P, mPC and rPC in a
    :class:`~adasap.robustness.detection_report.DetectionCorruptionReport`
    (:func:`~adasap.robustness.detection.evaluate_detection_corruptions`; batch size 8 unless
    given). ``batch_size`` is 256 by default for classifiers.

    ``test_data`` is any kind of data :func:`adasap.training.evaluate.evaluate_accuracy` takes:
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
    are split over the ranks, the (corruption, severity) cells too (each rank renders and
    evaluates its own), and every rank returns the whole report; rank 0 alone shows progress.
    """
    if task is None and isinstance(test_data, DetectionSet | FileDetectionSet):
        task = "detection"
    if task == "detection":
        given = {"labels": labels, "corrupted": corrupted, "imagenet": imagenet,
                 "normalize": normalize, "source": source}  # fmt: skip
        unused = [name for name, value in given.items() if value is not None] + (
            ["sharded"] if sharded else []
        )
        if unused:
            raise UserError(
                f"{', '.join(unused)} do(es) not apply to detection: leave it out (boxes come "
                "with the detection set; corruptions are rendered)"
            )
        return evaluate_detection_corruptions(
            model,
            test_data,
            dataset_key=dataset_key,
            corruptions=corruptions,
            severities=severities,
            batch_size=batch_size or 8,
            device=device,
            seed=seed,
            cache_dir=cache_dir,
            params=params,
            progress=progress,
            console=console,
        )
    if task not in (None, "classification"):
        raise UserError(f"task must be classification or detection, got {task!r}")
    batch_size = 256 if batch_size is None else batch_size
    sharded = sharded and is_distributed()
    corruptions = check_request(corruptions, severities, batch_size)
    clean = _clean_data(test_data, labels)
    device = torch.device(device) if device is not None else model_device(model)
    table = None
    if corrupted is None:
        images, clean_labels = _gather(clean, batch_size)
        table = resolve_param_table(params, images.shape[-2], images.shape[-1])
        fingerprint = image_fingerprint(images)

    def count(data: Any, sharded: bool = False) -> tuple[int, int]:
        return count_correct(
            model,
            data,
            batch_size=batch_size,
            device=device,
            channels_last=device.type == "cpu",
            normalize=normalize,
            sharded=sharded,
        )

    cells = [(name, s) for name in corruptions for s in severities]
    if sharded:
        cells = cells[rank() :: world_size()]
    found: dict[tuple[str, int], float] = {}
    sources: set[str] = set()
    with cell_progress(console, disable=not progress or not is_main()) as bar:
        task = bar.add_task("clean", total=1 + len(cells))
        correct, num_images = count(clean, sharded)
        bar.advance(task)
        for name, s in cells:
            bar.update(task, description=f"{name} s{s}")
            if corrupted is None:
                rendered = render_cached(
                    images,
                    dataset_key,
                    name,
                    s,
                    seed,
                    cache_dir,
                    params=table,
                    device=device,
                    fingerprint=fingerprint,
                )
                data: Any = TensorImageSet(rendered, clean_labels, source=SOURCE_RENDERED)
            else:
                data = corrupted(name, s)
            sources.add(getattr(data, "source", None) or source or "user-provided images")
            right, total = count(data)
            found[name, s] = right / total
            bar.advance(task)
    if sharded:  # every rank's cells, on every rank
        for their_found, their_sources in gather_values((found, sources)):
            found.update(their_found)
            sources |= their_sources
    accuracy = {name: {s: found[name, s] for s in severities} for name in corruptions}
    if source is None:
        source = " + ".join(sorted(sources)) if sources else SOURCE_RENDERED
    return CorruptionReport(
        dataset_key=dataset_key,
        source=source,
        clean_accuracy=correct / num_images,
        accuracy=accuracy,
        num_images=num_images,
        params_table=table,
        seed=seed if corrupted is None else None,
        imagenet=_names_imagenet(dataset_key) if imagenet is None else imagenet,
    )
