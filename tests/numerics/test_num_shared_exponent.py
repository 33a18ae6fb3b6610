"""MX6 / MX9 / BFP16 (shared exponents and micro-exponents) on hand-computed blocks."""

import math

import pytest
import torch

from quark.torch.quantization.numerics import (
    BFP16,
    MX6,
    MX9,
    SharedExponentFormat,
    shared_dequantize,
    shared_exponents,
    shared_fake_quantize,
    shared_quantize,
    ulp_from_exponents,
)


def test_format_parameters():
    assert (MX6.block_size, MX6.mantissa_bits, MX6.micro_block, MX6.micro_bits) == (16, 4, 2, 1)
    assert (MX9.block_size, MX9.mantissa_bits, MX9.micro_block, MX9.micro_bits) == (16, 7, 2, 1)
    assert (BFP16.block_size, BFP16.mantissa_bits, BFP16.micro_bits) == (8, 7, 0)
    assert (MX6.bits_per_element, MX9.bits_per_element, BFP16.bits_per_element) == (6, 9, 9)


def test_mx6_by_hand():
    # block max 1.0 -> E = 0, block step 2^(0 + 1 - 4) = 1/8; a pair whose max is below 2^E = 1
    # shifts down one: step 1/16.
    x = torch.zeros(16)
    x[0:2] = torch.tensor([1.0, 0.3])  # not shifted: 8 -> 1.0, 2.4 -> 2 -> 0.25
    x[2:4] = torch.tensor([0.3, -0.2])  # shifted: 4.8 -> 5 -> 0.3125, -3.2 -> -3 -> -0.1875
    x[4:6] = torch.tensor([0.96875, 0.0])  # shifted: 15.5 -> 16 -> saturates at 15 -> 0.9375
    x[6:8] = torch.tensor([0.09375, 0.03125])  # shifted: 1.5 -> 2 (even), 0.5 -> 0 (even)
    y = shared_fake_quantize(x, MX6)
    assert y[:8].tolist() == [1.0, 0.25, 0.3125, -0.1875, 0.9375, 0.0, 0.125, 0.0]
    codes, exps, micro = shared_quantize(x, MX6)
    assert exps.tolist() == [127]
    assert micro.tolist() == [0, 1, 1, 1, 1, 1, 1, 1]  # all-zero pairs shift too
    assert codes[:8].tolist() == [8, 2, 5, -3, 15, 0, 2, 0]
    assert torch.equal(shared_dequantize(codes, exps, micro, MX6), y)


def test_mx9_by_hand():
    x = torch.zeros(16)
    x[0:4] = torch.tensor([-3.0, 1.0, 1.01, 0.5])  # E = 1, step 2^(1 + 1 - 7) = 1/32
    y = shared_fake_quantize(x, MX9)
    # pair 0 (max 3 >= 2): -96, 32 steps; pair 1 (max 1.01 < 2): step 1/64: 64.64 -> 65, 32
    assert y[:4].tolist() == [-3.0, 1.0, 65 / 64, 0.5]
    codes, exps, micro = shared_quantize(x, MX9)
    assert exps.tolist() == [128] and micro[:2].tolist() == [0, 1]
    assert codes[:4].tolist() == [-96, 32, 65, 32]


def test_bfp16_by_hand():
    """FORMATS.md 2a.5: E = floor(log2(max|x|)), step 2^(E - 6), doubled when some element rounds to
    +128 steps; codes in [-128, 127]."""
    x = torch.tensor([3.0, 0.1, -1.015625, 0.015625, 3.99, 0.0, -0.0, 2.0**-6])
    # E = 1, step 1/32: 3.99 -> 127.68 -> 128 overflows, so the step is 1/16: 48, 1.6 -> 2,
    # -16.25 -> -16, 0.25 -> 0, 63.84 -> 64, 0, 0, 0.25 -> 0
    y = shared_fake_quantize(x, BFP16)
    assert y.tolist() == [3.0, 0.125, -1.0, 0.0, 4.0, 0.0, 0.0, 0.0]
    codes, exps, micro = shared_quantize(x, BFP16)
    assert codes.tolist() == [48, 2, -16, 0, 64, 0, 0, 0] and exps.tolist() == [129]
    assert micro.tolist() == [0]
    assert torch.equal(shared_dequantize(codes, exps, micro, BFP16), y)


def test_bfp16_vectors_of_the_issue():
    x = torch.tensor([1.996, 0.51, 0.26, -0.1, 0.0, 0.3, 0.7, -1.2])
    # E = 0; 1.996 * 64 = 127.74 -> 128 overflows: step 2^-5
    assert shared_fake_quantize(x, BFP16).tolist() == [2.0, 0.5, 0.25, -0.09375, 0.0, 0.3125, 0.6875, -1.1875]
    x[0] = -1.996  # -127.74 -> -128 fits: step 2^-6, code -128
    y = shared_fake_quantize(x, BFP16)
    assert y[0].item() == -2.0 and y[1].item() == 33 / 64
    codes, exps, _ = shared_quantize(x, BFP16)
    assert codes[0].item() == -128 and exps.tolist() == [127]


def test_bfp16_zero_non_finite_and_extreme_blocks():
    b = BFP16.block_size
    x = torch.randn(5, 4 * b, generator=torch.Generator().manual_seed(0))
    x[0, :b] = 0
    x[1, 0], x[1, 1], x[1, 2] = math.nan, math.inf, -math.inf
    x[2, :b] = torch.randn(b) * 1e-39  # subnormal maxima: E is kept at -127
    x[3, :b] = torch.randn(b) * 3e38
    y = shared_fake_quantize(x, BFP16)
    codes, exps, micro = shared_quantize(x, BFP16)
    assert y[0, :b].tolist() == [0.0] * b and exps[0, 0].item() == 127 - 17  # step 2^-23
    # NaN and inf count as 0 (the reference's rule): the rest of the block is quantized without them
    clean = x[1, :b].clone()
    clean[:3] = 0
    assert y[1, :3].tolist() == [0.0] * 3 and torch.equal(y[1, :b], shared_fake_quantize(clean, BFP16))
    assert exps[2, 0].item() == 0 and torch.isfinite(y).all()
    assert torch.equal(shared_dequantize(codes, exps, micro, BFP16), y)
    assert codes.min().item() >= -128 and codes.max().item() <= 127


def test_two_bit_micro_exponent_generic():
    fmt = SharedExponentFormat("t", 8, 3, 2, 2)
    x = torch.tensor([4.0, 0.0, 1.0, 0.0, 0.5, 0.0, 0.2, 0.0])
    _, micro = shared_exponents(x, fmt)
    # E = 2; pair maxima 4, 1, 0.5, 0.2: d = 0, min(2, 3) = 2, 3, 3 (capped)
    assert micro.tolist() == [0, 2, 3, 3]
    assert ulp_from_exponents(*shared_exponents(x, fmt), fmt).tolist() == [1.0, 0.25, 0.125, 0.125]
    y = shared_fake_quantize(x, fmt)
    assert y.tolist() == [4.0, 0.0, 1.0, 0.0, 0.5, 0.0, 0.25, 0.0]  # 0.2 / 0.125 = 1.6 -> 2


@pytest.mark.parametrize("fmt", [MX6, MX9])
def test_zero_nan_tiny_blocks_and_consistency(fmt):
    b = fmt.block_size
    x = torch.randn(6, 4 * b, generator=torch.Generator().manual_seed(0))
    x[0, :b] = 0
    x[1, 0] = math.nan
    x[2, :b] = torch.randn(b) * 1e-39  # float32 subnormals: E clamps at -127
    x[3, :b] = torch.randn(b) * 3e38
    y = shared_fake_quantize(x, fmt)
    codes, exps, micro = shared_quantize(x, fmt)
    assert y[0, :b].tolist() == [0.0] * b
    assert torch.isnan(y[1, :b]).all() and not torch.isnan(y[1, b:]).any()
    assert exps[1, 0].item() == 255 and exps[0, 0].item() == 0 and exps[2, 0].item() == 0
    assert torch.isfinite(y[[0, 2, 3, 4, 5]]).all()
    d = shared_dequantize(codes, exps, micro, fmt)
    assert torch.equal(d.nan_to_num(7.0), y.nan_to_num(7.0))
    assert codes.abs().max().item() <= fmt.qmax
    assert torch.equal(shared_fake_quantize(y[[0, 2, 3, 4, 5]], fmt), y[[0, 2, 3, 4, 5]])


def test_block_error_and_dtype():
    with pytest.raises(ValueError, match=r"block size 16 .* 24"):
        shared_fake_quantize(torch.zeros(3, 24), MX6)
    x = torch.randn(4, 32).half()
    assert shared_fake_quantize(x, "mx9").dtype == torch.float16
    with pytest.raises(ValueError, match="not a shared-exponent format"):
        shared_fake_quantize(x, "fp4")
