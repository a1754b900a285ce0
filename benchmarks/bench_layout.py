"""What finding a model's neurons costs: ``NeuronLayout`` timed three ways, side by side.

- ``adasap``: as adasap runs it (its linear-time concatenation mapping, the removal check on a
  copy, :mod:`adasap.method.probe`);
- ``tp-concat``: the same with Torch-Pruning 1.6's own concatenation mapping, loaded fresh from
  its module (quadratic in a concatenation's parts: DenseNet's blocks);
- ``no-check``: adasap's mapping without the removal check (what the check itself costs).

Each way builds the model from scratch for 10 classes (``adasap.models.build_model``), takes a
random batch, and times the layout ``--repeats`` times (the best is reported). Run it alone:
the times are only meaningful on an otherwise idle machine.

    .venv/bin/python benchmarks/bench_layout.py                       # densenet201, 64 px
    .venv/bin/python benchmarks/bench_layout.py --model resnet50 --threads 2 --json layout.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import time
from collections.abc import Iterator

import torch
from rich.console import Console
from rich.table import Table
from torch_pruning.dependency import index_mapping

from adasap.checks import find_classifier
from adasap.deploy.timing import machine_info
from adasap.io import atomic_write_json
from adasap.method import neurons
from adasap.method.neurons import NeuronLayout
from adasap.models import build_model

WAYS = ("adasap", "tp-concat", "no-check")


@contextlib.contextmanager
def _way(way: str) -> Iterator[None]:
    """adasap's layout, changed as ``way`` says while the block runs."""
    saved = index_mapping.update_concat_index_mapping, neurons.breaking_groups
    if way == "tp-concat":
        spec = importlib.util.find_spec("torch_pruning.dependency.index_mapping")
        original = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(original)
        index_mapping.update_concat_index_mapping = original.update_concat_index_mapping
    elif way == "no-check":
        neurons.breaking_groups = lambda *args: []
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping, neurons.breaking_groups = saved


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet201", help="a name build_model knows")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--json", help="write the rows and the machine here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(
        args.model, num_classes=10, in_channels=3, image_size=args.image_size,
        mean=[0.5] * 3, std=[0.25] * 3,
    )  # fmt: skip
    classifier = find_classifier(model, 10)
    example = torch.randn(args.batch, 3, args.image_size, args.image_size)
    rows = []
    for way in args.ways:
        seconds = []
        for _ in range(args.repeats):
            with _way(way):
                start = time.perf_counter()
                layout = NeuronLayout(model, example, ignored_layers=[classifier])
                seconds.append(time.perf_counter() - start)
        rows.append(
            dict(way=way, seconds=min(seconds), neurons=layout.num_neurons,
                 groups=len(layout.groups), left_whole=len(layout.left_whole))
        )  # fmt: skip
    table = Table(title=f"NeuronLayout of {args.model} at {args.image_size} px, batch {args.batch}")
    for column in ("way", "s (best)", "vs adasap", "neurons", "groups", "left whole"):
        table.add_column(column)
    base = next((r["seconds"] for r in rows if r["way"] == "adasap"), None)
    for r in rows:
        ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
        table.add_row(r["way"], f"{r['seconds']:.2f}", ratio, str(r["neurons"]),
                      str(r["groups"]), str(r["left_whole"]))  # fmt: skip
    Console().print(table)
    if args.json:
        atomic_write_json(args.json, dict(vars(args), rows=rows, machine=machine_info()))
    return rows


if __name__ == "__main__":
    main()
