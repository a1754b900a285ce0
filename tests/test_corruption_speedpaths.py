"""The corruptions' fast paths pinned against the straightforward computation they replace.

Chunked rendering (random numbers drawn for the whole batch first), F.pad padding, shifted-sum
separable filters, the FFT disk blur, Pillow-BOX pixelation by taps, the one-gather glass
shuffle, per-channel zoom interpolation, the JPEG round trip, to_uint8 and the huge-page batch
buffer (docs/corruptions.md, "Speed").
"""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adasap.errors import UserError
from adasap.robustness import corruptions as C
from adasap.robustness.corruptions import (
    CORRUPTIONS,
    PARAM_TABLES,
    apply,
    blur,
    corrupt,
    digital,
    image_ops,
    register_corruption,
    registry,
)
from test_registry import scratch_copy

TOY_ROWS = {table: (0.1, 0.2, 0.3, 0.4, 0.5) for table in PARAM_TABLES}


def images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images with some edges: bicubic upsampled noise plus a bright square."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, size // 4 + 2, size // 4 + 2, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x[..., size // 4 : size // 2, size // 3 : size // 2 + 2] += 0.4
    return x.clamp(0, 1)


@pytest.mark.parametrize("name", CORRUPTIONS + C.HELD_OUT_CORRUPTIONS)
def test_chunks_give_the_same_images_as_one_piece(name: str, monkeypatch) -> None:
    x = images(5, 3, 24)
    whole = corrupt(x, name, 4, seed=7, params="cifar")
    # Two images per chunk: every corruption that allows chunks is run in three pieces.
    monkeypatch.setattr(apply, "CHUNK_VALUES", 2 * x[0].numel())
    assert torch.equal(corrupt(x, name, 4, seed=7, params="cifar"), whole)


def test_chunks_cover_a_large_batch(monkeypatch) -> None:
    calls = []
    real = registry.get_corruption("contrast")

    def counting(x, c, ctx):
        calls.append(x.shape[0])
        return real.function(x, c, ctx)

    swapped = scratch_copy(registry._REGISTRY, contrast=replace(real, function=counting))
    monkeypatch.setattr(registry, "_REGISTRY", swapped)
    x = images(70, 3, 224)
    out = corrupt(x, "contrast", 2)
    per_chunk = apply.CHUNK_VALUES // x[0].numel()
    assert calls[0] == per_chunk and sum(calls) == 70
    means = x.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(out, ((x - means) * 0.3 + means).clamp(0, 1), atol=1e-6)


def test_draw_is_for_random_corruptions_only(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", scratch_copy(registry._REGISTRY))
    with pytest.raises(UserError, match="draw= is for random corruptions"):
        register_corruption(
            "toy_fixed", family="noise", params=TOY_ROWS, deterministic=True, draw=lambda *a: ()
        )(lambda x, c, ctx: x)

    @register_corruption(
        "toy_veil",
        family="weather",
        params=TOY_ROWS,
        deterministic=False,
        draw=lambda x, c, ctx: (ctx.rng.uniform((x.shape[0], 1, 1, 1)),),
    )
    def veil(x: torch.Tensor, c: float, ctx: C.CorruptionContext, v: torch.Tensor):
        return x * (1 - c) + c * v

    x = images(6, 3, 16)
    g = torch.Generator().manual_seed(3)
    expected = x * 0.7 + 0.3 * torch.rand((6, 1, 1, 1), generator=g)
    monkeypatch.setattr(apply, "CHUNK_VALUES", x[0].numel())
    assert torch.allclose(corrupt(x, "toy_veil", 3, seed=3), expected.clamp(0, 1), atol=1e-6)


def test_a_uint8_result_is_taken_as_levels(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", scratch_copy(registry._REGISTRY))
    register_corruption("toy_levels", family="digital", params=TOY_ROWS, deterministic=True)(
        lambda x, c, ctx: torch.full(x.shape, 51, dtype=torch.uint8)
    )
    out = corrupt(images(2, 1, 8), "toy_levels", 1)
    assert out.dtype == torch.float32 and torch.equal(out, torch.full_like(out, 0.2))


@pytest.mark.parametrize("mode", ("replicate", "reflect101", "symmetric"))
def test_padding_matches_index_padding(mode: str) -> None:
    for h, w in ((8, 8), (9, 13), (1, 5), (30, 2)):
        x = torch.rand(2, 3, h, w)
        for pads in ((0, 0, 0, 0), (1, 2, 3, 4), (7, 7, 7, 7), (20, 20, 20, 20), (0, 3, 2, 1)):
            rows = image_ops._pad_index(h, pads[0], pads[1], mode, x.device)
            cols = image_ops._pad_index(w, pads[2], pads[3], mode, x.device)
            expected = x.index_select(-2, rows).index_select(-1, cols)
            assert torch.equal(image_ops.pad(x, *pads, mode), expected), (h, w, pads)


@pytest.mark.parametrize(
    ("sigma", "mode"), ((0.6, "replicate"), (1.5, "replicate"), (2.4, "symmetric"))
)
def test_separable_filter_matches_a_depthwise_convolution(sigma: float, mode: str) -> None:
    x = torch.rand(2, 3, 40, 33)
    k = image_ops._gaussian_kernel(sigma, 3.0, x.device)
    r = (k.numel() - 1) // 2
    padded = image_ops.pad(x, r, r, r, r, mode).reshape(6, 1, 40 + 2 * r, 33 + 2 * r)
    expected = F.conv2d(F.conv2d(padded, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    assert torch.allclose(image_ops._separable(x, k, k, mode), expected.view(x.shape), atol=1e-6)


@pytest.mark.parametrize("severity", (1, 2, 3, 4, 5))
def test_defocus_blur_matches_a_direct_convolution(severity: int) -> None:
    x = torch.rand(2, 3, 30, 37)
    kernel = blur._disk_kernel(*PARAM_TABLES["imagenet"]["defocus_blur"][severity - 1])
    r = kernel.shape[0] // 2
    padded = F.pad(x, (r, r, r, r), mode="reflect").reshape(6, 1, 30 + 2 * r, 37 + 2 * r)
    expected = F.conv2d(padded, kernel[None, None]).view(x.shape)  # correlation, as filter2D
    got = corrupt(x, "defocus_blur", severity, params="imagenet")  # FFT from 15x15 kernels up
    assert torch.allclose(got, expected.clamp(0, 1), atol=1e-4)


def test_pixelate_taps_match_the_dense_box_matrix() -> None:
    for n_in in (8, 13, 32, 57, 224):
        for c in (0.95, 0.6, 0.4, 0.25):
            n_out = max(1, int(n_in * c))
            x = torch.rand(2, 3, n_in, 7)
            dense = digital._box_resample_matrix(n_in, n_out) @ x
            assert torch.allclose(digital._box_down(x, n_out), dense, atol=1e-6), (n_in, n_out)
            pick = digital._box_resample_matrix(n_out, n_in).argmax(dim=1)
            assert torch.equal(digital._box_pick(n_out, n_in), pick)


def test_glass_shuffle_is_the_two_sorted_gathers() -> None:
    n, c, h, w = 2, 3, 20, 17
    x = torch.rand(n, c, h, w)
    row_noise, column_noise = torch.randn(n, h, w) * 2, torch.randn(n, h, w) * 2
    # The reference order: sort every row by column + noise, then every column by row + noise.
    perm = (torch.arange(w) + row_noise).argsort(dim=-1)
    step = x.gather(-1, perm[:, None].expand(n, c, h, w))
    perm = (torch.arange(h)[:, None] + column_noise).argsort(dim=-2)
    expected = step.gather(-2, perm[:, None].expand(n, c, h, w))
    assert torch.equal(blur._local_shuffle(x, row_noise, column_noise), expected)


def test_clipped_zoom_matches_interpolating_all_channels_at_once() -> None:
    x = torch.rand(2, 3, 45, 38)
    for zoom in (1.06, 1.17, 1.31):
        h, w = x.shape[-2:]
        ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
        top, left = (h - ch) // 2, (w - cw) // 2
        oh, ow = round(ch * zoom), round(cw * zoom)
        crop = x[..., top : top + ch, left : left + cw]
        up = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True)
        th, tw = (oh - h) // 2, (ow - w) // 2
        expected = up[..., th : th + h, tw : tw + w]
        assert torch.allclose(image_ops.clipped_zoom(x, zoom), expected, atol=1e-5)


@pytest.mark.parametrize("channels", (1, 3))
@pytest.mark.parametrize("size", (8, 33, 96))
def test_jpeg_is_exactly_pillows_round_trip(channels: int, size: int) -> None:
    from PIL import Image

    x = images(3, channels, size)
    levels = C.to_uint8(x)
    for table in ("imagenet", "cifar"):
        for severity in (1, 5):
            got = C.to_uint8(corrupt(x, "jpeg_compression", severity, params=table))
            quality = PARAM_TABLES[table]["jpeg_compression"][severity - 1]
            for i in range(3):
                hwc = levels[i].permute(1, 2, 0).numpy()
                buffer = io.BytesIO()
                Image.fromarray(hwc[..., 0] if channels == 1 else hwc).save(
                    buffer, "JPEG", quality=quality
                )
                expected = np.asarray(Image.open(buffer)).reshape(hwc.shape)
                assert np.array_equal(got[i].permute(1, 2, 0).numpy(), expected)


def test_to_uint8_rounds_half_to_even_and_clamps() -> None:
    x = torch.cat([torch.rand(1000), torch.tensor([-0.3, 0.0, 0.5, 126.5 / 255, 1.0, 1.7])])
    expected = x.clamp(0, 1).mul(255).round().to(torch.uint8)  # the straightforward formula
    assert torch.equal(C.to_uint8(x), expected)
    assert C.to_uint8(torch.tensor([0.5]).double()).item() == 128


def test_batch_buffers_are_plain_tensors() -> None:
    big = registry.empty_batch((20, 3, 224, 224), "cpu")  # 12 MB: asks for huge pages
    small = registry.empty_batch((2, 3), torch.device("cpu"))
    assert big.shape == (20, 3, 224, 224) and big.dtype == torch.float32 and big.is_contiguous()
    assert small.shape == (2, 3)
    big.fill_(0.25)  # writable over its whole length
    assert big.sum().item() == pytest.approx(0.25 * big.numel())
