"""Enumerations of the quantization config (FORMATS.md section 1).

Every enum is a ``str`` enum so that configs serialise to plain JSON strings and read back
from them unchanged (``Dtype("int4") is Dtype.int4``).
"""

from __future__ import annotations

from enum import Enum


class _StrEnum(str, Enum):
    def __str__(self) -> str:  # json.dumps / f-strings show the plain value
        return self.value

    @classmethod
    def parse(cls, value: object, field: str) -> _StrEnum:
        """Turn ``value`` (an enum member or its string value) into a member, or raise a clear error."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"{field}={value!r} is not a valid {cls.__name__}; allowed: {allowed}") from None


class Dtype(_StrEnum):
    """Element data type of a quantized tensor."""

    int8 = "int8"
    uint8 = "uint8"
    int4 = "int4"
    uint4 = "uint4"
    int3 = "int3"
    int2 = "int2"
    uint2 = "uint2"
    bfloat16 = "bfloat16"
    float16 = "float16"
    fp8_e4m3 = "fp8_e4m3"
    fp8_e5m2 = "fp8_e5m2"
    fp8_e5m3 = "fp8_e5m3"  # unsigned e5m3 (bias 15, max 114688): used for scales
    fp6_e3m2 = "fp6_e3m2"
    fp6_e2m3 = "fp6_e2m3"
    fp4 = "fp4"  # e2m1
    mx = "mx"  # OCP MX with the element type in ``mx_element_dtype``
    mx6 = "mx6"
    mx9 = "mx9"
    bfp16 = "bfp16"

    @property
    def is_integer(self) -> bool:
        return self in _INTEGER_BITS

    @property
    def is_unsigned(self) -> bool:
        return self in (Dtype.uint8, Dtype.uint4, Dtype.uint2)

    @property
    def bits(self) -> int:
        """Storage bits of one element (excluding shared scales)."""
        return _BITS[self]


_INTEGER_BITS = {
    Dtype.int8: 8,
    Dtype.uint8: 8,
    Dtype.int4: 4,
    Dtype.uint4: 4,
    Dtype.int3: 3,
    Dtype.int2: 2,
    Dtype.uint2: 2,
}
_BITS = {
    **_INTEGER_BITS,
    Dtype.bfloat16: 16,
    Dtype.float16: 16,
    Dtype.fp8_e4m3: 8,
    Dtype.fp8_e5m2: 8,
    Dtype.fp8_e5m3: 8,
    Dtype.fp6_e3m2: 6,
    Dtype.fp6_e2m3: 6,
    Dtype.fp4: 4,
    Dtype.mx: 8,
    Dtype.mx6: 6,
    Dtype.mx9: 9,
    Dtype.bfp16: 8,
}


class QSchemeType(_StrEnum):
    """Granularity of the scales."""

    per_tensor = "per_tensor"
    per_channel = "per_channel"  # one scale per index of ch_axis (per output channel, or per token)
    per_group = "per_group"  # groups of group_size consecutive elements along the last dim
    per_block = "per_block"


class ScaleType(_StrEnum):
    """How a scale value is represented."""

    float = "float"  # the model's dtype
    pof2 = "pof2"  # a power of two
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float8_e5m3 = "float8_e5m3"  # unsigned e5m3
    float8_e8m0fnu = "float8_e8m0fnu"  # OCP MX shared exponent


class RoundType(_StrEnum):
    round = "round"  # half away from zero
    floor = "floor"
    half_even = "half_even"


class ZeroPointType(_StrEnum):
    int32 = "int32"
    float32 = "float32"


class QuantFlow(_StrEnum):
    standard = "standard"
    per_block = "per_block"
    file2file = "file2file"


class ScaleCalculationMode(_StrEnum):
    """How an OCP MX shared exponent is derived from a block's amax (see numerics/mx.py)."""

    even = "even"
    floor = "floor"
    ceil = "ceil"
