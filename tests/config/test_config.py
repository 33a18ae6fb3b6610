"""QTensorConfig / QLayerConfig / QConfig: validation, resolution precedence, exact round trips."""

import json

import pytest
import torch.nn as nn

from quark.torch.quantization.config.config import (
    AWQConfig,
    BFP16Spec,
    FP4PerGroupSpec,
    FP8E4M3PerChannelSpec,
    FP8E4M3PerTensorSpec,
    GPTQConfig,
    Int4PerGroupSpec,
    Int8PerTensorSpec,
    OCP_MXFP4Spec,
    OCP_MXINT8Spec,
    ProgressiveSpec,
    QConfig,
    QLayerConfig,
    QTensorConfig,
    QuantizationSpec,
    ScaleQuantSpec,
    Uint4PerGroupSpec,
)
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType, ScaleType, ZeroPointType


def test_aliases_are_the_same_classes():
    from quark.torch.quantization.config.config import Config, QuantizationConfig

    assert QuantizationSpec is QTensorConfig
    assert QuantizationConfig is QLayerConfig
    assert Config is QConfig


def test_spec_helper_builds_expected_fields():
    s = Uint4PerGroupSpec(group_size=64).to_quantization_spec()
    assert (s.dtype, s.qscheme, s.group_size, s.symmetric, s.zero_point_type) == (
        Dtype.uint4,
        QSchemeType.per_group,
        64,
        False,
        ZeroPointType.int32,
    )
    assert s.round_method is RoundType.half_even and s.scale_type is ScaleType.float
    mx = OCP_MXFP4Spec(is_dynamic=True).to_quantization_spec()
    assert (mx.dtype, mx.group_size, mx.scale_type, mx.scale_format, mx.is_dynamic) == (
        Dtype.fp4,
        32,
        ScaleType.float8_e8m0fnu,
        "e8m0",
        True,
    )
    assert mx.scale_calculation_mode.value == "even"
    assert OCP_MXINT8Spec().to_quantization_spec().dtype is Dtype.int8
    assert BFP16Spec().to_quantization_spec().group_size == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="int8", qscheme="per_tensor", symmetric=True, round_method="half_even"), "scale_type"),
        (dict(dtype="int4", symmetric=True, round_method="half_even", scale_type="float"), "qscheme"),
        (
            dict(dtype="uint4", qscheme="per_tensor", symmetric=True, round_method="half_even", scale_type="float"),
            "symmetric=True",
        ),
        (dict(dtype="int9"), "dtype='int9'"),
        (dict(dtype="fp4", qscheme="per_group", group_size=0), "group_size=0"),
        (dict(dtype="fp4", qscheme="per_group", group_size=-32), "group_size=-32"),
        (dict(dtype="fp8_e4m3", qscheme="per_channel"), "ch_axis"),
        (dict(dtype="fp8_e4m3", qscheme="per_tensor", group_size=32), "group_size=32"),
        (dict(dtype="fp4", qscheme="per_group", group_size=16, scale_format="e8m0"), "blocks of 32"),
        (dict(dtype="mx6", qscheme="per_group", group_size=32), "blocks of 16"),
        (dict(dtype="fp4", qscheme="per_group", group_size=32, scale_format="e9m0"), "scale_format='e9m0'"),
        (dict(dtype="fp8_e4m3", observer_cls="MinMaxObserverr"), "observer_cls='MinMaxObserverr'"),
        (dict(dtype="fp8_e4m3", qscheme="per_tensr"), "qscheme='per_tensr'"),
        (dict(dtype="mx"), "mx_element_dtype"),
    ],
)
def test_invalid_specs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        QTensorConfig(**kwargs)


def test_static_per_group_activation_is_refused_but_weight_is_fine():
    g = Int4PerGroupSpec(group_size=32).to_quantization_spec()
    QLayerConfig(weight=g)
    with pytest.raises(ValueError, match="input_tensors: static per_group"):
        QLayerConfig(input_tensors=g)
    QLayerConfig(input_tensors=Int4PerGroupSpec(group_size=32, is_dynamic=True).to_quantization_spec())


def test_layer_config_accepts_helpers_and_two_stage_lists():
    cfg = QLayerConfig(weight=ProgressiveSpec(FP8E4M3PerTensorSpec(), Int8PerTensorSpec()))
    assert isinstance(cfg.weight, list) and [s.dtype for s in cfg.weight] == [Dtype.fp8_e4m3, Dtype.int8]
    sq = ScaleQuantSpec(FP4PerGroupSpec(group_size=16), FP8E4M3PerTensorSpec()).to_quantization_spec()
    assert [s.is_scale_quant for s in sq] == [False, True]
    with pytest.raises(ValueError, match="exactly two"):
        QLayerConfig(weight=[sq[0]])
    with pytest.raises(ValueError, match="per_tensor"):
        ScaleQuantSpec(FP4PerGroupSpec(group_size=16), FP8E4M3PerChannelSpec()).to_quantization_spec()


def _rich_config() -> QConfig:
    w8 = Int8PerTensorSpec().to_quantization_spec()
    return QConfig(
        global_quant_config=QLayerConfig(weight=Int4PerGroupSpec(group_size=64).to_quantization_spec()),
        layer_type_quant_config={nn.Embedding: QLayerConfig(weight=w8)},
        layer_quant_config={"*down_proj": QLayerConfig(weight=w8, input_tensors=w8)},
        kv_cache_quant_config={
            "*k_proj": QLayerConfig(output_tensors=FP8E4M3PerTensorSpec().to_quantization_spec())
        },
        min_kv_scale=0.25,
        softmax_quant_spec=FP8E4M3PerTensorSpec().to_quantization_spec(),
        exclude=["lm_head", "*mlp.gate"],
        algo_config=[
            AWQConfig(model_decoder_layers="model.layers", scaling_layers=[{"prev_op": "a", "layers": ["b"]}]),
            GPTQConfig(inside_layer_modules=[["self_attn.q_proj"], ["mlp.down_proj"]]),
        ],
        quant_flow="per_block",
        shared_scale_groups=[["q_proj", "k_proj", "v_proj"]],
    )


def test_qconfig_round_trip_is_exact_through_json():
    cfg = _rich_config()
    data = cfg.to_dict()
    again = QConfig.from_dict(json.loads(json.dumps(data)))
    assert again == cfg
    assert again.to_dict() == data
    assert data["layer_type_quant_config"].keys() == {"Embedding"}
    assert data["global_quant_config"]["weight"]["dtype"] == "int4"


def test_qconfig_from_dict_ignores_export_keys_and_rejects_unknown():
    data = _rich_config().to_dict()
    data.update(quant_method="quark", export={"kv_cache_group": ["*k_proj"]}, version="0.12.0")
    assert QConfig.from_dict(data) == _rich_config()
    with pytest.raises(ValueError, match="no field"):
        QConfig.from_dict({"global_quant_configg": {}})


def test_resolution_precedence_exclude_then_name_then_type_then_global():
    cfg = _rich_config()
    assert cfg.resolve("lm_head", nn.Linear) is None
    assert cfg.resolve("model.layers.0.mlp.gate", nn.Linear) is None
    assert cfg.resolve("model.layers.0.mlp.gate_proj", nn.Linear) is cfg.global_quant_config
    down = cfg.resolve("model.layers.0.mlp.down_proj", nn.Linear)
    assert down is cfg.layer_quant_config["*down_proj"]
    assert cfg.resolve("model.embed_tokens", nn.Embedding) is cfg.layer_type_quant_config["Embedding"]

    class MyEmbedding(nn.Embedding):
        pass

    # a subclass resolves through its MRO
    assert cfg.resolve("x", MyEmbedding) is cfg.layer_type_quant_config["Embedding"]
    # name pattern beats type
    cfg.layer_quant_config["model.embed_tokens"] = QLayerConfig()
    assert cfg.resolve("model.embed_tokens", nn.Embedding) is cfg.layer_quant_config["model.embed_tokens"]
    # exclude beats everything
    cfg.exclude.append("model.embed_tokens")
    assert cfg.resolve("model.embed_tokens", nn.Embedding) is None


def test_needs_calibration():
    w = Int4PerGroupSpec(group_size=64).to_quantization_spec()
    assert not QConfig(global_quant_config=QLayerConfig(weight=w)).needs_calibration()
    dyn = FP8E4M3PerTensorSpec(is_dynamic=True).to_quantization_spec()
    assert not QConfig(global_quant_config=QLayerConfig(weight=w, input_tensors=dyn)).needs_calibration()
    static = FP8E4M3PerTensorSpec().to_quantization_spec()
    assert QConfig(global_quant_config=QLayerConfig(weight=w, input_tensors=static)).needs_calibration()
    assert QConfig(kv_cache_quant_config={"*k_proj": QLayerConfig(output_tensors=static)}).needs_calibration()


def test_min_kv_scale_must_be_non_negative():
    with pytest.raises(ValueError, match="min_kv_scale"):
        QConfig(min_kv_scale=-1.0)


def test_algorithm_field_overrides():
    """``algorithm.field=value`` (CLI --algo-config): JSON values, copies of the template's
    defaults (which stay untouched), and one clear error per kind of mistake."""
    from quark.torch import LLMTemplate
    from quark.torch.quantization.config.algo_configs import ScalingPair, with_field_overrides

    defaults = LLMTemplate.get("llama").algorithm_configs
    out = with_field_overrides(defaults, ["rotation.r4=true", "rotation.seed=3", "smoothquant.alpha=0.75",
                                          'gptq.inside_layer_modules=[["*q_proj"]]',
                                          'awq.scaling_layers=[{"prev_op": "input_layernorm", "layers": ["self_attn.q_proj"]}]'])
    assert sorted(out) == ["awq", "gptq", "rotation", "smoothquant"]
    assert (out["rotation"].r4, out["rotation"].seed, out["smoothquant"].alpha) == (True, 3, 0.75)
    assert out["gptq"].inside_layer_modules == [["*q_proj"]]
    assert out["awq"].scaling_layers == [ScalingPair("input_layernorm", ["self_attn.q_proj"])]
    assert defaults["rotation"].r4 is False and defaults["smoothquant"].alpha == 0.5
    assert out["rotation"].attn_norm == defaults["rotation"].attn_norm
    for item, message in [
        ("rotation=true", r"expected algorithm.field=value"),
        ("rotation.r4", r"expected algorithm.field=value"),
        ("spin.r4=true", r"unknown algorithm 'spin'; allowed: awq, gptq"),
        ("rotation.r5=true", r"RotationConfig has no field 'r5'; allowed: attn_inputs"),
    ]:
        with pytest.raises(ValueError, match=message):
            with_field_overrides(defaults, [item])
    with pytest.raises(ValueError, match=r"the template has no default awq config"):
        with_field_overrides({"awq": None}, ["awq.num_grid=10"])


@pytest.mark.parametrize("item,message", [
    ("gptq.damp_percent=-1", r"GPTQConfig.damp_percent=-1; allowed: a number >= 0"),
    ("gptq.damp_percent=NaN", r"GPTQConfig.damp_percent=nan; allowed: a number >= 0"),
    ("gptq.block_size=0", r"GPTQConfig.block_size=0; allowed: an integer >= 1"),
    ("gptq.block_size=64.0", r"GPTQConfig.block_size=64.0; allowed: an integer >= 1"),
    ("gptq.desc_act=yes", r"GPTQConfig.desc_act='yes'; allowed: true or false"),
    ("gptq.desc_act=1", r"GPTQConfig.desc_act=1; allowed: true or false"),
    ("gptq.clip_search_min=0", r"GPTQConfig.clip_search_min=0; allowed: a number in \(0, 1\]"),
    ("gptq.clip_search_min=1.5", r"GPTQConfig.clip_search_min=1.5; allowed: a number in \(0, 1\]"),
    ("gptq.clip_search_steps=-2", r"GPTQConfig.clip_search_steps=-2; allowed: an integer >= 0"),
    ("gptq.inside_layer_modules=[\"q_proj\"]", r"GPTQConfig.inside_layer_modules=\['q_proj'\]; allowed: a list of lists"),
    ("gptaq.alpha=-0.1", r"GPTAQConfig.alpha=-0.1; allowed: a number >= 0"),
    ("gptaq.damp_percent=true", r"GPTAQConfig.damp_percent=True; allowed: a number >= 0"),
    ("qronos.beta=-1", r"QronosConfig.beta=-1; allowed: a number >= 0"),
    ("qronos.block_size=0", r"QronosConfig.block_size=0; allowed: an integer >= 1"),
    ("smoothquant.alpha=1.5", r"SmoothQuantConfig.alpha=1.5; allowed: a number in \[0, 1\]"),
    ("smoothquant.scale_clamp_min=0", r"SmoothQuantConfig.scale_clamp_min=0; allowed: a number > 0"),
    ("autosmoothquant.compute_scale_loss=l1", r"AutoSmoothQuantConfig.compute_scale_loss='l1'; allowed: 'mse', 'mae', 'rmse'"),
    ("autosmoothquant.num_grid=0", r"AutoSmoothQuantConfig.num_grid=0; allowed: an integer >= 1"),
    ("awq.num_grid=2.5", r"AWQConfig.num_grid=2.5; allowed: an integer >= 1"),
    ("awq.clip_exclude=q_proj", r"AWQConfig.clip_exclude='q_proj'; allowed: a list of strings"),
    ("awq.search_dtype=fp16", r"AWQConfig.search_dtype='fp16'; allowed: 'auto', 'float32', 'bfloat16'"),
    ("rotation.r4=on", r"RotationConfig.r4='on'; allowed: true or false"),
    ("rotation.seed=1.5", r"RotationConfig.seed=1.5; allowed: an integer"),
    ("rotation.mlp_inputs=\"mlp.up_proj\"", r"RotationConfig.mlp_inputs='mlp.up_proj'; allowed: a list of strings"),
])
def test_algorithm_fields_out_of_range_fail_at_once_naming_field_value_and_range(item, message):
    """A bad value fails when it is set (CLI --algo-config), not minutes later inside the solver."""
    from quark.torch import LLMTemplate
    from quark.torch.quantization.config.algo_configs import with_field_overrides

    with pytest.raises(ValueError, match=message):
        with_field_overrides(LLMTemplate.get("llama").algorithm_configs, [item])


def test_algorithm_fields_are_checked_on_construction_and_by_get_config():
    from quark.torch import LLMTemplate
    from quark.torch.quantization.config.algo_configs import GPTQConfig, QronosConfig

    with pytest.raises(ValueError, match=r"QronosConfig.alpha=-1; allowed: a number >= 0"):
        QronosConfig(alpha=-1)
    cfg = GPTQConfig(model_decoder_layers="model.layers")
    cfg.damp_percent = -0.5  # changed after construction
    with pytest.raises(ValueError, match=r"GPTQConfig.damp_percent=-0.5"):
        LLMTemplate.get("llama").get_config("int4_wo_64", algorithm="gptq", algo_configs={"gptq": cfg})
    # the boundaries themselves are allowed
    GPTQConfig(damp_percent=0, clip_search_steps=0, clip_search_min=1, block_size=1)
    QronosConfig(alpha=0, beta=0)
