"""transformers' built-in ``quant_method: "quark"`` loader reads our exports with only this package.

transformers (5.24, ``utils/quantization_config.py::QuarkConfig`` and
``quantizers/quantizer_quark.py``) imports ``quark.__version__`` (gated >= 0.12),
``quark.torch.quantization.config.config.QConfig.from_dict``,
``quark.torch.export.config.config.JsonExporterConfig(**export)``,
``quark.torch.export.main_export.quant_config_parser.QuantConfigParser.from_custom_config`` and
``quark.torch.export.api._map_to_quark``; it renames checkpoint ``weight_scale`` ... to
``weight_quantizer.scale`` ... and sets every tensor onto the modules ``_map_to_quark`` built.
"""

import json

import pytest
import torch

from quark.torch import LLMTemplate
from quark.torch.export.api import export_safetensors
from quark.torch.export.config.config import JsonExporterConfig
from quark.torch.export.main_export.quant_config_parser import QuantConfigParser
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.modules import QuantLinear
from tests.helpers import tiny_llama, token_batches

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def batches():
    return token_batches(2, seq=16)


def test_transformers_sees_quark_as_available():
    from transformers.utils.import_utils import is_quark_available

    assert is_quark_available()


CASES = [
    ("fp8", {"kv_cache_scheme": "fp8"}),
    ("int8", {}),
    ("ptpc_fp8", {}),
    ("mxfp4", {}),
    ("nvfp4", {}),
    ("uint4_wo_64", {}),
    ("fp8", {"kv_cache_scheme": "fp8", "attention_scheme": "fp8"}),
]


@pytest.mark.parametrize("scheme,kwargs", CASES, ids=[f"{s}-{'-'.join(k.values()) or 'w'}" for s, k in CASES])
def test_from_pretrained_gives_the_same_logits(scheme, kwargs, batches, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(hidden=128)
    ModelQuantizer(LLMTemplate.get("llama").get_config(scheme, **kwargs)).quantize_model(model, batches, progress=False)
    with torch.no_grad():
        ref = model(**batches[0]).logits
    export_safetensors(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    layer = loaded.model.layers[0].self_attn.k_proj
    assert isinstance(layer, QuantLinear) and layer.frozen
    if "kv_cache_scheme" in kwargs:
        assert layer.output_quantizer.scale is not None and layer.output_quantizer.scale.device.type != "meta"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, ref, rtol=0, atol=0)


def test_quark_config_is_built_from_our_names(batches, tmp_path):
    from transformers.utils.quantization_config import QuarkConfig

    model = tiny_llama(hidden=128)
    ModelQuantizer(LLMTemplate.get("llama").get_config("fp8", kv_cache_scheme="fp8")).quantize_model(
        model, batches, progress=False)
    export_safetensors(model, tmp_path / "out", pack_method="order")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    cfg = QuarkConfig(**qc)
    assert cfg.quant_config == model._quark_qconfig
    assert cfg.json_export_config.pack_method == "order"
    assert cfg.json_export_config.kv_cache_group == ["*k_proj", "*v_proj"]


def test_json_exporter_config_keeps_unknown_keys():
    cfg = JsonExporterConfig(pack_method="order", weight_merge_groups=[["*q_proj", "*k_proj"]], future_key=3)
    assert cfg.future_key == 3 and cfg.to_dict()["future_key"] == 3
    assert JsonExporterConfig.from_dict(cfg.to_dict()) == cfg
    assert JsonExporterConfig().pack_method == "reorder"
    with pytest.raises(ValueError, match="pack_method"):
        JsonExporterConfig(pack_method="zigzag")


def test_custom_configs():
    awq = QuantConfigParser.from_custom_config(
        {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
         "modules_to_not_convert": ["visual"]}, is_bias_quantized=False)
    w = awq.global_quant_config.weight
    assert (w.dtype, w.qscheme, w.group_size, w.symmetric) == (Dtype.uint4, QSchemeType.per_group, 128, False)
    assert awq.resolve("model.visual.proj") is None and awq.resolve("lm_head") is None
    assert awq.global_quant_config.input_tensors is None
    fp8 = QuantConfigParser.from_custom_config(
        {"quant_method": "fp8", "activation_scheme": "dynamic", "kv_cache_scheme": "static"})
    assert fp8.global_quant_config.input_tensors.is_dynamic
    assert list(fp8.kv_cache_quant_config) == ["*k_proj", "*v_proj"]
    with pytest.raises(ValueError, match="bits=8"):
        QuantConfigParser.from_custom_config({"quant_method": "awq", "bits": 8})
    with pytest.raises(ValueError, match="gptq"):
        QuantConfigParser.from_custom_config({"quant_method": "gptq"})


def test_online_rotation_is_restored_by_both_loaders(batches, tmp_path):
    """rotation with r4 (random signs): down_proj's online Hadamard is not a tensor of the checkpoint;
    the config's algo_config records it and both loaders re-attach it (same logits, exactly); the
    AWQ layout and GGUF, which cannot record it, refuse before writing anything."""
    import copy

    from transformers import AutoModelForCausalLM

    from quark.torch.export.api import import_model_from_safetensors
    from quark.torch.export.gguf import GGUFExportError, export_gguf

    template = LLMTemplate.get("llama")
    rotation = copy.deepcopy(template.algorithm_configs["rotation"])
    rotation.r4, rotation.random, rotation.seed = True, True, 5
    model = tiny_llama(hidden=128)
    config = template.get_config("int8", algorithm=["rotation", "smoothquant"], algo_configs={"rotation": rotation})
    ModelQuantizer(config).quantize_model(model, batches, progress=False)
    with torch.no_grad():
        ref = model(**batches[0]).logits
    export_safetensors(model, tmp_path / "out")
    for loaded in (import_model_from_safetensors(None, tmp_path / "out"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        down = loaded.model.layers[1].mlp.down_proj
        torch.testing.assert_close(down.online_rotation.rot.signs, model.model.layers[1].mlp.down_proj.online_rotation.rot.signs)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batches[0]).logits, ref, rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj \(and 1 more\) rotate their input online"):
        export_safetensors(model, tmp_path / "awq", custom_mode="awq")
    with pytest.raises(GGUFExportError, match=r"rotate their input online \(rotation r4\)"):
        export_gguf(model, tmp_path / "gguf")
    assert not (tmp_path / "awq").exists() and not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_online_rotation_of_fused_experts_is_restored_by_both_loaders(model_type, tmp_path):
    """rotation with r4 then GPTQ on MoE models: the fused experts' down matrices (and dense blocks' and
    shared experts' down projections) absorbed R4; both loaders re-attach the online rotations, to the
    experts modules too, and give the quantized model's logits."""
    import copy

    from transformers import AutoModelForCausalLM

    from quark.torch.export.api import import_model_from_safetensors
    from quark.torch.quantization.online_rotation import online_rotated_layers
    from quark.torch.testing.tiny_models import build_model

    template = LLMTemplate.get(model_type)
    rotation = copy.deepcopy(template.algorithm_configs["rotation"])
    rotation.r4 = True
    model = build_model(model_type)
    data = token_batches(2, seq=16, vocab=model.config.vocab_size)
    config = template.get_config("int8", algorithm=["rotation", "gptq"], algo_configs={"rotation": rotation})
    ModelQuantizer(config).quantize_model(model, data, progress=False)
    rotated = online_rotated_layers(model)
    assert any(name.endswith("mlp.experts") for name in rotated)
    with torch.no_grad():
        ref = model(**data[0]).logits
    export_safetensors(model, tmp_path / "out")
    for loaded in (import_model_from_safetensors(None, tmp_path / "out"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        assert online_rotated_layers(loaded) == rotated
        with torch.no_grad():
            torch.testing.assert_close(loaded(**data[0]).logits, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# fused MoE experts (transformers 5 holds them as 3-D parameters; the export is per expert)
# ---------------------------------------------------------------------------------------------
MOE_CASES = [
    ("qwen3_moe", "int4_wo_32", {}, "real_quantized"),
    ("qwen3_moe", "uint4_wo_32", {}, "real_quantized"),
    ("qwen3_moe", "fp8", {"kv_cache_scheme": "fp8"}, "real_quantized"),
    ("qwen3_moe", "mxfp4", {}, "real_quantized"),
    ("mixtral", "int4_wo_32", {}, "real_quantized"),
    ("mixtral", "uint4_wo_32", {}, "real_quantized"),
    ("mixtral", "fp8", {"kv_cache_scheme": "fp8"}, "real_quantized"),
    ("mixtral", "mxfp4", {}, "real_quantized"),
    ("qwen3_moe", "fp8", {}, "fake_quantized"),
    ("mixtral", "uint4_wo_32", {}, "fake_quantized"),
]
#: per-expert checkpoint names of the gate / up / down matrices (vLLM's and the original checkpoints')
MOE_NAMES = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}
CODE_DTYPES = {"int4_wo_32": "I32", "uint4_wo_32": "I32", "fp8": "F8_E4M3", "mxfp4": "U8"}


def _checkpoint_meta(folder):
    from safetensors import safe_open

    meta = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                sl = s.get_slice(k)
                meta[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return meta


def _checkpoint_tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same(a, b):
    """Same dtype, shape and bytes (fp8 NaNs and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _moe_roundtrip(model_type, scheme, kwargs, weight_format, folder):
    """Quantize a tiny MoE model, export it, load it with from_pretrained and with quark's import: both
    give the quantized model's logits exactly, transformers reports nothing missing / unexpected, both end
    with the same experts state, and the transformers-loaded model exports the same checkpoint again."""
    import transformers

    from quark.torch.export.api import import_model_from_safetensors
    from quark.torch.quantization.fused_experts import QuantFusedExperts, fused_experts_modules
    from quark.torch.testing.tiny_models import build_model

    model = build_model(model_type)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ModelQuantizer(LLMTemplate.get(model_type).get_config(scheme, **kwargs)).quantize_model(
        model, [{"input_ids": ids}], progress=False)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    export_safetensors(model, folder / "out", weight_format=weight_format)

    cls = getattr(transformers, type(model).__name__)
    loaded, info = cls.from_pretrained(folder / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=0, atol=0)
    ours = import_model_from_safetensors(None, folder / "out")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref, rtol=0, atol=0)
    for name, experts in fused_experts_modules(ours):
        theirs = loaded.get_submodule(name)
        assert isinstance(theirs, QuantFusedExperts)
        assert theirs.__dict__.get("_checkpoint_slots") is None and "0" not in theirs._modules
        mine, got = experts.state_dict(), theirs.state_dict()
        assert sorted(mine) == sorted(got)
        for k, t in mine.items():
            assert _same(got[k], t), k
    export_safetensors(loaded, folder / "again", weight_format=weight_format)
    first, again = _checkpoint_tensors(folder / "out"), _checkpoint_tensors(folder / "again")
    assert sorted(first) == sorted(again)
    for k in first:
        assert _same(first[k], again[k]), k
    return model


@pytest.mark.parametrize("model_type,scheme,kwargs,weight_format", MOE_CASES,
                         ids=[f"{m}-{s}{'-kv' if k else ''}-{w.split('_')[0]}" for m, s, k, w in MOE_CASES])
def test_fused_moe_experts_load_in_transformers(model_type, scheme, kwargs, weight_format, tmp_path):
    """The per-expert export (vLLM's names) loads with from_pretrained: the model class's converters merge
    the per-expert codes into the fused parameter, the scales land in per-expert slots, and the experts
    module builds its stacked state from them on eval() (:func:`_moe_roundtrip`)."""
    from quark.torch.quantization.fused_experts import fused_experts_modules
    from quark.torch.quantization.layouts import WeightLayout

    model = _moe_roundtrip(model_type, scheme, kwargs, weight_format, tmp_path)
    # what is written: per expert, in the original checkpoints' names, nothing fused
    meta = _checkpoint_meta(tmp_path / "out")
    name, experts = fused_experts_modules(model)[0]
    gate, up, down = MOE_NAMES[model_type]
    assert not any(k.endswith((".experts.gate_up_proj", ".experts.down_proj")) for k in meta)
    inter, hidden = experts.fused_quant["down_proj"].in_features, model.config.hidden_size
    wq = experts.fused_quant["gate_up_proj"].weight_quantizer
    for e in range(int(experts.num_experts)):
        for proj, (out_f, in_f) in ((gate, (inter, hidden)), (up, (inter, hidden)), (down, (hidden, inter))):
            shape, dtype = meta[f"{name}.{e}.{proj}.weight"]
            if weight_format == "real_quantized":
                expected = WeightLayout(wq.spec).placeholders(out_f, in_f)
                assert (shape, dtype) == (tuple(expected["weight"].shape), CODE_DTYPES[scheme])
                for key, t in expected.items():
                    if key != "weight":
                        assert meta[f"{name}.{e}.{proj}.weight_{key}"][0] == tuple(t.shape)
            else:
                assert (shape, dtype) == ((out_f, in_f), "F32")
                assert f"{name}.{e}.{proj}.weight_scale" in meta
            if "kv_cache_scheme" in kwargs:  # fp8: static per-expert input scales
                assert meta[f"{name}.{e}.{proj}.input_scale"] == ((), "F32")


OTHER_MOE = [
    ("gpt_oss", "mxfp4", {}, "real_quantized"),  # fused on disk per expert (no converter), transposed, biases
    ("dbrx", "fp8", {"kv_cache_scheme": "fp8"}, "fake_quantized"),  # nested fused parameters, float weights
    ("deepseek_v3", "nvfp4", {}, "real_quantized"),  # two-stage scales
]


@pytest.mark.parametrize("model_type,scheme,kwargs,weight_format", OTHER_MOE,
                         ids=[f"{m}-{s}-{w.split('_')[0]}" for m, s, _, w in OTHER_MOE])
def test_other_fused_moe_classes_load_in_transformers(model_type, scheme, kwargs, weight_format, tmp_path):
    _moe_roundtrip(model_type, scheme, kwargs, weight_format, tmp_path)


def test_fused_moe_slots_refuse_forward_before_loading():
    """A placeholder built for transformers' loader (meta tensors, nothing loaded) says so instead of
    running on uninitialised tensors."""
    from quark.torch.export.api import _map_to_quark
    from quark.torch.quantization.fused_experts import fused_experts_modules
    from quark.torch.testing.tiny_models import build_model

    model = build_model("qwen3_moe", device="meta")
    qconfig = LLMTemplate.get("qwen3_moe").get_config("int4_wo_32")
    _map_to_quark(model, qconfig, weight_format="real_quantized")
    (name, experts), *_ = fused_experts_modules(model)
    keys = experts.state_dict()
    assert "gate_up_proj" in keys and "0.gate_proj.weight_scale" not in keys
    assert "0.gate_proj.weight_quantizer.scale" in keys and not any(k.startswith("fused_quant") for k in keys)
    with pytest.raises(RuntimeError, match="not loaded yet"):
        experts(torch.zeros(1, 4, device="meta"), torch.zeros(1, 1, dtype=torch.long, device="meta"),
                torch.ones(1, 1, device="meta"))


def test_a_rotated_layer_norm_model_reloads_with_its_architecture(batches, tmp_path):
    """OPT (LayerNorms with biases, a bias-free lm_head) rotated with R1/R2/R4 and quantized W8A8:
    the norms stay LayerNorms (the final one keeps a rotated bias), so transformers' own OPT class
    loads the export and gives the quantized model's logits exactly."""
    import copy

    from transformers import AutoModelForCausalLM

    from quark.torch.testing.tiny_models import build_model

    model = build_model("opt")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight") else torch.randn(p.shape, generator=g) * 0.3)
    template = LLMTemplate.get("opt")
    rotation = copy.deepcopy(template.algorithm_configs["rotation"])
    rotation.r4 = True
    config = template.get_config("int8", algorithm=["rotation", "smoothquant"], algo_configs={"rotation": rotation})
    ModelQuantizer(config).quantize_model(model, batches, progress=False)
    assert model.model.decoder.final_layer_norm.bias.abs().max() > 0.1  # kept: lm_head has no bias
    with torch.no_grad():
        ref = model(**batches[0]).logits
    export_safetensors(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(loaded.model.decoder.final_layer_norm) is torch.nn.LayerNorm
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, ref, rtol=0, atol=0)
