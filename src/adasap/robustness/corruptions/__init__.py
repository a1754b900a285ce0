"""The ImageNet-C / CIFAR-10-C common corruptions as batched torch functions, and a render cache.

Also the held-out family ``cbar`` (ImageNet-C-bar / CIFAR-10-C-bar, ``CBAR_CORRUPTIONS``), kept
out of ``CORRUPTIONS`` and evaluated only when named: a tuning signal apart from the benchmark.

Every corruption takes a float NCHW batch in [0, 1] (1 or 3 channels, any size from 8 px) on any
device and returns a batch of the same shape, dtype and device. Severity parameters are the
published tables of hendrycks/robustness (ImageNet-C, Tiny-ImageNet-C, CIFAR-10-C), picked by
image size or by name. Randomness comes only from an explicit ``torch.Generator``.

Layout: ``registry`` (the ``Corruption`` records and :func:`register_corruption`), one module per
family (``noise``, ``blur``, ``weather``, ``digital``; ``cbar`` and ``cbar_warps`` for the
held-out family), ``image_ops`` (shared filters, padding, resampling), ``opencv_ops`` (spatter's
OpenCV operations), ``apply`` (:func:`corrupt`) and ``render_cache`` (:func:`render_cached`).
``CORRUPTIONS``, ``CATEGORIES``, ``PARAM_TABLES`` and the other lists are derived from the
registry on every access, so a newly registered corruption is in them at once.

Where we differ from the reference code by design (procedural frost texture, vectorised glass-blur
shuffle, torch motion blur instead of ImageMagick, ...) is listed in ``docs/corruptions.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

# Importing the family modules registers their corruptions.
from adasap.robustness.corruptions import (  # noqa: F401
    blur,
    cbar,
    cbar_warps,
    digital,
    noise,
    weather,
)
from adasap.robustness.corruptions import registry as _registry
from adasap.robustness.corruptions.apply import corrupt
from adasap.robustness.corruptions.cbar import CBAR_FAMILY, CBAR_LEVEL_SOURCES
from adasap.robustness.corruptions.image_ops import to_uint8
from adasap.robustness.corruptions.registry import (
    FAMILIES,
    PARAM_CHOICES,
    PARAM_TABLE_SIZES,
    PARAM_TABLE_SOURCES,
    SEVERITIES,
    Corruption,
    CorruptionContext,
    RandomSource,
    get_corruption,
    get_corruption_names,
    register_corruption,
    resolve_param_table,
    select_param_table,
)
from adasap.robustness.corruptions.render_cache import (
    RENDER_VERSION,
    default_cache_dir,
    image_fingerprint,
    render_cached,
)
from adasap.robustness.corruptions.weather import FROST_TEXTURE_SCALES

if TYPE_CHECKING:
    CATEGORIES: dict[str, tuple[str, ...]]
    BENCHMARK_CORRUPTIONS: tuple[str, ...]
    EXTRA_CORRUPTIONS: tuple[str, ...]
    CORRUPTIONS: tuple[str, ...]
    CATEGORY_OF: dict[str, str]
    DETERMINISTIC_CORRUPTIONS: tuple[str, ...]
    HELD_OUT_CORRUPTIONS: tuple[str, ...]
    CBAR_CORRUPTIONS: tuple[str, ...]
    PARAM_TABLES: dict[str, dict[str, tuple[Any, ...]]]

_DERIVED: dict[str, Callable[[], Any]] = {
    "CATEGORIES": _registry.categories,
    "BENCHMARK_CORRUPTIONS": _registry.benchmark_corruptions,
    "EXTRA_CORRUPTIONS": _registry.extra_corruptions,
    "CORRUPTIONS": _registry.corruptions,
    "CATEGORY_OF": _registry.category_of,
    "DETERMINISTIC_CORRUPTIONS": _registry.deterministic_corruptions,
    "HELD_OUT_CORRUPTIONS": _registry.held_out_corruptions,
    "CBAR_CORRUPTIONS": lambda: _registry.held_out_families().get(CBAR_FAMILY, ()),
    "PARAM_TABLES": _registry.param_tables,
}


def __getattr__(name: str) -> Any:
    if name in _DERIVED:
        return _DERIVED[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_DERIVED])


__all__ = [
    "BENCHMARK_CORRUPTIONS",
    "CATEGORIES",
    "CATEGORY_OF",
    "CBAR_CORRUPTIONS",
    "CBAR_FAMILY",
    "CBAR_LEVEL_SOURCES",
    "CORRUPTIONS",
    "DETERMINISTIC_CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "FAMILIES",
    "FROST_TEXTURE_SCALES",
    "HELD_OUT_CORRUPTIONS",
    "PARAM_CHOICES",
    "PARAM_TABLES",
    "PARAM_TABLE_SIZES",
    "PARAM_TABLE_SOURCES",
    "RENDER_VERSION",
    "SEVERITIES",
    "Corruption",
    "CorruptionContext",
    "RandomSource",
    "corrupt",
    "default_cache_dir",
    "get_corruption",
    "get_corruption_names",
    "image_fingerprint",
    "register_corruption",
    "render_cached",
    "resolve_param_table",
    "select_param_table",
    "to_uint8",
]
