"""export_safetensors -> import_model_from_safetensors on a tiny llama: same logits, same files."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quark.torch import LLMTemplate
from quark.torch.export.api import export_safetensors, import_model_from_safetensors, load_params, save_params
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.config import QConfig
from quark.torch.quantization.layouts import NoServingLayoutError
from quark.torch.quantization.modules import QuantLinear
from tests.helpers import tiny_llama, token_batches

#: every scheme with a serving layout (one per family; the others differ only in numbers)
SERVING = [
    "fp8", "ptpc_fp8", "int8", "int4_wo_32", "uint4_wo_64", "int4_wo_per_channel", "uint4_wo_per_channel",
    "mxfp4", "mxfp6_e3m2", "mxfp4_fp8", "mxfp4_mxfp6_e2m3", "nvfp4", "amdfp4", "amdfp4_global32", "int4_fp8",
]


@pytest.fixture(scope="module")
def batches():
    return token_batches(2, seq=16)


def quantized(scheme, batches, **kwargs):
    model = tiny_llama(hidden=128)
    cfg = LLMTemplate.get("llama").get_config(scheme, **kwargs)
    ModelQuantizer(cfg).quantize_model(model, batches, progress=False)
    return model


def logits(model, batches):
    with torch.no_grad():
        return model(**batches[0]).logits


def shard(folder):
    return load_file(folder / "model-00001-of-00001.safetensors")


def same_files(a, b):
    """Bit-identical tensors under the same names (the files differ at most in their checksums' order)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


@pytest.mark.parametrize("scheme", SERVING)
def test_roundtrip_is_exact_and_frozen_model_writes_the_same_files(scheme, batches, tmp_path):
    model = quantized(scheme, batches)
    ref = logits(model, batches)
    export_safetensors(model, tmp_path / "fake")
    back = import_model_from_safetensors(None, tmp_path / "fake")
    assert isinstance(back.model.layers[0].mlp.down_proj, QuantLinear) and back.model.layers[0].mlp.down_proj.frozen
    torch.testing.assert_close(logits(back, batches), ref, rtol=0, atol=0)
    # the frozen model holds exactly what export writes: same tensors, and exporting it again is a rename
    ModelQuantizer.freeze(model)
    export_safetensors(model, tmp_path / "frozen")
    assert same_files(shard(tmp_path / "fake"), shard(tmp_path / "frozen"))
    export_safetensors(back, tmp_path / "again")
    assert same_files(shard(tmp_path / "fake"), shard(tmp_path / "again"))


def test_config_json(batches, tmp_path):
    model = quantized("fp8", batches, kv_cache_scheme="fp8", min_kv_scale=1e-4)
    export_safetensors(model, tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json",
            "model-00001-of-00001.safetensors"} <= files
    data = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = data["quantization_config"]
    assert qc["quant_method"] == "quark" and qc["quant_mode"] == "eager_mode" and qc["version"] == "0.12.0"
    assert qc["export"] == {
        "kv_cache_group": ["*k_proj", "*v_proj"], "min_kv_scale": 1e-4, "pack_method": "reorder",
        "weight_format": "real_quantized", "weight_merge_groups": None,
    }
    assert QConfig.from_dict(qc) == model._quark_qconfig
    assert data["model_type"] == "llama"
    t = shard(tmp_path / "out")
    kv = "model.layers.0.self_attn.{}_proj.output_scale"
    assert t[kv.format("k")].shape == () and t[kv.format("v")].dtype == torch.float32
    assert kv.format("q") not in t and "model.layers.0.mlp.up_proj.output_scale" not in t
    assert t[kv.format("k")].item() >= 1e-4


def test_tokenizer_files_are_saved(batches, tmp_path):
    class Tokenizer:
        def save_pretrained(self, folder):
            Path(folder, "tokenizer.json").write_text("{}")

    export_safetensors(quantized("int4_wo_64", batches), tmp_path / "out", tokenizer=Tokenizer())
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_fp8_attention_roundtrip(batches, tmp_path):
    model = quantized("fp8", batches, kv_cache_scheme="fp8", attention_scheme="fp8")
    ref = logits(model, batches)
    export_safetensors(model, tmp_path / "out")
    t = shard(tmp_path / "out")
    assert t["model.layers.1.self_attn.prob_output_scale"].shape == ()
    assert t["model.layers.1.self_attn.q_proj.output_scale"].shape == ()
    back = import_model_from_safetensors(None, tmp_path / "out")
    torch.testing.assert_close(logits(back, batches), ref, rtol=0, atol=0)
    attn = back.model.layers[1].self_attn
    assert attn.softmax_quantizer is attn.prob_output_quantizer
    assert attn.softmax_quantizer.scale == t["model.layers.1.self_attn.prob_output_scale"]


@pytest.mark.parametrize("scheme", ["mx6", "mx9", "bfp16"])
def test_no_serving_format_exports_fake_quantized_or_refuses(scheme, batches, tmp_path):
    model = quantized(scheme, batches)
    with pytest.raises(NoServingLayoutError, match="fake_quantized"):
        export_safetensors(model, tmp_path / "real")
    assert not (tmp_path / "real").exists() and list(tmp_path.iterdir()) == []
    export_safetensors(model, tmp_path / "fake", weight_format="fake_quantized")
    t = shard(tmp_path / "fake")
    w = t["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.float32 and w.shape == (128, 256)
    back = import_model_from_safetensors(None, tmp_path / "fake")
    assert not back.model.layers[0].mlp.down_proj.frozen
    torch.testing.assert_close(logits(back, batches), logits(model, batches), rtol=0, atol=0)


def test_fake_quantized_export_of_a_serving_format(batches, tmp_path):
    model = quantized("nvfp4", batches)
    export_safetensors(model, tmp_path / "out", weight_format="fake_quantized")
    t = shard(tmp_path / "out")
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert t["model.layers.0.mlp.down_proj.weight_scale"].shape == (128, 256 // 16)
    back = import_model_from_safetensors(None, tmp_path / "out")
    torch.testing.assert_close(logits(back, batches), logits(model, batches), rtol=0, atol=0)


def test_pack_method_order(batches, tmp_path):
    model = quantized("uint4_wo_32", batches)
    ModelQuantizer.freeze(model)  # frozen with "reorder": export re-packs
    export_safetensors(model, tmp_path / "order", pack_method="order")
    assert json.loads((tmp_path / "order" / "config.json").read_text())["quantization_config"]["export"][
        "pack_method"] == "order"
    back = import_model_from_safetensors(None, tmp_path / "order")
    assert back.model.layers[0].mlp.up_proj.weight_layout.pack_method == "order"
    torch.testing.assert_close(logits(back, batches), logits(model, batches), rtol=0, atol=0)


def test_import_onto_a_given_float_model(batches, tmp_path):
    model = quantized("int8", batches)
    export_safetensors(model, tmp_path / "out")
    back = import_model_from_safetensors(tiny_llama(hidden=128, seed=5), tmp_path / "out")
    torch.testing.assert_close(logits(back, batches), logits(model, batches), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int4_wo_32", "uint4_wo_64", "uint4_wo_per_channel"])
def test_awq_layout_roundtrip(scheme, batches, tmp_path):
    model = quantized(scheme, batches)
    export_safetensors(model, tmp_path / "awq", custom_mode="awq")
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    group = {"int4_wo_32": 32, "uint4_wo_64": 64, "uint4_wo_per_channel": -1}[scheme]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": scheme.startswith("u"),
                  "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    t = shard(tmp_path / "awq")
    name = "model.layers.0.mlp.down_proj"  # K=256, N=128
    groups = 256 // group if group > 0 else 1
    assert t[f"{name}.qweight"].shape == (256, 16) and t[f"{name}.qweight"].dtype == torch.int32
    assert t[f"{name}.qzeros"].shape == (groups, 16) and t[f"{name}.scales"].shape == (groups, 128)
    assert f"{name}.weight" not in t
    back = import_model_from_safetensors(None, tmp_path / "awq")
    torch.testing.assert_close(logits(back, batches), logits(model, batches), rtol=0, atol=0)


def _moe(model_type: str, scheme: str, algorithm=None, **kwargs):
    from quark.torch.testing.tiny_models import build_model

    model = build_model(model_type)
    data = token_batches(2, seq=16, vocab=model.config.get_text_config().vocab_size)
    config = LLMTemplate.get(model_type).get_config(scheme, algorithm=algorithm, **kwargs)
    return ModelQuantizer(config).quantize_model(model, data, progress=False), data


@pytest.mark.parametrize("model_type,names", [
    ("qwen3_moe", ("gate_proj", "up_proj", "down_proj")), ("mixtral", ("w1", "w3", "w2")),
    ("deepseek_v3", ("gate_proj", "up_proj", "down_proj")),
])
def test_awq_layout_writes_fused_experts_per_expert(model_type, names, tmp_path):
    """GPTQ-quantized fused experts in the AWQ layout: every expert is a linear of the original
    checkpoint's names (as AutoAWQ MoE checkpoints and vLLM's AWQ MoE loader have them), gate and up
    split out of the fused gate/up; the codes are the experts' own, and the reimport is exact."""
    from quark.torch.export.awq import from_awq
    from quark.torch.quantization.fused_experts import fused_experts_modules

    model, data = _moe(model_type, "uint4_wo_32", "gptq")
    export_safetensors(model, tmp_path / "awq", custom_mode="awq")
    t = shard(tmp_path / "awq")
    name, experts = fused_experts_modules(model)[0]
    gate, up, down = names
    (gu_proj, gu), = [(p, fp) for p, fp in experts.quantized_projections() if p.role == "gate_up"]
    inter = gu.out_features // 2
    assert not [k for k in t if k.startswith(f"{name}.") and k.endswith((".weight", "_proj"))]
    for e in range(int(experts.num_experts)):
        codes, qparams = gu.expert_codes(experts.float_weight(gu_proj), e)
        for ckpt, rows in ((gate, slice(0, inter)), (up, slice(inter, 2 * inter))):
            layer = {k: t[f"{name}.{e}.{ckpt}.{k}"] for k in ("qweight", "qzeros", "scales")}
            got, qp = from_awq(layer, gu.weight_quantizer.spec, inter)
            assert torch.equal(got, codes[rows]) and torch.equal(qp.scale, qparams.scale[rows])
        assert f"{name}.{e}.{down}.qweight" in t
    back = import_model_from_safetensors(None, tmp_path / "awq")
    torch.testing.assert_close(logits(back, data), logits(model, data), rtol=0, atol=0)


def test_awq_refuses_fused_experts_it_has_no_names_for(tmp_path):
    model, _ = _moe("gpt_oss", "uint4_wo_32")
    with pytest.raises(ValueError, match=r"experts.gate_up_proj: GptOssExperts's original checkpoints keep the "
                                         r"experts fused.*custom_mode='quark'"):
        export_safetensors(model, tmp_path / "a", custom_mode="awq")
    model, _ = _moe("qwen3_moe", "uint4_wo_32", exclude_layers=["*experts.down_proj"])
    with pytest.raises(ValueError, match=r"experts: its down_proj is not quantized"):
        export_safetensors(model, tmp_path / "b", custom_mode="awq")
    assert list(tmp_path.iterdir()) == []


def test_awq_refuses_what_it_cannot_hold(batches, tmp_path):
    with pytest.raises(ValueError, match="int4/uint4"):
        export_safetensors(quantized("mxfp4_weight_only", batches), tmp_path / "a", custom_mode="awq")
    with pytest.raises(ValueError, match="weight-only"):
        export_safetensors(quantized("int8", batches), tmp_path / "b", custom_mode="awq")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("freeze", [False, True])
def test_save_and_load_params(freeze, batches, tmp_path):
    model = quantized("int4_fp8", batches)
    if freeze:
        ModelQuantizer.freeze(model)
    json_path, st_path = save_params(model, tmp_path, model_type="llama")
    back = load_params(tiny_llama(hidden=128, seed=3), json_path, st_path)
    layer = back.model.layers[0].self_attn.o_proj
    assert layer.frozen is freeze
    torch.testing.assert_close(logits(back, batches), logits(model, batches), rtol=0, atol=0)


@pytest.mark.parametrize("custom_mode", ["quark", "awq"])
def test_static_activation_quantizers_without_qparams_are_refused(custom_mode, batches, tmp_path):
    """A checkpoint without a static activation scale is one quark's own import rejects: refuse to write
    it, naming the quantizer and why it has none."""
    model = quantized("fp8", batches)
    q = model.model.layers[1].self_attn.v_proj.input_quantizer
    q.scale = None
    q.uncalibrated_reason = "its block never ran"
    with pytest.raises(ValueError, match=r"^cannot export: static activation quantizer "
                                         r"model\.layers\.1\.self_attn\.v_proj\.input_quantizer has no qparams; "
                                         r"its block never ran$"):
        export_safetensors(model, tmp_path / "out", custom_mode=custom_mode)
    assert list(tmp_path.iterdir()) == []


ALGORITHM_CASES = [
    ("int4_wo_32", ["gptq"], "quark"),
    ("int4_wo_32", ["gptaq"], "quark"),
    ("uint4_wo_64", ["qronos"], "awq"),
    ("uint4_wo_64", ["awq"], "awq"),
    ("mxfp4", ["gptq"], "quark"),
    ("int8", ["autosmoothquant"], "quark"),
    ("int8", ["rotation", "smoothquant"], "quark"),
]


@pytest.mark.parametrize("scheme,algorithm,custom_mode", ALGORITHM_CASES)
def test_algorithm_results_survive_export(scheme, algorithm, custom_mode, batches, tmp_path):
    """What an algorithm chose (GPTQ's per-group grids, which min-max of the result would not give back;
    AWQ/SmoothQuant scales folded into norms and weights; rotated weights) is what the checkpoint holds:
    the reloaded model's logits are the quantized model's, bit for bit."""
    model = quantized(scheme, batches, algorithm=algorithm)
    ref = logits(model, batches)
    export_safetensors(model, tmp_path / "out", custom_mode=custom_mode)
    back = import_model_from_safetensors(None, tmp_path / "out")
    torch.testing.assert_close(logits(back, batches), ref, rtol=0, atol=0)
