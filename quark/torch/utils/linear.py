"""``linear(x, weight, bias)``: ``F.linear`` with a faster float32 kernel on CPU where one exists.

PyTorch's CPU build runs float32 ``F.linear`` through MKL's SGEMM. oneDNN (also in every x86 build,
the kernel behind bfloat16 linears and inductor's CPU linears) has its own JIT-compiled AVX-512
float32 kernels; on the AMD EPYC (Zen 4) machines this project develops on they run isolated
products of the calibration shapes at 1.15-1.9x MKL's rate (512 x 576 -> 1536: 1.25-1.5x; the
49152-wide vocabulary projection 1.57x), while for small products (under a few million
multiply-adds) MKL's lower call overhead wins. Whole runs gain less and unevenly (evaluation about
15%, GPTAQ about 5%, GPTQ and AWQ within the machine's noise; ``docs/benchmarks.md``), since Gram
matrices, attention and element-wise work are unchanged.

oneDNN's op has no autograd, so it is used only where no gradient is wanted; otherwise (and for
other devices, dtypes, small products, under autocast, or with ``QUARK_ONEDNN_LINEAR=0`` in the
environment) this is ``F.linear``. Both are float32 products with float32 accumulation; they differ only in summation
order (relative differences around 1e-6).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

#: products with fewer multiply-adds than this stay on ``F.linear`` (oneDNN's per-call overhead)
MIN_MACS = 1 << 23


def _available() -> bool:
    if os.environ.get("QUARK_ONEDNN_LINEAR", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _available()


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):  # F.linear follows the autocast dtype; oneDNN's op would not
        return False
    if weight.device.type != "cpu" or weight.dim() != 2 or x.dim() < 2 or x.shape[-1] != weight.shape[1]:
        return False
    if x.is_sparse or weight.is_sparse:
        return False
    # oneDNN reads a strided bias (b[::2]) as if it were contiguous: wrong outputs
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu" or not bias.is_contiguous()):
        return False
    # a weight with strided rows (w[::2]) takes oneDNN's reference path: seconds instead of milliseconds
    if not (weight.is_contiguous() or weight.t().is_contiguous()) or x.stride(-1) != 1:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False
    return x.numel() * weight.shape[0] >= MIN_MACS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``x @ weight.T + bias``), through oneDNN when it applies (see
    the module docstring)."""
    if _ONEDNN and _onednn_applies(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
