"""The offline detection set: Fashion-MNIST garments pasted onto textured RGB canvases.

Each canvas (default 128 x 128 px, RGB) holds 1..``max_objects`` garments at random positions
and sizes, each tinted with a random colour and blended in by its grey level, with its class
(1..10, Fashion-MNIST's label + 1) and a box tight around its non-zero pixels. Boxes of one
canvas overlap at most ``MAX_IOU``. Training and validation canvases use disjoint garments of
Fashion-MNIST's training file, test canvases its test file, so no test garment is trained on.
Everything is drawn from seeded generators and cached (:func:`adasap.io.cached`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from adasap.data import files
from adasap.data.detection import DetectionBundle, DetectionSet, DetectionSpec, Target, make_target
from adasap.data.specs import FASHION_MNIST
from adasap.errors import UserError
from adasap.io import (
    CacheMiss,
    atomic_write,
    cache_root,
    cached,
    file_sha256,
    read_checked_json,
    write_checked_json,
)

# Bump when the canvases drawn for a seed change, so older caches are rebuilt.
CANVAS_VERSION = 1
MAX_IOU = 0.25
_PLACEMENT_TRIES = 20
_VAL_FRACTION = 0.1
SOURCE_CANVAS = "Fashion-MNIST garments on textured canvases, made by adasap"


def canvas_spec(image_size: int = 128) -> DetectionSpec:
    return DetectionSpec("canvas-fashion-mnist", FASHION_MNIST.class_names or (), image_size, 3)


def _background(size: int, generator: torch.Generator) -> Tensor:
    """A smooth random colour field with fine grain, float 3 x size x size in [0, 0.75]."""
    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    grain = torch.rand(1, size, size, generator=generator) - 0.5
    return (0.1 + 0.5 * smooth + 0.15 * grain).clamp_(0, 1)


def _draw_int(low: int, high: int, generator: torch.Generator) -> int:
    """An integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def render_canvases(
    garments: Tensor,
    labels: Tensor,
    count: int,
    generator: torch.Generator,
    *,
    image_size: int = 128,
    max_objects: int = 4,
    sides: tuple[int, int] = (24, 64),
) -> tuple[Tensor, list[Target]]:
    """``count`` canvases (uint8 [count, 3, S, S]) and their targets, garments drawn from
    ``garments`` (uint8 [G, h, w], background 0) with ``labels`` 0..9, scaled to a side in
    ``sides`` (px, aspect kept)."""
    if garments.dtype != torch.uint8 or garments.dim() != 3 or len(garments) != len(labels):
        raise UserError(
            f"garments must be uint8 [G, h, w] with G labels, got {garments.dtype} "
            f"{tuple(garments.shape)} and {len(labels)} labels: pass Fashion-MNIST's arrays"
        )
    if not 1 <= sides[0] <= sides[1] <= image_size:
        raise UserError(f"garment sides {sides} do not fit a {image_size} px canvas: shrink them")
    images = torch.empty(count, 3, image_size, image_size, dtype=torch.uint8)
    targets = []
    for n in range(count):
        canvas = _background(image_size, generator)
        boxes: list[list[int]] = []
        classes: list[int] = []
        for _ in range(_draw_int(1, max_objects, generator)):
            index = _draw_int(0, len(garments) - 1, generator)
            side = _draw_int(*sides, generator)
            colour = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=generator)
            small = garments[index][None, None].float()
            h = max(1, round(side * small.shape[-2] / max(small.shape[-2:])))
            w = max(1, round(side * small.shape[-1] / max(small.shape[-2:])))
            # The alpha is rounded to 8 bits first, so the box is tight around the pixels that
            # change the canvas.
            alpha = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
            alpha = alpha[0].round_().clamp_(0, 255).div_(255)
            rows = alpha[0].amax(1).nonzero()
            cols = alpha[0].amax(0).nonzero()
            if len(rows) == 0:
                continue  # an empty garment has no box
            for _ in range(_PLACEMENT_TRIES):
                y0 = _draw_int(0, image_size - h, generator)
                x0 = _draw_int(0, image_size - w, generator)
                box = [
                    x0 + int(cols[0]),
                    y0 + int(rows[0]),
                    x0 + int(cols[-1]) + 1,
                    y0 + int(rows[-1]) + 1,
                ]
                if not boxes or box_iou(torch.tensor([box]), torch.tensor(boxes)).max() <= MAX_IOU:
                    break
            else:
                continue  # no free spot: fewer objects on this canvas
            patch = canvas[:, y0 : y0 + h, x0 : x0 + w]
            patch.mul_(1 - alpha).add_(alpha * colour)
            boxes.append(box)
            classes.append(int(labels[index]) + 1)
        images[n] = canvas.mul_(255).round_().to(torch.uint8)
        targets.append(make_target(boxes, classes))
    return images, targets


def _garment_pools(data_dir: str | Path | None, seed: int) -> tuple[dict, str]:
    """(split -> (garments, labels)) with disjoint train/val garments, and their sha256."""
    found = files.locate_idx_files("fashion-mnist", data_dir)
    arrays = {
        key: files.read_idx(found[f"{key}-idx{3 if 'images' in key else 1}-ubyte"])
        for key in ("train-images", "train-labels", "t10k-images", "t10k-labels")
    }
    digest = hashlib.sha256()
    for array in arrays.values():
        digest.update(np.ascontiguousarray(array).tobytes())
    images = {k: torch.from_numpy(v.astype(np.uint8)) for k, v in arrays.items() if "images" in k}
    labels = {k: torch.from_numpy(v.astype(np.int64)) for k, v in arrays.items() if "labels" in k}
    order = torch.randperm(
        len(labels["train-labels"]), generator=torch.Generator().manual_seed(seed)
    )
    n_val = max(1, round(_VAL_FRACTION * len(order)))
    train_idx, val_idx = order[n_val:], order[:n_val]
    pools = {
        "train": (images["train-images"][train_idx], labels["train-labels"][train_idx]),
        "val": (images["train-images"][val_idx], labels["train-labels"][val_idx]),
        "test": (images["t10k-images"], labels["t10k-labels"]),
    }
    return pools, digest.hexdigest()


def _save(path: Path, splits: dict[str, tuple[Tensor, list[Target]]]) -> None:
    arrays = {}
    for split, (images, targets) in splits.items():
        arrays[f"{split}_images"] = images.numpy()
        arrays[f"{split}_counts"] = np.array([len(t["labels"]) for t in targets], np.int64)
        arrays[f"{split}_boxes"] = torch.cat([t["boxes"] for t in targets]).numpy()
        arrays[f"{split}_labels"] = torch.cat([t["labels"] for t in targets]).numpy()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def _load(path: Path) -> dict[str, tuple[Tensor, list[Target]]]:
    with np.load(path, allow_pickle=False) as data:
        out = {}
        for split in ("train", "val", "test"):
            counts = data[f"{split}_counts"].tolist()
            boxes = torch.from_numpy(data[f"{split}_boxes"]).split(counts)
            labels = torch.from_numpy(data[f"{split}_labels"]).split(counts)
            targets = [make_target(b, c) for b, c in zip(boxes, labels, strict=True)]
            out[split] = (torch.from_numpy(data[f"{split}_images"]), targets)
    return out


def load_canvas_detection(
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 250,
    num_test: int = 500,
    image_size: int = 128,
    max_objects: int = 4,
) -> DetectionBundle:
    """The canvas detection set (train/val/test), built once per argument set and cached.

    Fashion-MNIST is found as :func:`adasap.data.load_dataset` finds it (``data_dir``,
    ``$ADASAP_DATA``, Debian's package, the cache). The cache lives in
    ``<cache root>/detection/`` (``cache_dir``, else ``$ADASAP_CACHE``, else
    ``~/.cache/adasap``); at the defaults it holds about 135 MB.
    """
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    options = {f"num_{k}": v for k, v in sizes.items()}
    for name, value in {**options, "image_size": image_size, "max_objects": max_objects}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"canvas option {name}={value!r} is invalid: use an integer >= 1")
    if image_size < 32:
        raise UserError(f"canvas image_size={image_size} is too small: use 32 px or more")
    pools, garments_sha = _garment_pools(data_dir, seed)
    key = {
        "version": CANVAS_VERSION,
        "seed": seed,
        "sizes": sizes,
        "image_size": image_size,
        "max_objects": max_objects,
        "max_iou": MAX_IOU,
        "garments_sha256": garments_sha,
    }
    name = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / "detection" / f"canvas-{name}"
    data_path, manifest_path = folder / "canvases.npz", folder / "manifest.json"
    sides = (max(8, image_size * 3 // 16), image_size // 2)

    def load() -> dict[str, tuple[Tensor, list[Target]]]:
        manifest = read_checked_json(manifest_path)
        if manifest.get("key") != key:
            raise CacheMiss("made with other arguments")
        if not data_path.is_file() or file_sha256(data_path) != manifest.get("data_sha256"):
            raise CacheMiss("data does not match its sha256")
        return _load(data_path)

    def build() -> dict[str, tuple[Tensor, list[Target]]]:
        splits = {}
        for i, (split, count) in enumerate(sizes.items()):
            generator = torch.Generator().manual_seed(seed * 3 + i)
            garments, labels = pools[split]
            splits[split] = render_canvases(
                garments,
                labels,
                count,
                generator,
                image_size=image_size,
                max_objects=max_objects,
                sides=sides,
            )
        _save(data_path, splits)  # the manifest, holding the checksum, last: it publishes
        write_checked_json(manifest_path, {"key": key, "data_sha256": file_sha256(data_path)})
        return splits

    splits = cached(folder / "canvases", load, build)
    spec = canvas_spec(image_size)
    sets = {k: DetectionSet(*splits[k], spec, source=SOURCE_CANVAS) for k in splits}
    return DetectionBundle(spec, sets["train"], sets["val"], sets["test"])
