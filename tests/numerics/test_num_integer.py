"""Integer quantization: ranges, min-max qparams and codes computed by hand."""

import math

import pytest
import torch

from quark.torch.quantization.config.type import RoundType
from quark.torch.quantization.numerics import (
    asymmetric_qparams,
    code_dtype,
    dequantize_int,
    fake_quantize_int,
    int_range,
    quantize_int,
    symmetric_scale,
)


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_range(bits):
    assert int_range(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert int_range(bits, False) == (0, 2**bits - 1)


def test_int_range_and_code_dtype():
    assert int_range(8, True) == (-128, 127) and int_range(4, False) == (0, 15)
    assert code_dtype(-8, 7) == torch.int8 and code_dtype(0, 15) == torch.uint8
    assert code_dtype(0, 255) == torch.uint8 and code_dtype(-(2**15), 2**15 - 1) == torch.int32
    with pytest.raises(ValueError):
        int_range(0, True)


def test_symmetric_int8_by_hand():
    # FORMATS.md 2a.1: s = amax / 127.5; amax = 0.99609375 = 127.5 / 128 gives s = 2^-7 exactly
    x = torch.tensor([-0.99609375, 0.99609375, -0.01171875, 0.5, 0.25, 0.0])
    scale = symmetric_scale(x.abs().amax(), -128, 127)
    assert scale.item() == 2.0**-7
    codes = quantize_int(x, scale, None, -128, 127)
    # -127.5 -> -128 (even, and in range), 127.5 -> 128 -> 127, -1.5 -> -2, 64, 32, 0
    assert codes.dtype == torch.int8
    assert codes.tolist() == [-128, 127, -2, 64, 32, 0]
    fq = fake_quantize_int(x, scale, None, -128, 127)
    assert torch.equal(fq, codes.float() * scale)
    assert torch.equal(dequantize_int(codes, scale), fq)


def test_int4_group_of_the_issue_by_hand():
    x = torch.tensor([-0.46875, 0.46875, 0.1875, 0.15625, 0.03125, -0.09375, 0.28125, -0.21875])
    scale = symmetric_scale(x.abs().amax(), -8, 7)
    assert scale.item() == 0.0625  # 0.46875 / 7.5
    # x / s = [-7.5, 7.5, 3, 2.5, 0.5, -1.5, 4.5, -3.5] -> half-even, clamped to [-8, 7]
    assert quantize_int(x, scale, None, -8, 7).tolist() == [-8, 7, 3, 2, 0, -2, 4, -4]


def test_symmetric_scale_floor_and_nan():
    s = symmetric_scale(torch.tensor([0.0, 1e-9, 7.5, float("nan")]), -8, 7)
    assert s[:3].tolist() == [2.0**-23, 2.0**-23, 1.0] and torch.isnan(s[3])


def test_symmetric_codes_multiply_by_the_reciprocal():
    """2a.1 quantizes fl(x * fl(1 / s)), not fl(x / s): here the division lands exactly on the tie
    31.5 (-> 32) and the product just below it (-> 31)."""
    x, s = torch.tensor([3.1854562759399414]), torch.tensor(0.10112559795379639)
    assert (x / s).item() == 31.5 and (x * (1 / s)).item() < 31.5
    assert quantize_int(x, s, None, -128, 127).tolist() == [31]
    assert fake_quantize_int(x, s, None, -128, 127).item() == (torch.tensor(31.0) * s).item()
    # an integer zero point keeps the division (the uint4 conventions are unchanged)
    assert quantize_int(x, s, torch.tensor(0, dtype=torch.int32), -128, 127).tolist() == [32]
    # power-of-two steps may divide (MXINT8, shared exponents): exact even below 2^-126
    tiny = torch.tensor([3 * 2.0**-140])
    assert quantize_int(tiny, torch.tensor(2.0**-140), None, -128, 127, divide=True).tolist() == [3]


def test_tie_rounding_methods():
    x = torch.tensor([2.5, -2.5, 3.5, 0.5, -0.5]) * 0.25
    s = torch.tensor(0.25)
    assert quantize_int(x, s, None, -8, 7, RoundType.half_even).tolist() == [2, -2, 4, 0, 0]
    assert quantize_int(x, s, None, -8, 7, RoundType.round).tolist() == [3, -3, 4, 1, -1]
    assert quantize_int(x, s, None, -8, 7, RoundType.floor).tolist() == [2, -3, 3, 0, -1]


def test_asymmetric_uint4_int_zero_point_by_hand():
    # range [-1, 2] -> scale 3/15 = 0.2, zero point 0 - round(-1 / 0.2) = 5
    scale, zp = asymmetric_qparams(torch.tensor(-1.0), torch.tensor(2.0), 0, 15)
    assert scale.item() == pytest.approx(0.2) and zp.dtype == torch.int32 and zp.item() == 5
    x = torch.tensor([-1.0, 0.0, 0.1, 0.3, 2.0, 5.0, -3.0])
    codes = quantize_int(x, scale, zp, 0, 15)
    # 0.1/0.2 = 0.5 -> 0 (even) + 5; 0.3/0.2 = 1.5 -> 2 + 5; clipping at 15 and 0
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [0, 5, 5, 7, 15, 15, 0]
    fq = fake_quantize_int(x, scale, zp, 0, 15)
    assert fq[1].item() == 0.0  # real 0 exactly representable
    assert torch.equal(fq, (codes.float() - 5) * scale)
    assert torch.equal(dequantize_int(codes, scale, zp), fq)


def test_asymmetric_range_includes_zero():
    scale, zp = asymmetric_qparams(torch.tensor(2.0), torch.tensor(4.0), 0, 255)
    assert scale.item() == pytest.approx(4 / 255) and zp.item() == 0
    scale, zp = asymmetric_qparams(torch.tensor(-4.0), torch.tensor(-2.0), 0, 255)
    assert scale.item() == pytest.approx(4 / 255) and zp.item() == 255


def test_float_zero_point():
    scale, zp = asymmetric_qparams(torch.tensor(-1.0), torch.tensor(2.0), 0, 15, "float32")
    assert zp.dtype == torch.float32 and zp.item() == pytest.approx(5.0)
    scale, zp = asymmetric_qparams(torch.tensor(-0.9), torch.tensor(2.1), 0, 15, "float32")
    assert zp.item() == pytest.approx(4.5)  # 0.9 / 0.2, not rounded
    x = torch.tensor([-0.9, 2.1, 0.0])
    codes = quantize_int(x, scale, zp, 0, 15)
    assert codes.tolist() == [0, 15, 4]  # min -> qmin, max -> qmax, 0 -> round(4.5) = 4
    fq = fake_quantize_int(x, scale, zp, 0, 15)
    assert fq[0].item() == pytest.approx(-0.9) and fq[1].item() == pytest.approx(2.1)
    assert fq[2].item() == pytest.approx(-0.1)


def test_zero_scale_and_huge_range_are_finite():
    scale, zp = asymmetric_qparams(torch.tensor([0.0, -3e38]), torch.tensor([0.0, 3e38]), 0, 255)
    assert scale[0].item() == 0 and zp[0].item() == 0
    assert math.isfinite(scale[1].item()) and zp[1].item() == 128
    x = torch.tensor([[0.0, 0.0], [-3e38, 3e38]])
    y = fake_quantize_int(x, scale.view(2, 1), zp.view(2, 1), 0, 255)
    assert torch.isfinite(y).all() and y[0].tolist() == [0, 0]
    assert y[1, 1].item() == pytest.approx(3e38, rel=1e-2)


def test_nan():
    x = torch.tensor([1.0, math.nan, -1.0])
    y = fake_quantize_int(x, torch.tensor(1 / 127), None, -128, 127)
    assert math.isnan(y[1]) and y[0] == 1.0 and y[2] == -1.0
    assert quantize_int(x, torch.tensor(1 / 127), None, -128, 127).tolist() == [127, 0, -127]
    assert quantize_int(x, torch.tensor(0.5), torch.tensor(3, dtype=torch.int32), 0, 15).tolist() == [5, 3, 1]
    scale, zp = asymmetric_qparams(torch.tensor(math.nan), torch.tensor(1.0), 0, 15)
    assert math.isnan(scale.item()) and zp.item() == 0


def test_broadcast_per_row_and_dtype_kept():
    x = torch.tensor([[1.0, -2.5, 0.625], [10.0, 3.0, -7.0]])
    scale = torch.tensor([[0.25], [2.0]])
    y = fake_quantize_int(x.half(), scale, None, -8, 7)
    assert y.dtype == torch.float16
    # row 0: 4, -10 -> -8, 2.5 -> 2; row 1: 5, 1.5 -> 2, -3.5 -> -4
    assert y.tolist() == [[1.0, -2.0, 0.5], [10.0, 4.0, -8.0]]
