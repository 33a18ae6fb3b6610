"""Uniform integer quantization (int2..int8, signed or unsigned) with min-max parameters.

Conventions (shared by quantize, dequantize and fake-quantize, so the three always agree):

- Integer zero point (``int32`` tensor):  ``q = clamp(round(x / s) + z, qmin, qmax)`` and
  ``x' = (q - z) * s``.  Rounding happens before the zero point is added, so ties are decided on
  ``x / s`` alone and real 0 is always exactly representable (it maps to ``z``).
- Float zero point (floating tensor, ``ZeroPointType.float32``): ``q = clamp(round(x / s + z),
  qmin, qmax)`` and ``x' = (q - z) * s``; ``z`` is not rounded, so the calibrated min and max map
  exactly onto ``qmin`` and ``qmax`` (real 0 is then generally not representable).
- No zero point (``None``): symmetric, FORMATS.md 2a.1: ``q = clamp(round(fl(x * fl(1 / max(s,
  2^-126)))), qmin, qmax)``, a product with the scale's float32 reciprocal rather than a division
  (the reference implementation's rounding: the two differ in the last bit of ``x / s`` for some
  inputs, which flips a tie now and then).  The power-of-two steps of MXINT8 and the shared-exponent
  formats pass ``divide=True``: an exact division, also for steps below 2^-126.

Signed symmetric scales (:func:`symmetric_scale`) are ``amax / ((qmax - qmin) / 2)``: amax/7.5 for
int4, amax/127.5 for int8, so that the code ``qmin`` (-8, -128) is used; this is the original GPTQ
quantizer's grid and it has a lower weight MSE than ``amax / qmax``.

A scale of 0 (an all-zero group with given qparams) is guarded: the division uses the smallest
positive float instead, the final product uses the real 0, so the group comes out as exact zeros and
never NaN/inf.  NaN in ``x`` stays NaN in fake-quantize; it has no integer code, so ``quantize``
treats it as 0 (the code of real 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quark.torch.quantization.config.type import RoundType, ZeroPointType

from ._chunk import Scratch, as_param, finish, run_chunked, start
from .rounding import parse_round_method, round_tensor_, rounder_

__all__ = [
    "int_range",
    "code_dtype",
    "symmetric_scale",
    "SCALE_FLOOR",
    "asymmetric_qparams",
    "zero_point_from_scale",
    "safe_scale",
    "reciprocal_scale",
    "quantize_int",
    "dequantize_int",
    "fake_quantize_int",
]


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-bit two's complement (signed) or unsigned integer."""
    if not 1 <= bits <= 16:
        raise ValueError(f"integer quantization supports 1..16 bits, got {bits}")
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """Torch dtype of codes in ``[qmin, qmax]``: uint8 for unsigned ranges, int8, else int32."""
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    return torch.int32


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """The divisor for ``scale`` (>= 0): zeros become the smallest float32 subnormal, every other
    value (NaN included) is kept.  A zero-scale group then divides to 0 or +-inf, clamps to the
    range and is multiplied back by the real 0: exact zeros, no NaN (module doc).  A clamp rather
    than a comparison: several times cheaper on the CPU."""
    return scale.clamp_min(2.0**-149)


#: the smallest scale a signed symmetric grid gets from its data (FORMATS.md 2a.1): an all-zero
#: group has scale 2^-23, not 0
SCALE_FLOOR = 2.0**-23
#: the divisor floor of the symmetric convention: ``fl(1 / max(s, 2^-126))`` is finite
_RECIPROCAL_FLOOR = 2.0**-126


def symmetric_scale(amax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """FORMATS.md 2a.1: ``max(fl(amax / ((qmax - qmin) / 2)), 2^-23)`` in float32 (amax/7.5 for int4,
    amax/127.5 for int8: the most negative code is used). NaN stays NaN."""
    scale = amax.float() / ((qmax - qmin) / 2)
    return torch.where(scale < SCALE_FLOOR, SCALE_FLOOR, scale)


def reciprocal_scale(scale: torch.Tensor) -> torch.Tensor:
    """``fl(1 / max(s, 2^-126))``: what the symmetric convention multiplies ``x`` by."""
    return torch.reciprocal(scale.clamp_min(_RECIPROCAL_FLOOR))


def asymmetric_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    qmin: int,
    qmax: int,
    zero_point_type: ZeroPointType | str = ZeroPointType.int32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of an affine integer grid covering ``[min_val, max_val]``.

    The range is first widened to include 0 (``min = min(min_val, 0)``, ``max = max(max_val, 0)``)
    and ``scale = (max - min) / (qmax - qmin)``, computed as ``(max/2 - min/2) / ((qmax-qmin)/2)``
    (the same float32 value for normal bounds, but no overflow for ranges beyond 1.7e38).

    - ``int32`` zero point: ``z = clamp(qmin - round_half_even(min / scale), qmin, qmax)``; real 0
      maps exactly to code ``z``.
    - ``float32`` zero point: ``z = qmin - min / scale`` unrounded; ``min`` maps to ``qmin``.

    An all-zero range gives scale 0 and ``z = qmin`` (0 maps to code ``qmin``).
    NaN bounds give a NaN scale (which carries the NaN through dequantization) and zero point ``qmin``.
    """
    lo = torch.clamp(min_val.float(), max=0.0)
    hi = torch.clamp(max_val.float(), min=0.0)
    scale = (hi * 0.5 - lo * 0.5) / ((qmax - qmin) * 0.5)
    return scale, zero_point_from_scale(lo, scale, qmin, qmax, zero_point_type)


def zero_point_from_scale(
    min_val: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    zero_point_type: ZeroPointType | str = ZeroPointType.int32,
) -> torch.Tensor:
    """Zero point placing ``min(min_val, 0)`` at ``qmin`` for a given ``scale`` (see
    :func:`asymmetric_qparams`); int32, or float32 unrounded for ``ZeroPointType.float32``."""
    zp_type = ZeroPointType.parse(zero_point_type, "zero_point_type")
    shifted = torch.clamp(min_val.float(), max=0.0) / safe_scale(scale.float())
    if zp_type is ZeroPointType.float32:
        return (qmin - shifted).nan_to_num_(nan=float(qmin))
    zp = (qmin - shifted.round_()).nan_to_num_(nan=float(qmin)).clamp_(qmin, qmax)
    return zp.to(torch.int32)


def _prepare(x, scale, zero_point, divide=False):
    """Float32 params shaped for ``x``: scale, guarded divisor (None when symmetric), reciprocal
    (None unless symmetric), zero point, and whether it is float."""
    s = as_param(scale, x)
    if zero_point is None and not divide:
        return s, None, reciprocal_scale(s), None, False
    if zero_point is None:
        return s, safe_scale(s), None, None, False
    zt = torch.as_tensor(zero_point, device=x.device)
    return s, safe_scale(s), None, as_param(zt, x), zt.is_floating_point()


def _to_codes_(y, zp, qmin, qmax, method, float_zp):
    """``y = x / s`` -> integer codes in [qmin, qmax], in place (NaN stays NaN)."""
    if zp is None:
        return round_tensor_(y, method).clamp_(qmin, qmax)
    if float_zp:
        return round_tensor_(y.add_(zp), method).clamp_(qmin, qmax)
    # Integer zero point: round first (ties decided on x / s), then shift.
    return round_tensor_(y, method).add_(zp).clamp_(qmin, qmax)


def fake_quantize_int(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int | None,
    qmin: int,
    qmax: int,
    round_method: RoundType | str | None = RoundType.half_even,
    out: torch.Tensor | None = None,
    scratch: Scratch | None = None,
    divide: bool = False,
) -> torch.Tensor:
    """``dequantize_int(quantize_int(x, ...))`` fused, computed in float32, returned in ``x.dtype``.

    ``scale`` and ``zero_point`` broadcast to ``x``; an integer-dtype ``zero_point`` uses the
    integer convention, a floating one the float-zero-point convention, None the symmetric one
    (module doc; ``divide``: by the scale instead of a product with its reciprocal).  ``out`` may be
    ``x`` for an in-place update; ``scratch`` is for callers already working on a chunk.
    """
    method = parse_round_method(round_method)
    s, div, inv, zp, float_zp = _prepare(x, scale, zero_point, divide)

    def kernel(xc, oc, scratch, divc, invc, sc, zpc):
        y = _to_codes_(start(xc, oc, scratch, divc, invc), zpc, qmin, qmax, method, float_zp)
        if zpc is not None:
            y.sub_(zpc)
        finish(y, oc, sc)

    return run_chunked(kernel, x, [div, inv, s, zp], out=out, scratch=scratch)


def fake_quantizer_int(
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    round_method: RoundType | str | None = RoundType.half_even,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`fake_quantize_int` with these parameters, prepared once, for many small tensors shaped
    like ``scale`` (GPTQ's column loop: one value per row): bit-identical results, without the
    per-call preparation and chunking, in as few operations as possible (the loop's cost is their
    count). An integer zero point moves into the clamp bounds, ``clamp(round(x / s) + z, qmin,
    qmax) - z = clamp(round(x / s), qmin - z, qmax - z)`` (exact: small integers in float32)."""
    method = parse_round_method(round_method)
    s, div, inv, zp, float_zp = _prepare(scale, scale, zero_point)
    lo: torch.Tensor | float = float(qmin)
    hi: torch.Tensor | float = float(qmax)
    if zp is not None and not float_zp:
        lo, hi, zp = qmin - zp, qmax - zp, None
    rnd = rounder_(method)

    def fake(x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float32 else x.float()
        y = torch.mul(xf, inv) if inv is not None else torch.div(xf, div)
        if zp is not None:  # float zero point: added before rounding
            rnd(y.add_(zp)).clamp_(lo, hi).sub_(zp)
        else:
            rnd(y).clamp_(lo, hi)
        y.mul_(s)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    return fake


def quantize_int(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int | None,
    qmin: int,
    qmax: int,
    round_method: RoundType | str | None = RoundType.half_even,
    divide: bool = False,
) -> torch.Tensor:
    """Integer codes in ``[qmin, qmax]`` (dtype from :func:`code_dtype`; ``divide`` as in
    :func:`fake_quantize_int`).

    NaN has no code: it is quantized as 0 (so it maps to the code of real 0).
    """
    method = parse_round_method(round_method)
    _, div, inv, zp, float_zp = _prepare(x, scale, zero_point, divide)

    def kernel(xc, oc, scratch, divc, invc, zpc):
        y = start(xc, scratch.get(1, xc.shape, torch.float32), scratch, divc, invc).nan_to_num_(nan=0.0)
        oc.copy_(_to_codes_(y, zpc, qmin, qmax, method, float_zp))

    return run_chunked(kernel, x, [div, inv, zp], out_dtype=code_dtype(qmin, qmax))


def dequantize_int(
    codes: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(codes - zero_point) * scale`` computed in float32, returned as ``dtype``."""
    s = as_param(scale, codes)
    zp = None if zero_point is None else as_param(torch.as_tensor(zero_point, device=codes.device), codes)

    def kernel(cc, oc, scratch, sc, zpc):
        y = start(cc, oc, scratch)
        if zpc is not None:
            y.sub_(zpc)
        finish(y, oc, sc)

    return run_chunked(kernel, codes, [s, zp], out_dtype=dtype)
