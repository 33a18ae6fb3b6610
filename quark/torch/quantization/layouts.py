"""Storage layout of a quantized weight: the tensors a frozen ``QuantLinear`` holds and export writes.

One :class:`WeightLayout` per weight spec turns element codes + qparams (what
:mod:`quark.torch.quantization.tensor_quantize` produces, in their natural shapes) into the stored
tensors of FORMATS.md section 4, and back.  The stored tensors are keyed by their checkpoint suffix
without the ``weight_`` prefix: ``weight``, ``scale``, ``zero_point``, ``scale_2``, ``zero_point_2``
(a second stage adds ``_2``; stage one of a two-stage spec is ``scale``).

Per element format (N out features, K in features):

==========================  ==================================  =====================================
element                     ``weight``                          code-stage ``scale`` / ``zero_point``
==========================  ==================================  =====================================
fp8 e4m3 / e5m2             ``float8_e4m3fn`` / ``e5m2`` [N, K]  float32, natural shape
int8 (and int2/int3/uint*)  int8 / uint8 [N, K]                  float32 / int32, natural
int4 / uint4 per group      int32 [K, N/8] (packed along N)      float32 [K/g, N] / int32 [K/g, N/8]
int4 / uint4 otherwise      int32 [N, K/8]                       float32 / int32, natural ([N] or [])
fp4 / fp6 (packed)          uint8 [N, K/2] / [N, 3K/4]           per scale format (below)
MX (e8m0 scales)            as the element above                 uint8 e8m0 codes [N, K/32]
float16 / bfloat16 casts    the cast tensor                      (none)
==========================  ==================================  =====================================

Scale formats: e8m0 -> uint8 codes; ``float8_e5m3`` (AMD fp4) -> uint8 unsigned-e5m3 codes;
otherwise float32.  Two stages:

- scale quantization (nvfp4, amdfp4_global): ``scale`` holds the per-group scales in the second
  stage's format (``float8_e4m3fn`` for nvfp4, e5m3 codes for amdfp4_global), ``scale_2`` the float32
  global scale ``[]``; the value is ``code * scale * scale_2``.
- progressive (int4_fp8): ``scale`` is the first (fp8 per-tensor) stage's scale ``s1`` and ``scale_2``
  the int4 per-channel scale ``s2`` of the fp8 codes (FORMATS.md 2a.4); the value is
  ``(code * scale_2) * scale``, in that order, bit for bit the fake-quantized weight (a loader that
  multiplies the two scales first, as vLLM's W4A8 one does, can differ in the last bit).

Packing of int4 follows ``pack_method`` (``reorder``: AutoAWQ nibble order, ``order``: natural);
fp4 packs the even element in the low nibble, fp6 four codes per three bytes (numerics.packing).

mx6 / mx9 / bfp16 have no serving layout: their frozen weight keeps the int8 mantissas and the
natural float32 steps, and export refuses them unless ``weight_format="fake_quantized"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quark.torch.quantization.config.config import QTensorConfig, TensorSpec
from quark.torch.quantization.config.type import Dtype, QSchemeType, ScaleType
from quark.torch.quantization.numerics import minifloat as nfp
from quark.torch.quantization.numerics.packing import pack, pack_int4, unpack, unpack_int4
from quark.torch.quantization.tensor_quantize import QParams, compute_qparams, quantize

__all__ = [
    "STORED_NAMES",
    "PACK_METHODS",
    "NoServingLayoutError",
    "WeightLayout",
    "element_dtype",
    "has_serving_layout",
    "activation_placeholders",
]

#: stored tensor names, in the order they are written
STORED_NAMES = ("weight", "scale", "zero_point", "scale_2", "zero_point_2")
PACK_METHODS = ("reorder", "order")

_SHARED = (Dtype.mx6, Dtype.mx9, Dtype.bfp16)
_CASTS = (Dtype.float16, Dtype.bfloat16)
_TORCH_FP8 = {Dtype.fp8_e4m3: torch.float8_e4m3fn, Dtype.fp8_e5m2: torch.float8_e5m2}


class NoServingLayoutError(ValueError):
    """The weight format has no real-quantized serving layout (mx6, mx9, bfp16)."""


def _stages(spec: TensorSpec) -> list[QTensorConfig]:
    return list(spec) if isinstance(spec, list) else [spec]


def element_dtype(spec: QTensorConfig) -> Dtype:
    """The element format of one stage (OCP MX stores its element type in ``mx_element_dtype``)."""
    return spec.mx_element_dtype if spec.dtype is Dtype.mx else spec.dtype


def _is_mx(spec: QTensorConfig) -> bool:
    return spec.dtype is Dtype.mx or spec.scale_type is ScaleType.float8_e8m0fnu


def _is_scale_quant(stages: list[QTensorConfig]) -> bool:
    return len(stages) == 2 and bool(stages[1].is_scale_quant)


def _code_index(stages: list[QTensorConfig]) -> int:
    """Index of the stage whose element codes are stored (progressive: the last)."""
    return 0 if len(stages) == 1 or _is_scale_quant(stages) else 1


def has_serving_layout(spec: TensorSpec) -> bool:
    stages = _stages(spec)
    return element_dtype(stages[_code_index(stages)]) not in _SHARED


def _transposed(spec: QTensorConfig) -> bool:
    """int4/uint4 per group is stored transposed (AWQ-style [K, N/8], scales [K/g, N])."""
    return (
        element_dtype(spec) in (Dtype.int4, Dtype.uint4)
        and spec.qscheme is QSchemeType.per_group
        and not _is_mx(spec)
    )


# -- scale codecs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Codec:
    """How a float32 scale is stored: ``f32``, a torch float8 dtype, or codes of a ``FloatFormat``."""

    kind: str  # "f32" | "torch" | "codes"
    torch_dtype: torch.dtype | None = None
    fmt: nfp.FloatFormat | None = None

    def encode(self, scale: torch.Tensor) -> torch.Tensor:
        if self.kind == "torch":
            return scale.float().to(self.torch_dtype)
        if self.kind == "codes":
            return nfp.encode(scale.float(), self.fmt)
        return scale.float()

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        if self.kind == "codes":
            return nfp.decode(stored, self.fmt).float()
        return stored.float()


_F32 = _Codec("f32")


def _format_codec(dtype: Dtype) -> _Codec:
    if dtype in _TORCH_FP8:
        return _Codec("torch", torch_dtype=_TORCH_FP8[dtype])
    if dtype is Dtype.fp8_e5m3:
        return _Codec("codes", fmt=nfp.UE5M3)
    raise ValueError(f"scales quantized to {dtype.value} have no storage format")


def _scale_codec(spec: QTensorConfig) -> _Codec:
    if _is_mx(spec):
        return _Codec("codes", fmt=nfp.E8M0)
    if spec.scale_type is ScaleType.float8_e5m3:
        return _Codec("codes", fmt=nfp.UE5M3)
    return _F32


# -- the layout ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightLayout:
    """Stored tensors of a weight quantized with ``spec`` (see the module docstring)."""

    spec: Any  # TensorSpec: a QTensorConfig or a list of two
    pack_method: str = "reorder"

    def __post_init__(self) -> None:
        if self.pack_method not in PACK_METHODS:
            raise ValueError(f"pack_method={self.pack_method!r}; allowed: {', '.join(PACK_METHODS)}")

    # -- structure -------------------------------------------------------------------------------
    @property
    def stages(self) -> list[QTensorConfig]:
        return _stages(self.spec)

    @property
    def code_index(self) -> int:
        return _code_index(self.stages)

    @property
    def code_spec(self) -> QTensorConfig:
        return self.stages[self.code_index]

    @property
    def serving(self) -> bool:
        return has_serving_layout(self.spec)

    def _codec(self, index: int) -> _Codec:
        stages = self.stages
        if _is_scale_quant(stages):
            return _format_codec(element_dtype(stages[1])) if index == 0 else _F32
        return _scale_codec(stages[index]) if index == self.code_index else _F32

    # -- codes -------------------------------------------------------------------------------------
    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        spec = self.code_spec
        dt = element_dtype(spec)
        if dt in _SHARED or dt in _CASTS:
            return codes
        if dt in _TORCH_FP8:
            return codes.to(torch.uint8).view(_TORCH_FP8[dt])
        if dt in (Dtype.int4, Dtype.uint4):
            if _transposed(spec):
                return pack_int4(codes.t().contiguous(), self.pack_method)
            return pack_int4(codes, self.pack_method)
        return pack(codes, dt)

    def _unpack(self, stored: torch.Tensor) -> torch.Tensor:
        spec = self.code_spec
        dt = element_dtype(spec)
        if dt in _SHARED or dt in _CASTS:
            return stored
        if dt in _TORCH_FP8:
            return stored.view(torch.uint8)
        if dt in (Dtype.int4, Dtype.uint4):
            codes = unpack_int4(stored, self.pack_method, signed=dt is Dtype.int4)
            return codes.t() if _transposed(spec) else codes
        return unpack(stored, dt)

    def _orient(self, t: torch.Tensor | None, is_zero_point: bool) -> torch.Tensor | None:
        """Code-stage scale / zero point into storage orientation."""
        if t is None or not _transposed(self.code_spec):
            return t
        t = t.t().contiguous()
        if is_zero_point and not t.is_floating_point():
            return pack_int4(t, self.pack_method)
        return t

    def _unorient(self, t: torch.Tensor | None, is_zero_point: bool) -> torch.Tensor | None:
        if t is None or not _transposed(self.code_spec):
            return t
        if is_zero_point and not t.is_floating_point():
            signed = element_dtype(self.code_spec) is Dtype.int4
            t = unpack_int4(t, self.pack_method, signed=signed).to(torch.int32)
        return t.t()

    # -- public ------------------------------------------------------------------------------------
    def store(self, codes: torch.Tensor, qparams: QParams | list[QParams | None] | None) -> dict[str, torch.Tensor]:
        """Stored tensors of a weight with element ``codes`` (``tensor_quantize.quantize``) and ``qparams``."""
        qps = list(qparams) if isinstance(qparams, (list, tuple)) else [qparams]
        out: dict[str, torch.Tensor] = {"weight": self._pack(codes)}
        for i, qp in enumerate(qps):
            if qp is None:
                continue
            suffix = "" if i == 0 else "_2"
            scale, zp = qp.scale, qp.zero_point
            if i == self.code_index:
                scale, zp = self._orient(scale, False), self._orient(zp, True)
            if scale is not None:
                out["scale" + suffix] = self._codec(i).encode(scale).contiguous()
            if zp is not None:
                out["zero_point" + suffix] = zp.contiguous()
        return out

    def load(self, stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, QParams | list[QParams]]:
        """Element codes and natural qparams back from stored tensors (inverse of :meth:`store`)."""
        codes = self._unpack(stored["weight"])
        qps: list[QParams] = []
        for i in range(len(self.stages)):
            suffix = "" if i == 0 else "_2"
            scale, zp = stored.get("scale" + suffix), stored.get("zero_point" + suffix)
            scale = None if scale is None else self._codec(i).decode(scale)
            if i == self.code_index:
                scale, zp = self._unorient(scale, False), self._unorient(zp, True)
            qps.append(QParams(scale, zp))
        return codes, (qps[0] if len(qps) == 1 else qps)

    def relayout(self, stored: dict[str, torch.Tensor], target: WeightLayout) -> dict[str, torch.Tensor]:
        """The same weight stored in ``target``'s layout (a no-op when the layouts are equal)."""
        if target == self:
            return dict(stored)
        return target.store(*self.load(stored))

    def placeholders(
        self, out_features: int, in_features: int, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Uninitialised stored tensors of the right shapes and dtypes (what a loader fills in)."""
        meta = torch.empty(out_features, in_features, device="meta")  # shapes only, no data or work
        qparams = compute_qparams(meta, self.spec)
        shaped = self.store(quantize(meta, self.spec, qparams), qparams)
        return {k: torch.empty(v.shape, dtype=v.dtype, device=device) for k, v in shaped.items()}


def activation_placeholders(spec: TensorSpec, features: int, device: torch.device | str | None = None,
                            ) -> dict[str, torch.Tensor]:
    """Uninitialised static qparams of an activation quantizer (keys ``scale``, ``zero_point``,
    ``scale_2``, ``zero_point_2``; dynamic stages have none) for activations with last dim ``features``."""
    stages = _stages(spec)
    meta = torch.empty(1, features, device="meta")
    qps = compute_qparams(meta, spec)
    qps = list(qps) if isinstance(qps, list) else [qps]
    if _is_scale_quant(stages) and stages[0].is_dynamic:
        qps[0] = None
    out: dict[str, torch.Tensor] = {}
    for i, (stage, qp) in enumerate(zip(stages, qps)):
        if qp is None or (stage.is_dynamic and not (_is_scale_quant(stages) and i == 1)):
            continue
        suffix = "" if i == 0 else "_2"
        for name, t in (("scale", qp.scale), ("zero_point", qp.zero_point)):
            if t is not None:
                out[name + suffix] = torch.empty(t.shape, dtype=t.dtype, device=device)
    return out


def qparam_tensors(prefix: str, qparams: QParams | list[QParams | None] | None, sep: str = "_") -> dict[str, torch.Tensor]:
    """Named tensors of natural-shape qparams: ``<prefix><sep>scale``, ``<prefix><sep>zero_point`` and, for a
    second stage, the same with ``_2`` (``sep="_"``: checkpoint names such as ``weight_scale``;
    ``sep="."``: module state such as ``weight_quantizer.scale``)."""
    out: dict[str, torch.Tensor] = {}
    for i, qp in enumerate(qparams if isinstance(qparams, list) else [qparams]):
        if qp is None:
            continue
        suffix = "" if i == 0 else "_2"
        for name in ("scale", "zero_point"):
            t = getattr(qp, name)
            if t is not None:
                out[f"{prefix}{sep}{name}{suffix}"] = t
    return out
