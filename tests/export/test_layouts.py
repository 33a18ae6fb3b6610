"""Exported tensors read the way a serving engine reads them (FORMATS.md section 4).

Every reference below decodes the checkpoint tensors with its own few lines (fp4/fp6/e8m0/e5m3
tables, nibble orders) and must give the weight the quantized model computes with.
"""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from quark.torch import LLMTemplate
from quark.torch.export.api import export_safetensors
from quark.torch.export.awq import from_awq, to_awq
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.config import QConfig
from quark.torch.quantization.layouts import WeightLayout
from quark.torch.quantization.tensor_quantize import QParams

N, K = 32, 128
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def unpack_nibbles(words: torch.Tensor, order: list[int], signed: bool) -> torch.Tensor:
    """int32 [R, C] -> [R, 8C]: nibble i of a word is element order[i] of its group of 8."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*words.shape, 8, dtype=torch.int64)
    for i, elem in enumerate(order):
        out[..., elem] = (w >> (4 * i)) & 0xF
    if signed:
        out = torch.where(out >= 8, out - 16, out)
    return out.reshape(words.shape[0], -1)


def fp4(codes: torch.Tensor) -> torch.Tensor:
    mag = FP4[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -mag, mag)


def fp4_bytes(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int64)
    return fp4(torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], -1))


def fp6_e2m3_bytes(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int64).reshape(b.shape[0], -1, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    c = torch.stack([(word >> (6 * i)) & 0x3F for i in range(4)], dim=-1).reshape(b.shape[0], -1)
    e, m = (c >> 3) & 3, (c & 7).double()
    mag = torch.where(e == 0, m / 8, (1 + m / 8) * 2.0 ** (e - 1).double())
    return torch.where((c & 32) > 0, -mag, mag).float()


def ue5m3(c: torch.Tensor) -> torch.Tensor:
    c = c.to(torch.int64)
    e, m = c >> 3, (c & 7).double()
    return torch.where(e == 0, m / 8 * 2.0**-14, (1 + m / 8) * 2.0 ** (e - 15).double()).float()


def e8m0(c: torch.Tensor) -> torch.Tensor:
    return 2.0 ** (c.to(torch.float64) - 127)


def per_group(scale_kn: torch.Tensor, g: int) -> torch.Tensor:
    """[K/g, N] -> [N, K]"""
    return scale_kn.t().repeat_interleave(g, dim=1)


def per_block(scale_nb: torch.Tensor, k: int) -> torch.Tensor:
    return scale_nb.repeat_interleave(k // scale_nb.shape[1], dim=1)


DECODERS = {
    "fp8": lambda t: t["weight"].float() * t["weight_scale"],
    "ptpc_fp8": lambda t: t["weight"].float() * t["weight_scale"][:, None],
    "int8": lambda t: t["weight"].float() * t["weight_scale"],
    "int4_wo_32": lambda t: unpack_nibbles(t["weight"], AWQ_ORDER, True).t() * per_group(t["weight_scale"], 32),
    "uint4_wo_64": lambda t: (
        unpack_nibbles(t["weight"], AWQ_ORDER, False).t() - per_group(unpack_nibbles(t["weight_zero_point"], AWQ_ORDER, False), 64)
    ) * per_group(t["weight_scale"], 64),
    "int4_wo_per_channel": lambda t: unpack_nibbles(t["weight"], AWQ_ORDER, True) * t["weight_scale"][:, None],
    "uint4_wo_per_channel": lambda t: (
        unpack_nibbles(t["weight"], AWQ_ORDER, False) - t["weight_zero_point"][:, None]
    ) * t["weight_scale"][:, None],
    "mxfp4": lambda t: fp4_bytes(t["weight"]) * per_block(e8m0(t["weight_scale"]), K),
    "mxfp4_fp8": lambda t: fp4_bytes(t["weight"]) * per_block(e8m0(t["weight_scale"]), K),
    "mxfp6_e2m3": lambda t: fp6_e2m3_bytes(t["weight"]) * per_block(e8m0(t["weight_scale"]), K),
    "nvfp4": lambda t: fp4_bytes(t["weight"]) * per_block(t["weight_scale"].float() * t["weight_scale_2"], K),
    "amdfp4": lambda t: fp4_bytes(t["weight"]) * per_block(ue5m3(t["weight_scale"]), K),
    "amdfp4_global16": lambda t: fp4_bytes(t["weight"]) * per_block(ue5m3(t["weight_scale"]) * t["weight_scale_2"], K),
    # FORMATS.md 2a.4: value = (int4 * weight_scale_2 (per channel, fp8-code units)) * weight_scale (fp8 per tensor)
    "int4_fp8": lambda t: unpack_nibbles(t["weight"], AWQ_ORDER, True) * t["weight_scale_2"][:, None] * t["weight_scale"],
}

DTYPES = {  # weight dtype, weight shape, weight_scale dtype and shape
    "fp8": (torch.float8_e4m3fn, (N, K), torch.float32, ()),
    "ptpc_fp8": (torch.float8_e4m3fn, (N, K), torch.float32, (N,)),
    "int8": (torch.int8, (N, K), torch.float32, ()),
    "int4_wo_32": (torch.int32, (K, N // 8), torch.float32, (K // 32, N)),
    "uint4_wo_64": (torch.int32, (K, N // 8), torch.float32, (K // 64, N)),
    "int4_wo_per_channel": (torch.int32, (N, K // 8), torch.float32, (N,)),
    "uint4_wo_per_channel": (torch.int32, (N, K // 8), torch.float32, (N,)),
    "mxfp4": (torch.uint8, (N, K // 2), torch.uint8, (N, K // 32)),
    "mxfp4_fp8": (torch.uint8, (N, K // 2), torch.uint8, (N, K // 32)),
    "mxfp6_e2m3": (torch.uint8, (N, 3 * K // 4), torch.uint8, (N, K // 32)),
    "nvfp4": (torch.uint8, (N, K // 2), torch.float8_e4m3fn, (N, K // 16)),
    "amdfp4": (torch.uint8, (N, K // 2), torch.uint8, (N, K // 16)),
    "amdfp4_global16": (torch.uint8, (N, K // 2), torch.uint8, (N, K // 16)),
    "int4_fp8": (torch.int32, (N, K // 8), torch.float32, ()),
}


def one_linear(scheme: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N, bias=True))
    cfg = QConfig(global_quant_config=LLMTemplate.get_scheme(scheme).config)
    ModelQuantizer(cfg).quantize_model(model, [torch.randn(4, K)], progress=False)
    return model


@pytest.mark.parametrize("scheme", list(DECODERS))
def test_exported_tensors_decode_to_the_quantized_weight(scheme, tmp_path):
    model = one_linear(scheme)
    export_safetensors(model, tmp_path / "out")
    t = {k.removeprefix("0."): v for k, v in load_file(tmp_path / "out" / "model-00001-of-00001.safetensors").items()}
    wdtype, wshape, sdtype, sshape = DTYPES[scheme]
    assert (t["weight"].dtype, tuple(t["weight"].shape)) == (wdtype, wshape)
    assert (t["weight_scale"].dtype, tuple(t["weight_scale"].shape)) == (sdtype, sshape)
    with torch.no_grad():
        expected = model[0].quantized_weight()
    torch.testing.assert_close(DECODERS[scheme](t).float(), expected, rtol=0, atol=0)
    torch.testing.assert_close(t["bias"], model[0].bias.detach())
    static_input = LLMTemplate.get_scheme(scheme).config.input_tensors
    if scheme in ("fp8", "int8", "mxfp4_fp8"):
        assert t["input_scale"].shape == () and t["input_scale"].dtype == torch.float32
    elif scheme in ("nvfp4", "amdfp4_global16"):
        assert set(t) >= {"input_scale_2", "weight_scale_2"} and "input_scale" not in t
        assert t["weight_scale_2"].shape == () and t["input_scale_2"].shape == ()
    else:
        assert not any(k.startswith("input_") for k in t), (scheme, static_input)


def test_pack_order_changes_only_the_nibble_order():
    model = one_linear("int4_wo_per_channel")
    codes, qparams = model[0].weight_codes_and_qparams()
    spec = model[0].weight_quantizer.spec
    reorder = WeightLayout(spec, "reorder").store(codes, qparams)["weight"]
    order = WeightLayout(spec, "order").store(codes, qparams)["weight"]
    torch.testing.assert_close(unpack_nibbles(order, list(range(8)), True), codes.long())
    torch.testing.assert_close(unpack_nibbles(reorder, AWQ_ORDER, True), codes.long())
    assert not torch.equal(order, reorder)


def test_awq_layout_by_hand():
    # N=8 outputs, K=4 inputs, one group: codes q[n, k] = n (uint4), zero point 3 and scale 0.5 everywhere
    spec = LLMTemplate.get_scheme("uint4_wo_per_channel").config.weight
    codes = torch.arange(8, dtype=torch.uint8)[:, None].expand(8, 4).contiguous()
    qp = QParams(torch.full((8,), 0.5), torch.full((8,), 3, dtype=torch.int32))
    t = to_awq(codes, qp, spec, torch.float16)
    # each row k of qweight holds n = 0..7 in nibble order [0, 2, 4, 6, 1, 3, 5, 7]
    word = sum(n << (4 * i) for i, n in enumerate(AWQ_ORDER))
    assert t["qweight"].shape == (4, 1) and (t["qweight"] == word).all()
    assert t["qzeros"].shape == (1, 1) and t["qzeros"].item() == 0x33333333
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (1, 8)
    back_codes, back_qp = from_awq(t, spec, 8)
    assert torch.equal(back_codes, codes) and torch.equal(back_qp.zero_point, qp.zero_point)


def test_awq_scales_keep_float32_when_the_model_dtype_would_round_them():
    spec = LLMTemplate.get_scheme("uint4_wo_per_channel").config.weight
    qp = QParams(torch.full((8,), 0.1), torch.zeros(8, dtype=torch.int32))
    t = to_awq(torch.zeros(8, 8, dtype=torch.uint8), qp, spec, torch.float16)
    assert t["scales"].dtype == torch.float32


def test_int4_fp8_stores_both_stages_scales_as_they_are():
    """``weight_scale`` is the fp8 stage's scale, ``weight_scale_2`` the int4 scale of the fp8 codes; load
    gives them back bit for bit."""
    model = one_linear("int4_fp8")
    codes, (q1, q2) = model[0].weight_codes_and_qparams()
    layout = WeightLayout(model[0].weight_quantizer.spec)
    stored = layout.store(codes, [q1, q2])
    assert torch.equal(stored["scale"], q1.scale) and torch.equal(stored["scale_2"], q2.scale)
    assert stored["scale_2"].max().item() <= (torch.tensor(448.0) / 7.5).item()  # code units: max|c| / 7.5
    back_codes, (b1, b2) = layout.load(stored)
    assert torch.equal(back_codes, codes) and torch.equal(b1.scale, q1.scale) and torch.equal(b2.scale, q2.scale)


def test_shared_exponent_formats_have_no_serving_layout():
    for scheme in ("mx6", "mx9", "bfp16"):
        assert not WeightLayout(LLMTemplate.get_scheme(scheme).config.weight).serving
