"""Commands on saved detectors: ``adasap eval`` (P, mPC, rPC) and ``adasap latency``.

Both read a detection run directory (:mod:`adasap.experiments.detection_run`) and its
``config.json``: the data the run used, and for latency the run's trained dense detector from
the dense cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from adasap.deploy.comparison import LatencyComparison, compare_latency
from adasap.deploy.onnx import find_models
from adasap.deploy.serialization import load_model, read_description
from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig, from_flat
from adasap.experiments.dense import load_cached_model
from adasap.experiments.detection_data import image_side, load_detection_data, timing_images
from adasap.experiments.detection_run import (
    architecture_of,
    dense_directory,
    dense_recipe,
    evaluate_detector,
    example_image,
)
from adasap.experiments.reporting import DETECTION_COLUMNS, results_table
from adasap.experiments.results import ResultRow
from adasap.io import CacheMiss, read_json_mapping
from adasap.method.pruning import measure_size


def saved_detection_config(model_dir: Path) -> ExperimentConfig:
    """The config of the run holding the detector saved in ``model_dir``, else the detection
    defaults at the detector's input size."""
    saved = model_dir.parent / "config.json"
    if saved.is_file():
        values = read_json_mapping(saved, "restore it, or pass a run directory")
        return from_flat(values, source=str(saved))
    architecture = read_description(model_dir)["architecture"]
    return from_flat({"task": "detection", "image_size": architecture["image_size"]})


def run_detection_latency(
    run_dir: str | Path,
    *,
    batch_sizes: Sequence[int] = (1,),
    device: str = "cpu",
    repeats: int = 20,
    console: Console | None = None,
) -> LatencyComparison:
    """``adasap latency`` on a detection run: its pruned detectors beside its trained dense one
    (from the dense cache), PyTorch only, all timed on the run's first test images.

    A detector's time depends on its weights and input, unlike a classifier's: post-processing
    grows with the boxes above the score threshold. So neither fresh weights nor random
    images (:func:`adasap.deploy.comparison.run_latency`'s shortcuts) would be fair.
    """
    console = console or Console()
    models = find_models(run_dir)
    config = saved_detection_config(next(iter(models.values()))).validate()
    data = load_detection_data(config)
    directory = dense_directory(config, dense_recipe(config, data))
    try:
        dense, _ = load_cached_model(directory, console)
    except CacheMiss as exc:
        raise UserError(
            f"the dense detector of {run_dir} is not in the cache ({directory}): rebuild it "
            f"with adasap run --resume {Path(run_dir)}, or pass the run's --cache-dir"
        ) from exc
    side = image_side(config)
    return compare_latency(
        dense,
        {name: load_model(path) for name, path in models.items()},
        (3, side, side),
        batch_sizes=batch_sizes,
        device=device,
        repeats=repeats,
        images=timing_images(config, data, max(batch_sizes)),
    )


def evaluate_detectors(
    models: dict[str, Any],
    directories: dict[str, Path],
    config: ExperimentConfig,
    console: Console | None = None,
) -> list[ResultRow]:
    """``adasap eval`` on saved detectors: P, mPC and rPC of each, reports next to each model.

    The data are those of ``config`` when it is a detection config (a run's ``config.json``
    with the eval flags), else of the run directory holding the model, else the detection
    defaults at the model's image size.
    """
    console = console or Console()
    if config.task != "detection":
        config = saved_detection_config(next(iter(directories.values())))
    config = config.validate()
    data = load_detection_data(config)
    rows = []
    for label, directory in directories.items():
        architecture = read_description(directory)["architecture"]
        wanted = architecture_of(config, data)
        if {k: architecture.get(k) for k in wanted} != wanted:
            raise UserError(
                f"the detector in {directory} was built for {architecture.get('num_classes')} "
                f"classes at {architecture.get('image_size')} px, the data have "
                f"{wanted['num_classes']} at {wanted['image_size']} px: evaluate it with the "
                "config of its run (adasap eval <run directory>)"
            )
        model = models[label]
        row = evaluate_detector(model, data, config, directory.parent, label)
        size = measure_size(model, example_image(config))
        rows.append(row.with_cost(size))
    title = f"adasap eval: {next(iter(directories.values())).parent}"
    console.print(results_table(rows, title=title, columns=DETECTION_COLUMNS))
    return rows
