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
