"""Throughput of adasap's batched corruptions on the CPU, next to PyPI ``imagecorruptions``.

    .venv/bin/python benchmarks/bench_corruptions.py [--threads 1] [--clock cpu] [--batch 64]

Times the 15 benchmark corruptions at severity 3 with ImageNet-C parameters on 32 px and 224 px
images, in images per second. When ``imagecorruptions`` is importable (it is optional:
``pip install imagecorruptions 'setuptools<81'``), it is timed on the same images, the speed-up
is printed, and for each corruption without randomness the PSNR between both outputs at
severities 1..5 is reported. imagecorruptions 1.1.2 needs shims for current numpy and
scikit-image (``np.float_``, ``multichannel=``); they are applied to that package at import.

``--threads N`` gives both sides N threads (torch; OpenCV and BLAS/OpenMP for the reference,
whose numpy, scipy and Pillow calls are single-threaded): ``--threads 1`` is the fair comparison.
Both sides are timed as the best of repeated runs; ``--clock cpu`` times this process's CPU time
instead of the wall clock, which on a shared machine leaves out the time spent waiting for a
core (with one thread per side it is the work done).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adasap.robustness.corruptions import (
    BENCHMARK_CORRUPTIONS,
    DETERMINISTIC_CORRUPTIONS,
    SEVERITIES,
    corrupt,
    to_uint8,
)

DESIGN_DIFFERENCES = {
    "frost": "procedural ice textures matched to the reference photos' colour statistics",
    "glass_blur": "vectorised local shuffle (jittered row/column sort) calibrated to the "
    "reference's sequential swap loop",
    "motion_blur": "ImageMagick's one-sided Gaussian taps in torch (random angle per image)",
    "snow": "as motion_blur for the flakes",
    "elastic_transform": "hendrycks' affine + smooth displacement; imagecorruptions 1.1.2 uses "
    "its own formulation without the affine part",
    "zoom_blur": "centre trim as in hendrycks (imagecorruptions keeps the top-left corner)",
    "pixelate": "BOX upscaling as in hendrycks (imagecorruptions uses NEAREST)",
    "all": "uint8 output rounds (the references truncate); randomness from torch.Generator",
}


def load_reference() -> Callable[..., np.ndarray] | None:
    """imagecorruptions' ``corrupt`` with compatibility shims, or None when not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import imagecorruptions
            import imagecorruptions.corruptions as module
            from skimage import filters
    except ImportError:
        return None
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # removed in NumPy 2, used by its plasma_fractal
    gaussian = filters.gaussian

    def gaussian_shim(image: np.ndarray, *args: Any, multichannel: bool = False, **kw: Any):
        # scikit-image 0.19 renamed multichannel=True to channel_axis=-1.
        if multichannel:
            kw["channel_axis"] = -1
        return gaussian(image, *args, **kw)

    module.gaussian = gaussian_shim
    return imagecorruptions.corrupt


def sample_images(n: int, size: int) -> torch.Tensor:
    """``n`` photos from scikit-image's sample data (or smooth random images), resized."""
    try:
        from skimage import data

        photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
        base = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in photos]
    except ImportError:
        g = torch.Generator().manual_seed(0)
        base = [F.interpolate(torch.rand(1, 3, 8, 8, generator=g), 256)[0] for _ in range(4)]
    out = []
    for i in range(n):
        img = base[i % len(base)]
        h, w = img.shape[-2:]
        # Crops from 100% down to 50% of the photo, so a big batch has no repeated images.
        side = int(min(h, w) * (1 - ((i // len(base)) % 32) / 64))
        top, left = (h - side) // 2, (w - side) // 2
        crop = img[None, :, top : top + side, left : left + side]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0])
    return to_uint8(torch.stack(out).clamp(0, 1)).float() / 255


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(fn: Callable[[], Any], min_total: float = 0.5, clock: str = "wall") -> float:
    """Best time of one call, repeating until ``min_total`` seconds have been spent."""
    now = CLOCKS[clock]
    best, spent = math.inf, 0.0
    while spent < min_total or best == math.inf:
        start = now()
        fn()
        took = now() - start
        best, spent = min(best, took), spent + took
    return best


def set_threads(threads: int | None) -> None:
    """Give torch, and OpenCV and BLAS/OpenMP (the reference's), ``threads`` threads each."""
    if not threads:
        return
    torch.set_num_threads(threads)
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:
        pass


def reference_threads() -> str:
    """The threads the reference's libraries may use, as a phrase."""
    parts = []
    try:
        import cv2

        parts.append(f"OpenCV {cv2.getNumThreads()}")
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info

        pools = {pool["internal_api"]: pool["num_threads"] for pool in threadpool_info()}
        parts += [f"{api} {count}" for api, count in sorted(pools.items())]
    except ImportError:
        pass
    listed = ", ".join(parts) or "no thread pools found"
    return f"{listed}; its numpy, scipy and Pillow calls run on one thread"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def time_size(size: int, args: argparse.Namespace, reference: Callable | None) -> None:
    """Print images per second of every benchmark corruption at one image size."""
    images = sample_images(args.batch, size)
    arrays = to_uint8(images).permute(0, 2, 3, 1).numpy()
    print(f"\n{size} px, batch {args.batch}: images per second")
    print(f"{'corruption':18s} {'adasap':>10s} {'reference':>10s} {'speed-up':>9s}")
    ours_total = ref_total = 0.0
    for name in BENCHMARK_CORRUPTIONS:
        corrupt(images[:2], name, args.severity, params="imagenet")  # warm caches
        run = partial(corrupt, images, name, args.severity, params="imagenet")
        ours = best_time(run, clock=args.clock) / len(images)
        ours_total += ours
        line = f"{name:18s} {1 / ours:10.1f}"
        if reference is not None:
            # glass_blur takes about a second per 224 px image in the reference: one run of two.
            slow = name == "glass_blur"
            count = min(args.reference_images, len(arrays), 2 if slow else 10**9)
            run = partial(run_reference, reference, arrays[:count], name, args.severity)
            run()  # warm caches, as for adasap
            ref = best_time(run, min_total=0.0 if slow else 0.5, clock=args.clock) / count
            ref_total += ref
            line += f" {1 / ref:10.1f} {ref / ours:8.1f}x"
        print(line)
    line = f"{'all 15 in turn':18s} {1 / ours_total:10.1f}"
    if reference is not None:
        line += f" {1 / ref_total:10.1f} {ref_total / ours_total:8.1f}x"
    print(line)


def run_reference(reference: Callable, arrays: np.ndarray, name: str, severity: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for array in arrays:
            reference(array, corruption_name=name, severity=severity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="images per adasap call")
    parser.add_argument("--reference-images", type=int, default=8, help="images for the reference")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for both sides (default: all cores)"
    )
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall clock or process CPU time"
    )
    args = parser.parse_args()
    reference = load_reference()
    set_threads(args.threads)  # after the reference's imports, which start its thread pools
    print(f"torch {torch.__version__}; severity {args.severity}, {args.clock} clock,")
    print("ImageNet-C parameters for both libraries (the reference knows no others).")
    print(f"threads: adasap {torch.get_num_threads()} (torch)", end="")
    if reference is None:
        print("\nimagecorruptions is not installed: timing adasap only.")
    else:
        print(f"; imagecorruptions: {reference_threads()}")

    for size in args.sizes:
        time_size(size, args, reference)

    if reference is None:
        return
    images = sample_images(args.reference_images, 224)
    arrays = to_uint8(images).permute(0, 2, 3, 1).numpy()
    print("\nPSNR (dB) against imagecorruptions at 224 px, corruptions without randomness")
    print(f"{'corruption':18s} " + " ".join(f"{'s' + str(s):>6s}" for s in SEVERITIES))
    for name in DETERMINISTIC_CORRUPTIONS:
        row = []
        for s in SEVERITIES:
            ours = to_uint8(corrupt(images, name, s, params="imagenet")).permute(0, 2, 3, 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = np.stack([reference(a, corruption_name=name, severity=s) for a in arrays])
            row.append(psnr(ours.numpy(), ref))
        print(f"{name:18s} " + " ".join(f"{p:6.1f}" for p in row))
    print("\nDesign differences (see docs/corruptions.md):")
    for name, text in DESIGN_DIFFERENCES.items():
        print(f"  {name}: {text}")


if __name__ == "__main__":
    main()
