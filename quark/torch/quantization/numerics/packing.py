"""Bit packing of sub-byte codes for export (FORMATS.md section 4).

- int4/uint4: 8 nibbles per int32 along the last dim.  ``order="reorder"`` (default, the AutoAWQ
  layout): nibble i (bits 4i..4i+3) holds element ``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of each group of
  8; ``order="order"``: nibble i holds element i.  Signed codes are stored as two's complement
  nibbles; the int32 word is the two's complement reading of the 32 bits.
- fp4: two codes per uint8 along the last dim, the even element in the low nibble.
- fp6: four codes per three uint8 as a little-endian bit stream: code i of a group of four occupies
  bits 6i..6i+5 of the 24-bit word ``b0 | b1 << 8 | b2 << 16``.
- 8-bit codes (int8, uint8, fp8) are stored as they are.
"""

from __future__ import annotations

import sys

import torch

from quark.torch.quantization.config.type import Dtype

__all__ = [
    "pack",
    "unpack",
    "AWQ_ORDER",
    "pack_int4",
    "unpack_int4",
    "pack_fp4",
    "unpack_fp4",
    "pack_fp6",
    "unpack_fp6",
]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_NATURAL_ORDER = tuple(range(8))


def _groups(codes: torch.Tensor, factor: int, what: str) -> torch.Tensor:
    k = codes.shape[-1] if codes.dim() else 0
    if codes.dim() == 0 or k % factor:
        raise ValueError(f"{what}: the last dim ({k}, shape {tuple(codes.shape)}) must be a multiple of {factor}")
    return codes.reshape(*codes.shape[:-1], k // factor, factor)


def _order(order: str) -> tuple[int, ...]:
    if order == "reorder":
        return AWQ_ORDER
    if order == "order":
        return _NATURAL_ORDER
    raise ValueError(f"pack order must be 'reorder' or 'order', got {order!r}")


def pack_int4(codes: torch.Tensor, order: str = "reorder") -> torch.Tensor:
    """Pack int4 (-8..7) or uint4 (0..15) codes ``[..., K]`` into int32 ``[..., K / 8]``."""
    perm = _order(order)
    if sys.byteorder == "little":
        # byte j of the little-endian word holds nibbles 2j (low) and 2j+1 (high): build the 4 bytes
        # in uint8 and reinterpret them (about 3x faster than shifting int64 words)
        g = (_groups(codes, 8, "pack_int4").to(torch.uint8) & 0xF)[..., list(perm)]
        return (g[..., 0::2] | (g[..., 1::2] << 4)).contiguous().view(torch.int32).squeeze(-1)
    g = _groups(codes, 8, "pack_int4").to(torch.int64) & 0xF
    word = torch.zeros(g.shape[:-1], dtype=torch.int64, device=codes.device)
    for i, src in enumerate(perm):  # 8 whole-tensor ops, one per nibble position
        word |= g[..., src] << (4 * i)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def unpack_int4(packed: torch.Tensor, order: str = "reorder", signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: codes ``[..., 8 * K']``, int8 sign-extended when ``signed``,
    else uint8 in 0..15."""
    perm = _order(order)
    w = packed.to(torch.int32)
    nib = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    inv = [perm.index(j) for j in range(8)]  # element j sits in nibble inv[j]
    out = nib[..., inv]
    out = out.reshape(*packed.shape[:-1], -1)
    if signed:
        return torch.where(out >= 8, out - 16, out).to(torch.int8)
    return out.to(torch.uint8)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte ``[..., K] -> [..., K / 2]``: even element low nibble."""
    g = _groups(codes, 2, "pack_fp4").to(torch.uint8) & 0xF
    return (g[..., 0] | (g[..., 1] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4` (uint8 codes)."""
    p = packed.to(torch.uint8)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def pack_fp6(codes: torch.Tensor) -> torch.Tensor:
    """Four 6-bit codes per three bytes ``[..., K] -> [..., 3K / 4]`` (little-endian bit stream)."""
    g = _groups(codes, 4, "pack_fp6").to(torch.int32) & 0x3F
    w = g[..., 0] | (g[..., 1] << 6) | (g[..., 2] << 12) | (g[..., 3] << 18)
    b = torch.stack([w & 0xFF, (w >> 8) & 0xFF, w >> 16], dim=-1)
    return b.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack_fp6(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp6` (uint8 codes)."""
    g = _groups(packed, 3, "unpack_fp6").to(torch.int32)
    w = g[..., 0] | (g[..., 1] << 8) | (g[..., 2] << 16)
    c = torch.stack([(w >> (6 * i)) & 0x3F for i in range(4)], dim=-1)
    return c.reshape(*packed.shape[:-1], -1).to(torch.uint8)


_INT8_LIKE = {Dtype.int8, Dtype.int3, Dtype.int2}
_UINT8_LIKE = {Dtype.uint8, Dtype.uint2, Dtype.fp8_e4m3, Dtype.fp8_e5m2, Dtype.fp8_e5m3}


def pack(codes: torch.Tensor, dtype: Dtype | str, order: str = "reorder") -> torch.Tensor:
    """Pack element codes of ``dtype`` for storage (int4/uint4 -> int32 words, fp4/fp6 -> bytes,
    8-bit and narrower integer codes -> a plain int8/uint8 cast)."""
    dt = Dtype.parse(dtype, "dtype")
    if dt in (Dtype.int4, Dtype.uint4):
        return pack_int4(codes, order)
    if dt is Dtype.fp4:
        return pack_fp4(codes)
    if dt in (Dtype.fp6_e2m3, Dtype.fp6_e3m2):
        return pack_fp6(codes)
    if dt in _INT8_LIKE:
        return codes.to(torch.int8)
    if dt in _UINT8_LIKE:
        return codes.to(torch.uint8)
    raise ValueError(f"no packed storage for dtype {dt.value!r}")


def unpack(packed: torch.Tensor, dtype: Dtype | str, order: str = "reorder") -> torch.Tensor:
    """Inverse of :func:`pack`."""
    dt = Dtype.parse(dtype, "dtype")
    if dt in (Dtype.int4, Dtype.uint4):
        return unpack_int4(packed, order, signed=dt is Dtype.int4)
    if dt is Dtype.fp4:
        return unpack_fp4(packed)
    if dt in (Dtype.fp6_e2m3, Dtype.fp6_e3m2):
        return unpack_fp6(packed)
    if dt in _INT8_LIKE:
        return packed.to(torch.int8)
    if dt in _UINT8_LIKE:
        return packed.to(torch.uint8)
    raise ValueError(f"no packed storage for dtype {dt.value!r}")
