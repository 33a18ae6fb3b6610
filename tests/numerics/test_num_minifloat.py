"""Exhaustive checks of every <= 8-bit float format against an independent float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quark.torch.quantization.config.type import RoundType
from quark.torch.quantization.numerics import (
    E8M0,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    UE5M3,
    decode,
    encode,
    fake_quantize_fp,
    round_to_format,
)

# name -> (format, signed, ebits, mbits, bias, NaN magnitude codes, inf magnitude codes, max)
SPECS = {
    "e4m3": (FP8_E4M3, True, 4, 3, 7, {0x7F}, set(), 448.0),
    "e5m2": (FP8_E5M2, True, 5, 2, 15, {0x7D, 0x7E, 0x7F}, {0x7C}, 57344.0),
    "e2m3": (FP6_E2M3, True, 2, 3, 1, set(), set(), 7.5),
    "e3m2": (FP6_E3M2, True, 3, 2, 3, set(), set(), 28.0),
    "e2m1": (FP4_E2M1, True, 2, 1, 1, set(), set(), 6.0),
    "ue5m3": (UE5M3, False, 5, 3, 15, {0xFF}, set(), 114688.0),
}


def reference(name: str) -> np.ndarray:
    """float64 value of every code, computed from the bit fields (not from the implementation)."""
    _, signed, eb, mb, bias, nans, infs, _ = SPECS[name]
    nbits = int(signed) + eb + mb
    out = np.empty(1 << nbits, dtype=np.float64)
    for code in range(1 << nbits):
        mag = code & ((1 << (eb + mb)) - 1)
        sign = -1.0 if signed and code >> (eb + mb) else 1.0
        e, m = mag >> mb, mag & ((1 << mb) - 1)
        if mag in nans:
            v = math.nan
        elif mag in infs:
            v = math.inf
        elif e == 0:
            v = m * 2.0 ** (1 - bias - mb)
        else:
            v = (1 + m / 2**mb) * 2.0 ** (e - bias)
        out[code] = sign * v
    return out


def finite_codes(name: str) -> tuple[np.ndarray, np.ndarray]:
    ref = reference(name)
    codes = np.arange(ref.size)
    keep = np.isfinite(ref)
    return codes[keep], ref[keep]


@pytest.mark.parametrize("name", SPECS)
def test_decode_matches_reference(name):
    fmt = SPECS[name][0]
    ref = reference(name)
    got = decode(torch.arange(ref.size, dtype=torch.uint8), fmt).double().numpy()
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.array_equal(got[ok], ref[ok])
    assert np.array_equal(np.signbit(got[ok]), np.signbit(ref[ok]))  # -0 decodes to -0
    assert fmt.max_value == SPECS[name][7] == np.nanmax(ref[np.isfinite(ref)])
    assert fmt.bits == int(SPECS[name][1]) + SPECS[name][2] + SPECS[name][3]


@pytest.mark.parametrize("name", SPECS)
def test_every_code_round_trips(name):
    fmt = SPECS[name][0]
    codes, values = finite_codes(name)
    enc = encode(torch.tensor(values, dtype=torch.float32), fmt)
    assert enc.dtype == torch.uint8
    assert enc.tolist() == codes.tolist()
    # NaN encodes to the format's NaN code; formats without one (fp6, fp4) encode it as +0
    nan_code = encode(torch.tensor([math.nan, -math.nan]), fmt).tolist()
    if SPECS[name][5]:
        assert all(math.isnan(reference(name)[c]) for c in nan_code)
        assert fmt.nan_code == max(SPECS[name][5])  # the all-ones magnitude
    else:
        assert nan_code == [0, 0] and fmt.nan_code is None


@pytest.mark.parametrize("name", SPECS)
def test_midpoints_round_to_even_and_neighbours(name):
    fmt = SPECS[name][0]
    codes, values = finite_codes(name)
    pos = values >= 0
    order = np.argsort(values[pos])
    v, c = values[pos][order], codes[pos][order]
    v, idx = np.unique(v, return_index=True)  # drop -0 duplicates
    c = c[idx]
    lo, hi = v[:-1], v[1:]
    mid = (lo + hi) / 2  # exact in float32: at most mbits + 2 significant bits
    even = np.where(c[:-1] % 2 == 0, lo, hi)
    assert np.all((c[:-1] % 2) != (c[1:] % 2))  # neighbours differ in the mantissa lsb
    mid32 = torch.tensor(mid, dtype=torch.float32)
    assert np.array_equal(mid32.double().numpy(), mid)
    assert np.array_equal(round_to_format(mid32, fmt).double().numpy(), even)
    above = torch.nextafter(mid32, torch.tensor(math.inf))
    below = torch.nextafter(mid32, torch.tensor(-math.inf))
    assert np.array_equal(round_to_format(above, fmt).double().numpy(), hi)
    assert np.array_equal(round_to_format(below, fmt).double().numpy(), lo)
    if fmt.signed:  # mirror image
        assert np.array_equal(round_to_format(-mid32, fmt).double().numpy(), -even)
        assert np.array_equal(round_to_format(-above, fmt).double().numpy(), -hi)
        assert np.array_equal(round_to_format(-below, fmt).double().numpy(), -lo)


@pytest.mark.parametrize("name", SPECS)
def test_saturation_and_specials(name):
    fmt, signed, *_, mx = SPECS[name]
    x = torch.tensor([mx * 1.01, mx * 1.5, 3e38, math.inf, -math.inf, -mx * 1.01, math.nan])
    y = round_to_format(x, fmt)
    lo = -mx if signed else 0.0
    assert y[:4].tolist() == [mx] * 4
    assert y[4:6].tolist() == [lo, lo]
    assert math.isnan(y[6])
    assert not torch.isinf(y).any()


def test_fp4_values_and_rounding_table():
    x = torch.tensor([0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 100.0, -0.25, -0.26, -5.0])
    assert round_to_format(x, FP4_E2M1).tolist() == [0, 0.5, 1, 1, 2, 2, 4, 4, 6, 6, -0.0, -0.5, -4]
    assert decode(torch.arange(8, dtype=torch.uint8), FP4_E2M1).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("fmt, tdtype", [(FP8_E4M3, torch.float8_e4m3fn), (FP8_E5M2, torch.float8_e5m2)])
def test_fp8_matches_torch(fmt, tdtype):
    codes = torch.arange(256, dtype=torch.uint8)
    ours = decode(codes, fmt)
    theirs = codes.view(tdtype).float()
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    ok = ~torch.isnan(theirs)
    assert torch.equal(ours[ok], theirs[ok])
    # random values in range, subnormals and midpoints: identical bit patterns (RNE in both)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(20000, generator=g) * fmt.max_value / 8,
        torch.randn(2000, generator=g) * fmt.min_normal,
        (theirs[ok][:-1] + theirs[ok][1:]) / 2,
    ]).clamp(-fmt.max_value, fmt.max_value)
    x = torch.cat([x[torch.isfinite(x)], torch.tensor([math.nan, -math.nan, -0.0, 0.0])])
    assert torch.equal(encode(x, fmt), x.to(tdtype).view(torch.uint8))


def test_ue5m3_semantics():
    assert UE5M3.max_code == 0xFE and not UE5M3.signed
    assert decode(torch.tensor([0xFE, 0x01, 0x08], dtype=torch.uint8), UE5M3).tolist() == [114688, 2**-17, 2**-14]
    assert math.isnan(decode(torch.tensor([0xFF], dtype=torch.uint8), UE5M3).item())
    assert round_to_format(torch.tensor([-3.0, 2**-18, 2**-18 * 1.01, 120000.0]), UE5M3).tolist() == [
        0, 0, 2**-17, 114688,
    ]


def test_e8m0_semantics():
    codes = torch.tensor([0, 1, 126, 127, 128, 254], dtype=torch.uint8)
    assert decode(codes, E8M0).tolist() == [2**-127, 2**-126, 0.5, 1, 2, 2**127]
    assert math.isnan(decode(torch.tensor([255], dtype=torch.uint8), E8M0).item())
    x = torch.tensor([1.0, 1.49, 1.5, 3.0, 0.0, -1.0, 1e-45, 2**-127 * 1.5, 2**-127 * 1.49, 3e38, math.nan])
    y = round_to_format(x, E8M0)
    assert y[:-1].tolist() == [1, 1, 2, 4, 2**-127, 2**-127, 2**-127, 2**-126, 2**-127, 2**127]
    assert math.isnan(y[-1])
    assert encode(x[:-1], E8M0).tolist() == [127, 127, 128, 129, 0, 0, 0, 1, 0, 254]
    assert encode(x[-1:], E8M0).tolist() == [255]


def test_round_methods_on_grid():
    x = torch.tensor([2.5, 2.9, -2.5, -2.9, 0.75, 5.5])
    assert round_to_format(x, FP4_E2M1, RoundType.floor).tolist() == [2, 2, -3, -3, 0.5, 4]
    assert round_to_format(x, FP4_E2M1, RoundType.round).tolist() == [3, 3, -3, -3, 1, 6]
    assert round_to_format(x, FP4_E2M1, RoundType.half_even).tolist() == [2, 3, -2, -3, 1, 6]


def test_float32_subnormal_inputs_and_negative_zero():
    x = torch.tensor([1e-45, -1e-45, 1e-40, -0.0, 0.0])
    y = round_to_format(x, FP8_E4M3)
    assert y.tolist() == [0, 0, 0, 0, 0]
    assert torch.signbit(y).tolist() == [False, True, False, True, False]
    assert encode(x, FP8_E4M3).tolist() == [0x00, 0x80, 0x00, 0x80, 0x00]


def test_fake_quantize_fp_scale_and_zero_scale():
    x = torch.tensor([[1.0, -3.0, 0.2], [5.0, 1.0, -1.0]])
    scale = torch.tensor([[0.5], [0.0]])
    y = fake_quantize_fp(x, scale, FP4_E2M1)
    assert y.tolist() == [[1.0, -3.0, 0.25], [0.0, 0.0, -0.0]]  # 0.2 / 0.5 = 0.4 -> 0.5
    assert y.dtype == x.dtype
    yb = fake_quantize_fp(x.bfloat16(), scale, FP4_E2M1)
    assert yb.dtype == torch.bfloat16 and yb.float().tolist() == y.tolist()
