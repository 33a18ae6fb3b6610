"""Small floating-point formats (fp8, fp6, fp4, unsigned e5m3, e8m0): rounding, codes, values.

A format is a :class:`FloatFormat`.  Values are computed with float32 bit arithmetic: every value
of every format here is exactly representable in float32 (the smallest, 2^-127 of e8m0, as a
float32 subnormal), so rounding to a format is "scale to the step, round to an integer, scale
back" with the step a power of two read from the float32 exponent field.

Semantics of :func:`round_to_format` (FORMATS.md numerics notes): round half to even on the
format's mantissa grid (subnormals included), saturate to +-max (never inf, also for inf input),
NaN in gives NaN out.  Unsigned formats clamp negative input to their smallest value (0, or 2^-127
for e8m0, which has no zero).  E8M0 has no mantissa: it rounds to the nearest power of two with
ties (1.5 * 2^e) going up, whatever the round method (it only ever holds scales).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quark.torch.quantization.config.type import RoundType

from ._chunk import Scratch, as_param, finish, run_chunked, start
from .integer import safe_scale
from .rounding import parse_round_method, round_tensor_

__all__ = [
    "FloatFormat",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP6_E2M3",
    "FP6_E3M2",
    "FP4_E2M1",
    "UE5M3",
    "E8M0",
    "FORMATS",
    "round_to_format",
    "round_to_format_",
    "encode",
    "decode",
    "fake_quantize_fp",
    "pow2",
]

_EXP_MASK = 0x7F800000


@dataclass(frozen=True)
class FloatFormat:
    """A sign(optional)-exponent-mantissa format.

    ``specials`` says which codes are not finite numbers:

    - ``"ieee"``: all-ones exponent is inf (mantissa 0) or NaN (fp8 e5m2).
    - ``"fn"``: only the all-ones magnitude code is NaN, there is no inf (e4m3fn, ue5m3, e8m0).
    - ``"none"``: every code is a number (fp6, fp4).

    ``max_value`` is the largest finite value.  Formats without a mantissa (e8m0) have no zero and
    no subnormals: every code is ``2^(code - bias)``.
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    max_value: float
    signed: bool = True
    specials: str = "none"

    @property
    def bits(self) -> int:
        return int(self.signed) + self.ebits + self.mbits

    @property
    def has_subnormals(self) -> bool:
        return self.mbits > 0

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return 1 - self.bias if self.has_subnormals else -self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value (``floor(log2(max_value))``)."""
        return math.floor(math.log2(self.max_value))

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (for e8m0, its smallest value 2^-127)."""
        return 2.0 ** (self.emin - self.mbits)

    @property
    def nan_code(self) -> int | None:
        """The (positive) NaN code, or None when the format has no NaN."""
        mag_ones = (1 << (self.ebits + self.mbits)) - 1
        if self.specials == "fn":
            return mag_ones
        if self.specials == "ieee":
            return mag_ones  # exponent all ones, mantissa all ones
        return None

    @property
    def inf_code(self) -> int | None:
        if self.specials == "ieee":
            return ((1 << self.ebits) - 1) << self.mbits
        return None

    @property
    def max_code(self) -> int:
        """Code of ``max_value``."""
        return int(encode(torch.tensor([self.max_value]), self)[0])


FP8_E4M3 = FloatFormat("fp8_e4m3", 4, 3, 7, 448.0, specials="fn")
"""OCP fp8 E4M3 (torch.float8_e4m3fn): bias 7, max 448, NaN = S.1111.111, no inf."""
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, 15, 57344.0, specials="ieee")
"""OCP fp8 E5M2 (torch.float8_e5m2): IEEE-like, bias 15, max 57344, inf and NaN codes."""
FP6_E2M3 = FloatFormat("fp6_e2m3", 2, 3, 1, 7.5)
"""OCP MX fp6 E2M3: bias 1, max 7.5, no inf/NaN."""
FP6_E3M2 = FloatFormat("fp6_e3m2", 3, 2, 3, 28.0)
"""OCP MX fp6 E3M2: bias 3, max 28, no inf/NaN."""
FP4_E2M1 = FloatFormat("fp4_e2m1", 2, 1, 1, 6.0)
"""OCP MX fp4 E2M1: values 0, 0.5, 1, 1.5, 2, 3, 4, 6 (and negatives), no inf/NaN."""
UE5M3 = FloatFormat("ue5m3", 5, 3, 15, 114688.0, signed=False, specials="fn")
"""Unsigned e5m3 (AMD fp4 scales, FORMATS.md: bias 15, max 114688).

8 bits = 5 exponent + 3 mantissa, no sign.  The stated max 114688 = 1.75 * 2^16 is the code
0xFE (exponent 31, mantissa 6), so -- as in e4m3fn -- exponent 31 is a normal binade and only
the all-ones code 0xFF (which would be 1.875 * 2^16) is NaN; there is no inf.  Smallest normal
2^-14, smallest subnormal 2^-17.
"""
E8M0 = FloatFormat("e8m0", 8, 0, 127, 2.0**127, signed=False, specials="fn")
"""OCP MX shared scale E8M0 (torch.float8_e8m0fnu): 2^(code - 127) for codes 0..254, 255 = NaN."""

FORMATS: dict[str, FloatFormat] = {
    f.name: f for f in (FP8_E4M3, FP8_E5M2, FP6_E2M3, FP6_E3M2, FP4_E2M1, UE5M3, E8M0)
}


def pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**k`` for an integer tensor ``k`` in [-149, 127] (built from bits)."""
    k = k.to(torch.int32)
    normal = ((k.clamp(min=-126) + 127) << 23).view(torch.float32)
    sub = torch.bitwise_left_shift(torch.ones_like(k), (k + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(k >= -126, normal, sub)


def _round_pof2_(y: torch.Tensor) -> torch.Tensor:
    """e8m0 rounding in place: nearest power of two in [2^-127, 2^127], ties (1.5 * 2^e) up."""
    nan = torch.isnan(y)
    y.clamp_(2.0**-127, 2.0**127)
    b = y.view(torch.int32)
    # Normal floats: add half a binade's mantissa and drop the mantissa (ties round up).
    rounded = (b + 0x00400000) & _EXP_MASK
    # The one subnormal band [2^-127, 2^-126): ties 1.5 * 2^-127 go up to 2^-126.
    sub = torch.where(b >= 0x00600000, 0x00800000, 0x00400000)
    b.copy_(torch.where(b >= 0x00800000, rounded, sub))
    return y.masked_fill_(nan, float("nan"))


def round_to_format_(
    y: torch.Tensor,
    fmt: FloatFormat,
    round_method: RoundType | str | None = RoundType.half_even,
    scratch: torch.Tensor | None = None,
    signed_zero: bool = True,
) -> torch.Tensor:
    """Round a float32 tensor in place onto ``fmt``'s value grid (module doc for the semantics).

    ``scratch``: an optional int32 tensor shaped like ``y`` for the one temporary.
    ``signed_zero=False`` allows negative values that round to zero to give +0 (a faster path,
    used by fake-quantization where only the value matters).
    """
    if y.dtype != torch.float32:
        raise TypeError(f"round_to_format_ works on float32 tensors, got {y.dtype}")
    method = parse_round_method(round_method)
    lo = -fmt.max_value if fmt.signed else (0.0 if fmt.has_subnormals else fmt.min_subnormal)
    y.clamp_(lo, fmt.max_value)
    if not fmt.has_subnormals:
        return _round_pof2_(y)
    # The grid step at y is 2^(max(e, emin) - mbits), e the float32 exponent of y: subnormals of
    # the format share the step of its smallest binade.
    t = torch.bitwise_and(y.view(torch.int32), _EXP_MASK, out=scratch)
    t.clamp_(min=(fmt.emin + 127) << 23)
    if method is RoundType.half_even and not signed_zero:
        # Magic-number rounding: adding C = 1.5 * 2^(e - mbits + 23) puts y in a binade whose
        # float32 ulp is exactly the step, so the addition itself rounds y to the grid (ties to
        # even) and subtracting C is exact.  Two cheap ops instead of divide-round-multiply; a
        # negative value that rounds to zero comes out as +0 instead of -0 (equal values).
        t.add_(((23 - fmt.mbits) << 23) | (1 << 22))
        c = t.view(torch.float32)
        return y.add_(c).sub_(c)
    t.sub_(fmt.mbits << 23)
    step = t.view(torch.float32)
    return round_tensor_(y.div_(step), method).mul_(step)


def round_to_format(
    x: torch.Tensor, fmt: FloatFormat, round_method: RoundType | str | None = RoundType.half_even
) -> torch.Tensor:
    """``x`` rounded to the nearest value of ``fmt`` (float32 result, same shape and device).

    Ties go to the even mantissa (``round_method="half_even"``, the default) or follow
    ``round_method``; out-of-range values saturate to +-``fmt.max_value``; NaN stays NaN.
    """
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return fake_quantize_fp(x, None, fmt, round_method, out=out, signed_zero=True)


def fake_quantize_fp(
    x: torch.Tensor,
    scale: torch.Tensor | float | None,
    fmt: FloatFormat,
    round_method: RoundType | str | None = RoundType.half_even,
    out: torch.Tensor | None = None,
    scratch: Scratch | None = None,
    signed_zero: bool = False,
) -> torch.Tensor:
    """``round_to_format(x / scale, fmt) * scale``, fused; result in ``x.dtype`` (or ``out``).

    Values that round to zero may come out as +0 where the exact result is -0 (``signed_zero``
    keeps the sign, at some cost); everything else is bit-identical to the unfused expression.

    ``scale`` (>= 0) broadcasts to ``x``; a zero scale yields zeros (see ``integer.safe_scale``).
    ``out`` may be ``x`` for an in-place update; ``scratch`` is for callers already working on a
    chunk.
    """
    method = parse_round_method(round_method)
    s = None if scale is None else as_param(scale, x)
    div = None if s is None else safe_scale(s)

    def kernel(xc, oc, scratch, divc, sc):
        y = start(xc, oc, scratch, divc)
        finish(round_to_format_(y, fmt, method, scratch.get(1, y.shape, torch.int32), signed_zero), oc, sc)

    return run_chunked(kernel, x, [div, s], out=out, scratch=scratch)


def encode(x: torch.Tensor, fmt: FloatFormat, round_method: RoundType | str | None = RoundType.half_even) -> torch.Tensor:
    """Codes (uint8) of ``x`` rounded to ``fmt`` (saturating, see :func:`round_to_format`).

    The layout is sign | exponent | mantissa from the top used bit down (fp8 codes equal the bit
    patterns of ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``).  NaN becomes the format's
    (all-ones, signed like the input) NaN code; formats without NaN (fp6, fp4) encode NaN as +0 --
    in the block formats the NaN is carried by the scale instead.
    """
    v = round_to_format(x, fmt, round_method)
    nan = torch.isnan(v)
    a = v.abs().nan_to_num_(nan=0.0)
    b = a.view(torch.int32)
    if fmt.has_subnormals:
        e = (b >> 23) - 127 + fmt.bias  # biased exponent in the format
        normal = (e << fmt.mbits) | ((b >> (23 - fmt.mbits)) & ((1 << fmt.mbits) - 1))
        sub = (a * (1.0 / fmt.min_subnormal)).to(torch.int32)  # exact: a is a multiple of the step
        mag = torch.where(e >= 1, normal, sub)
    else:  # e8m0: 2^(code - 127); the float32 subnormal 2^-127 is code 0
        mag = torch.clamp((b >> 23) - 127 + fmt.bias, min=0)
    if fmt.nan_code is not None:
        mag = torch.where(nan, fmt.nan_code, mag)
    if fmt.signed:
        sign = torch.signbit(v) if fmt.nan_code is not None else torch.signbit(v) & ~nan
        mag = mag | (sign.to(torch.int32) << (fmt.ebits + fmt.mbits))
    return mag.to(torch.uint8)


def decode(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Float32 values of ``fmt`` codes (bit-exact; NaN/inf codes give NaN/inf)."""
    c = codes.to(torch.int32) & ((1 << fmt.bits) - 1)
    mag_bits = fmt.ebits + fmt.mbits
    m_all = c & ((1 << mag_bits) - 1)
    e = m_all >> fmt.mbits
    m = m_all & ((1 << fmt.mbits) - 1)
    if fmt.has_subnormals:
        normal = (((e - fmt.bias + 127) << 23) | (m << (23 - fmt.mbits))).view(torch.float32)
        val = torch.where(e == 0, m.to(torch.float32) * fmt.min_subnormal, normal)
    else:
        val = torch.where(e == 0, 2.0**-127, ((e - fmt.bias + 127) << 23).view(torch.float32))
    if fmt.specials == "fn":
        val = torch.where(m_all == fmt.nan_code, float("nan"), val)
    elif fmt.specials == "ieee":
        top = e == (1 << fmt.ebits) - 1
        val = torch.where(top, torch.where(m == 0, float("inf"), float("nan")), val)
    if fmt.signed:
        val = torch.where((c >> mag_bits) == 1, -val, val)
    return val
