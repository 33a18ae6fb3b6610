"""GGUF export: block bytes by hand, read back with the gguf package, reload with transformers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quark.torch import LLMTemplate
from quark.torch.export.gguf import GGUFExportError, _encode, _permute_rows, export_gguf
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.config import QConfig, QLayerConfig
from quark.torch.quantization.config.type import ScaleType
from quark.torch.quantization.modules import quantized_linears
from quark.torch.quantization.tensor_quantize import QParams
from quark.torch.quantization.tensor_quantizer import TensorQuantizer
from tests.helpers import tiny_llama, token_batches


def _weight_only(scheme: str, fp16_scales: bool = True) -> QConfig:
    cfg = LLMTemplate.get("llama").get_config(scheme)
    w = cfg.global_quant_config.weight
    if fp16_scales and w.scale_type is not ScaleType.float8_e8m0fnu:
        w = w.with_changes(scale_type=ScaleType.float16)
    return QConfig(global_quant_config=QLayerConfig(weight=w), exclude=cfg.exclude)


def _read(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _dequant(t: gguf.ReaderTensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))


def _weights_off(model) -> None:
    """Activation quantizers off: GGUF holds the weights only."""
    for _, q in quantized_linears(model):
        for tq in (q.input_quantizer, q.output_quantizer):
            if isinstance(tq, TensorQuantizer):
                tq.mode = "off"


# ---------------------------------------------------------------------------------------------
# one block, by hand
# ---------------------------------------------------------------------------------------------
def test_q4_0_block_bytes_by_hand():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(2).reshape(1, 32)
    enc = _encode(codes, QParams(torch.tensor([[0.5]])), "Q4_0")
    data = enc.data.reshape(-1).tolist()
    assert data[:2] == [0x00, 0x38]  # fp16 0.5 = 0x3800, little endian
    # byte i: element i (code + 8 = i) low, element i + 16 (same code) high
    assert data[2:] == [i | (i << 4) for i in range(16)]
    assert torch.equal(enc.dequantized, codes.float() * 0.5)


def test_q4_1_and_q8_0_and_mxfp4_block_bytes_by_hand():
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    enc = _encode(codes, QParams(torch.tensor([[0.25]]), torch.tensor([[4]])), "Q4_1")
    data = enc.data.reshape(-1).tolist()
    assert data[:4] == [0x00, 0x34, 0x00, 0xBC]  # d = 0.25 (0x3400), m = -4 * 0.25 = -1 (0xBC00)
    assert data[4:] == [i | (i << 4) for i in range(16)]
    assert torch.equal(enc.dequantized, (codes.float() - 4) * 0.25)

    c8 = torch.arange(-16, 16, dtype=torch.int8).reshape(1, 32)
    enc = _encode(c8, QParams(torch.tensor(2.0)), "Q8_0")
    assert enc.data.reshape(-1).tolist() == [0x00, 0x40] + [v & 0xFF for v in range(-16, 16)]

    fp4 = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    enc = _encode(fp4, QParams(torch.tensor([[0.125]])), "MXFP4")
    data = enc.data.reshape(-1).tolist()
    assert data[0] == 127 - 3  # e8m0 of 2^-3
    assert data[1:] == [i | (i << 4) for i in range(16)]
    e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert enc.dequantized.reshape(-1).tolist() == [v * 0.125 for v in (e2m1 + [-x for x in e2m1]) * 2]


def test_every_mxfp4_code_and_many_exponents_read_back_exactly(tmp_path):
    # all 16 codes x 252 e8m0 exponents (all but the two whose 6 * 2^e overflows float32), through a
    # real file and gguf's own dequantizer
    codes = torch.arange(16, dtype=torch.uint8).repeat(2).repeat(252, 1)  # [252, 32]
    scale = torch.exp2(torch.arange(-127, 125, dtype=torch.float32)).reshape(252, 1)
    enc = _encode(codes, QParams(scale), "MXFP4")
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_tensor("t", enc.data.numpy(), raw_dtype=gguf.GGMLQuantizationType.MXFP4)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    back = _dequant(_read(tmp_path / "t.gguf")["t"])
    assert torch.equal(back, enc.dequantized)


def test_permute_rows_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(48 * 3, dtype=torch.float32).reshape(48, 3)
    permuted = _permute_rows(w, heads=4)
    undone = LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), 4, 4)
    assert np.array_equal(undone, w.numpy()) and not torch.equal(permuted, w)


# ---------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("scheme", "qtype"), [("int4_wo_32", "Q4_0"), ("int4_wo_64", "Q4_0"),
                                               ("int4_wo_per_channel", "Q4_0"), ("mxfp4", "MXFP4")])
def test_read_back_equals_our_quantized_weights_exactly(scheme, qtype, tmp_path):
    model = tiny_llama(hidden=64)
    ModelQuantizer(_weight_only(scheme)).quantize_model(model)
    path = export_gguf(model, tmp_path, strict=True)
    tensors = _read(path)
    layers = dict(quantized_linears(model))
    checked = 0
    for name, gname in (("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight"),
                        ("model.layers.0.self_attn.v_proj", "blk.0.attn_v.weight"),
                        ("model.layers.1.self_attn.o_proj", "blk.1.attn_output.weight")):
        t = tensors[gname]
        assert t.tensor_type.name == qtype
        assert torch.equal(_dequant(t), layers[name].quantized_weight().detach())
        checked += 1
    assert checked == 3


def test_uint4_q4_1_differs_only_by_fp16_rounding_of_m(tmp_path, caplog):
    model = tiny_llama(hidden=64)
    ModelQuantizer(_weight_only("uint4_wo_32")).quantize_model(model)
    path = export_gguf(model, tmp_path)
    layer = dict(quantized_linears(model))["model.layers.0.mlp.up_proj"]
    codes, qp = layer.weight_codes_and_qparams()
    back = _dequant(_read(path)["blk.0.ffn_up.weight"])
    scale = qp.scale.repeat_interleave(32, 1)
    m = (-qp.zero_point.float().repeat_interleave(32, 1) * scale).half().float()
    assert torch.equal(back, codes.float() * scale + m)  # GGML's own formula, exactly
    ours = layer.quantized_weight().detach()
    assert (back - ours).abs().max() <= (m.abs() * 2**-11).max()
    with pytest.raises(GGUFExportError, match="fp16"):
        export_gguf(model, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("scheme", ["int4_wo_32", "int4_wo_128", "mxfp4"])
def test_transformers_reloads_the_same_logits(scheme, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(hidden=128)
    ModelQuantizer(_weight_only(scheme)).quantize_model(model)
    path = export_gguf(model, tmp_path, strict=True)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = token_batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_activation_schemes_write_their_weights(tmp_path, caplog):
    model = tiny_llama(hidden=64)
    ModelQuantizer(LLMTemplate.get("llama").get_config("int8")).quantize_model(model, token_batches(2))
    path = export_gguf(model, tmp_path)
    assert "only the weights" in caplog.text
    assert _read(path)["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"


def test_tied_embeddings_are_written_once(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(hidden=64, tie_word_embeddings=True)
    model.tie_weights()
    ModelQuantizer(_weight_only("int4_wo_32")).quantize_model(model)
    path = export_gguf(model, tmp_path, strict=True)
    assert "output.weight" not in _read(path)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings
    ids = token_batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_gguf_in_quantize_gguf_out(tmp_path):
    """A float GGUF loaded by transformers, quantized, written as GGUF again and reloaded."""
    from transformers import AutoModelForCausalLM

    src = export_gguf(tiny_llama(hidden=64, seed=3), tmp_path / "float")
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(src)).tensors} == {"F32"}
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    ModelQuantizer(_weight_only("int4_wo_32")).quantize_model(model)
    out = export_gguf(model, tmp_path / "q4", strict=True)
    back = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    ids = token_batches(1, vocab=128)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_tokenizer_is_copied_from_a_gguf_file(tmp_path):
    src = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(str(src), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 3])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(2)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    model = tiny_llama(hidden=64)
    path = export_gguf(model, tmp_path / "out", tokenizer_path=src)
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "ab"]
    assert fields["tokenizer.ggml.token_type"].contents() == [1, 1, 3]
    assert fields["tokenizer.ggml.merges"].contents() == ["a b"]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 2
    assert fields["llama.embedding_length"].contents() == 64
    assert fields["llama.attention.head_count_kv"].contents() == 2


def test_refusals_name_the_layer_and_write_nothing(tmp_path):
    model = tiny_llama(hidden=64)
    ModelQuantizer(LLMTemplate.get("llama").get_config("fp8")).quantize_model(model, token_batches(2))
    with pytest.raises(GGUFExportError, match=r"model\.layers\.0\.self_attn\.q_proj: weight spec fp8_e4m3"):
        export_gguf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(GGUFExportError, match="model_type='gpt2'"):
        export_gguf(model, tmp_path / "out", model_type="gpt2")
    ok = tiny_llama(hidden=64)
    export_gguf(ok, tmp_path / "f")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_gguf(ok, tmp_path / "f")
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["model-F32.gguf"]
