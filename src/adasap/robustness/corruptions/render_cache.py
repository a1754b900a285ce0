"""The render cache: each corrupted test set is rendered once and stored as uint8.

Methods are compared on identical corrupted images; the manifest next to each file records
everything the render depends on, and a file that does not match it is rendered again.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adasap.errors import UserError
from adasap.io import CacheMiss, atomic_write, atomic_write_json, cache_root, cached, load_json
from adasap.robustness.corruptions.apply import check_images, check_severity, corrupt
from adasap.robustness.corruptions.image_ops import to_uint8
from adasap.robustness.corruptions.registry import (
    get_corruption,
    resolve_param_table,
)

# Bump whenever a corruption's output changes, so older caches are re-rendered.
RENDER_VERSION = 2
_RENDER_CHUNK = 64
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_cache_dir() -> Path:
    """``$ADASAP_CACHE/corruptions``, by default ``~/.cache/adasap/corruptions``.

    ``$ADASAP_CACHE`` is adasap's cache root, shared with the other caches.
    """
    return cache_root() / "corruptions"


def image_fingerprint(images: Tensor) -> str:
    """sha256 of the images as uint8 plus their shape: identifies a clean test set."""
    digest = hashlib.sha256(repr(tuple(images.shape)).encode())
    for start in range(0, images.shape[0], 1024):
        chunk = images[start : start + 1024]
        data = chunk if chunk.dtype == torch.uint8 else to_uint8(chunk)
        digest.update(data.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _chunk_seed(seed: int, chunk: int) -> int:
    """An independent 63-bit seed per render chunk, so the render does not depend on batching."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _load_cached(data_path: Path, manifest_path: Path, expected: dict[str, Any]) -> Tensor | str:
    """The cached images, or why they cannot be used."""
    if not data_path.exists() or not manifest_path.exists():
        return CacheMiss.MISSING
    try:
        manifest = load_json(manifest_path)
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    changed = [k for k, v in expected.items() if manifest.get(k) != v]
    if changed:
        return f"manifest differs in {', '.join(changed)}"
    try:
        data = np.load(data_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        return f"unreadable data ({exc})"
    if list(data.shape) != expected["shape"] or data.dtype != np.uint8:
        return f"data has shape {list(data.shape)} and dtype {data.dtype}"
    if hashlib.sha256(data.tobytes()).hexdigest() != manifest.get("sha256"):
        return "data does not match its sha256"
    return torch.from_numpy(data)


def render_cached(
    images: Tensor,
    dataset_key: str,
    name: str,
    severity: int,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    *,
    params: str = "auto",
    device: torch.device | str | None = None,
    fingerprint: str | None = None,
) -> Tensor:
    """Render ``images`` corrupted, once, and reuse the stored uint8 copy on later calls.

    The result depends only on (images, corruption, severity, seed, parameter table): images
    are rendered in fixed chunks, each with its own generator derived from ``seed``. Files go
    to ``cache_dir/dataset_key/`` as ``.npy`` plus a JSON manifest (corruption, severity, seed,
    table and its parameters, shape, sha256 of the data and of the clean images). A cache whose
    manifest does not match or whose data fails its checksum is re-rendered with a warning.
    Processes that ask for the same render at once render it once (:func:`adasap.io.cached`).

    Args:
        images: clean float NCHW images in [0, 1].
        dataset_key: names the clean set in the cache, e.g. "cifar10-test".
        name, severity, seed, params: as for :func:`corrupt`.
        cache_dir: defaults to :func:`default_cache_dir`.
        device: where to render (default: the images' device).
        fingerprint: :func:`image_fingerprint` of ``images``, if already computed.

    Returns:
        uint8 tensor (N, C, H, W) on the CPU.
    """
    check_images(images)
    corruption = get_corruption(name)
    check_severity(severity)
    if not isinstance(dataset_key, str) or not _KEY_PATTERN.match(dataset_key):
        raise UserError(
            f"dataset key {dataset_key!r} is not a safe folder name: "
            "use letters, digits, '.', '_' and '-', e.g. 'cifar10-test'"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    table = resolve_param_table(params, images.shape[-2], images.shape[-1])
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = folder / dataset_key / f"{name}-s{severity}-seed{seed}-{table}"
    data_path, manifest_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    expected = {
        "format": RENDER_VERSION,
        "dataset_key": dataset_key,
        "corruption": name,
        "severity": int(severity),
        "seed": int(seed),
        "params_table": table,
        "params": json.loads(json.dumps(corruption.params[table][int(severity) - 1])),
        "params_source": corruption.sources[table],
        "shape": list(images.shape),
        "dtype": "uint8",
        "images_sha256": fingerprint or image_fingerprint(images),
    }

    def load() -> Tensor:
        found = _load_cached(data_path, manifest_path, expected)
        if isinstance(found, str):
            raise CacheMiss(found)
        return found

    def render() -> Tensor:
        on = torch.device(device) if device is not None else images.device
        out = np.empty(tuple(images.shape), dtype=np.uint8)
        for chunk, start in enumerate(range(0, images.shape[0], _RENDER_CHUNK)):
            batch = images[start : start + _RENDER_CHUNK].to(on)
            gen = torch.Generator().manual_seed(_chunk_seed(int(seed), chunk))
            rendered = corrupt(batch, name, severity, generator=gen, params=table)
            out[start : start + batch.shape[0]] = to_uint8(rendered).cpu().numpy()

        def write_npy(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, out, allow_pickle=False)

        # the manifest, which holds the data's checksum, last: it publishes the entry
        atomic_write(data_path, write_npy)
        atomic_write_json(
            manifest_path, {**expected, "sha256": hashlib.sha256(out.tobytes()).hexdigest()}
        )
        return torch.from_numpy(out)

    def damaged(why: str) -> None:
        warnings.warn(
            f"corruption cache {data_path} is unusable ({why}); re-rendering", stacklevel=4
        )

    return cached(stem, load, render, on_damaged=damaged)
