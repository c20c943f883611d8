"""Training FLOPs of an ESM transformer and the accelerator peaks that model FLOPs utilisation (MFU) divides by."""

from functools import cache
from pathlib import Path

import torch

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets, SXM parts unless named. "bf16" also serves
# fp16; "fp32" is plain fp32 (PyTorch's default matmul precision, no TF32). Matched in order, first hit wins.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("GH200", {"bf16": 989.0, "fp32": 67.0}),
    ("B200", {"bf16": 2250.0, "fp32": 80.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp32": 31.2}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
    ("V100", {"bf16": 125.0, "fp32": 15.7}),  # fp16 tensor cores; V100 has no bf16
]


def precision_kind(precision: str | int) -> str:
    """'bf16' for half/mixed precision (tensor-core peak), else 'fp32'."""
    return "bf16" if "16" in str(precision) and not str(precision).startswith("32") else "fp32"


def lookup_peak_tflops(device_name: str, precision: str | int) -> float | None:
    """The datasheet peak of a known GPU at this precision, or None."""
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks[precision_kind(precision)]
    return None


def resolve_peak_tflops(peak_tflops: float | None, precision: str | int, on_gpu: bool, device: int = 0) -> float | None:
    """The configured peak, else the datasheet value of GPU `device`; None on CPUs (no single honest number).

    Read from the device's properties, which need no CUDA context (the process may not have chosen its GPU yet).
    """
    if peak_tflops:
        return float(peak_tflops)
    if on_gpu and torch.cuda.is_available():
        return lookup_peak_tflops(torch.cuda.get_device_properties(device).name, precision)
    return None


def flops_per_step(num_params: int, num_layers: int, hidden_size: int, real_tokens, sum_squared_lengths):
    """Training FLOPs (forward + backward = 3 x forward) of the real tokens of a step.

    6 x params x tokens for the matrix multiplies (PaLM appendix B), plus attention's scores and weighted
    sum: 4 x n x hidden FLOPs per token per layer forward for a sequence of n tokens, so 12 x layers x
    hidden x n^2 per sequence in training. Padding is not counted: MFU measures useful work.
    """
    return 6 * num_params * real_tokens + 12 * num_layers * hidden_size * sum_squared_lengths


@cache
def cpu_flags() -> frozenset[str]:
    """The x86 CPU's feature flags (/proc/cpuinfo), empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split()[2:])
