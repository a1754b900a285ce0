"""The image-folder loader's images/s per core, and the cores per GPU that training needs.

Writes synthetic JPEGs of ImageNet's typical size (500 x 375 px by default, smooth images with
noise, so their files and decoding cost are close to photographs') into a temporary
``<root>/train/<class>/`` and ``<root>/val/<class>/`` tree, loads it with adasap's own path
(``imagefolder:<root>`` through :func:`adasap.data.load_dataset`, then the training batches
of :func:`adasap.data.batches`: decode, RandomResizedCrop 224 and flip in DataLoader worker
processes, pinned memory on CUDA), and times whole epochs for 0, 1, 2 ... workers.

With ``w`` workers ``w`` cores decode (0: the training process itself), so images/s / max(1,
w) is the rate per core. A GPU that trains at ``R`` images/s needs ``R / rate per core``
cores of loading: ``--gpu-images-per-second`` sets ``R``. Its default, 2470, is an
**estimate**, not a measurement: NVIDIA's DeepLearningExamples report 2470 images/s for
ResNet-50 v1.5 training with mixed precision on one A100 80GB (PyTorch, DALI loading);
replace it with ``benchmarks/bench_gpu.py``'s ``sgd`` number for your GPU.

    python benchmarks/bench_loader.py [--images 512] [--workers 0 1 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from adasap.data import batches, load_dataset

ESTIMATED_GPU_IMAGES_PER_SECOND = 2470.0  # ResNet-50 AMP, one A100 (NVIDIA's published table)


def write_jpegs(root: Path, count: int, width: int, height: int, classes: int = 4) -> int:
    """``count`` JPEGs (quality 90) over ``classes`` folders of ``root/train`` (one per class
    in ``root/val``, which the dataset needs); returns their mean file size in bytes."""
    rng = np.random.default_rng(0)
    sizes = []
    for index in range(count + classes):
        split, label = ("train", index % classes) if index < count else ("val", index - count)
        coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        path = root / split / f"n{label:08d}" / f"{index}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return int(np.mean(sizes))


def images_per_second(
    root: Path, workers: int, batch_size: int, image_size: int, device: torch.device, epochs: int
) -> float:
    """Training batches of the whole folder through adasap's loader; the first epoch (worker
    start-up, file cache) is not timed."""
    data = load_dataset(
        f"imagefolder:{root}", val_fraction=0, image_size=image_size, num_workers=workers
    )
    generator = torch.Generator().manual_seed(0)

    def epoch() -> int:
        seen = 0
        for x, _ in batches(
            data.train, batch_size, shuffle=True, generator=generator, augment=True,
            device=device, drop_last=True,
        ):  # fmt: skip
            seen += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return seen

    epoch()
    start = time.perf_counter()
    seen = sum(epoch() for _ in range(epochs))
    return seen / (time.perf_counter() - start)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="JPEGs to write and load")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--image-size", type=int, default=224, help="the training crop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per setting")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--gpu-images-per-second", type=float, default=ESTIMATED_GPU_IMAGES_PER_SECOND,
        help="one GPU's training rate to feed (default: an estimate, see above)",
    )  # fmt: skip
    parser.add_argument("--json", default="bench_loader.json", help="where to write the results")
    args = parser.parse_args(argv)
    if min(args.images, args.batch_size, args.epochs, args.image_size) < 1:
        parser.error("images, batch size, image size and epochs must be >= 1")
    if args.images < args.batch_size or min(args.workers) < 0:
        parser.error("need at least one batch of images and workers >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    device = torch.device(args.device)
    console = Console(width=120)
    rates: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="adasap-loader-") as folder:
        root = Path(folder)
        mean_bytes = write_jpegs(root, args.images, args.width, args.height)
        for workers in args.workers:
            rates[workers] = images_per_second(
                root, workers, args.batch_size, args.image_size, device, args.epochs
            )
            console.print(f"{workers} workers: {rates[workers]:.0f} images/s")
    per_core = {w: rate / max(1, w) for w, rate in rates.items()}
    # the rate per core of the most workers measured: what a loaded GPU process sees
    best = per_core[max(rates)]
    cores = args.gpu_images_per_second / best
    estimated = args.gpu_images_per_second == ESTIMATED_GPU_IMAGES_PER_SECOND
    table = Table(
        title=f"adasap's image-folder loader: {args.width}x{args.height} JPEGs (mean "
        f"{mean_bytes / 1024:.0f} KiB) -> RandomResizedCrop {args.image_size} + flip, batch "
        f"{args.batch_size}, to {device}; {os.cpu_count()} cores"
    )
    for column in ("workers", "images/s", "images/s per core"):
        table.add_column(column, justify="right")
    for workers in args.workers:
        table.add_row(str(workers), f"{rates[workers]:.0f}", f"{per_core[workers]:.0f}")
    console.print(table)
    console.print(
        f"A GPU training at {args.gpu_images_per_second:.0f} images/s needs about "
        f"{math.ceil(cores)} cores of loading ({best:.0f} images/s per core, {max(rates)} "
        f"workers)" + (" [the GPU rate is an estimate]" if estimated else "")
    )
    record = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "device": str(device),
        },
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "mean_jpeg_bytes": mean_bytes,
        "images_per_second": {str(w): r for w, r in rates.items()},
        "images_per_second_per_core": {str(w): r for w, r in per_core.items()},
        "cores_per_gpu": cores,
        "gpu_images_per_second_is_an_estimate": estimated,
    }
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"results: {args.json}")
    return record


if __name__ == "__main__":
    main()
