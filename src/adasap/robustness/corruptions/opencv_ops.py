"""OpenCV's image operations that spatter's reference code uses, ported to batched torch so
that the render stays on the tensor's device and needs no OpenCV (tests compare with cv2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from adasap.robustness.corruptions.image_ops import depthwise, pad


def canny(img: Tensor, low: float, high: float) -> Tensor:
    """OpenCV's Canny (3x3 Sobel, L1 magnitude) on uint8-valued (N, 1, H, W); True on edges."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = pad(img, 1, 1, 1, 1, "replicate")
    gx = depthwise(padded, sobel.to(img.device))
    gy = depthwise(padded, sobel.T.contiguous().to(img.device))
    mag = gx.abs() + gy.abs()
    m = F.pad(mag, (1, 1, 1, 1))  # OpenCV compares against zeros outside the image

    def at(dy: int, dx: int) -> Tensor:
        return m[..., 1 + dy : m.shape[-2] - 1 + dy, 1 + dx : m.shape[-1] - 1 + dx]

    ax, ay = gx.abs(), gy.abs()
    tan22 = math.tan(math.radians(22.5))
    horizontal = ay < ax * tan22
    vertical = ay > ax / tan22
    s = torch.where((gx * gy) < 0, -1, 1)
    keep_h = (mag > at(0, -1)) & (mag >= at(0, 1))
    keep_v = (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep_d = torch.where(
        s > 0, (mag > at(-1, -1)) & (mag > at(1, 1)), (mag > at(-1, 1)) & (mag > at(1, -1))
    )
    peak = torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d)) & (mag > low)
    strong = peak & (mag > high)
    weak = peak
    while True:  # hysteresis: grow strong edges through 8-connected weak ones
        grown = weak & (F.max_pool2d(strong.float(), 3, 1, 1) > 0)
        grown |= strong
        if torch.equal(grown, strong):
            return strong
        strong = grown


# OpenCV's 5x5 chamfer weights for DIST_L2: axial 1, diagonal 1.4, knight move 2.1969.
CHAMFER_WEIGHTS = [(dy, dx, 1.0) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
CHAMFER_WEIGHTS += [(dy, dx, 1.4) for dy in (-1, 1) for dx in (-1, 1)]
CHAMFER_WEIGHTS += [(dy, dx, 2.1969) for dy, dx in ((1, 2), (2, 1), (-1, 2), (-2, 1))]
CHAMFER_WEIGHTS += [(dy, dx, 2.1969) for dy, dx in ((1, -2), (2, -1), (-1, -2), (-2, -1))]


def chamfer_distance(edges: Tensor, cap: float) -> Tensor:
    """cv2.distanceTransform(DIST_L2, 5) to the nearest edge pixel, truncated at ``cap``."""
    dist = torch.where(edges, 0.0, cap)
    h, w = dist.shape[-2:]
    while True:
        padded = F.pad(dist, (2, 2, 2, 2), value=math.inf)
        best = dist
        for dy, dx, weight in CHAMFER_WEIGHTS:
            best = torch.minimum(
                best, padded[..., 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w] + weight
            )
        if torch.equal(best, dist):
            return dist
        dist = best


def equalize_hist(img: Tensor) -> Tensor:
    """cv2.equalizeHist per image of uint8-valued (N, 1, H, W)."""
    n = img.shape[0]
    values = img.reshape(n, -1).long()
    hist = torch.zeros(n, 256, device=img.device).scatter_add_(
        1, values, torch.ones_like(values, dtype=torch.float32)
    )
    total = values.shape[1]
    first = (hist > 0).float().argmax(dim=1, keepdim=True)  # darkest value present
    first_count = hist.gather(1, first)
    scale = 255 / (total - first_count).clamp_min(1)
    lut = torch.round((hist.cumsum(1) - first_count) * scale).clamp_(0, 255)
    # A constant image maps to itself.
    lut = torch.where(first_count == total, first.float(), lut)
    return lut.gather(1, values).view_as(img)
