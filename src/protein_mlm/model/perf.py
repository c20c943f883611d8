"""Training FLOPs of an ESM transformer and the accelerator peaks that model FLOPs utilisation (MFU) divides by."""

import logging
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

# Dense (no sparsity) tensor-core peak TFLOP/s from the vendors' datasheets, by the exact name the GPU reports
# (`torch.cuda.get_device_properties(i).name`), so "NVIDIA L4" is not "NVIDIA L40" and an NVL part is not an SXM one.
# "bf16" is the 16-bit tensor-core peak (bf16, or fp16 on T4/V100, which have no bf16); "fp32" is plain fp32
# (PyTorch's default matmul precision, no TF32).
_H100_SXM = {"bf16": 989.0, "fp32": 67.0}
_NVL = {"bf16": 835.5, "fp32": 60.0}  # H100 NVL and H200 NVL (one card): 1,671 TFLOP/s bf16 with sparsity
_A100 = {"bf16": 312.0, "fp32": 19.5}  # SXM and PCIe alike
_V100_SXM = {"bf16": 125.0, "fp32": 15.7}
_V100_PCIE = {"bf16": 112.0, "fp32": 14.0}
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100": _H100_SXM,
    "NVIDIA H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "NVIDIA H100 NVL": _NVL,
    "NVIDIA H200": _H100_SXM,
    "NVIDIA H200 NVL": _NVL,
    "NVIDIA GH200 480GB": _H100_SXM,
    "NVIDIA B200": {"bf16": 2250.0, "fp32": 80.0},
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA L40S": {"bf16": 362.0, "fp32": 91.6},
    "NVIDIA L40": {"bf16": 181.0, "fp32": 90.5},
    "NVIDIA L4": {"bf16": 121.0, "fp32": 30.3},
    "NVIDIA A40": {"bf16": 149.7, "fp32": 37.4},
    "NVIDIA A10": {"bf16": 125.0, "fp32": 31.2},
    "NVIDIA A10G": {"bf16": 70.0, "fp32": 31.2},
    "Tesla T4": {"bf16": 65.0, "fp32": 8.1},  # fp16 tensor cores
    "Tesla V100-SXM2-16GB": _V100_SXM,
    "Tesla V100-SXM2-32GB": _V100_SXM,
    "Tesla V100-PCIE-16GB": _V100_PCIE,
    "Tesla V100-PCIE-32GB": _V100_PCIE,
    "Tesla V100S-PCIE-32GB": {"bf16": 130.0, "fp32": 16.4},
}


def precision_kind(precision: str | int) -> str:
    """'bf16' for half/mixed precision (tensor-core peak), else 'fp32'."""
    return "bf16" if "16" in str(precision) and not str(precision).startswith("32") else "fp32"


def lookup_peak_tflops(device_name: str, precision: str | int) -> float | None:
    """The datasheet peak of a GPU known by this exact name at this precision, or None."""
    peaks = GPU_PEAK_TFLOPS.get(device_name.strip())
    return peaks[precision_kind(precision)] if peaks else None


def resolve_peak_tflops(peak_tflops: float | None, precision: str | int, gpu_name: str | None) -> float | None:
    """The configured peak, else the datasheet value of the GPU named; None on CPUs (no single honest number) and
    for a GPU not in the table (a wrong MFU is worse than none: one warning says how to set it)."""
    if peak_tflops:
        return float(peak_tflops)
    if not gpu_name:
        return None
    peak = lookup_peak_tflops(gpu_name, precision)
    if peak is None:
        log.warning("no datasheet peak for %r: MFU is not reported; set perf.peak_tflops=<dense TFLOP/s>", gpu_name)
    return peak


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
