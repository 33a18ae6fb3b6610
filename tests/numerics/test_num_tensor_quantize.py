"""tensor_quantize: granularity, scale types, delegation to the format families, two stages."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from quark.torch.quantization import tensor_quantize as tq
from quark.torch.quantization.numerics import (
    FP8_E4M3,
    UE5M3,
    _chunk,
    mx_fake_quantize,
    round_to_format,
    shared_fake_quantize,
)
from quark.torch.quantization.tensor_quantize import (
    QParams,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
)


@dataclass
class Spec:
    """Stand-in with the attribute names of QTensorConfig (tensor_quantize reads only those)."""

    dtype: str
    qscheme: str | None = "per_tensor"
    ch_axis: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    round_method: str | None = None
    scale_type: str | None = None
    scale_format: str | None = None
    scale_calculation_mode: str | None = None
    mx_element_dtype: str | None = None
    zero_point_type: str | None = None
    is_scale_quant: bool = False
    observer_cls: str | None = None
    is_dynamic: bool | None = None


X = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.25, 0.0, -8.0, 1.0], [3.0, 3.0, -1.5, 0.0]])


def test_granularity_shapes_and_values():
    pt = compute_qparams(X, Spec("int8", "per_tensor", symmetric=True))
    assert pt.scale.shape == () and pt.scale.item() == pytest.approx(8 / 127.5) and pt.zero_point is None
    ch0 = compute_qparams(X, Spec("int8", "per_channel", ch_axis=0, symmetric=True))
    assert ch0.scale.tolist() == pytest.approx([4 / 127.5, 8 / 127.5, 3 / 127.5])
    ch1 = compute_qparams(X, Spec("int8", "per_channel", ch_axis=-1, symmetric=True))
    assert ch1.scale.tolist() == pytest.approx([3 / 127.5, 3 / 127.5, 8 / 127.5, 4 / 127.5])
    g = compute_qparams(X, Spec("int4", "per_group", group_size=2, symmetric=True))
    assert g.scale.shape == (3, 2)
    assert g.scale.flatten().tolist() == pytest.approx([2 / 7.5, 4 / 7.5, 0.25 / 7.5, 8 / 7.5, 3 / 7.5, 1.5 / 7.5])
    # activations are [tokens, K]: ch_axis 0 on [B, S, K] is per token
    act = torch.randn(2, 3, 8)
    tok = compute_qparams(act, Spec("fp8_e4m3", "per_channel", ch_axis=0))
    assert tok.scale.shape == (2, 3)
    assert torch.equal(tok.scale, act.abs().amax(-1) / 448)


def test_int4_per_group_fake_quant_by_hand():
    x = torch.tensor([[1.875, -0.375, 3.75, 1.2], [0.0, 0.0, -7.5, 2.5]])
    spec = Spec("int4", "per_group", group_size=2, symmetric=True)
    # scales amax / 7.5 = [0.25, 0.5], [2^-23 (all zero), 1]: codes [7.5 -> 8 -> 7, -1.5 -> -2],
    # [7.5 -> 7, 2.4 -> 2], [0, 0], [-7.5 -> -8, 2.5 -> 2]: the most negative code is used
    assert compute_qparams(x, spec).scale.tolist() == [[0.25, 0.5], [2.0**-23, 1.0]]
    assert quantize(x, spec).tolist() == [[7, -2, 7, 2], [0, 0, -8, 2]]
    assert fake_quantize(x, spec).tolist() == [[1.75, -0.5, 3.5, 1.0], [0.0, 0.0, -8.0, 2.0]]


def test_uint4_asymmetric_int_zero_point():
    spec = Spec("uint4", "per_channel", ch_axis=0, symmetric=False, zero_point_type="int32")
    qp = compute_qparams(X, spec)
    assert qp.zero_point.dtype == torch.int32
    # row 1: [-8, 1] -> scale 9/15, zp = round(8 / 0.6) = 13
    assert qp.scale[1].item() == pytest.approx(0.6) and qp.zero_point.tolist() == [5, 13, 5]
    codes = quantize(X, spec, qp)
    assert codes.dtype == torch.uint8 and codes[1].tolist() == [13, 13, 0, 15]  # 0.25/0.6 -> 0
    assert torch.equal(dequantize(codes, spec, qp), fake_quantize(X, spec, qp))


def test_group_size_error_names_group_and_k():
    with pytest.raises(ValueError, match=r"group_size=3 .* K=4"):
        fake_quantize(X, Spec("int4", "per_group", group_size=3, symmetric=True))
    with pytest.raises(ValueError, match="ch_axis"):
        fake_quantize(torch.zeros(2, 3, 4), Spec("int8", "per_channel", ch_axis=1, symmetric=True))


def test_fp8_per_tensor_scale_is_amax_over_448():
    spec = Spec("fp8_e4m3", "per_tensor")
    qp = compute_qparams(X, spec)
    assert qp.scale.item() == pytest.approx(8 / 448)
    y = fake_quantize(X, spec)
    assert torch.equal(y, round_to_format(X / qp.scale, FP8_E4M3) * qp.scale)
    codes = quantize(X, spec, qp)
    assert codes.dtype == torch.uint8 and torch.equal(codes.view(torch.float8_e4m3fn).float() * qp.scale, y)


@pytest.mark.parametrize(
    "scale_type, expected",
    [
        ("float32", float(torch.tensor(10.0) / 6)),
        ("pof2", 2.0),  # rounded up to a power of two
        ("float16", float(torch.tensor(10 / 6).half())),
        ("bfloat16", float(torch.tensor(10 / 6).bfloat16())),
        ("float8_e5m3", 1.625),  # nearest ue5m3 value of 1.6667 (step 0.125 in [1, 2))
    ],
)
def test_scale_types(scale_type, expected):
    x = torch.tensor([[10.0, 1.0, -3.0, 0.1]])
    qp = compute_qparams(x, Spec("fp4", "per_group", group_size=4, scale_type=scale_type))
    assert qp.scale.item() == expected


def test_scale_type_float_follows_model_dtype():
    x = torch.tensor([[10.0, 1.0, -3.0, 0.1]])
    spec = Spec("int8", "per_tensor", symmetric=True, scale_type="float")
    assert compute_qparams(x, spec).scale.item() == pytest.approx(10 / 127.5)
    assert compute_qparams(x.bfloat16(), spec).scale.item() == float(torch.tensor(10 / 127.5).bfloat16())


def test_amdfp4_scales_are_ue5m3_values():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    spec = Spec("fp4", "per_group", group_size=16, scale_type="float8_e5m3")
    qp = compute_qparams(x, spec)
    assert torch.equal(qp.scale, round_to_format(qp.scale, UE5M3)) and qp.scale.shape == (8, 4)


@pytest.mark.parametrize("element", ["fp4", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "int8"])
def test_mx_delegation(element):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    via_dtype = Spec("mx", "per_group", group_size=32, mx_element_dtype=element)
    via_scale = Spec(element, "per_group", group_size=32, scale_type="float8_e8m0fnu", symmetric=True)
    expected = mx_fake_quantize(x, element)
    assert torch.equal(fake_quantize(x, via_dtype), expected)
    assert torch.equal(fake_quantize(x, via_scale), expected)
    qp = compute_qparams(x, via_dtype)
    assert qp.scale.shape == (4, 2)
    assert torch.equal(dequantize(quantize(x, via_dtype, qp), via_dtype, qp), expected)
    floor = Spec("mx", "per_group", group_size=32, mx_element_dtype=element, scale_calculation_mode="floor")
    assert torch.equal(fake_quantize(x, floor), mx_fake_quantize(x, element, mode="floor"))


@pytest.mark.parametrize("dtype", ["mx6", "mx9", "bfp16"])
def test_shared_exponent_delegation(dtype):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    spec = Spec(dtype, "per_group")
    y = fake_quantize(x, spec)
    assert torch.equal(y, shared_fake_quantize(x, dtype))
    qp = compute_qparams(x, spec)
    assert torch.equal(fake_quantize(x, spec, qp), y)
    assert torch.equal(dequantize(quantize(x, spec, qp), spec, qp), y)


def test_cast_dtypes():
    x = torch.tensor([1.0 + 2**-10, 3.14159])
    assert torch.equal(fake_quantize(x, Spec("bfloat16", None)), x.bfloat16().float())
    assert quantize(x, Spec("float16", None)).dtype == torch.float16


def test_nvfp4_scale_quant_by_hand():
    first = Spec("fp4", "per_group", group_size=16, scale_type="float32")
    second = Spec("fp8_e4m3", "per_tensor", is_scale_quant=True)
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 16], x[1, 0], x[1, 16] = 6.0 * 448, 5.0, 0.003, -300.0
    x[1, 1] = -0.001
    q1, q2 = compute_qparams(x, [first, second])
    # block scales s = amax / 6 = [448, 5/6, 0.0005, 50]; global g = 448 / 448 = 1
    assert q2.scale.item() == 1.0 and q1.scale.shape == (2, 2)
    # e4m3: 448, 5/6 -> 0.8125, 0.0005 -> 0 (below half the smallest subnormal 2^-9), 50 -> 48 (tie, even)
    assert q1.scale.tolist() == [[448.0, 0.8125], [0.0, 48.0]]
    y = fake_quantize(x, [first, second])
    eff = q1.scale.repeat_interleave(16, dim=1)
    expected = round_to_format(x / torch.where(eff == 0, 1.0, eff), tq.nfp.FP4_E2M1) * eff
    assert torch.equal(y, expected)
    assert y[1, :16].tolist() == [0.0] * 16  # a block whose stored scale is 0 dequantizes to 0
    assert torch.equal(dequantize(quantize(x, [first, second], [q1, q2]), [first, second], [q1, q2]), y)
    # static global, dynamic block scales (nvfp4 activations)
    assert torch.equal(fake_quantize(x, [first, second], [None, q2]), y)
    g = tq.scale_quant_global_scale(x.abs().amax(), [first, second])
    assert g.item() == q2.scale.item()


def test_amdfp4_global_second_stage_is_ue5m3():
    first = Spec("fp4", "per_group", group_size=16, scale_type="float32")
    second = Spec("fp8_e5m3", "per_tensor", is_scale_quant=True)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    q1, q2 = compute_qparams(x, [first, second])
    assert q2.scale.item() == pytest.approx(x.abs().amax().item() / 6 / 114688)
    assert torch.equal(q1.scale, round_to_format(q1.scale, UE5M3))
    assert q1.scale.max().item() == 114688  # the largest block scale lands on the format's max


def test_progressive_int4_fp8():
    """FORMATS.md 2a.4, in float32: s1 = amax / 448, c = e4m3(clamp(x / s1)); per row s2 = max|c| / 7.5,
    q = clamp(rne(c * fl(1 / s2)), -8, 7); x_hat = fl(fl(q * s2) * s1). The int4 stage runs on the fp8
    codes, so its scale is in code units."""
    first = Spec("fp8_e4m3", "per_tensor")
    second = Spec("int4", "per_channel", ch_axis=0, symmetric=True, round_method="half_even")
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    s1 = x.abs().amax() / 448
    c = round_to_format((x / s1).clamp(-448, 448), FP8_E4M3)
    s2 = c.abs().amax(1) / 7.5
    q = torch.clamp(torch.round(c * (1 / s2)[:, None]), -8, 7)
    expected = (q * s2[:, None]) * s1
    y = fake_quantize(x, [first, second])
    assert torch.equal(y, expected)
    q1, q2 = compute_qparams(x, [first, second])
    assert torch.equal(q1.scale, s1) and torch.equal(q2.scale, s2)
    assert torch.equal(fake_quantize(x, [first, second], [q1, q2]), y)
    codes = quantize(x, [first, second], [q1, q2])
    assert codes.dtype == torch.int8 and torch.equal(codes.float(), q) and codes.min().item() == -8
    assert torch.equal(dequantize(codes, [first, second], [q1, q2]), y)
    # not the same as re-quantizing the first stage's values c * s1 (the convention before)
    assert not torch.equal(y, fake_quantize(fake_quantize(x, first), second))


def test_real_qtensorconfig_specs():
    specs = pytest.importorskip("quark.torch.quantization.config.specs")
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for helper in (specs.Int4PerGroupSpec(group_size=32), specs.OCP_MXFP4Spec(), specs.MX6Spec(),
                   specs.ScaleQuantSpec(specs.FP4PerGroupSpec(group_size=16), specs.FP8E4M3PerTensorSpec()),
                   specs.ProgressiveSpec(specs.FP8E4M3PerTensorSpec(), specs.Int4PerChannelSpec())):
        spec = helper.to_quantization_spec()
        qp = compute_qparams(x, spec)
        y = fake_quantize(x, spec)
        assert torch.equal(fake_quantize(x, spec, qp), y)
        assert torch.equal(dequantize(quantize(x, spec, qp), spec, qp), y)


def test_dtype_device_nan_and_no_inf():
    spec = Spec("fp4", "per_group", group_size=4, scale_type="float32")
    x = torch.tensor([[1.0, math.nan, 2.0, 3.0], [3e38, -3e38, 1.0, 0.0]], dtype=torch.bfloat16)
    y = fake_quantize(x, spec)
    assert y.dtype == torch.bfloat16 and y.device == x.device
    assert torch.isnan(y[0]).all()  # dynamic: the NaN poisons its group's scale
    assert torch.isfinite(y[1]).all()
    qp = QParams(torch.tensor([[1.0], [1e38]]))
    ys = fake_quantize(x, spec, qp)
    assert torch.isnan(ys[0, 1]) and ys[0, [0, 2, 3]].tolist() == [1.0, 2.0, 3.0]  # static: NaN stays put


def test_chunked_path_matches_single_pass(monkeypatch):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 5
    x[3, 7] = math.nan
    cases = [
        Spec("int8", "per_tensor", symmetric=True),
        Spec("uint4", "per_group", group_size=32, symmetric=False, zero_point_type="float32"),
        Spec("fp8_e5m2", "per_channel", ch_axis=0),
        Spec("mx", "per_group", group_size=32, mx_element_dtype="fp6_e3m2"),
        Spec("mx9", "per_group"),
        [Spec("fp4", "per_group", group_size=16), Spec("fp8_e4m3", "per_tensor", is_scale_quant=True)],
    ]
    whole = [fake_quantize(x, s).nan_to_num(9.0) for s in cases]
    monkeypatch.setattr(_chunk, "CHUNK_ELEMS", 256)  # many chunks of 2..8 rows
    for s, w in zip(cases, whole):
        assert torch.equal(fake_quantize(x, s).nan_to_num(9.0), w)


def test_empty_tensor():
    x = torch.zeros(0, 64)
    for spec in (Spec("int4", "per_group", group_size=32, symmetric=True), Spec("mx", mx_element_dtype="fp4"),
                 [Spec("fp4", "per_group", group_size=16), Spec("fp8_e4m3", "per_tensor", is_scale_quant=True)]):
        assert fake_quantize(x, spec).shape == (0, 64)
    assert compute_qparams(x, Spec("int8", "per_channel", ch_axis=0, symmetric=True)).scale.shape == (0,)


def test_meta_tensors_give_qparam_and_code_shapes():
    """Export sizes its tensors from meta weights: every path must run on the meta device."""
    m = torch.empty(8, 64, device="meta")
    nv = [Spec("fp4", "per_group", group_size=16), Spec("fp8_e4m3", "per_tensor", is_scale_quant=True)]
    for spec, shape in [
        (Spec("uint4", "per_group", group_size=32, symmetric=False), (8, 2)),
        (Spec("mx", mx_element_dtype="fp6_e2m3"), (8, 2)),
        (Spec("mx9", "per_group"), (8, 32)),
        (nv, (8, 4)),
    ]:
        qp = compute_qparams(m, spec)
        first = qp[0] if isinstance(qp, list) else qp
        assert first.scale.shape == shape and first.scale.device.type == "meta"
        codes = quantize(m, spec, qp)
        assert codes.shape == m.shape and dequantize(codes, spec, qp).shape == m.shape
        assert fake_quantize(m, spec).shape == m.shape


def test_requires_grad_input_gives_a_detached_result():
    x = torch.randn(4, 64, requires_grad=True)
    for spec in (Spec("int8", "per_tensor", symmetric=True), Spec("mx", mx_element_dtype="fp4"), Spec("mx6")):
        y = fake_quantize(x, spec)
        assert not y.requires_grad and torch.equal(y, fake_quantize(x.detach(), spec))
    assert not mx_fake_quantize(x, "fp4").requires_grad


def test_worker_pool_matches_plain_loop(monkeypatch):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    specs = [Spec("uint4", "per_group", group_size=32, symmetric=False), Spec("mx9"),
             [Spec("fp4", "per_group", group_size=16), Spec("fp8_e4m3", "per_tensor", is_scale_quant=True)]]
    whole = [fake_quantize(x, s) for s in specs]
    monkeypatch.setattr(_chunk, "CHUNK_ELEMS", 512)
    for threads in ("0", "3"):
        monkeypatch.setenv("QUARK_NUMERICS_THREADS", threads)
        for s, w in zip(specs, whole):
            assert torch.equal(fake_quantize(x, s), w)


@pytest.mark.parametrize(
    "dtype,symmetric,zp_dtype",
    [("int4", True, None), ("uint4", False, torch.int32), ("uint4", False, torch.float32), ("int8", True, None)],
)
@pytest.mark.parametrize("round_method", [None, "round", "floor"])
def test_row_fake_quantizer_is_bit_identical_to_fake_quantize(dtype, symmetric, zp_dtype, round_method):
    """GPTQ's prepared per-row column quantizer gives exactly fake_quantize's values: every code of
    the grid, the ties between codes, the clamped values beyond the range, and zero-scale rows."""
    rows = 64
    spec = Spec(dtype, "per_channel", ch_axis=0, symmetric=symmetric, round_method=round_method)
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(rows, generator=gen) * 0.1 + 0.01
    scale[3] = 0.0
    zp = None if zp_dtype is None else torch.randint(0, 16, (rows,), generator=gen).to(zp_dtype)
    if zp is not None and zp_dtype is torch.float32:
        zp = zp + 0.25
    qp = QParams(scale, zp)
    fn = tq.row_fake_quantizer(spec, qp)
    codes = torch.arange(-140.0, 140.0, 0.5)  # integers and exact ties, well beyond int8's range
    for c in codes:
        v = c * scale + torch.randn(rows, generator=gen) * 1e-3 * (c.abs() < 1)
        expected = fake_quantize(v[:, None], spec, qp).reshape(-1)
        assert torch.equal(fn(v), expected), float(c)
    assert tq.row_fake_quantizer(Spec("fp8_e4m3", "per_channel", ch_axis=0), QParams(scale)) is None


def test_ptpc_fp8_activations_get_one_scale_per_token():
    """FORMATS.md 2a.6 as this project keeps it (docs/numerics.md): one scale per row of the [-1, K] view,
    for [B, T, K] and for [N, K] inputs, each the token's own amax / 448."""
    from quark.torch import LLMTemplate

    spec = LLMTemplate.get_scheme("ptpc_fp8").config.input_tensors
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(compute_qparams(x, spec).scale, x.abs().amax(-1) / 448)
    flat = x.reshape(10, 16)
    assert torch.equal(compute_qparams(flat, spec).scale, flat.abs().amax(-1) / 448)
    assert torch.equal(fake_quantize(x, spec).reshape(10, 16), fake_quantize(flat, spec))
