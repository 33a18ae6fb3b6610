"""OCP Microscaling (MX) formats, OCP MX v1.0: blocks share an E8M0 power-of-two scale.

A block of ``block_size`` (32 in the spec) consecutive elements along the last dim shares the
scale ``X = 2^s``; each element is stored as ``P_i = quantize(V_i / X)`` in the element format
(fp4 e2m1, fp6 e2m3/e3m2, fp8 e4m3/e5m2 with round-half-even and saturation, or MXINT8: an int8
two's complement code with an implicit 2^-6, i.e. ``P_i = code * 2^-6``), and ``V_i ~ X * P_i``.

The shared exponent ``s`` comes from the block's absolute maximum ``amax`` (``ScaleCalculationMode``):

- ``floor`` (the OCP v1.0 rule): ``s = floor(log2(amax)) - emax_elem``.  The largest element can
  then exceed the element max and be clipped (amax 7.9 in fp4: X = 1, 7.9 -> 6).
- ``even`` (default, FORMATS.md): round ``amax`` to the element's mantissa width, ties up, before
  ``floor(log2(.))``, so a block whose largest element would round up to the next binade moves to
  the next scale instead of clipping (amax 7.9 in fp4: 7.9 -> 8, X = 2, 7.9 -> 4 * 2 = 8).
- ``ceil``: ``s = ceil(log2(amax)) - emax_elem`` (never clips, coarser).

``s`` is clamped to E8M0's range [-127, 127]; an all-zero block gets ``s = -127`` (code 0), a
valid scale.  A block containing NaN gets the NaN scale code 0xFF, and decodes to all NaN as the
spec prescribes for a NaN scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quark.torch.quantization.config.type import Dtype, RoundType, ScaleCalculationMode

from . import _chunk
from ._chunk import Scratch, run_chunked
from .integer import dequantize_int, fake_quantize_int, quantize_int
from .minifloat import (
    E8M0,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    FloatFormat,
    decode,
    encode,
    fake_quantize_fp,
)

__all__ = [
    "MXElement",
    "MXINT8_QMAX",
    "MX_ELEMENTS",
    "mx_element",
    "absmax",
    "block_view",
    "mx_scale_codes",
    "mx_scale_from_amax",
    "mx_quantize",
    "mx_dequantize",
    "mx_fake_quantize",
    "fake_quantize_elements",
]

MX_BLOCK_SIZE = 32
_INT8_EMAX = 0
_INT8_MBITS = 6  # MXINT8 values code * 2^-6: six fraction bits in [1, 2)
MXINT8_QMAX = 127  # symmetric: the OCP max normal 1 63/64; -128 (= -2) is not produced


@dataclass(frozen=True)
class MXElement:
    """An MX element type: a float format, or MXINT8 when ``fmt`` is None."""

    name: str
    fmt: FloatFormat | None

    @property
    def emax(self) -> int:
        """Exponent of the element's largest normal (``emax_elem`` of OCP MX v1.0, table 1)."""
        return _INT8_EMAX if self.fmt is None else self.fmt.emax

    @property
    def mbits(self) -> int:
        return _INT8_MBITS if self.fmt is None else self.fmt.mbits

    @property
    def is_int(self) -> bool:
        return self.fmt is None


MX_ELEMENTS: dict[str, MXElement] = {
    Dtype.fp4.value: MXElement("fp4", FP4_E2M1),
    Dtype.fp6_e2m3.value: MXElement("fp6_e2m3", FP6_E2M3),
    Dtype.fp6_e3m2.value: MXElement("fp6_e3m2", FP6_E3M2),
    Dtype.fp8_e4m3.value: MXElement("fp8_e4m3", FP8_E4M3),
    Dtype.fp8_e5m2.value: MXElement("fp8_e5m2", FP8_E5M2),
    Dtype.int8.value: MXElement("int8", None),
}


def mx_element(element: MXElement | Dtype | str) -> MXElement:
    """Parse an element type (``Dtype.fp4``, ``"fp6_e2m3"``, ``"int8"``, ...)."""
    if isinstance(element, MXElement):
        return element
    key = element.value if isinstance(element, Dtype) else str(element)
    if key not in MX_ELEMENTS:
        raise ValueError(f"MX element type {key!r} is not supported; allowed: {', '.join(MX_ELEMENTS)}")
    return MX_ELEMENTS[key]


def block_view(x: torch.Tensor, block_size: int, what: str = "block size") -> torch.Tensor:
    """``x`` viewed as ``[numel / block_size, block_size]`` blocks along its last dim."""
    k = x.shape[-1] if x.dim() else 1
    if block_size <= 0 or k % block_size:
        raise ValueError(f"{what} {block_size} must divide the last dim of the tensor, which is {k} (shape {tuple(x.shape)})")
    return x.reshape(-1, block_size)


def absmax(
    x: torch.Tensor, dim: int | None = None, keepdim: bool = True, scratch: Scratch | None = None
) -> torch.Tensor:
    """``max |x|`` over ``dim`` (all dims when None) in float32, NaN-propagating.

    Row maxima (``dim`` the last of a 2-D ``x``) are taken on the int32 bit patterns of ``|x|``:
    for non-negative floats the integer order is the float order and a (positive) NaN is above
    everything, and the integer reduction vectorises over short rows where the float one does
    not (4x faster for groups of 16).  ``|x|`` goes to a chunk-sized scratch buffer (``scratch``
    from a caller already working on a chunk), so no full-size temporary is made.
    """
    if dim is None:
        if x.dim() == 2 and x.device.type == "cpu" and x.numel() > 2 * _chunk.CHUNK_ELEMS:
            amax = absmax(x, 1).amax()  # row maxima chunk by chunk (on the worker pool), then one
        else:
            lo, hi = torch.aminmax(x)
            amax = torch.maximum(hi.float(), lo.float().neg())
        return amax.reshape((1,) * x.dim() if keepdim else ())
    if x.dim() != 2 or dim not in (1, -1):
        return torch.maximum(x.amax(dim, keepdim=keepdim).float(), x.amin(dim, keepdim=keepdim).float().neg_())

    def rows_max(xc, oc, scratch):
        a = scratch.get(2, xc.shape, torch.float32)
        if xc.dtype == torch.float32:
            torch.abs(xc, out=a)
        else:
            a.copy_(xc).abs_()
        torch.amax(a.view(torch.int32), 1, keepdim=True, out=oc.view(torch.int32))

    out = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    if scratch is not None:
        rows_max(x, out, scratch)
    else:
        run_chunked(rows_max, x, [], out=out)
    return out if keepdim else out.view(-1)


def _exponent_bits(amax: torch.Tensor, elem: MXElement, mode: ScaleCalculationMode | str | None) -> torch.Tensor:
    """float32 exponent bits ``(s + 127) << 23`` of the shared scale, ``s`` clamped to [-127, 127]."""
    mode = ScaleCalculationMode.parse(mode or ScaleCalculationMode.even, "scale_calculation_mode")
    b = amax.float().view(torch.int32)
    if mode is ScaleCalculationMode.even:
        b = b + (1 << (22 - elem.mbits))  # half an ulp of an mbits mantissa: round half up
    elif mode is ScaleCalculationMode.ceil:
        b = b + 0x007FFFFF  # any nonzero mantissa carries into the exponent
    else:
        b = b.clone()
    # floor(log2) of the (rounded) amax is the exponent field (0 and float32 subnormals: -127).
    b.bitwise_and_(0x7F800000).sub_(elem.emax << 23)
    return b.clamp_(0, 254 << 23)


def mx_scale_codes(
    amax: torch.Tensor,
    element: MXElement | Dtype | str,
    mode: ScaleCalculationMode | str | None = ScaleCalculationMode.even,
) -> torch.Tensor:
    """E8M0 codes (uint8) of the shared scales of blocks with absolute maximum ``amax`` (>= 0)."""
    bits = _exponent_bits(amax, mx_element(element), mode)
    return (bits >> 23).masked_fill_(torch.isnan(amax), 255).to(torch.uint8)


def mx_scale_from_amax(
    amax: torch.Tensor,
    element: MXElement | Dtype | str,
    mode: ScaleCalculationMode | str | None = ScaleCalculationMode.even,
) -> torch.Tensor:
    """The shared scales ``X = 2^s`` as float32 (NaN for NaN blocks); equals
    ``decode(mx_scale_codes(amax), E8M0)``."""
    bits = _exponent_bits(amax, mx_element(element), mode)
    # Exponent field 0 is s = -127: the float32 subnormal 2^-127.
    scale = bits.view(torch.float32).clamp_min_(2.0**-127)
    return scale.masked_fill_(torch.isnan(amax), float("nan"))


def _element_step(elem: MXElement, scale: torch.Tensor) -> torch.Tensor:
    """What an element code is multiplied by: ``X`` (floats) or ``X * 2^-6`` (MXINT8, exact)."""
    return scale * 2.0**-_INT8_MBITS if elem.is_int else scale


def fake_quantize_elements(
    x: torch.Tensor,
    scale: torch.Tensor,
    element: MXElement | Dtype | str,
    round_method: RoundType | str | None = RoundType.half_even,
    out: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """Elements of MX blocks given their scales ``X`` (float32, broadcastable): ``X * P(x / X)``."""
    elem = mx_element(element)
    if elem.is_int:
        step = _element_step(elem, scale)
        return fake_quantize_int(x, step, None, -MXINT8_QMAX, MXINT8_QMAX, round_method, out=out, scratch=scratch)
    return fake_quantize_fp(x, scale, elem.fmt, round_method, out=out, scratch=scratch)


def mx_fake_quantize(
    x: torch.Tensor,
    element: MXElement | Dtype | str,
    block_size: int = MX_BLOCK_SIZE,
    mode: ScaleCalculationMode | str | None = ScaleCalculationMode.even,
    round_method: RoundType | str | None = RoundType.half_even,
) -> torch.Tensor:
    """MX quantize-dequantize of ``x`` (blocks along the last dim), same dtype/shape as ``x``.

    Scales and elements are computed chunk by chunk in one pass (see ``_chunk``).
    """
    elem = mx_element(element)
    xb = block_view(x, block_size)

    def kernel(xc, oc, scratch):
        scale = mx_scale_from_amax(absmax(xc, 1, scratch=scratch), elem, mode)
        fake_quantize_elements(xc, scale, elem, round_method, out=oc, scratch=scratch)

    return run_chunked(kernel, xb, []).view(x.shape)


def mx_quantize(
    x: torch.Tensor,
    element: MXElement | Dtype | str,
    block_size: int = MX_BLOCK_SIZE,
    mode: ScaleCalculationMode | str | None = ScaleCalculationMode.even,
    round_method: RoundType | str | None = RoundType.half_even,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(element_codes, scale_codes)``: codes shaped like ``x`` (uint8 for float elements, int8 for
    MXINT8), E8M0 scale codes (uint8) shaped ``[..., K / block_size]``."""
    elem = mx_element(element)
    xb = block_view(x, block_size)
    scodes = mx_scale_codes(absmax(xb, 1), elem, mode)
    scale = decode(scodes, E8M0)
    if elem.is_int:
        codes = quantize_int(xb, _element_step(elem, scale), None, -MXINT8_QMAX, MXINT8_QMAX, round_method)
    else:
        codes = encode(xb.float() / scale, elem.fmt, round_method)  # exact division by 2^s
    return codes.view(x.shape), scodes.view(*x.shape[:-1], -1)


def mx_dequantize(
    codes: torch.Tensor,
    scale_codes: torch.Tensor,
    element: MXElement | Dtype | str,
    block_size: int = MX_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values ``X * P_i`` from element codes and E8M0 scale codes (NaN scale code -> NaN block)."""
    elem = mx_element(element)
    cb = block_view(codes, block_size)
    scale = decode(scale_codes.reshape(-1, 1), E8M0)
    if elem.is_int:
        out = dequantize_int(cb, _element_step(elem, scale), None, dtype=dtype)
    else:
        out = (decode(cb, elem.fmt) * scale).to(dtype)
    return out.view(codes.shape)
