"""The flags of ``adasap run``, ``train`` and ``eval``: one table of (flag, config key, help).

A flag's type comes from the config schema and its default from ``ExperimentConfig``, so a new
config key needs one line here to get a flag (docs/architecture.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from adasap.deploy.runtimes import RUNTIMES
from adasap.experiments.config import SCHEMA, ExperimentConfig
from adasap.method.importance import criteria
from adasap.method.pruner import METHODS
from adasap.settings import quote

DEFAULTS = ExperimentConfig().to_flat()
# seeds, limits and sizes reach torch and numpy as 64-bit integers
MAX_INT = 2**63 - 1

# (flag, config key, help); the type comes from the config schema
RUN_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--task", "task", "classification, or detection (own defaults: README, Detection)"),
    ("--dataset", "dataset", "fashion-mnist, mnist, cifar10, cifar100, digits, synthetic or "
                             "imagefolder:<path>; detection: canvas, voc[:<year>+<year>] or "
                             "coco[:<train split>,<test split>]"),
    ("--data-dir", "data_dir", "where the dataset's files are (voc: the folder holding "
                               "VOCdevkit/; coco: annotations/ and the split folders)"),
    ("--model", "model", "resnet20/32/56, a torchvision classifier or timm:<name>"),
    ("--methods", "methods", f"pruning methods to compare: {', '.join(METHODS)}"),
    ("--criterion", "criterion", f"neuron importance: {', '.join(criteria())}"),
    ("--keep", "keep", "fraction of the dense size to keep, in (0, 1]"),
    ("--keep-kind", "keep_kind", "what --keep counts: params, macs or latency (measured here)"),
    ("--train-limit", "train_limit", "training images to use ('none' for all)"),
    ("--test-limit", "test_limit", "test images to use ('none' for all)"),
    ("--corruption-limit", "corruption_limit", "test images to corrupt ('none' for all)"),
    ("--corruptions", "corruptions", "all (19 x 5), quick (2 x 5) or none"),
    ("--dense-epochs", "dense_epochs", "epochs to train the dense model"),
    ("--dense-lr", "dense_lr", "learning rate of dense training"),
    ("--warmup-epochs", "warmup_epochs", "phase 1: adaptive warm-up"),
    ("--prune-epochs", "prune_epochs", "phase 2: neuron removal"),
    ("--finetune-epochs", "finetune_epochs", "phase 3: uniform sharpness-aware fine-tuning"),
    ("--prune-steps", "prune_steps", "removal steps spread over phase 2"),
    ("--batch-size", "batch_size", "training batch size"),
    ("--base-optimizer", "base_optimizer", "the optimizer SAM/AdaSAP wrap: any torch.optim "
                                           "class by name (sgd, adamw ...)"),
    ("--lr", "lr", "peak learning rate of the pruning phases"),
    ("--rho", "rho", "uniform SAM radius (phase 3 and the sam method)"),
    ("--finetune-sharpness", "finetune_sharpness", "phase 3 (fine-tuning) of adasap, sam and "
                                                   "sgd-sam: asam, sam, or none (as --asam)"),
    ("--finetune-rho", "finetune_rho", "phase 3's radius (none: --rho, or 2.0 for ASAM after SAM)"),
    ("--rho-min", "rho_min", "AdaSAP radius of the most important neurons"),
    ("--rho-max", "rho_max", "AdaSAP radius of the least important neurons"),
    ("--normalization", "normalization", "AdaSAP perturbation normalisation: global, neuron "
                                         "or neuron-scaled (docs/method.md)"),
    ("--score-refresh", "score_refresh", "steps between AdaSAP radius updates"),
    ("--sam-probability", "sam_probability", "cheaper SAM (RST): the chance that a step is "
                                             "sharpness-aware; otherwise a plain step"),
    ("--sam-probability-end", "sam_probability_end", "move --sam-probability linearly to this "
                                                     "over training ('none': constant)"),
    ("--sam-every", "sam_every", "cheaper SAM (LookSAM): the ascent every k-th step; the steps "
                                 "between reuse its direction in one pass"),
    ("--looksam-alpha", "looksam_alpha", "weight of the reused LookSAM direction"),
    ("--ascent-fraction", "ascent_fraction", "cheaper SAM: the first (ascent) pass on this "
                                             "fraction of the batch"),
    ("--distill-weight", "distill_weight", "distil from the dense model: the teacher's share "
                                           "of the loss in [0, 1] (0: off)"),
    ("--distill-temperature", "distill_temperature", "the distillation's softmax temperature"),
    ("--distill-from", "distill_from", "the first distilled phase (warmup, prune or finetune), "
                                       "through to the end"),
    ("--round-to", "round_to", "keep channel counts that are multiples of this, or auto: "
                               "what suits --runtime (16 for ort)"),
    ("--runtime", "runtime", f"where the models are deployed and timed (the speed table; what "
                             f"--round-to auto suits): {', '.join(RUNTIMES.names())}"),
    ("--trace-seconds", "trace_seconds", "the time each trace and group search may take "
                                         "before a one-line refusal ('none': no limit)"),
    ("--trace-memory-gib", "trace_memory_gib", "the memory growth (GiB) each trace and group "
                                               "search may take ('none': no limit)"),
    ("--seed", "seed", "random seed"),
    ("--device", "device", "auto, cpu or cuda[:N]"),
    ("--workers", "workers", "loader processes per training process for image folders "
                             "('none': the machine's cores shared by its processes, at most 8)"),
    ("--amp", "amp", "mixed precision: auto (fp16 on CUDA, bf16 on a CPU with native bf16), "
                     "bf16, fp16 or off"),
    ("--out", "out_dir", "parent folder of run directories"),
    ("--name", "name", "run directory name (default: date-dataset-model)"),
    ("--cache-dir", "cache_dir", "dense models and corrupted test sets (default ~/.cache/adasap)"),
    ("--image-size", "image_size", "detection: the detector's input side (and the canvases')"),
)  # fmt: skip
RUN_SWITCHES: tuple[tuple[str, str, bool, str], ...] = (
    ("--asam", "asam", True, "scale-invariant (ASAM) perturbations (phase 3: see --finetune-*)"),
    ("--sync-ascent", "sync_ascent", True, "torchrun: average the ascent gradient over the ranks"),
    (
        "--sync-bn",
        "sync_bn",
        True,
        "torchrun on GPUs: SyncBatchNorm (statistics of the global batch)",
    ),
    ("--compile", "compile", True, "torch.compile the model (compiled again after removals)"),
    (
        "--int8",
        "int8",
        True,
        "after the methods: every model quantized to INT8 (ONNX Runtime, "
        "calibrated on training images), evaluated and timed",
    ),
    ("--overwrite", "overwrite", True, "replace an existing run directory of the same name"),
    ("--no-progress", "progress", False, "no progress bars"),
)


TRAIN_KEYS = {
    "dataset", "data_dir", "model", "train_limit", "test_limit", "dense_epochs", "dense_lr",
    "batch_size", "seed", "device", "out_dir", "name", "cache_dir", "overwrite", "progress",
    "compile", "amp", "workers", "sync_bn",
}  # fmt: skip


EVAL_KEYS = {
    "dataset", "data_dir", "test_limit", "corruptions", "corruption_limit", "seed", "device",
    "cache_dir", "progress", "workers",
}  # fmt: skip


def _parse_value(key: str):
    types = SCHEMA[key]

    def parse(text: str) -> Any:
        if type(None) in types and text.lower() in ("none", "null", "all"):
            return None
        for t in (int, float):
            if t in types:
                if t is int:
                    # a key that also takes a word (round_to: auto) gets the word; the
                    # config's type check names the words it takes
                    words = [t for t in types if t not in (int, float, type(None))]
                    if words and not text.lstrip("+-").isdigit():
                        return text
                    return integer(text, "{} is not an integer")
                try:
                    return float(text)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"{quote(text)} is not a number") from None
        return text

    return parse


def integer(text: str, invalid: str = "invalid int value: {}") -> int:
    """An integer flag's value within :data:`MAX_INT`; one short line for anything else (the
    text, however long, quoted short: ``int`` refuses over 4300 digits with a long message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(invalid.format(quote(text))) from None
    if abs(value) > MAX_INT:
        raise argparse.ArgumentTypeError(f"{quote(text)} is too large: at most {MAX_INT}")
    return value


def add_options(
    parser: argparse.ArgumentParser,
    options: Iterable[tuple[str, str, str]],
    switches: Iterable[tuple[str, str, bool, str]],
) -> None:
    """Add the flags of ``options`` and ``switches`` (entries of the tables above) to ``parser``;
    an unset flag stays out of the namespace, so the YAML file and the defaults show through."""
    for flag, key, text in options:
        default = DEFAULTS[key]
        shown = " ".join(default) if isinstance(default, list) else default
        parser.add_argument(
            flag,
            dest=key,
            default=argparse.SUPPRESS,
            nargs="+" if key == "methods" else None,
            type=None if key == "methods" else _parse_value(key),
            help=f"{text} (default: {shown})",
        )
    for flag, key, value, text in switches:
        action = "store_true" if value else "store_false"
        parser.add_argument(flag, dest=key, action=action, default=argparse.SUPPRESS, help=text)
