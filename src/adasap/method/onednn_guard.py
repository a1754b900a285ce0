"""A guard around a oneDNN bug that pruning walks into.

oneDNN's CPU kernel for the weight gradient of a strided 1x1 convolution over channels_last
(NHWC) input writes past its workspace when the layer has fewer input channels than the
kernel's channel block (8 with AVX2): memory corruption and crashes with one thread, wrong
weight gradients with more (uxlfoundation/oneDNN#6035; seen with torch 2.14.1). Dense models
rarely have such a layer, but pruning makes them: a ResNet's downsampling shortcut whose input
kept 2-7 channels. PyTorch takes that kernel whenever the input or the weight is
channels_last, so a guarded layer gets both in the contiguous layout, which oneDNN serves with
another kernel. Its output goes back to channels_last, so that the rest of the model stays in
one layout: BatchNorm, ReLU and residual additions over a mix of layouts take PyTorch's slow
strided loops (a ResNet-20 pruned to half its MACs with one guarded shortcut trained 1-3% faster
per step with the output restored, about the noise; docs/performance.md, "Pruned models train
at pruned speed").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# oneDNN's largest input-channel block on x86 (AVX-512: 16; AVX2: 8); at or above it the
# kernel needs no partial block. 16 covers both.
_CHANNEL_BLOCK = 16
_GUARDED = "_adasap_onednn_guard"
# whether the layer's last input was channels_last, and so its output should be
_RESTORE = "_adasap_onednn_guard_restore"


def needs_guard(module: nn.Module) -> bool:
    """Whether ``module`` is a strided 1x1 convolution with a partial input-channel block."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and any(s > 1 for s in module.stride)
        and module.in_channels // module.groups < _CHANNEL_BLOCK
    )


def _row_major(t: Tensor) -> bool:
    """Strides exactly row-major: a 1x1 kernel in channels_last also counts as contiguous, but
    its strides still tell PyTorch to take the channels_last kernel."""
    expected, stride = [], 1
    for size in reversed(t.shape):
        expected.append(stride)
        stride *= size
    return t.stride() == tuple(reversed(expected))


def _contiguous_layout(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0]
    cpu = x.device.type == "cpu"
    restore = cpu and x.is_contiguous(memory_format=torch.channels_last) and not _row_major(x)
    if getattr(module, _RESTORE, None) is not restore:  # set on a change only (torch.compile)
        setattr(module, _RESTORE, restore)
    if not cpu:
        return None
    if not _row_major(module.weight):
        module.weight.data = module.weight.data.clone(memory_format=torch.contiguous_format)
    return None if _row_major(x) else (x.clone(memory_format=torch.contiguous_format), *args[1:])


def _restored_layout(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
    if not getattr(module, _RESTORE):
        return None
    return output.contiguous(memory_format=torch.channels_last)


def compute_contiguously(module: nn.Module) -> None:
    """Run ``module`` (a convolution) in the contiguous layout on the CPU, its output returned
    in channels_last when its input was; a second call changes nothing."""
    if not getattr(module, _GUARDED, False):
        module.register_forward_pre_hook(_contiguous_layout)
        module.register_forward_hook(_restored_layout)
        setattr(module, _GUARDED, True)


def guard_strided_pointwise_convs(model: nn.Module) -> list[nn.Module]:
    """:func:`compute_contiguously` every layer that :func:`needs_guard` (call again after
    pruning changed the model); returns the guarded layers."""
    guarded = [module for module in model.modules() if needs_guard(module)]
    for module in guarded:
        compute_contiguously(module)
    return guarded
