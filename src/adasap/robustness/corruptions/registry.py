"""The corruption registry: one ``Corruption`` record per name, and the name lists derived from it.

A corruption is registered once, next to its function, with :func:`register_corruption`; the
lists the rest of adasap uses (``CORRUPTIONS``, ``CATEGORIES``, ``PARAM_TABLES``, ...) are
computed from the registry, ordered by family (:data:`FAMILIES`) and then by registration, so
they never disagree with each other and a new corruption never reorders the existing ones.

A held-out family (``held_out=True``, e.g. the ImageNet-C-bar corruptions of ``cbar``) is neither
benchmark nor extra: it is left out of ``CORRUPTIONS`` and every list derived from it, and is
evaluated only when asked for by name (``HELD_OUT_CORRUPTIONS``, ``get_corruption_names("cbar")``),
so it can serve for tuning while the benchmark stays untouched.
"""

from __future__ import annotations

import ctypes
import mmap
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from adasap.errors import UserError, quote
from adasap.registry import Registry

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

_REPO = "https://github.com/hendrycks/robustness/blob"
_CREATE_C = "ImageNet-C/create_c"
# The parameter tables, one per image-size class, are copied from these scripts.
PARAM_TABLE_SOURCES: dict[str, str] = {
    "imagenet": f"{_REPO}/e0377d46411fa30c01a9559017bdb6a5f78d4abf/{_CREATE_C}/make_imagenet_c.py",
    "tinyimagenet": (
        f"{_REPO}/7a64e6a188082e666f200dc1b9762cfb5cdf8fe8/{_CREATE_C}/make_tinyimagenet_c.py"
    ),
    "cifar": f"{_REPO}/ca360085d57889288c4143fddd8a707bbcae01bd/{_CREATE_C}/make_cifar_c.py",
}
# Image side each table was made for; elastic_transform's pixel lengths scale from it.
PARAM_TABLE_SIZES: dict[str, int] = {"imagenet": 224, "tinyimagenet": 64, "cifar": 32}
PARAM_CHOICES: tuple[str, ...] = ("auto", *PARAM_TABLE_SOURCES)
# The order of categories in every list and report; a new family goes after these.
FAMILIES: tuple[str, ...] = ("noise", "blur", "weather", "digital")

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


# --------------------------------------------------------------------------- what a function gets

# Linux's MADV_HUGEPAGE; buffers from this size up are worth huge pages (numpy uses 4 MiB too).
_MADV_HUGEPAGE = 14
_HUGE_BYTES = 4 << 20


def _load_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _load_madvise()


def empty_batch(shape: Sequence[int], device: torch.device | str) -> Tensor:
    """An uninitialised float32 tensor; a big CPU one asks Linux for transparent huge pages.

    A 64-image batch at 224 px is 38 MB: where THP is "madvise" (the usual default) torch gets
    4 KiB pages, and faulting them in on first write cost 3x the whole work of a cheap
    corruption (0.34 against 0.11 ms per image with huge pages). numpy asks the same for its
    big arrays. The advice is only a hint: where it is refused nothing changes.
    """
    out = torch.empty(*shape, device=device)
    size = out.numel() * out.element_size()
    if _MADVISE is not None and out.device.type == "cpu" and size >= _HUGE_BYTES:
        page = mmap.PAGESIZE
        start = -(-out.data_ptr() // page) * page
        _MADVISE(start, (out.data_ptr() + size) // page * page - start, _MADV_HUGEPAGE)
    return out


class RandomSource:
    """Draws from one generator, then moves the numbers to the images' device.

    With a CPU generator (what ``seed=`` makes) CPU and CUDA runs draw identical numbers.
    """

    def __init__(self, generator: torch.Generator, device: torch.device) -> None:
        self.generator = generator
        self.device = device
        self.source = generator.device

    def normal(self, shape: Sequence[int], mean: float = 0.0, std: float = 1.0) -> Tensor:
        z = empty_batch(shape, self.source)
        return z.normal_(mean, std, generator=self.generator).to(self.device)

    def uniform(self, shape: Sequence[int], low: float = 0.0, high: float = 1.0) -> Tensor:
        u = empty_batch(shape, self.source).uniform_(0, 1, generator=self.generator)
        return u.to(self.device).mul_(high - low).add_(low)

    def integers(self, low: int, high: int, shape: Sequence[int]) -> Tensor:
        """Integers in [low, high)."""
        r = torch.randint(low, high, tuple(shape), generator=self.generator, device=self.source)
        return r.to(self.device)

    def poisson(self, rates: Tensor) -> Tensor:
        return torch.poisson(rates.to(self.source), generator=self.generator).to(self.device)


@dataclass(frozen=True)
class CorruptionContext:
    """What a corruption function gets besides the images and its parameter row."""

    rng: RandomSource
    table: str

    def length_scale(self, height: int, width: int) -> float:
        """How much longer a pixel length is here than at the table's reference size."""
        return min(height, width) / PARAM_TABLE_SIZES[self.table]


CorruptionFunction = Callable[..., Tensor]
# draw(x, row, ctx) -> per-image random tensors (first dimension = batch size).
DrawFunction = Callable[[Tensor, Any, CorruptionContext], tuple[Tensor, ...]]


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Corruption:
    """One registered corruption.

    ``function(x, row, ctx)`` gets a float32 NCHW batch in [0, 1] (never empty), the parameter
    row for the severity (``params[table][severity - 1]``) and a :class:`CorruptionContext`; it
    returns a batch of the same shape (``corrupt`` clamps it to [0, 1]; a uint8 batch is taken
    as levels 0..255 and divided by 255, which saves a decoded JPEG a float pass). With a ``draw``,
    ``draw(x, row, ctx)`` makes all the random numbers for the whole batch first, and
    ``function(x, row, ctx, *draws)`` gets them sliced like ``x``. A corruption that draws
    nothing or draws through ``draw`` may be run on the CPU in chunks of a few images, so its
    output for one image must not depend on the other images of the batch.
    """

    name: str
    family: str
    benchmark: bool
    deterministic: bool
    params: Mapping[str, tuple[Any, ...]]
    function: CorruptionFunction
    held_out: bool = False
    draw: DrawFunction | None = None
    # Where each table's rows come from (default: PARAM_TABLE_SOURCES).
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType(PARAM_TABLE_SOURCES)
    )


_REGISTRY: Registry[Corruption] = Registry("corruption")


def _check_params(name: str, params: Mapping[str, Sequence[Any]]) -> dict[str, tuple[Any, ...]]:
    if not isinstance(params, Mapping) or set(params) != set(PARAM_TABLE_SOURCES):
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise UserError(
            f"corruption {name!r}: params must map each table ({', '.join(PARAM_TABLE_SOURCES)}) "
            f"to its {len(SEVERITIES)} severity rows, got {got}"
        )
    for table in PARAM_TABLE_SOURCES:
        table_rows = params[table]
        if isinstance(table_rows, str | bytes) or not isinstance(table_rows, Sequence):
            table_rows = (table_rows,)
        if len(table_rows) != len(SEVERITIES):
            raise UserError(
                f"corruption {name!r}: params[{table!r}] must have one row per severity "
                f"{SEVERITIES}, got {len(table_rows)} rows"
            )
    return {table: tuple(params[table]) for table in PARAM_TABLE_SOURCES}


def register_corruption(
    name: str,
    *,
    family: str,
    params: Mapping[str, Sequence[Any]],
    deterministic: bool,
    benchmark: bool = False,
    held_out: bool = False,
    sources: Mapping[str, str] | None = None,
    draw: DrawFunction | None = None,
) -> Callable[[CorruptionFunction], CorruptionFunction]:
    """Register the decorated function as corruption ``name``; returns it unchanged.

    Args:
        name: lower-case identifier, unique among the corruptions.
        family: its category ("noise", "blur", "weather", "digital", or a new one).
        params: one tuple of 5 severity rows per size class: "imagenet", "tinyimagenet",
            "cifar" (the built-in rows are copied from ``PARAM_TABLE_SOURCES``). A row is
            whatever the function takes as its parameter.
        deterministic: True when the function draws no random numbers.
        benchmark: True only for the 15 ImageNet-C corruptions that make up the headline mean;
            everything else is reported as an extra.
        held_out: True for a family kept apart from benchmark and extras (e.g. "cbar"): it is
            not in ``CORRUPTIONS`` and is evaluated only when named. Excludes ``benchmark``.
        sources: where each table's rows come from (a URL per table); defaults to
            ``PARAM_TABLE_SOURCES``. Render-cache manifests record it.
        draw: for a random corruption, ``draw(x, row, ctx)`` returning its random tensors for
            the whole batch (first dimension = images), which ``function`` then takes after
            ``ctx``; ``function`` must not draw itself. Lets ``corrupt`` run the function in
            cache-sized chunks on the CPU with the same numbers as in one piece.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise UserError(f"corruption name {name!r} must be a lower-case identifier, e.g. 'haze'")
    if not isinstance(family, str) or not _NAME_PATTERN.match(family):
        raise UserError(
            f"corruption {name!r}: family {family!r} must be a lower-case identifier, e.g. 'noise'"
        )
    rows = _check_params(name, params)
    if benchmark and held_out:
        raise UserError(
            f"corruption {name!r}: a held-out corruption cannot be a benchmark one: "
            "pass benchmark=True or held_out=True, not both"
        )
    if draw is not None and (deterministic or not callable(draw)):
        raise UserError(
            f"corruption {name!r}: draw= is for random corruptions: pass a function and "
            "deterministic=False"
        )
    if sources is not None and (
        not isinstance(sources, Mapping) or set(sources) != set(PARAM_TABLE_SOURCES)
    ):
        raise UserError(
            f"corruption {name!r}: sources must map each table ({', '.join(PARAM_TABLE_SOURCES)}) "
            "to where its rows come from"
        )

    def register(function: CorruptionFunction) -> CorruptionFunction:
        if not callable(function):
            raise UserError(f"corruption {name!r}: register a function, got {function!r}")
        # Users register corruptions of their own: a clash is theirs to fix, so a UserError
        # rather than the registry's ValueError.
        if name in _REGISTRY:
            raise UserError(f"corruption {name!r} is already registered: choose another name")
        _REGISTRY.add(
            name,
            Corruption(
                name=name,
                family=family,
                benchmark=bool(benchmark),
                deterministic=bool(deterministic),
                params=MappingProxyType(rows),
                function=function,
                held_out=bool(held_out),
                sources=MappingProxyType(dict(sources or PARAM_TABLE_SOURCES)),
                draw=draw,
            ),
        )
        return function

    return register


def get_corruption(name: str) -> Corruption:
    """The registered corruption ``name``; an unknown name is a :class:`UserError`."""
    try:
        return _REGISTRY.get(name)
    except UserError:
        # The choices in report order (benchmark, extras, held out), not registration order.
        known = ", ".join((*corruptions(), *held_out_corruptions()))
        raise UserError(f"unknown corruption {quote(name)}: choose one of {known}") from None


# --------------------------------------------------------------------------- derived lists


def _in_report_order() -> list[Corruption]:
    """By family (FAMILIES, then new families as first registered), then registration order."""
    entries = [_REGISTRY.get(name) for name in _REGISTRY]
    registered = dict.fromkeys(c.family for c in entries)
    families = [*FAMILIES, *(family for family in registered if family not in FAMILIES)]
    return sorted(entries, key=lambda c: families.index(c.family))


def categories() -> dict[str, tuple[str, ...]]:
    """Benchmark corruptions by family."""
    grouped: dict[str, list[str]] = {}
    for corruption in _in_report_order():
        if corruption.benchmark:
            grouped.setdefault(corruption.family, []).append(corruption.name)
    return {family: tuple(names) for family, names in grouped.items()}


def benchmark_corruptions() -> tuple[str, ...]:
    return tuple(c.name for c in _in_report_order() if c.benchmark)


def extra_corruptions() -> tuple[str, ...]:
    return tuple(c.name for c in _in_report_order() if not (c.benchmark or c.held_out))


def corruptions() -> tuple[str, ...]:
    """The benchmark corruptions, then the extras; held-out families are not included."""
    return benchmark_corruptions() + extra_corruptions()


def held_out_corruptions() -> tuple[str, ...]:
    """Every corruption of a held-out family, by family, then registration order."""
    return tuple(c.name for c in _in_report_order() if c.held_out)


def held_out_families() -> dict[str, tuple[str, ...]]:
    """Held-out corruptions by family (e.g. "cbar")."""
    grouped: dict[str, list[str]] = {}
    for name in held_out_corruptions():
        grouped.setdefault(_REGISTRY.get(name).family, []).append(name)
    return {family: tuple(names) for family, names in grouped.items()}


def category_of() -> dict[str, str]:
    return {name: _REGISTRY.get(name).family for name in corruptions()}


def deterministic_corruptions() -> tuple[str, ...]:
    return tuple(name for name in corruptions() if _REGISTRY.get(name).deterministic)


def param_tables() -> dict[str, dict[str, tuple[Any, ...]]]:
    """Severity rows by table, then corruption."""
    return {
        table: {name: _REGISTRY.get(name).params[table] for name in corruptions()}
        for table in PARAM_TABLE_SOURCES
    }


def get_corruption_names(subset: str = "benchmark") -> tuple[str, ...]:
    """Names in ``subset``.

    "benchmark" (the 15), "extra" (the 4), "all" (those 19), a category name, "held_out" (every
    held-out family) or the name of a held-out family, e.g. "cbar".
    """
    subsets = {
        "benchmark": benchmark_corruptions(),
        "extra": extra_corruptions(),
        "all": corruptions(),
        **categories(),
        "held_out": held_out_corruptions(),
        **held_out_families(),
    }
    if subset not in subsets:
        raise UserError(
            f"unknown corruption subset {quote(subset)}: choose one of {', '.join(subsets)}"
        )
    return subsets[subset]


# --------------------------------------------------------------------------- tables by size


def select_param_table(height: int, width: int) -> str:
    """The table "auto" picks: "cifar" up to 48 px, "tinyimagenet" up to 128, else "imagenet".

    The shorter side decides, so a 32x400 strip still gets the small-image parameters.
    """
    side = min(height, width)
    if side <= 48:
        return "cifar"
    if side <= 128:
        return "tinyimagenet"
    return "imagenet"


def resolve_param_table(params: str, height: int, width: int) -> str:
    """Check ``params`` ("auto" or a table name) and return the table it means for this size."""
    if params not in PARAM_CHOICES:
        raise UserError(
            f"unknown parameter table {quote(params)}: choose one of {', '.join(PARAM_CHOICES)}"
        )
    return select_param_table(height, width) if params == "auto" else params
