"""One GPU's training throughput: sgd, sam and adasap steps on ResNet-50, 224 px, 1000 classes.

Each configuration (method x precision x memory layout) builds a fresh torchvision ResNet-50
and a :class:`~adasap.method.pruner.Pruner` in its warm-up phase (the step kind of the
method's first phase: the base optimizer for ``sgd``, uniform SAM for ``sam``, AdaSAP's
per-neuron radii for ``adasap``; no removals), repeats one training step on a fixed synthetic
batch, and reports images/s (warm-up steps excluded, timed between ``torch.cuda.synchronize``
calls) and the peak GPU memory of the steps (``torch.cuda.max_memory_allocated``). It prints a
table and writes JSON with the machine (GPU name, torch and CUDA versions).

    python benchmarks/bench_gpu.py                # the full grid (sized for ~3 min on an H200)
    python benchmarks/bench_gpu.py --quick        # bf16, channels_last only (for < 1 min)
    python benchmarks/bench_gpu.py --device cpu --image-size 64 --batch-size 4 --steps 2
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from adasap.devices import autocast_dtype
from adasap.method.pruner import Pruner
from adasap.method.schedule import PhaseSchedule
from adasap.models.builders import build_model
from adasap.training.loop import autocast_for

METHODS = ("sgd", "sam", "adasap")
AMP_MODES = ("bf16", "fp16", "off")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Config:
    method: str
    amp: str
    channels_last: bool

    def label(self) -> str:
        layout = "channels_last" if self.channels_last else "contiguous"
        return f"{self.method}, {self.amp}, {layout}"


@dataclass
class Measurement:
    config: Config
    images_per_second: float
    seconds_per_step: float
    peak_memory_gib: float | None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    config: Config, device: torch.device, batch_size: int, image_size: int, steps: int, warmup: int
) -> Measurement:
    """Images/s and peak memory of ``steps`` training steps after ``warmup`` untimed ones."""
    torch.manual_seed(0)
    model = build_model(
        "resnet50",
        num_classes=1000,
        in_channels=3,
        image_size=image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ).to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.rand(batch_size, 3, image_size, image_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    dtype = autocast_dtype(config.amp, device)
    # float16 gradients underflow without loss scaling (as adasap's training loop does)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    pruner = Pruner(
        model,
        x[:2],
        PhaseSchedule(warmup + steps, 0, 0, removals=0),
        method=config.method,
        keep=1.0,
        optimizer_kwargs={"lr": 0.1, "momentum": 0.9},
        scaler=scaler,
    )

    def loss() -> torch.Tensor:
        with autocast_for(device, dtype):
            logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=0.1)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):  # cuDNN's algorithm search and the allocator's growth
        pruner.step(loss)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        pruner.step(loss)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Measurement(config, steps * batch_size / seconds, seconds / steps, peak)


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_convolutions=torch.backends.cudnn.allow_tf32,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return info


def table(results: list[Measurement], title: str) -> Table:
    out = Table(title=title)
    for column in ("method", "amp", "layout", "images/s", "ms/step", "peak GiB", "x sgd"):
        out.add_column(column, justify="left" if column in ("method", "amp", "layout") else "right")
    sgd = {
        (m.config.amp, m.config.channels_last): m.images_per_second
        for m in results
        if m.config.method == "sgd"
    }
    for m in results:
        c = m.config
        reference = sgd.get((c.amp, c.channels_last))
        out.add_row(
            c.method,
            c.amp,
            "channels_last" if c.channels_last else "contiguous",
            f"{m.images_per_second:.0f}",
            f"{1000 * m.seconds_per_step:.1f}",
            "-" if m.peak_memory_gib is None else f"{m.peak_memory_gib:.2f}",
            "-" if reference is None else f"{m.images_per_second / reference:.2f}",
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--amp", nargs="+", default=["bf16", "fp16", "off"], choices=AMP_MODES)
    parser.add_argument(
        "--layouts", nargs="+", default=["channels_last", "contiguous"],
        choices=["channels_last", "contiguous"],
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="bf16 and channels_last only, 5 steps (< 1 min)"
    )
    parser.add_argument("--json", default="bench_gpu.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.quick:
        args.amp, args.layouts, args.steps, args.warmup = ["bf16"], ["channels_last"], 5, 2
    if min(args.batch_size, args.image_size, args.steps) < 1 or args.warmup < 0:
        parser.error("batch size, image size and steps must be >= 1, warm-up >= 0")
    return args


def main(argv: list[str] | None = None) -> list[Measurement]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: CUDA is not available: pass --device cpu (small settings)")
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels
    configs = [
        Config(method, amp, layout == "channels_last")
        for amp in args.amp
        for layout in args.layouts
        for method in METHODS
    ]
    console = Console(width=120)
    results = []
    for config in configs:
        results.append(
            measure(config, device, args.batch_size, args.image_size, args.steps, args.warmup)
        )
        console.print(f"{config.label()}: {results[-1].images_per_second:.0f} images/s")
        gc.collect()  # the configuration's model, optimizer state and activations
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info = machine(device)
    title = (
        f"ResNet-50 training steps on {info.get('gpu', info['cpu'])}: {args.image_size} px, "
        f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup}"
    )
    console.print(table(results, title))
    record = {
        "machine": info,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "results": [
            {**asdict(m.config), **{k: v for k, v in asdict(m).items() if k != "config"}}
            for m in results
        ],
    }
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"results: {args.json}")
    return results


if __name__ == "__main__":
    main()
