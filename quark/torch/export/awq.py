"""The AutoAWQ "GEMM" layout of 4-bit weight-only layers (``custom_mode="awq"``).

For a linear layer with K inputs, N outputs and groups of g along K (facts of the published AWQ
format, which vLLM's and transformers' AWQ loaders read):

- ``qweight``: int32 ``[K, N / 8]``: unsigned 4-bit codes ``q`` packed along N, eight per word, in
  the AutoAWQ nibble order (nibble i holds column ``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of each group of 8);
- ``qzeros``: int32 ``[K / g, N / 8]``: the zero points, packed the same way;
- ``scales``: ``[K / g, N]``;
- value ``w[n, k] = (q[k, n] - z[k / g, n]) * s[k / g, n]``.

uint4 (asymmetric) maps one to one.  int4 (symmetric, codes -8..7) is stored as ``q = code + 8`` with
all zero points 8, so ``(q - 8) * s`` is the same value; its config says ``zero_point: false``.
Per-channel weights are one group spanning K: ``group_size: -1``, scales ``[1, N]``.  Scales are
written in the model's dtype when that is lossless (AutoAWQ checkpoints use float16; engines cast on
load), else in float32, so a re-import is exact.
"""

from __future__ import annotations

from typing import Any

import torch

from quark.torch.quantization.config.config import QTensorConfig
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.numerics.packing import pack_int4, unpack_int4
from quark.torch.quantization.tensor_quantize import QParams

__all__ = ["AWQ_NAMES", "awq_unsupported_reason", "awq_group_size", "awq_config", "to_awq", "from_awq"]

AWQ_NAMES = ("qweight", "qzeros", "scales")
_OFFSET = 8  # int4 codes -8..7 are stored as code + 8 with zero point 8


def awq_unsupported_reason(spec: Any, has_activation_quant: bool) -> str | None:
    """Why a layer cannot be written in the AWQ layout (None: it can)."""
    if has_activation_quant:
        return "AWQ is weight-only, but this layer also quantizes its input or output"
    if not isinstance(spec, QTensorConfig):
        return "AWQ stores one quantization stage; this weight has two"
    if spec.dtype not in (Dtype.int4, Dtype.uint4):
        return f"AWQ stores int4/uint4 weights, this weight is {spec.dtype.value}"
    if spec.qscheme not in (QSchemeType.per_group, QSchemeType.per_channel):
        return f"AWQ stores per-group (or per-channel) scales, this weight is {spec.qscheme.value}"
    if spec.qscheme is QSchemeType.per_channel and spec.ch_axis not in (0, None):
        return "AWQ per-channel scales are per output channel (ch_axis=0)"
    if spec.dtype is Dtype.int4 and not spec.symmetric:
        return "asymmetric int4 (signed codes with a zero point) has no AWQ form; use uint4"
    return None


def awq_group_size(spec: QTensorConfig) -> int:
    return int(spec.group_size) if spec.qscheme is QSchemeType.per_group else -1


def awq_config(spec: QTensorConfig, modules_to_not_convert: list[str]) -> dict[str, Any]:
    """config.json ``quantization_config`` of an AWQ export."""
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": awq_group_size(spec),
        "zero_point": spec.dtype is Dtype.uint4,
        "version": "gemm",
        "modules_to_not_convert": list(modules_to_not_convert) or None,
    }


def _scale_dtype(scale: torch.Tensor, model_dtype: torch.dtype) -> torch.dtype:
    if model_dtype.is_floating_point and torch.equal(scale.to(model_dtype).float(), scale.float()):
        return model_dtype
    return torch.float32


def _grouped(t: torch.Tensor, spec: QTensorConfig) -> torch.Tensor:
    """Natural [N, K/g] (per group) or [N] (per channel) -> AWQ [K/g, N]."""
    return t.reshape(t.shape[0], -1).t().contiguous()


def to_awq(codes: torch.Tensor, qparams: QParams, spec: QTensorConfig, model_dtype: torch.dtype
           ) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` of a weight with element ``codes`` [N, K] and natural ``qparams``."""
    n = codes.shape[0]
    if n % 8:
        raise ValueError(f"AWQ packs 8 output channels per int32: out_features={n} is not a multiple of 8")
    q = codes.to(torch.int32)
    scale = _grouped(qparams.scale.float(), spec)
    if spec.dtype is Dtype.int4:
        q = q + _OFFSET
        zeros = torch.full(scale.shape, _OFFSET, dtype=torch.int32, device=scale.device)
    else:
        zeros = _grouped(qparams.zero_point.to(torch.int32), spec)
    return {
        "qweight": pack_int4(q.t().contiguous(), "reorder"),
        "qzeros": pack_int4(zeros, "reorder"),
        "scales": scale.to(_scale_dtype(scale, model_dtype)),
    }


def from_awq(tensors: dict[str, torch.Tensor], spec: QTensorConfig, out_features: int
             ) -> tuple[torch.Tensor, QParams]:
    """Element codes [N, K] and natural qparams of an AWQ layer (inverse of :func:`to_awq`)."""
    q = unpack_int4(tensors["qweight"], "reorder", signed=False).to(torch.int32).t()
    zeros = unpack_int4(tensors["qzeros"], "reorder", signed=False).to(torch.int32)
    scales = tensors["scales"].float()
    if q.shape[0] != out_features or scales.shape[-1] != out_features:
        raise ValueError(f"AWQ tensors of shape {tuple(tensors['qweight'].shape)} do not fit out_features={out_features}")
    per_channel = spec.qscheme is QSchemeType.per_channel
    natural = (lambda t: t.t().reshape(-1)) if per_channel else (lambda t: t.t().contiguous())
    if spec.dtype is Dtype.int4:
        if not bool((zeros == _OFFSET).all()):
            raise ValueError("AWQ checkpoint with zero_point=false must store every zero point as 8")
        return (q - _OFFSET).to(torch.int8).contiguous(), QParams(natural(scales))
    return q.to(torch.uint8).contiguous(), QParams(natural(scales), natural(zeros).contiguous())
