"""Image helpers shared by the corruption families: padding, filtering, resampling, colour.

Each reproduces the OpenCV / scipy / scikit-image / ImageMagick call the reference scripts
make, down to the border mode, so the corruptions match the published ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adasap.robustness.corruptions.registry import CorruptionContext

# ITU-R BT.601 luma weights, as OpenCV's RGB2GRAY uses.
_LUMA = (0.299, 0.587, 0.114)


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [0, 1] to uint8, rounding to the nearest level."""
    # One float temporary, not three (clamping after the scaling gives the same levels). The
    # detour through int16 is exact for 0..255 and 4x faster on the CPU than torch's direct
    # float-to-uint8 conversion, which took longer than everything else here.
    return images.mul(255).round_().clamp_(0, 255).to(torch.int16).to(torch.uint8)


def _pad_index(n: int, before: int, after: int, mode: str, device: torch.device) -> Tensor:
    """Source indices of a padded axis; works for pads longer than the axis itself.

    Modes: "replicate" (OpenCV BORDER_REPLICATE, scipy "nearest"), "reflect101" (OpenCV's
    default BORDER_REFLECT_101, scipy "mirror"), "symmetric" (scipy/skimage "reflect").
    """
    idx = torch.arange(-before, n + after, device=device)
    if mode == "replicate" or n == 1:
        return idx.clamp(0, n - 1)
    if mode == "reflect101":
        period = 2 * (n - 1)
        idx = idx.remainder(period)
        return torch.where(idx >= n, period - idx, idx)
    period = 2 * n
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - 1 - idx, idx)


def pad(x: Tensor, top: int, bottom: int, left: int, right: int, mode: str) -> Tensor:
    """Pad the two spatial axes with a border ``mode`` of :func:`_pad_index`."""
    h, w = x.shape[-2:]
    # F.pad copies the same pixels 10x faster than the gathers below; its "reflect" is
    # reflect101 and needs pads shorter than the axis.
    if mode == "replicate" and x.dim() == 4:
        return F.pad(x, (left, right, top, bottom), mode="replicate")
    if mode == "reflect101" and x.dim() == 4 and max(top, bottom) < h and max(left, right) < w:
        return F.pad(x, (left, right, top, bottom), mode="reflect")
    if mode == "symmetric" and max(top, bottom) <= h and max(left, right) <= w:
        x = torch.cat([x[..., :top, :].flip(-2), x, x[..., h - bottom :, :].flip(-2)], dim=-2)
        return torch.cat([x[..., :left].flip(-1), x, x[..., w - right :].flip(-1)], dim=-1)
    rows = _pad_index(h, top, bottom, mode, x.device)
    cols = _pad_index(w, left, right, mode, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _filter_matrix(n: int, weights: Tensor, mode: str) -> Tensor:
    """The n x n matrix of a 1-D correlation with centred ``weights`` and border ``mode``."""
    r = (weights.numel() - 1) // 2
    src = _pad_index(n, r, r, mode, weights.device).unfold(0, 2 * r + 1, 1)  # (n, 2r+1)
    matrix = torch.zeros(n, n, dtype=weights.dtype, device=weights.device)
    return matrix.scatter_add_(1, src, weights.expand(n, -1).contiguous())


def depthwise(x: Tensor, kernel: Tensor) -> Tensor:
    """Correlate each channel of an already padded batch with one 2-D kernel ("valid" output)."""
    c = x.shape[1]
    weight = kernel.to(x.dtype).expand(c, 1, *kernel.shape).contiguous()
    # channels_last makes oneDNN's depthwise convolution about 10x faster on CPU.
    x = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, groups=c).contiguous()


def _shifted_sum(x: Tensor, weights: list[float], dim: int, length: int) -> Tensor:
    """sum_i weights[i] * x.narrow(dim, i, length): a 1-D correlation of a padded axis."""
    out = x.narrow(dim, 0, length) * weights[0]
    for i, weight in enumerate(weights[1:], 1):
        out.add_(x.narrow(dim, i, length), alpha=weight)
    return out


def _separable(x: Tensor, kernel_h: Tensor, kernel_w: Tensor, mode: str) -> Tensor:
    """Correlate with ``kernel_h`` along rows and ``kernel_w`` along columns, same-size output."""
    rh, rw = (kernel_h.numel() - 1) // 2, (kernel_w.numel() - 1) // 2
    h, w = x.shape[-2:]
    if 2 * max(rh, rw) + 1 <= 15:
        # Shifted multiply-adds: the same sums, in the same order, as a depthwise convolution,
        # and 2-9x faster than oneDNN's on images of a few channels.
        x = pad(x, rh, rh, rw, rw, mode)
        rows = _shifted_sum(x, kernel_w.tolist(), dim=-1, length=w)
        return _shifted_sum(rows, kernel_h.tolist(), dim=-2, length=h)
    # Long kernels: two small matrix products beat a long convolution and fold any border.
    mh = _filter_matrix(h, kernel_h.to(x.dtype), mode)
    mw = _filter_matrix(w, kernel_w.to(x.dtype), mode)
    return torch.matmul(torch.matmul(mh, x), mw.T)


def _gaussian_kernel(sigma: float, truncate: float, device: torch.device) -> Tensor:
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian(x: Tensor, sigma: float, mode: str = "replicate", truncate: float = 4.0) -> Tensor:
    """skimage.filters.gaussian on the two spatial axes (its default mode "nearest")."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(sigma, truncate, x.device)
    return _separable(x, k, k, mode)


def _fft_size(n: int) -> int:
    """A fast transform size >= n: the smallest even 5-smooth number (factors 2, 3, 5 only), or
    the next power of two where that is at most 7% longer.

    Measured on one CPU core: odd sizes (81, 125, 243) take up to twice as long, and 256 is 17%
    faster than 240 (the size for a 224 px image padded for a 15 px kernel).
    """
    size = n + n % 2
    while True:
        m = size
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            break
        size += 2
    power = 1 << (n - 1).bit_length()
    return power if power <= 1.07 * size else size


def filter2d(x: Tensor, kernel: Tensor, mode: str = "reflect101") -> Tensor:
    """cv2.filter2D: correlation with an odd 2-D kernel, same-size output."""
    kh, kw = kernel.shape
    rh, rw = kh // 2, kw // 2
    padded = pad(x, rh, rh, rw, rw, mode)
    if max(kh, kw) <= 13:
        return depthwise(padded, kernel.to(x.device))
    # Big kernels: FFT. Any transform size covering the padded image avoids wrap-around in
    # the kept region; 5-smooth sizes transform fastest.
    ph, pw = _fft_size(padded.shape[-2]), _fft_size(padded.shape[-1])
    k = torch.zeros(ph, pw, dtype=x.dtype, device=x.device)
    k[:kh, :kw] = kernel.flip(0, 1).to(x.device)
    k = torch.roll(k, shifts=(-rh, -rw), dims=(0, 1))
    spectrum = torch.fft.rfft2(padded, s=(ph, pw)) * torch.fft.rfft2(k)
    out = torch.fft.irfft2(spectrum, s=(ph, pw))
    return out[..., rh : rh + x.shape[-2], rw : rw + x.shape[-1]]


def luma(x: Tensor) -> Tensor:
    """Grey (N, 1, H, W) of RGB or grey images."""
    if x.shape[1] == 1:
        return x
    r, g, b = _LUMA
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


def rgb_only(
    fn: Callable[[Tensor, Any, CorruptionContext], Tensor],
) -> Callable[[Tensor, Any, CorruptionContext], Tensor]:
    """Run a colour corruption on grey images as RGB with equal channels, then take the luma."""

    def wrapped(x: Tensor, c: Any, ctx: CorruptionContext) -> Tensor:
        if x.shape[1] == 3:
            return fn(x, c, ctx)
        return luma(fn(x.expand(-1, 3, -1, -1).contiguous(), c, ctx)).clamp_(0, 1)

    wrapped.__name__ = fn.__name__
    return wrapped


def clipped_zoom(x: Tensor, zoom: float) -> Tensor:
    """The reference's clipped_zoom: zoom the centre crop by ``zoom``, trim back to the size.

    scipy.ndimage.zoom(order=1) maps output o to input o * (in - 1) / (out - 1), which is
    bilinear interpolation with align_corners=True.
    """
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    oh, ow = round(ch * zoom), round(cw * zoom)
    # From 64 px up, one channel per image: there the NCHW kernel's conversion of several
    # channels to channels-last and back took longer than the interpolation itself (1.7x at
    # 224 px); on small images it is 1.6x faster than going channel by channel.
    planes = x.reshape(-1, 1, h, w) if h * w >= 64 * 64 else x
    crop = planes[..., top : top + ch, left : left + cw]
    up = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True)
    th, tw = (oh - h) // 2, (ow - w) // 2
    return up[..., th : th + h, tw : tw + w].reshape(x.shape)


def motion_kernel(radius: float, sigma: float) -> list[float]:
    """ImageMagick's MotionBlurImage taps: a one-sided Gaussian of 2*ceil(radius)+1 taps."""
    width = 2 * math.ceil(radius) + 1
    k = np.exp(-(np.arange(width, dtype=np.float64) ** 2) / (2 * sigma**2))
    return (k / k.sum()).tolist()


def motion_blur_batch(x: Tensor, radius: float, sigma: float, angles: Sequence[float]) -> Tensor:
    """Blur image b along ``angles[b]`` degrees like ImageMagick's motion blur (edge pixels repeat).

    Tap i reads the pixel at offset (ceil(i sin a - 0.5), ceil(i cos a - 0.5)) rows/columns.
    """
    weights = motion_kernel(radius, sigma)
    reach = len(weights) - 1
    h, w = x.shape[-2:]
    padded = pad(x, reach, reach, reach, reach, "replicate")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for b, angle in enumerate(angles):
        a = math.radians(angle)
        acc = out[b]
        for i, k in enumerate(weights):
            dy = math.ceil(i * math.sin(a) - 0.5) + reach
            dx = math.ceil(i * math.cos(a) - 0.5) + reach
            tap = padded[b, :, dy : dy + h, dx : dx + w]
            if i == 0:
                torch.mul(tap, k, out=acc)
            else:
                acc.add_(tap, alpha=k)
    return out
