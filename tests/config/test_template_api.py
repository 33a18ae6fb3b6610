"""LLMTemplate / schemes: the spec's examples verbatim, every scheme x template config, clear errors."""

import json

import pytest
import torch.nn as nn

from quark.torch import LLMTemplate
from quark.torch.quantization.config.config import AWQConfig, GPTQConfig, QConfig, QLayerConfig
from quark.torch.quantization.config.template import (
    AmdFP4Scheme,
    QuantizationScheme,
    QuantizationSchemeCollection,
)
from quark.torch.quantization.config.type import Dtype, QSchemeType

SPEC_MODEL_TYPES = """chatglm cohere dbrx deepseek deepseek_v2 deepseek_v3 deepseek_v32 deepseek_v4 deepseek_vl_v2
gemma2 gemma3 gemma3_text glm4_moe glm4_moe_lite glm_moe_dsa gptj gpt_oss granitemoehybrid grok-1 instella kimi_k2
kimi_k25 llama llama4 minimax_m2 minimax_m3_vl mistral mixtral mllama olmo opt phi phi3 qwen qwen2 qwen2_moe qwen3
qwen3_moe qwen3_next qwen3_vl_moe qwen3_5_moe""".split()

DOCUMENTED_SCHEMES = """fp8 ptpc_fp8 int4_wo_32 int4_wo_64 int4_wo_128 int4_wo_per_channel uint4_wo_32 uint4_wo_64
uint4_wo_128 uint4_wo_per_channel int8 mxfp4 mxfp6_e3m2 mxfp6_e2m3 mx6 bfp16 int4_fp8""".split()
EXTRA_SCHEMES = """int4_wa_64 mxfp4_weight_only mxfp4_fp8 mxfp4_mxfp6_e2m3 amdfp4 amdfp4_g32 amdfp4_global16
amdfp4_global32 mx9 nvfp4 fp4_block16_scale_e4m3""".split()


def test_every_spec_model_type_is_registered():
    assert len(SPEC_MODEL_TYPES) == 41
    assert sorted(set(SPEC_MODEL_TYPES) - set(LLMTemplate.list_available())) == []


def test_every_scheme_is_registered():
    assert set(DOCUMENTED_SCHEMES + EXTRA_SCHEMES) <= set(LLMTemplate.list_schemes())


# -- the spec's examples, verbatim ---------------------------------------------------------------
def test_spec_example_custom_template():
    from quark.torch import LLMTemplate

    # Create a new template
    template = LLMTemplate(model_type="kimi_k2", kv_layers_name=["*kv_b_proj"], exclude_layers_name=["lm_head"])
    # Register the template to LLMTemplate class (optional, if you want to use the template in other places)
    LLMTemplate.register_template(template)
    assert LLMTemplate.get("kimi_k2") is template


def test_spec_example_list_available():
    from quark.torch import LLMTemplate

    templates = LLMTemplate.list_available()
    print(templates)  # ['llama', 'opt', 'gpt2', ...]
    assert "llama" in templates and "opt" in templates


def test_spec_example_register_template():
    from quark.torch import LLMTemplate

    # Create template
    template = LLMTemplate(
        model_type="llama",
        kv_layers_name=["*k_proj", "*v_proj"],
        q_layer_name="*q_proj",
        exclude_layers_name=["lm_head"],
    )
    # Register template
    LLMTemplate.register_template(template)
    assert LLMTemplate.get("llama") is template


def test_spec_example_get():
    from quark.torch import LLMTemplate

    template = LLMTemplate.get("llama")
    print(template)
    assert template.model_type == "llama"


def test_spec_example_register_scheme():
    # Register a new quantization scheme ``int8_wo (int8 weight-only)`` to the template
    from quark.torch import LLMTemplate
    from quark.torch.quantization.config.config import Int8PerTensorSpec, QLayerConfig

    quant_spec = Int8PerTensorSpec(
        observer_method="min_max", symmetric=True, scale_type="float", round_method="half_even", is_dynamic=False
    ).to_quantization_spec()
    global_config = QLayerConfig(weight=quant_spec)
    LLMTemplate.register_scheme("int8_wo", config=global_config)
    cfg = LLMTemplate.get("llama").get_config(scheme="int8_wo")
    assert cfg.global_quant_config.weight == quant_spec and cfg.global_quant_config.input_tensors is None


def test_spec_example_unregister_scheme():
    from quark.torch import LLMTemplate

    LLMTemplate.unregister_scheme("int8")
    assert "int8" not in LLMTemplate.list_schemes()
    with pytest.raises(ValueError, match="'int8'.*available: fp8"):
        LLMTemplate.get("llama").get_config(scheme="int8")


def test_spec_example_get_config():
    from quark.torch import LLMTemplate

    template = LLMTemplate.get("llama")
    config = template.get_config(scheme="fp8", kv_cache_scheme="fp8")
    assert isinstance(config, QConfig)
    assert set(config.kv_cache_quant_config) == {"*k_proj", "*v_proj"}
    kv = config.kv_cache_quant_config["*k_proj"]
    assert kv.output_tensors.dtype is Dtype.fp8_e4m3 and not kv.output_tensors.is_dynamic
    # the kv layers keep the scheme's own weight and input quantization
    assert kv.weight == config.global_quant_config.weight
    assert config.resolve("model.layers.3.self_attn.k_proj", nn.Linear) == kv
    assert config.resolve("lm_head", nn.Linear) is None


# -- every template x scheme ---------------------------------------------------------------------
@pytest.mark.parametrize("model_type", SPEC_MODEL_TYPES)
def test_every_template_scheme_config_round_trips(model_type):
    template = LLMTemplate.get(model_type)
    for scheme in LLMTemplate.list_schemes():
        cfg = template.get_config(scheme)
        data = json.loads(json.dumps(cfg.to_dict()))
        assert QConfig.from_dict(data) == cfg, (model_type, scheme)
        assert "lm_head" in cfg.exclude
    if template.kv_layers_name:
        cfg = template.get_config("fp8", kv_cache_scheme="fp8", min_kv_scale=1e-3)
        assert QConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert cfg.min_kv_scale == 1e-3


def test_scheme_contents_match_formats_table():
    def weight(name):
        return LLMTemplate.get_scheme(name).config.weight

    def act(name):
        return LLMTemplate.get_scheme(name).config.input_tensors

    w = weight("int4_wo_64")
    assert (w.dtype, w.symmetric, w.group_size, w.qscheme) == (Dtype.int4, True, 64, QSchemeType.per_group)
    assert act("int4_wo_64") is None
    w = weight("uint4_wo_per_channel")
    assert (w.dtype, w.symmetric, w.qscheme, w.ch_axis) == (Dtype.uint4, False, QSchemeType.per_channel, 0)
    assert not act("int8").is_dynamic and act("int8").dtype is Dtype.int8
    assert act("ptpc_fp8").is_dynamic and act("ptpc_fp8").qscheme is QSchemeType.per_channel
    assert weight("ptpc_fp8").qscheme is QSchemeType.per_channel
    assert act("mxfp4").is_dynamic and weight("mxfp4").scale_format == "e8m0"
    assert act("mxfp4_weight_only") is None
    assert act("mxfp4_fp8").dtype is Dtype.fp8_e4m3 and not act("mxfp4_fp8").is_dynamic
    assert act("mxfp4_mxfp6_e2m3").dtype is Dtype.fp6_e2m3
    assert weight("amdfp4").scale_format == "e5m3" and weight("amdfp4_g32").group_size == 32
    nv = weight("nvfp4")
    assert [s.dtype for s in nv] == [Dtype.fp4, Dtype.fp8_e4m3] and nv[0].group_size == 16 and nv[1].is_scale_quant
    nva = act("nvfp4")
    assert nva[0].is_dynamic and not nva[1].is_dynamic
    assert weight("fp4_block16_scale_e4m3") == nv
    g = weight("amdfp4_global32")
    assert g[0].group_size == 32 and g[1].dtype is Dtype.fp8_e5m3 and g[1].is_scale_quant
    i4f8 = weight("int4_fp8")
    assert [s.dtype for s in i4f8] == [Dtype.fp8_e4m3, Dtype.int4] and not i4f8[1].is_scale_quant
    assert i4f8[1].round_method.value == "half_even" and i4f8[1].qscheme is QSchemeType.per_channel
    assert act("int4_fp8").is_dynamic
    assert weight("mx6").group_size == 16 and weight("mx9").dtype is Dtype.mx9 and weight("bfp16").group_size == 8


def test_amdfp4_group_size_is_checked():
    AmdFP4Scheme(32)
    with pytest.raises(ValueError, match="group_size=64"):
        AmdFP4Scheme(64)


# -- get_config options ----------------------------------------------------------------------------
def test_get_config_options():
    t = LLMTemplate.get("llama")
    cfg = t.get_config(
        "int4_wo_128",
        layer_config={"*down_proj": "int8"},
        layer_type_config={nn.Embedding: "uint4_wo_64"},
        exclude_layers=["model.layers.0.*"],
        attention_scheme="fp8",
    )
    assert cfg.layer_quant_config["*down_proj"] == LLMTemplate.get_scheme("int8").config
    assert cfg.layer_type_quant_config["Embedding"] == LLMTemplate.get_scheme("uint4_wo_64").config
    assert cfg.exclude[: len(t.exclude_layers_name)] == t.exclude_layers_name and "model.layers.0.*" in cfg.exclude
    q = t.q_layer_name if isinstance(t.q_layer_name, str) else t.q_layer_name[0]
    assert cfg.layer_quant_config[q].output_tensors.dtype is Dtype.fp8_e4m3
    assert cfg.softmax_quant_spec.dtype is Dtype.fp8_e4m3
    assert cfg.resolve("model.layers.0.mlp.down_proj", nn.Linear) is None


def test_get_config_algorithms_in_order_with_overrides():
    t = LLMTemplate.get("llama")
    cfg = t.get_config("int4_wo_128", algorithm=["rotation", "gptq"])
    assert [a.name for a in cfg.algo_config] == ["rotation", "gptq"]
    assert cfg.algo_config[1] == t.algorithm_configs["gptq"] and cfg.algo_config[1] is not t.algorithm_configs["gptq"]
    mine = GPTQConfig(damp_percent=0.1, inside_layer_modules=[["self_attn.q_proj"]], model_decoder_layers="model.layers")
    cfg = t.get_config("int4_wo_128", algorithm="gptq", algo_configs={"gptq": mine})
    assert cfg.algo_config == [mine]
    assert QConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_missing_algorithm_default_names_algo_configs():
    bare = LLMTemplate(model_type="bare_arch", kv_layers_name=["*k_proj"], exclude_layers_name=["lm_head"])
    with pytest.raises(ValueError, match=r"algo_configs=\{'awq': AWQConfig"):
        bare.get_config("uint4_wo_128", algorithm="awq")
    cfg = bare.get_config(
        "uint4_wo_128", algorithm="awq", algo_configs={"awq": AWQConfig(model_decoder_layers="model.layers")}
    )
    assert cfg.algo_config[0].name == "awq"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(scheme="int5"), ValueError, "unknown quantization scheme 'int5'; available: fp8"),
        (dict(scheme="fp8", algorithm="gptqq"), ValueError, "unknown algorithm 'gptqq'; allowed: awq, gptq"),
        (dict(scheme="fp8", kv_cache_scheme="int8"), ValueError, "unknown kv_cache_scheme 'int8'; allowed: fp8"),
        (dict(scheme="fp8", attention_scheme="fp4"), ValueError, "unknown attention_scheme 'fp4'; allowed: fp8"),
        (dict(scheme="fp8", layer_config={"*o_proj": "bogus"}), ValueError, "layer_config.*'bogus'"),
    ],
)
def test_bad_names_give_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        LLMTemplate.get("llama").get_config(**kwargs)


def test_unknown_model_type_is_a_key_error_listing_valid_ones():
    with pytest.raises(KeyError, match="'gpt5'.*available: .*llama"):
        LLMTemplate.get("gpt5")


def test_kv_and_attention_need_template_layers():
    t = LLMTemplate(model_type="no_kv")
    with pytest.raises(ValueError, match="names no kv layers"):
        t.get_config("fp8", kv_cache_scheme="fp8")
    with pytest.raises(ValueError, match="names no q layer"):
        t.get_config("fp8", attention_scheme="fp8")


def test_legacy_algorithm_keyword_warns_and_maps():
    awq = AWQConfig(model_decoder_layers="model.layers")
    with pytest.warns(DeprecationWarning, match="algorithm_configs"):
        t = LLMTemplate(model_type="legacy", awq_config=awq)
    assert t.algorithm_configs["awq"] is awq
    with pytest.raises(TypeError, match="bogus_config"):
        LLMTemplate(model_type="legacy", bogus_config=awq)


def test_shared_scale_groups_default_and_disable():
    t = LLMTemplate.get("llama")
    assert t.get_config("fp8").shared_scale_groups is None
    groups = t.get_config("nvfp4").shared_scale_groups
    assert ["q_proj", "k_proj", "v_proj"] in groups and ["gate_proj", "up_proj"] in groups
    assert t.get_config("nvfp4", shared_scale_groups=[]).shared_scale_groups == []


def test_scheme_collection():
    c = QuantizationSchemeCollection()
    s = QuantizationScheme(QLayerConfig())
    c.register_scheme("empty", s)
    assert c.get_scheme("empty") is s
    with pytest.raises(ValueError, match="'nope'; available: empty"):
        c.get_scheme("nope")
    # a scheme's config is a copy: editing it does not change the registry
    cfg = LLMTemplate.get_scheme("int8").config
    cfg.weight = None
    assert LLMTemplate.get_scheme("int8").config.weight is not None
