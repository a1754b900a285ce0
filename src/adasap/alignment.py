"""The channel multiple that a deployment runtime's fast kernels want, on this machine.

Pruned layers whose channel counts are not multiples of the kernels' channel block run on a
slower path, so a model with half the MACs can be slower than the dense one. The blocks:

- onnxruntime (``ort``) runs convolutions in its NCHWc layout, whose block is the vector width
  in floats: 16 with AVX-512, 8 with AVX2. Measured on a 2-core AMD EPYC (AVX-512): with odd
  counts pruned models ran at 0.51-1.49x of dense, rounded to 16 at 1.25-3.30x
  (docs/deployment.md, "Measured on a 2-core CPU"; ``benchmarks/bench_channels.py`` shows
  the steps per channel count).
- OpenVINO's CPU plugin runs oneDNN's blocked layouts (nChw16c with AVX-512, nChw8c with AVX2).
- INT8 runtimes work in the same blocks (VNNI multiplies 4 int8 pairs per 32-bit lane).
- PyTorch eager in channels_last at batch 1 on small images runs its own im2col + GEMM
  convolution, fast only for multiples of 8 (a 3x3 conv at 28 px: 16 channels 89 us, 15
  channels 165 us; docs/deployment.md, "Latency in the run table").
- CUDA: tensor cores take fp16/tf32 channels in multiples of 8, int8 in multiples of 16.

On a CPU without AVX2 (an ARM core, say) nothing here was measured; 4, the float32 lanes of a
128-bit vector, costs little. The runtime names are those of
:data:`adasap.deploy.runtimes.RUNTIMES` (a test keeps them equal; the foundation cannot import
``deploy``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import torch

from adasap.errors import UserError, quote

InstructionSet = Literal["avx512", "avx2", "other"]
RoundTo = int | Literal["auto"]

DEFAULT_RUNTIME = "ort"
# runtime -> instruction set -> the channel multiple of its fast CPU kernels (docstring above)
_CPU_ALIGNMENT: dict[str, dict[InstructionSet, int]] = {
    "torch": {"avx512": 8, "avx2": 8, "other": 4},
    "ort": {"avx512": 16, "avx2": 8, "other": 4},
    "ort-int8": {"avx512": 16, "avx2": 8, "other": 4},
    "openvino": {"avx512": 16, "avx2": 8, "other": 4},
    "openvino-int8": {"avx512": 16, "avx2": 8, "other": 4},
}
# on a GPU: tensor cores, by the precision the runtime computes in
_GPU_ALIGNMENT = {"torch": 8, "ort": 8, "ort-int8": 16, "openvino": 8, "openvino-int8": 16}
RUNTIME_NAMES = tuple(_CPU_ALIGNMENT)


def check_runtime(runtime: str) -> str:
    """``runtime`` itself, or a one-line :class:`UserError` naming the known runtimes."""
    if runtime not in _CPU_ALIGNMENT:
        raise UserError(
            f"unknown runtime {quote(runtime)}: choose one of {', '.join(RUNTIME_NAMES)} "
            f"(where the pruned model will run; e.g. --runtime {DEFAULT_RUNTIME})"
        )
    return runtime


# PyTorch's dispatch level, where the CPU's flags cannot be read
_TORCH_CAPABILITY: dict[str, InstructionSet] = {"AVX512": "avx512", "AVX2": "avx2"}


def _linux_cpu_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@functools.cache
def cpu_instruction_set() -> InstructionSet:
    """The widest vector instructions of this CPU that the runtimes dispatch on.

    Linux's CPU flags are what onnxruntime and OpenVINO see through CPUID; elsewhere PyTorch's
    own dispatch level stands in for them.
    """
    flags = _linux_cpu_flags()
    if flags is None:
        return _TORCH_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), "other")
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


def channel_alignment(runtime: str, device: str | torch.device = "cpu") -> int:
    """The channel multiple the fast kernels of ``runtime`` want on ``device`` of this machine.

    ``device`` is where the model will run: ``cpu`` (by this CPU's instruction set) or a GPU
    (``cuda``, ``cuda:1``: tensor cores).
    """
    check_runtime(runtime)
    if torch.device(device).type != "cpu":
        return _GPU_ALIGNMENT[runtime]
    return _CPU_ALIGNMENT[runtime][cpu_instruction_set()]


def check_rounding(runtime: str, round_to: RoundTo) -> None:
    """A one-line :class:`UserError` for an unknown ``runtime`` or a ``round_to`` below 1."""
    check_runtime(runtime)
    whole = isinstance(round_to, int) and not isinstance(round_to, bool)
    if round_to != "auto" and not (whole and round_to >= 1):
        raise UserError(
            f"round_to must be >= 1 or auto, got {quote(round_to)}: e.g. round_to=auto (the "
            "runtime's channel block), or 1 for any channel count"
        )


def resolve_round_to(round_to: RoundTo, runtime: str, device: str | torch.device) -> int:
    """``round_to`` as a channel count: ``"auto"`` is :func:`channel_alignment`."""
    return channel_alignment(runtime, device) if round_to == "auto" else round_to
