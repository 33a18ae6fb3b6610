"""The most negative integer code (-8 for int4, -128 for int8) that FORMATS.md 2a.1 uses is stored
exactly by every packed layout: quark's int4 / int8, AWQ, GGUF Q4_0 / Q8_0."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn as nn

from quark.torch import LLMTemplate
from quark.torch.export.awq import from_awq, to_awq
from quark.torch.export.gguf import _encode
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.config import QConfig, QLayerConfig
from quark.torch.quantization.layouts import WeightLayout
from quark.torch.quantization.tensor_quantize import dequantize

N, K = 16, 64


def _weight_with_negative_extremes(scheme: str) -> tuple[nn.Linear, torch.Tensor, object]:
    """A one-Linear model whose every group of 32 has its largest magnitude on one negative weight -a
    with a power-of-two scale a / 7.5 (int4) or a / 127.5 (int8), so that it is exactly -7.5 / -127.5
    steps and takes the code qmin (with other amax the float32 reciprocal of the scale can land that
    element just inside the tie and give -7 / -127: the reference's rule). Returns the layer, its codes
    and qparams."""
    spec = LLMTemplate.get_scheme(scheme).config.weight
    lin = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        w = torch.rand(N, K, generator=torch.Generator().manual_seed(0)) - 0.5
        w[:, ::32] = -0.99609375 if scheme == "int8" else -0.9375  # one per group of 32
        lin.weight.copy_(w)
    model = nn.Sequential(lin)
    ModelQuantizer(QConfig(global_quant_config=QLayerConfig(weight=spec))).quantize_model(model, progress=False)
    codes, qparams = model[0].weight_codes_and_qparams()
    return model[0], codes, qparams


@pytest.mark.parametrize(("scheme", "qmin", "pack_method"), [
    ("int4_wo_32", -8, "reorder"), ("int4_wo_32", -8, "order"), ("int4_wo_per_channel", -8, "reorder"), ("int8", -128, "reorder"),
])
def test_quark_layouts_store_the_most_negative_code(scheme, qmin, pack_method):
    layer, codes, qparams = _weight_with_negative_extremes(scheme)
    assert int((codes == qmin).sum()) == N * K // 32  # each group's (row's, tensor's) extreme is exactly qmin
    layout = WeightLayout(layer.weight_quantizer.spec, pack_method=pack_method)
    back, back_qparams = layout.load(layout.store(codes, qparams))
    assert torch.equal(back.to(torch.int32), codes.to(torch.int32))
    assert torch.equal(dequantize(back, layer.weight_quantizer.spec, back_qparams),
                       layer.quantized_weight().detach())


@pytest.mark.parametrize("scheme", ["int4_wo_32", "int4_wo_per_channel"])
def test_awq_stores_the_most_negative_code(scheme):
    layer, codes, qparams = _weight_with_negative_extremes(scheme)
    spec = layer.weight_quantizer.spec
    assert int((codes == -8).sum()) == N * K // 32
    tensors = to_awq(codes, qparams, spec, torch.float32)
    back, back_qparams = from_awq(tensors, spec, N)
    assert torch.equal(back.to(torch.int32), codes.to(torch.int32))
    assert torch.equal(back_qparams.scale, qparams.scale)


@pytest.mark.parametrize(("scheme", "qtype", "qmin"), [("int4_wo_32", "Q4_0", -8), ("int8", "Q8_0", -128)])
def test_gguf_blocks_store_the_most_negative_code(scheme, qtype, qmin):
    """What gguf's own dequantizer reads back from our blocks is our fake-quantized weight (float16
    scales, as GGML stores them)."""
    _, codes, qparams = _weight_with_negative_extremes(scheme)
    assert int((codes == qmin).sum()) == N * K // 32
    scale = qparams.scale.half().float()
    enc = _encode(codes, type(qparams)(scale), qtype)
    read = gguf.quants.dequantize(enc.data.numpy(), gguf.GGMLQuantizationType[qtype])
    expected = codes.float().reshape(N, -1, 32) * (scale.reshape(N, -1, 1) if scale.dim() else scale)
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(read)).reshape(N, K), expected.reshape(N, K))
