"""Shared-exponent block formats: MX6 / MX9 (shared microexponents) and BFP16.

Rouhani et al. 2023, "Shared Microexponents: A Little Shifting Goes a Long Way" (ISCA'23): a
block of ``block_size`` elements shares an 8-bit exponent ``E``; each sub-block of
``micro_block`` elements shares a ``micro_bits``-bit micro-exponent ``d`` (a right shift); each
element is a sign and ``mantissa_bits`` magnitude bits.  MX9 = (16, 7 bits, pairs, 1 bit),
MX6 = (16, 4 bits, pairs, 1 bit); BFP16 is plain block floating point, (8, 7 bits, no micro
exponent).  One implementation covers all three.

Conventions (the paper's, made concrete):

- ``E = floor(log2(max |block|))`` clamped to [-127, 127] (an all-zero block gets -127); stored
  biased by 127 in a uint8, 255 marking a NaN block (decodes to NaN).
- ``d = min(E - floor(log2(max |sub-block|)), 2^micro_bits - 1)``, i.e. the number of
  ``k = 1 .. 2^micro_bits - 1`` with ``max |sub-block| < 2^(E - k + 1)``: a sub-block whose own
  maximum lies below the block's binade shifts down, gaining precision (all-zero sub-blocks shift
  fully).
- Elements are sign-magnitude integers ``M`` with ``|M| <= 2^m - 1`` on the fixed-point grid
  ``ulp = 2^(E - d + 1 - m)``: the block's largest element ``[2^E, 2^(E+1))`` uses the top bit.
  ``M = clamp(round_half_even(x / ulp), -(2^m - 1), 2^m - 1)``, value ``M * ulp``.

BFP16 follows the reference implementation's block floating point instead (FORMATS.md 2a.5,
``overflow_step``): ``E = floor(float32 log2(max |block|))``, step ``s = 2^(E - 6)`` (``2^-23`` for an
all-zero block); when some element rounds to ``+128`` steps (``rne(x / s) >= 128``) the step doubles;
codes are two's complement ``clamp(rne(x / s), -128, 127)``, so ``-2^(E+1)`` keeps its code -128.
NaN and inf count as 0 (for the exponent and as elements), as the reference treats them. The
float32 ``log2`` of a maximum just below a power of two can round up to it: that block then gets the
next binade's step, as in the reference. Exponents are kept in [-127, 127] (blocks whose maximum is
subnormal or within a step of float32's largest value differ from the reference there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quark.torch.quantization.config.type import Dtype, RoundType

from ._chunk import finish, run_chunked, start
from .integer import dequantize_int, quantize_int
from .minifloat import pow2
from .mx import absmax, block_view
from .rounding import parse_round_method, round_tensor_

__all__ = [
    "SharedExponentFormat",
    "MX6",
    "MX9",
    "BFP16",
    "SHARED_EXPONENT_FORMATS",
    "shared_exponent_format",
    "shared_exponents",
    "ulp_from_exponents",
    "shared_quantize",
    "shared_dequantize",
    "shared_fake_quantize",
]


@dataclass(frozen=True)
class SharedExponentFormat:
    name: str
    block_size: int
    mantissa_bits: int
    micro_block: int
    micro_bits: int
    #: the BFP16 rule of the module doc: float32 log2 exponent, a step that doubles on overflow,
    #: two's complement codes, NaN/inf as 0
    overflow_step: bool = False

    @property
    def qmax(self) -> int:
        return (1 << self.mantissa_bits) - 1

    @property
    def qmin(self) -> int:
        """The most negative code: ``-qmax`` (sign-magnitude), ``-qmax - 1`` with ``overflow_step``."""
        return -self.qmax - 1 if self.overflow_step else -self.qmax

    @property
    def bits_per_element(self) -> float:
        """Average storage bits: sign + mantissa + shared bits amortised over the block."""
        shared = 8 + self.micro_bits * (self.block_size // self.micro_block)
        return 1 + self.mantissa_bits + shared / self.block_size


MX9 = SharedExponentFormat("mx9", 16, 7, 2, 1)
MX6 = SharedExponentFormat("mx6", 16, 4, 2, 1)
BFP16 = SharedExponentFormat("bfp16", 8, 7, 8, 0, overflow_step=True)
SHARED_EXPONENT_FORMATS: dict[str, SharedExponentFormat] = {
    Dtype.mx6.value: MX6,
    Dtype.mx9.value: MX9,
    Dtype.bfp16.value: BFP16,
}


def shared_exponent_format(fmt: SharedExponentFormat | Dtype | str) -> SharedExponentFormat:
    if isinstance(fmt, SharedExponentFormat):
        return fmt
    key = fmt.value if isinstance(fmt, Dtype) else str(fmt)
    if key not in SHARED_EXPONENT_FORMATS:
        raise ValueError(f"{key!r} is not a shared-exponent format; allowed: {', '.join(SHARED_EXPONENT_FORMATS)}")
    return SHARED_EXPONENT_FORMATS[key]


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) of a float32 a >= 0 from its exponent field (-127 for 0 and subnormals)."""
    return (a.view(torch.int32) >> 23) - 127


def _block_exponent(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, nan)`` per block row of ``xb``: E = floor(log2(max|block|)) clamped to [-127, 127]."""
    amax = absmax(xb, 1)
    return _floor_log2(amax).clamp_(-127, 127), torch.isnan(amax)


def _block_step(amax: torch.Tensor, m: int) -> torch.Tensor:
    """``2^(E + 1 - m)`` per block from its float32 amax, NaN for NaN blocks (the steps of
    :func:`ulp_from_exponents` for ``d = 0``).  The exponent field of amax, clamped to [0x00400000,
    254 << 23], reads as the float ``2^E`` with ``E`` in [-127, 127] (-127 for 0 / subnormals, as
    2^-127); the product with 2^(1-m) is exact, also where it is subnormal."""
    e = amax.view(torch.int32) & 0x7F800000
    step = e.clamp_(0x00400000, 254 << 23).view(torch.float32).mul_(2.0 ** (1 - m))
    return step.masked_fill_(torch.isnan(amax), float("nan"))


def _thresholds(e: torch.Tensor, fmt: SharedExponentFormat) -> list[torch.Tensor]:
    """``2^(E - k + 1)`` for k = 1 .. 2^micro_bits - 1: d >= k iff max|sub-block| < threshold k."""
    return [pow2(e - k + 1) for k in range(1, 1 << fmt.micro_bits)]


def _finite(x: torch.Tensor) -> torch.Tensor:
    """Float32 ``x`` with NaN and +-inf replaced by 0 (the BFP16 rule)."""
    return torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)


def _overflow_step_exponents(xb: torch.Tensor, fmt: SharedExponentFormat,
                             method: RoundType = RoundType.half_even) -> torch.Tensor:
    """Per block row of ``xb`` (float32, finite) the exponent ``E`` of the step ``2^(E + 1 - m)``
    under the BFP16 rule (module doc), int32 in [-127, 127]."""
    m = fmt.mantissa_bits
    a = xb.abs().amax(1, keepdim=True)
    e = torch.floor(torch.log2(a)).nan_to_num_(neginf=-127.0).clamp_(-127, 127).to(torch.int32)
    e = torch.where(a == 0, int(-23 + m - 1), e)  # the all-zero block's step is 2^-23
    step = pow2(e + 1 - m)
    top = round_tensor_(xb.amax(1, keepdim=True) / step, method)  # rounding is monotonic: the largest x
    return torch.where(top >= (1 << m), e + 1, e).clamp_(max=127)


def shared_exponents(x: torch.Tensor, fmt: SharedExponentFormat | Dtype | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exponents, micro_exponents)`` of ``x``'s blocks along the last dim.

    ``exponents``: uint8 ``E + 127`` shaped ``[..., K / block_size]`` (255 for a block with NaN);
    ``micro_exponents``: uint8 ``d`` shaped ``[..., K / micro_block]``.
    """
    fmt = shared_exponent_format(fmt)
    xb = block_view(x, fmt.block_size)
    if fmt.overflow_step:  # no micro-exponents, no NaN blocks
        e = _overflow_step_exponents(_finite(xb), fmt)
        lead = x.shape[:-1]
        return (e + 127).to(torch.uint8).view(*lead, -1), torch.zeros_like(e, dtype=torch.uint8).view(*lead, -1)
    e, nan = _block_exponent(xb)
    per_block = fmt.block_size // fmt.micro_block
    sub_amax = absmax(x.reshape(-1, fmt.micro_block), 1).view(-1, per_block)
    d = torch.zeros_like(sub_amax, dtype=torch.int32)
    for thr in _thresholds(e, fmt):
        d += sub_amax < thr
    exps = torch.where(nan, 255, e + 127).to(torch.uint8)
    lead = x.shape[:-1]
    return exps.view(*lead, -1), d.to(torch.uint8).view(*lead, -1)


def ulp_from_exponents(
    exponents: torch.Tensor, micro_exponents: torch.Tensor, fmt: SharedExponentFormat | Dtype | str
) -> torch.Tensor:
    """Float32 grid step ``2^(E - d + 1 - m)`` of each sub-block, shaped like ``micro_exponents``."""
    fmt = shared_exponent_format(fmt)
    per_block = fmt.block_size // fmt.micro_block
    e = exponents.to(torch.int32).reshape(-1, 1)
    d = micro_exponents.to(torch.int32).reshape(-1, per_block)
    ulp = pow2(e - 127 - d + 1 - fmt.mantissa_bits)
    ulp = torch.where(e == 255, float("nan"), ulp)
    return ulp.view(micro_exponents.shape)


_PATTERN = {2: (torch.int16, 0x0101), 4: (torch.int32, 0x01010101), 8: (torch.int64, 0x0101010101010101)}


def _all_in_micro_block(flags: torch.Tensor, micro: int) -> torch.Tensor:
    """Per element (uint8 0/1): are all flags of its micro-block set?  ``flags``: bool [rows, block].

    For micro-blocks of 2, 4 or 8 the flag bytes of a micro-block are read as one 16/32/64-bit
    integer, which equals 0x0101.. exactly when all are set; no reduction over a tiny dim.
    """
    rows, block = flags.shape
    if micro == 1:
        return flags.view(torch.uint8)
    if micro in _PATTERN:
        dt, ones = _PATTERN[micro]
        word = flags.view(torch.uint8).view(dt)
        return ((word == ones).to(dt) * ones).view(torch.uint8).view(rows, block)
    return flags.view(rows, block // micro, micro).all(-1, keepdim=True).expand(-1, -1, micro).reshape(rows, block).view(torch.uint8)


def _pair_shift_factor(a: torch.Tensor, m: int, out: torch.Tensor) -> torch.Tensor:
    """Per element 2.0 if both elements of its pair have ``|y| < 2^(m-1)``, else 1.0 (one micro-
    exponent bit, pairs); ``a = |y|`` (float32, contiguous, even row length, overwritten) and
    ``out`` an int64 buffer of half its element count.

    Bit arithmetic instead of comparisons (which are several times slower on the CPU): for the
    bits ``b >= 0`` of ``|y|`` and ``T`` those of ``2^(m-1)``, ``b + (2^31 - T)`` has its top bit
    set iff ``b >= T`` (the int32 sum wraps).  A pair is the two int32 lanes of an int64, and
    ``w | w >> 32 | w << 32`` leaves the OR of both top bits in the top bit of each lane; an
    arithmetic shift turns it into 0 / -1 and that into the float32 bits of 2.0 / 1.0.
    """
    b = a.view(torch.int32)
    b.add_((1 << 31) - ((m - 1 + 127) << 23))
    w = b.view(torch.int64)  # one pair per int64, either lane order
    t = torch.bitwise_right_shift(w, 32, out=out)
    t.bitwise_or_(w).bitwise_or_(w.bitwise_left_shift_(32))
    t32 = t.view(torch.int32)  # top bit of each lane: some |y| of the pair >= 2^(m-1)
    t32.bitwise_right_shift_(31).bitwise_left_shift_(23).add_(0x40000000)  # 2.0 - (that ? 1.0 : 0)
    return t32.view(torch.float32).view(a.shape)


def shared_fake_quantize(
    x: torch.Tensor,
    fmt: SharedExponentFormat | Dtype | str,
    round_method: RoundType | str | None = RoundType.half_even,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` (blocks along its last dim); same shape and dtype as ``x``.

    Scales and elements are computed chunk by chunk in one pass (see ``_chunk``), with the step
    ``2^(E - d + 1 - m)`` expanded per element (a broadcast over micro-blocks of 2 would be slow);
    the result equals ``shared_dequantize(*shared_quantize(x))`` exactly.
    """
    fmt = shared_exponent_format(fmt)
    method = parse_round_method(round_method)
    xb = block_view(x, fmt.block_size)
    qmax = fmt.qmax
    if fmt.overflow_step:
        return _overflow_step_fake_quantize(xb, fmt, method).view(x.shape)

    m = fmt.mantissa_bits
    levels = (1 << fmt.micro_bits) - 1

    def kernel(xc, oc, scratch):
        shape = xc.shape
        amax = absmax(xc, 1, scratch=scratch)
        u0 = _block_step(amax, m)
        y = start(xc, oc, scratch, u0)  # x / 2^(E + 1 - m), exact
        f = None
        if levels:
            # d >= k  iff  max|sub-block| < 2^(E - k + 1)  iff  max|y| over it < 2^(m - k): a scalar
            # compare in the normalised domain instead of a broadcast one.
            a = torch.abs(y, out=scratch.get(2, shape, torch.float32))
            if levels == 1 and fmt.micro_block == 2:
                f = _pair_shift_factor(a, m, scratch.get(3, (shape[0], shape[1] // 2), torch.int64))
            elif levels == 1:
                below = scratch.get(4, shape, torch.bool)
                f = scratch.get(5, shape, torch.float32)
                torch.add(_all_in_micro_block(torch.lt(a, 2.0 ** (m - 1), out=below), fmt.micro_block), 1, out=f)
            else:
                below = scratch.get(4, shape, torch.bool)
                f = scratch.get(5, shape, torch.float32)
                d = scratch.get(3, shape, torch.uint8).zero_()
                for k in range(1, levels + 1):
                    d += _all_in_micro_block(torch.lt(a, 2.0 ** (m - k), out=below), fmt.micro_block)
                torch.exp2(d, out=f)  # exact for small integers
            y.mul_(f)  # 2^d: the micro-block's finer grid
        round_tensor_(y, method).clamp_(-qmax, qmax)
        if f is not None:
            y.div_(f)
        finish(y, oc, u0)

    return run_chunked(kernel, xb, []).view(x.shape)


def _overflow_step_fake_quantize(xb: torch.Tensor, fmt: SharedExponentFormat, method: RoundType) -> torch.Tensor:
    """Fake-quantize ``[blocks, block_size]`` rows under the BFP16 rule, in ``xb``'s dtype."""
    m = fmt.mantissa_bits

    def kernel(xc, oc, scratch):
        y = start(xc, oc, scratch).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        step = pow2(_overflow_step_exponents(y, fmt, method) + 1 - m)
        round_tensor_(y.div_(step), method).clamp_(fmt.qmin, fmt.qmax)
        finish(y, oc, step)

    return run_chunked(kernel, xb, [])


def shared_quantize(
    x: torch.Tensor,
    fmt: SharedExponentFormat | Dtype | str,
    round_method: RoundType | str | None = RoundType.half_even,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, exponents, micro_exponents)``: int8 signed mantissas ``M`` shaped like ``x`` plus
    the exponents of :func:`shared_exponents`."""
    fmt = shared_exponent_format(fmt)
    if fmt.overflow_step:
        x = _finite(x)
    exps, micro = shared_exponents(x, fmt)
    ulp = ulp_from_exponents(exps, micro, fmt).reshape(-1, 1)
    codes = quantize_int(x.reshape(-1, fmt.micro_block), ulp, None, fmt.qmin, fmt.qmax, round_method,
                         divide=True)
    return codes.view(x.shape), exps, micro


def shared_dequantize(
    codes: torch.Tensor,
    exponents: torch.Tensor,
    micro_exponents: torch.Tensor,
    fmt: SharedExponentFormat | Dtype | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values ``M * 2^(E - d + 1 - m)``."""
    fmt = shared_exponent_format(fmt)
    ulp = ulp_from_exponents(exponents, micro_exponents, fmt).reshape(-1, 1)
    return dequantize_int(codes.reshape(-1, fmt.micro_block), ulp, None, dtype=dtype).view(codes.shape)
