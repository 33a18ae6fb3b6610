"""Packing layouts: hand-packed words for both int4 orders, fp4 / fp6 bytes, round trips."""

import pytest
import torch

from quark.torch.quantization.numerics import (
    pack,
    pack_fp4,
    pack_fp6,
    pack_int4,
    unpack,
    unpack_fp4,
    unpack_fp6,
    unpack_int4,
)


def test_int4_order_by_hand():
    codes = torch.arange(8, dtype=torch.int8).view(1, 8)
    assert pack_int4(codes, "order").tolist() == [[0x76543210]]
    # reorder: nibble i holds element [0, 2, 4, 6, 1, 3, 5, 7][i]
    assert pack_int4(codes, "reorder").tolist() == [[0x75316420]]
    assert pack_int4(codes).tolist() == [[0x75316420]]  # default is the AutoAWQ order


def test_int4_signed_and_sign_bit_of_word():
    codes = torch.tensor([[-1, -8, 7, 0, 1, 2, 3, -2]], dtype=torch.int8)
    w = pack_int4(codes, "order")
    # nibbles F, 8, 7, 0, 1, 2, 3, E from the low end: 0xE321078F, read as a signed int32
    assert w.dtype == torch.int32 and w.item() == 0xE321078F - (1 << 32)
    assert unpack_int4(w, "order").tolist() == codes.tolist()
    u = torch.tensor([[15, 8, 0, 1, 2, 3, 4, 5]], dtype=torch.uint8)
    wu = pack_int4(u, "reorder")  # elements 0,2,4,6,1,3,5,7 = 15,0,2,4,8,1,3,5
    assert wu.item() == 0x5318420F
    assert unpack_int4(wu, "reorder", signed=False).tolist() == u.tolist()


@pytest.mark.parametrize("order", ["order", "reorder"])
def test_int4_round_trip(order):
    g = torch.Generator().manual_seed(0)
    s = torch.randint(-8, 8, (3, 5, 64), generator=g, dtype=torch.int8)
    packed = pack_int4(s, order)
    assert packed.shape == (3, 5, 8) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed, order), s)
    u = torch.randint(0, 16, (7, 16), generator=g).to(torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(u, order), order, signed=False), u)


def test_fp4_bytes():
    codes = torch.tensor([[1, 2, 15, 0, 7, 8]], dtype=torch.uint8)
    p = pack_fp4(codes)
    assert p.tolist() == [[0x21, 0x0F, 0x87]]  # even element in the low nibble
    assert torch.equal(unpack_fp4(p), codes)


def test_fp6_bytes():
    assert pack_fp6(torch.tensor([0x3F, 0, 0, 0])).tolist() == [0x3F, 0x00, 0x00]
    assert pack_fp6(torch.tensor([0, 0x3F, 0, 0])).tolist() == [0xC0, 0x0F, 0x00]  # bits 6..11
    assert pack_fp6(torch.tensor([0, 0, 0, 0x3F])).tolist() == [0x00, 0x00, 0xFC]  # bits 18..23
    assert pack_fp6(torch.tensor([1, 2, 3, 4])).tolist() == [0x81, 0x30, 0x10]
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 64, (5, 32), generator=g).to(torch.uint8)
    p = pack_fp6(c)
    assert p.shape == (5, 24) and p.dtype == torch.uint8
    assert torch.equal(unpack_fp6(p), c)


def test_dispatch_and_errors():
    c = torch.randint(0, 16, (2, 16)).to(torch.uint8)
    assert torch.equal(unpack(pack(c, "fp4"), "fp4"), c)
    assert torch.equal(unpack(pack(c, "uint4"), "uint4"), c)
    assert pack(c, "fp6_e2m3").shape == (2, 12)
    assert pack(torch.tensor([-3, 5]), "int8").dtype == torch.int8
    assert pack(torch.tensor([200]), "fp8_e4m3").tolist() == [200]
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 2"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_fp6(torch.zeros(6, dtype=torch.uint8))
    with pytest.raises(ValueError, match="'reorder' or 'order'"):
        pack_int4(torch.zeros(8, dtype=torch.int8), "awq")


@pytest.mark.parametrize("order", ["order", "reorder"])
def test_int4_byte_path_equals_the_word_path(order, monkeypatch):
    """The little-endian byte construction and the portable int64 shifts give the same words for
    every nibble value at every position (the 16 codes cycled through all 8 slots)."""
    import sys

    codes = torch.stack([torch.roll(torch.arange(-8, 8, dtype=torch.int8), k) for k in range(16)]).repeat(3, 1)
    fast = pack_int4(codes, order)
    monkeypatch.setattr(sys, "byteorder", "big")
    assert torch.equal(fast, pack_int4(codes, order))
    assert fast.shape == (48, 2)
