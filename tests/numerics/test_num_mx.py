"""OCP MX: shared exponents computed by hand for each ScaleCalculationMode, codes and specials."""

import math

import pytest
import torch

from quark.torch.quantization.config.type import ScaleCalculationMode
from quark.torch.quantization.numerics import (
    E8M0,
    decode,
    mx_dequantize,
    mx_fake_quantize,
    mx_quantize,
    mx_scale_codes,
    mx_scale_from_amax,
)

ELEMENTS = ["fp4", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "int8"]


def block(first: float, rest: float = 0.0, n: int = 32) -> torch.Tensor:
    x = torch.full((n,), rest)
    x[0] = first
    return x


@pytest.mark.parametrize(
    "amax, mode, scale, top",
    [
        # fp4 (emax 2, 1 mantissa bit). 7.9 = 1.975 * 2^2:
        (7.9, "even", 2.0, 8.0),  # 1.975 rounds (half up, 1 bit) to 2.0 -> 2^3 -> s = 1; 7.9/2 -> 4
        (7.9, "floor", 1.0, 6.0),  # plain OCP: s = 2 - 2 = 0; 7.9 clips to 6
        (7.9, "ceil", 2.0, 8.0),  # ceil(log2 7.9) = 3
        (7.0, "even", 2.0, 8.0),  # 1.75 is the tie: half up -> next binade; 7/2 = 3.5 -> 4 (even)
        (7.0, "floor", 1.0, 6.0),
        (6.0, "even", 1.0, 6.0),  # exactly representable: no change
        (6.0, "ceil", 2.0, 6.0),  # ceil(log2 6) = 3 -> X = 2, 6/2 = 3
        (4.0, "ceil", 1.0, 4.0),  # a power of two: ceil == floor
        (0.3, "even", 2.0**-4, 0.25),  # 0.3 = 1.2 * 2^-2 -> s = -4; 0.3 / X = 4.8 -> 4
    ],
)
def test_fp4_shared_exponent_modes(amax, mode, scale, top):
    x = block(amax)
    y = mx_fake_quantize(x, "fp4", mode=mode)
    codes, scodes = mx_quantize(x, "fp4", mode=mode)
    assert decode(scodes, E8M0).tolist() == [scale]
    assert y[0].item() == top
    assert torch.equal(mx_dequantize(codes, scodes, "fp4"), y)


def test_mode_names_and_default():
    a = torch.tensor([[7.9]])
    assert mx_scale_codes(a, "fp4").item() == 128  # default: even
    assert mx_scale_codes(a, "fp4", ScaleCalculationMode.floor).item() == 127
    assert mx_scale_from_amax(a, "fp4", "ceil").item() == 2.0


@pytest.mark.parametrize(
    "element, amax, even, floor",
    [
        ("fp6_e2m3", 7.9, 2.0, 1.0),  # 1.975 * 2^2: 3 bits half up -> 2.0 -> s = 1
        ("fp6_e3m2", 30.0, 2.0, 1.0),  # 1.875 * 2^4, emax 4; 2 bits half up -> 2.0 -> s = 1
        ("fp8_e4m3", 500.0, 2.0, 1.0),  # 1.953 * 2^8, emax 8
        ("fp8_e5m2", 1.0, 2.0**-15, 2.0**-15),
        ("int8", 1.99, 1.0, 1.0),  # 1.99 * 64 = 127.36 -> stays below 127.5
        ("int8", 1.995, 2.0, 1.0),  # 127.68: the 6-bit mantissa rounds up
    ],
)
def test_other_elements_shared_exponent(element, amax, even, floor):
    a = torch.tensor([[amax]])
    got_even = mx_scale_from_amax(a, element, "even").item()
    got_floor = mx_scale_from_amax(a, element, "floor").item()
    assert (got_even, got_floor) == (even, floor)


def test_mxint8_codes_and_saturation():
    x = block(1.995, -1.0)
    codes, scodes = mx_quantize(x, "int8")
    assert codes.dtype == torch.int8 and scodes.tolist() == [128]
    assert codes[:2].tolist() == [64, -32]  # 1.995 / 2 * 64 = 63.84 -> 64; -1 / 2 * 64 = -32
    codes, _ = mx_quantize(block(1.99, -1.99), "int8", mode="floor")
    assert codes[:2].tolist() == [127, -127]
    codes, _ = mx_quantize(block(-1.999), "int8", mode="floor")  # -127.9 saturates at -127, not -128
    assert codes[0].item() == -127
    assert mx_fake_quantize(block(-1.999), "int8", mode="floor")[0].item() == -127 / 64


def test_zero_block_nan_block_and_tiny_block():
    x = torch.stack([torch.zeros(32), block(math.nan, 1.0), block(1e-40, 1e-42), block(3e38, -1.0)])
    codes, scodes = mx_quantize(x, "fp8_e4m3")
    assert scodes.view(-1).tolist()[:3] == [0, 255, 0]  # zero block: 2^-127, a valid scale
    y = mx_fake_quantize(x, "fp8_e4m3")
    assert y[0].tolist() == [0.0] * 32
    assert torch.isnan(y[1]).all()  # the NaN scale makes the whole block NaN (OCP MX)
    assert torch.isnan(mx_dequantize(codes, scodes, "fp8_e4m3")[1]).all()
    assert torch.isfinite(y[2]).all() and torch.isfinite(y[3]).all()
    assert y[3, 0].item() == pytest.approx(3e38, rel=0.07)


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize("mode", ["even", "floor", "ceil"])
def test_dequantize_of_codes_equals_fake_quantize(element, mode):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 64, generator=g) * torch.logspace(-3, 3, 8).view(1, 8, 1)
    y = mx_fake_quantize(x, element, mode=mode)
    codes, scodes = mx_quantize(x, element, mode=mode)
    assert scodes.shape == (4, 8, 2) and codes.shape == x.shape
    assert torch.equal(mx_dequantize(codes, scodes, element), y)
    assert torch.equal(mx_fake_quantize(y, element, mode=mode), y)  # idempotent


def test_block_size_error_names_sizes():
    with pytest.raises(ValueError, match=r"block size 32 .* 48"):
        mx_fake_quantize(torch.zeros(2, 48), "fp4")
    with pytest.raises(ValueError, match="not supported"):
        mx_fake_quantize(torch.zeros(2, 32), "fp3")


def test_bf16_input_keeps_dtype():
    x = torch.randn(2, 64).bfloat16()
    y = mx_fake_quantize(x, "fp4")
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.float(), mx_fake_quantize(x.float(), "fp4"))
