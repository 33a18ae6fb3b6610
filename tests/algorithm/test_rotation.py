"""Hadamard rotation (R1/R2/R4) on tiny random llamas whose sizes need non-power-of-two Hadamard
orders (hidden 48 = 12·4, head 12, intermediate 96 = 12·8): the float function is unchanged, tied
embeddings are untied, R4 rotates down_proj's input before its quantizer, W8A8 error drops on a
model with outlier channels, and unsupported norms / sizes are refused before anything changes."""

import copy
import logging
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

from quark.torch import LLMTemplate
from quark.torch.algorithm import quantizers_off
from quark.torch.algorithm.rotation import ALGORITHM
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.algo_configs import RotationConfig
from quark.torch.quantization.online_rotation import OnlineHadamard, online_rotation
from tests.helpers import tiny_llama, token_batches


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def llama48(tied: bool = False, hidden: int = 48, seed: int = 0) -> nn.Module:
    """A tiny llama with non-trivial norm weights (so that folding them matters)."""
    model = tiny_llama(seed=seed, hidden=hidden)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    return model


def rotation_config(**fields) -> RotationConfig:
    cfg = copy.deepcopy(LLMTemplate.get("llama").algorithm_configs["rotation"])
    for k, v in fields.items():
        setattr(cfg, k, v)
    return cfg


def logits(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    from quark.torch.testing import coverage

    # coverage.logits reads a multimodal model whose own forward fails on text (transformers 5.24's
    # Llama4ForConditionalGeneration) through its language model
    return torch.cat([coverage.logits(model, b) for b in batches])


def quantize(model: nn.Module, scheme: str, batches: list[dict], rotation: RotationConfig | None) -> nn.Module:
    template = LLMTemplate.get("llama")
    algo = None if rotation is None else "rotation"
    config = template.get_config(scheme, algorithm=algo, algo_configs=None if rotation is None else {"rotation": rotation})
    return ModelQuantizer(config).quantize_model(model, batches, progress=False)


@pytest.fixture(scope="module")
def batches():
    return token_batches(3, seq=24)


ROLES = [
    dict(),
    dict(r4=True),
    dict(r4=True, random=True, seed=7),
    dict(r1=False),
    dict(r1=False, r2=False, r4=True),
]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fields", ROLES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "r1,r2")
def test_rotation_keeps_the_float_model(batches, tied, fields):
    reference = llama48(tied)
    model = llama48(tied)
    ALGORITHM.prepare_model(model, rotation_config(**fields))
    assert _rel(logits(model, batches), logits(reference, batches)) < 1e-4
    layer, ref_layer = model.model.layers[1], reference.model.layers[1]
    r1, r2, r4 = fields.get("r1", True), fields.get("r2", True), fields.get("r4", False)
    changed = lambda a, b: not torch.allclose(a.weight, b.weight)  # noqa: E731
    assert changed(layer.self_attn.q_proj, ref_layer.self_attn.q_proj) == r1
    assert changed(layer.self_attn.v_proj, ref_layer.self_attn.v_proj) == (r1 or r2)
    assert changed(model.model.embed_tokens, reference.model.embed_tokens) == r1
    assert isinstance(getattr(layer.mlp.down_proj, "online_rotation", None), OnlineHadamard) == r4
    if r1:  # norms folded away
        assert torch.equal(layer.input_layernorm.weight, torch.ones(48))
        assert torch.equal(model.model.norm.weight, torch.ones(48))


def test_random_signs_change_the_weights_not_the_function(batches):
    a, b = llama48(), llama48()
    ALGORITHM.prepare_model(a, rotation_config())
    ALGORITHM.prepare_model(b, rotation_config(random=True))
    assert not torch.allclose(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert _rel(logits(a, batches), logits(b, batches)) < 1e-4


def test_tied_embeddings_are_untied(batches, caplog):
    model = llama48(tied=True)
    embed = model.model.embed_tokens.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="quark.torch.algorithm.rotation"):
        ALGORITHM.prepare_model(model, rotation_config())
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert not model.all_tied_weights_keys
    assert "untied" in caplog.text and "tie_word_embeddings = False" in caplog.text
    # the embedding rows are rotated (norms kept), the head columns are rotated and scaled by the final norm
    torch.testing.assert_close(model.model.embed_tokens.weight.norm(dim=1), embed.norm(dim=1))


def test_pipeline_float_function_and_r4_before_the_input_quantizer(batches):
    """Through ModelQuantizer (int8 W8A8, rotation with R4): with quantizers off the model is the
    float model; down_proj's input quantizer receives the rotated intermediate activations."""
    reference = llama48(tied=True)
    model = quantize(llama48(tied=True), "int8", batches, rotation_config(r4=True))
    with quantizers_off(model):
        assert _rel(logits(model, batches), logits(reference, batches)) < 1e-4

    mlp = model.model.layers[0].mlp
    seen = {}
    handles = [
        mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0])),
        mlp.down_proj.input_quantizer.register_forward_pre_hook(lambda m, a: seen.__setitem__("q_in", a[0])),
    ]
    with quantizers_off(model), torch.no_grad():
        model(**batches[0])
        h = seen["mlp_in"]
        intermediate = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
        expected = mlp.down_proj.online_rotation(intermediate)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(seen["q_in"], expected)
    assert not torch.allclose(expected, intermediate)


def outlier_llama() -> nn.Module:
    """Large activation channels on both norms' outputs (what makes per-tensor W8A8 fail)."""
    model = llama48(hidden=48)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:2] *= 40
            layer.post_attention_layernorm.weight[5:7] *= 40
    return model


def _activation_errors(model: nn.Module, batches: list[dict], names: list[str]) -> dict[str, float]:
    """Mean relative error each named layer's input quantizer makes on its input."""
    errors: dict[str, list[float]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).input_quantizer.register_forward_hook(
            lambda m, a, out, n=n: errors[n].append(_rel(out, a[0]))
        )
        for n in names
    ]
    logits(model, batches)
    for handle in handles:
        handle.remove()
    return {n: sum(v) / len(v) for n, v in errors.items()}


def test_rotation_reduces_w8a8_error(batches):
    """Per-tensor int8 activations: R1 removes the outlier channels from q/k/v and gate/up inputs,
    R4 halves down_proj's input error; the logits follow."""
    names = [f"model.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")]
    reference = logits(outlier_llama(), batches)
    results = {}
    for key, rotation in (("plain", None), ("r1r2", rotation_config()), ("r4", rotation_config(r4=True))):
        model = quantize(outlier_llama(), "int8", batches, rotation)
        results[key] = (_rel(logits(model, batches), reference), _activation_errors(model, batches, names))
    plain, r1r2, r4 = (results[k][1] for k in ("plain", "r1r2", "r4"))
    for n in names:
        if "down_proj" in n:
            assert r4[n] < 0.6 * min(plain[n], r1r2[n])
        else:
            assert r1r2[n] < 0.35 * plain[n]
    assert results["r1r2"][0] < 0.7 * results["plain"][0]
    assert results["r4"][0] < 0.5 * results["plain"][0]


class _LayerNorm(nn.LayerNorm):
    pass


class _OnePlusRMSNorm(nn.Module):
    """Gemma-style: y = x / rms(x) * (1 + weight)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class _L1Norm(nn.Module):
    """y = x / mean|x| * weight: no rotation commutes with it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((n,), 0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.abs().mean(-1, keepdim=True) * self.weight


def test_one_plus_weight_norms_fold_to_a_zero_weight(batches):
    """Gemma-style ``(1 + w)`` RMSNorms (random ``w``) everywhere: the scale ``1 + w`` folds into the
    readers, ``w`` becomes 0, the logits stay."""
    reference = llama48()
    g = torch.Generator().manual_seed(5)
    for owner, name in [(layer, n) for layer in reference.model.layers
                        for n in ("input_layernorm", "post_attention_layernorm")] + [(reference.model, "norm")]:
        setattr(owner, name, _OnePlusRMSNorm(torch.rand(48, generator=g) - 0.5))
    model = copy.deepcopy(reference)
    ALGORITHM.prepare_model(model, rotation_config(r4=True))
    assert _rel(logits(model, batches), logits(reference, batches)) < 1e-4
    norms = [m for m in model.modules() if isinstance(m, _OnePlusRMSNorm)]
    assert len(norms) == 5 and all(torch.equal(n.weight, torch.zeros(48)) for n in norms)


@pytest.mark.parametrize(
    ("norm", "message"),
    [
        (lambda: nn.LayerNorm(48), r"LayerNorms and RMSNorms \(model.layers.1.post_attention_layernorm is a LayerNorm, "
                                   r"model.layers.0.input_layernorm an RMSNorm\)"),
        (lambda: _LayerNorm(48, bias=False), r"post_attention_layernorm is a LayerNorm"),
        (lambda: _L1Norm(48), r"post_attention_layernorm \(_L1Norm\) computes neither"),
        (lambda: nn.GroupNorm(1, 48), r"post_attention_layernorm is a GroupNorm"),
    ],
)
def test_unfoldable_norms_are_refused_untouched(norm, message):
    model = llama48()
    model.model.layers[1].post_attention_layernorm = norm()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        ALGORITHM.prepare_model(model, rotation_config(r4=True))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _BiasedRMSNorm(nn.Module):
    """y = x / rms(x) * weight + bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight + self.bias


def test_a_norm_bias_stays_in_the_norm_when_a_reader_has_none(batches):
    """Llama's q/k/v have no bias, so a norm's bias b cannot fold into them: it stays in the norm as
    ``(b / w) Q`` and the model computes the same function."""
    reference = llama48()
    g = torch.Generator().manual_seed(3)
    for layer in reference.model.layers:
        norm = layer.input_layernorm
        layer.input_layernorm = _BiasedRMSNorm(norm.weight.detach(), torch.randn(48, generator=g) * 0.5)
    model = copy.deepcopy(reference)
    ALGORITHM.prepare_model(model, rotation_config())
    assert _rel(logits(model, batches), logits(reference, batches)) < 1e-4
    for old, new in zip(reference.model.layers, model.model.layers):
        assert torch.equal(new.input_layernorm.weight, torch.ones(48))
        q = ALGORITHM._rotation(48, rotation_config(), 0, "r1").matrix()
        expected = (old.input_layernorm.bias.double() / old.input_layernorm.weight.double()) @ q
        assert torch.allclose(new.input_layernorm.bias.double(), expected, atol=1e-6)


def test_a_norm_bias_where_its_weight_is_zero_is_refused_untouched():
    model = llama48()
    weight = model.model.layers[0].input_layernorm.weight.detach().clone()
    weight[3] = 0.0
    bias = torch.zeros(48)
    bias[3] = 1.0
    model.model.layers[0].input_layernorm = _BiasedRMSNorm(weight, bias)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"model.layers.0.input_layernorm has a nonzero bias where its weight is 0, "
                                         r"and model.layers.0.self_attn.q_proj \(reading it\) has no bias"):
        ALGORITHM.prepare_model(model, rotation_config())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unconstructible_sizes_are_refused_untouched():
    model = tiny_llama(hidden=184)  # no Hadamard matrix of order 184 is constructed
    with pytest.raises(ValueError, match="rotation r1: no Hadamard matrix of order 184"):
        ALGORITHM.prepare_model(model, rotation_config())
    model = tiny_llama(hidden=40)  # 40 = Paley I (q=19) x 2, but heads of 10
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match="rotation r2: no Hadamard matrix of order 10"):
        ALGORITHM.prepare_model(model, rotation_config())
    assert torch.equal(model.model.embed_tokens.weight, before)  # R1 was planned, not applied
    ALGORITHM.prepare_model(model, rotation_config(r2=False))  # R1 alone is fine


def test_r3_is_not_implemented():
    with pytest.raises(NotImplementedError, match="r3"):
        ALGORITHM.prepare_model(llama48(), rotation_config(r3=True))


def test_bad_roles_are_named():
    with pytest.raises(ValueError, match="model.final_ln"):
        ALGORITHM.prepare_model(llama48(), rotation_config(final_norm="model.final_ln"))
    with pytest.raises(ValueError, match="mlp.down"):
        ALGORITHM.prepare_model(llama48(), rotation_config(down_proj="mlp.down"))


def test_bad_stream_writers_are_refused_untouched():
    model = llama48()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"stream_writers entry 'model.projector\*' matches no module"):
        ALGORITHM.prepare_model(model, rotation_config(stream_writers=["model.projector*"]))
    # a module whose output is not of the hidden size cannot write the stream
    with pytest.raises(ValueError, match=r"stream writer model.layers.0.self_attn.k_proj writes \[24\] features"):
        ALGORITHM.prepare_model(model, rotation_config(stream_writers=["model.layers.0.self_attn.k_proj"]))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# -- smoothing through an online rotation (R4 then SmoothQuant: smooth, then rotate) -------------------
def _smooth_then_rotate(batches: list[dict], algorithms: list[str], pairs: list | None = None,
                        model: nn.Module | None = None) -> nn.Module:
    template = LLMTemplate.get("llama")
    overrides = {"rotation": rotation_config(r4=True)}
    for name in algorithms:
        if name != "rotation":
            cfg = copy.deepcopy(template.algorithm_configs[name])
            if pairs is not None:
                cfg.scaling_layers = pairs
            overrides[name] = cfg
    config = template.get_config("int8", algorithm=algorithms, algo_configs=overrides)
    return ModelQuantizer(config).quantize_model(model or outlier_llama(), batches, progress=False)


def test_smoothquant_scales_down_proj_in_the_unrotated_basis(batches):
    """rotation(r4) + smoothquant on the up_proj -> down_proj pair alone: up_proj's rows are divided by
    exactly SmoothQuant's scale computed from the *unrotated* intermediate activations and the
    unrotated down_proj weight, the stored weight stays in the rotated basis, and the float model is
    unchanged."""
    from quark.torch.algorithm.scaling import smooth_scale
    from quark.torch.quantization.config.algo_configs import ScalingPair

    reference = outlier_llama()
    rotated = _smooth_then_rotate(batches, ["rotation"])
    pair = [ScalingPair("mlp.up_proj", ["mlp.down_proj"])]
    smoothed = _smooth_then_rotate(batches, ["rotation", "smoothquant"], pairs=pair)

    mlp = rotated.model.layers[0].mlp
    acts = []
    handle = mlp.register_forward_pre_hook(
        lambda m, a: acts.append((m.act_fn(m.gate_proj(a[0])) * m.up_proj(a[0])).reshape(-1, m.up_proj.out_features)))
    with quantizers_off(rotated), torch.no_grad():
        logits(rotated, batches)
    handle.remove()
    w_in = mlp.down_proj.online_rotation.to_input_basis(mlp.down_proj.weight.detach())
    expected = smooth_scale(torch.cat(acts).abs().amax(0), w_in.abs().amax(0), alpha=0.5, clamp_min=1e-3)

    up_ratio = mlp.up_proj.weight.double() / smoothed.model.layers[0].mlp.up_proj.weight.double()
    torch.testing.assert_close(up_ratio, expected.double()[:, None].expand_as(up_ratio), rtol=1e-4, atol=0)
    down = smoothed.model.layers[0].mlp.down_proj
    torch.testing.assert_close(down.online_rotation.to_input_basis(down.weight.detach()),
                               w_in * expected.double(), rtol=1e-4, atol=1e-6)
    with quantizers_off(smoothed):
        assert _rel(logits(smoothed, batches), logits(reference, batches)) < 1e-4


def massive_down_proj_llama() -> nn.Module:
    """outlier_llama plus a few intermediate channels 30x larger (down_proj input outliers)."""
    model = outlier_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[3:5] *= 30
    return model


def _down_proj_error(model: nn.Module, batches: list[dict]) -> float:
    """Relative error down_proj's quantizers add to its output, on the inputs the quantized model gives it
    (each call against the same layer with its quantizers off)."""
    calls = []
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.append((m, a)))
               for layer in model.model.layers]
    logits(model, batches)
    for handle in handles:
        handle.remove()
    num = den = 0.0
    with torch.no_grad():
        for m, args in calls:
            quantized = m(*args)
            with quantizers_off(m):
                exact = m(*args)
            num += float((quantized - exact).pow(2).sum())
            den += float(exact.pow(2).sum())
    return (num / den) ** 0.5


def test_smoothing_then_rotating_lowers_down_proj_error(batches):
    """On down_proj inputs with outlier channels, smoothing before the online rotation beats the
    rotation alone: per-tensor int8 W8A8 error of down_proj's output 0.412 -> 0.064 (0.12-0.34 of the
    rotation's for outliers x10 ... x100 and 3 or 6 batches), and the whole pipeline keeps the float
    model. (The logits error is no measure here: on this tiny model it moves either way with the
    outlier strength.)"""
    reference = logits(massive_down_proj_llama(), batches)
    rot = _smooth_then_rotate(batches, ["rotation"], model=massive_down_proj_llama())
    both = _smooth_then_rotate(batches, ["rotation", "smoothquant"], model=massive_down_proj_llama())
    with quantizers_off(both):
        assert _rel(logits(both, batches), reference) < 1e-4
    assert _down_proj_error(rot, batches) == pytest.approx(0.412, rel=0.02)
    assert _down_proj_error(both, batches) / _down_proj_error(rot, batches) == pytest.approx(0.155, rel=0.03)


@pytest.mark.parametrize("algorithm", ["awq", "autosmoothquant"])
def test_searching_algorithms_skip_online_rotated_pairs(batches, caplog, algorithm):
    """A scale search does not model the online rotation: the up_proj -> down_proj pair is skipped
    (reported once) and the float model is unchanged."""
    reference = outlier_llama()
    scheme_model = outlier_llama()
    config = LLMTemplate.get("llama").get_config("int8", algorithm=["rotation", algorithm],
                                                 algo_configs={"rotation": rotation_config(r4=True)})
    with caplog.at_level(logging.WARNING, logger="quark.torch.algorithm.scaling"):
        model = ModelQuantizer(config).quantize_model(scheme_model, batches, progress=False)
    skips = [r.getMessage() for r in caplog.records if "rotate their input online" in r.getMessage()]
    assert skips == [f"{algorithm}: scaling pair mlp.up_proj -> ['mlp.down_proj'] skipped: its layers rotate "
                     f"their input online (rotation r4), which {algorithm}'s scale search does not model"]
    with quantizers_off(model):
        assert _rel(logits(model, batches), logits(reference, batches)) < 1e-4


@pytest.mark.parametrize(
    "scheme, algorithms, fields, warns",
    [
        ("int4_wo_64", ["rotation"], {}, True),
        ("uint4_wo_64", ["rotation", "awq"], {}, True),
        ("int4_wo_64", ["rotation", "gptq"], {}, False),
        ("int4_wo_64", ["rotation"], {"r1": False}, False),  # no norm folding without R1
        ("int8", ["rotation"], {}, False),  # 8-bit weights: the folded error stays small
    ],
)
def test_warns_when_round_to_nearest_4_bit_weights_follow_rotation(batches, caplog, scheme, algorithms, fields, warns):
    """Folding the norms (R1) hurts 4-bit RTN weights on attention-sink models; the quantizer says so
    and names the fix, and stays quiet where a GPTQ-style solver follows or weights are 8-bit."""
    config = LLMTemplate.get("llama").get_config(
        scheme, algorithm=algorithms, algo_configs={"rotation": rotation_config(**fields)}
    )
    with caplog.at_level(logging.WARNING, logger="quark.torch.algorithm.rotation"):
        ModelQuantizer(config).quantize_model(llama48(hidden=64), batches[:1], progress=False)
    hits = [r for r in caplog.records if "round-to-nearest" in r.getMessage()]
    assert len(hits) == int(warns)
    if warns:
        assert "algorithm=['rotation', 'gptq']" in hits[0].getMessage()


def test_the_warning_sees_4_bit_weights_set_per_layer_type(batches, caplog):
    """The fewest weight bits come from every layer config, the per-type ones included."""
    template = LLMTemplate.get("llama")
    config = template.get_config("int8", algorithm=["rotation"], algo_configs={"rotation": rotation_config()})
    config.layer_type_quant_config = {"QuantLinear": template.get_config("int4_wo_64").global_quant_config}
    quantizer = ModelQuantizer(config)
    assert quantizer._min_weight_bits() == 4
    with caplog.at_level(logging.WARNING, logger="quark.torch.algorithm.rotation"):
        quantizer.quantize_model(llama48(hidden=64), batches[:1], progress=False)
    assert any("round-to-nearest 4-bit" in r.getMessage() for r in caplog.records)


def _types_with_rotation_defaults() -> list[str]:
    from quark.torch.testing.tiny_models import CASES

    return [t for t in LLMTemplate.list_available()
            if t in CASES and LLMTemplate.get(t).algorithm_configs.get("rotation") is not None]


MOE_ROTATION = ["dbrx", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "glm4_moe", "granitemoehybrid",
                "minimax_m2", "minimax_m3_vl", "qwen3_5_moe", "qwen3_next", "glm4_moe_lite", "gpt_oss", "kimi_k25", "llama4", "mixtral", "qwen2_moe",
                "qwen3_moe", "qwen3_vl_moe"]


def test_rotation_defaults_exist_for_the_pre_norm_templates():
    assert _types_with_rotation_defaults() == [
        "cohere", "dbrx", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa",
        "gptj", "gpt_oss", "granitemoehybrid", "kimi_k25", "llama", "llama4", "minimax_m2", "minimax_m3_vl", "mistral",
        "mixtral", "mllama", "olmo", "opt", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next",
        "qwen3_vl_moe", "qwen3_5_moe"]


def _stream_matrices(model: nn.Module, config: RotationConfig) -> dict[str, list[torch.Tensor]]:
    """Per block role present in the model: copies of the matrices rotation changes."""
    from quark.torch.algorithm.rotation import StreamModule, find_stream_writers

    out = {}
    for path, module in find_stream_writers(model, config.stream_writers):
        out[path] = [m.clone() for m in StreamModule(module, path, True).matrices()]
    for i, block in enumerate(model.get_submodule(config.model_decoder_layers)):
        for names, writes in ((config.attn_inputs + config.mlp_inputs, False),
                              ([config.o_proj, *(config.mlp_outputs or [config.down_proj])], True)):
            for name in (n for entry in names for n in entry.split("|")):  # "a|b": alternatives
                try:
                    module = block.get_submodule(name)
                except AttributeError:
                    continue  # a dense block has no router / experts, a MoE block no mlp.down_proj
                out[f"{i}.{name}"] = [m.clone() for m in StreamModule(module, name, writes).matrices()]
    return out


def _variants_with_rotation_defaults() -> list[tuple[str, int]]:
    from quark.torch.testing.tiny_models import CASES

    return [(t, i) for t in _types_with_rotation_defaults() for i in range(len(CASES[t]))]


@pytest.mark.parametrize(("model_type", "variant"), _variants_with_rotation_defaults())
@pytest.mark.parametrize("r4", [False, True])
def test_every_rotation_default_keeps_its_architecture_float(model_type, variant, r4):
    """The template's rotation roles, applied to a tiny model of every variant of the architecture
    (MoE ones: a router and fused experts, Qwen2-MoE a shared expert, the Qwen ones a dense first
    block; DeepSeek-V2 with and without q-LoRA, GLM-5 a block sharing its indexer): same logits, and
    every matrix reading or writing the residual stream was rotated. R4 on an unquantized MoE model
    is refused before anything changes (only quantized fused experts rotate their down input online:
    :func:`test_r4_rotates_the_fused_experts_down_inputs_online`)."""
    from quark.torch.testing.tiny_models import build_model

    reference, model = build_model(model_type, variant), build_model(model_type, variant)
    config = copy.deepcopy(LLMTemplate.get(model_type).algorithm_configs["rotation"])
    config.r4 = r4
    if r4 and model_type in MOE_ROTATION:
        with pytest.raises(ValueError, match=r"r4: .*fused experts that are not quantized.*set r4=False"):
            ALGORITHM.prepare_model(model, config)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
        return
    before = _stream_matrices(model, config)
    assert model_type not in MOE_ROTATION or any("experts" in k for k in before)
    ALGORITHM.prepare_model(model, config)
    data = token_batches(2, seq=16)
    assert _rel(logits(model, data), logits(reference, data)) < 1e-4
    after = _stream_matrices(model, config)
    unchanged = [k for k in before if any(torch.allclose(a, b) for a, b in zip(before[k], after[k]))]
    assert unchanged == []
    rotated_online = [n for n, m in model.named_modules() if online_rotation(m) is not None]
    blocks = len(model.get_submodule(config.model_decoder_layers))
    assert rotated_online == ([f"{config.model_decoder_layers}.{i}.{config.down_proj}" for i in range(blocks)] if r4 else [])


@pytest.mark.parametrize("model_type", MOE_ROTATION)
def test_r4_rotates_the_fused_experts_down_inputs_online(model_type):
    """W8A8 with rotation(r4) on every MoE template: every block's MLP outputs (fused experts, shared
    experts' and dense blocks' down projections) rotate their input online; the fused experts' down
    matrices absorbed R4 (they differ from R1's alone, gate/up do not) and the float function is
    unchanged (the quantizer also checks this before and after the rotation)."""
    from quark.torch.quantization.fused_experts import QuantFusedExperts
    from quark.torch.testing.tiny_models import build_model

    def rotated(r4: bool) -> nn.Module:
        model = build_model(model_type)
        config = copy.deepcopy(LLMTemplate.get(model_type).algorithm_configs["rotation"])
        config.r4 = r4
        qconfig = LLMTemplate.get(model_type).get_config("int8", algorithm="rotation", algo_configs={"rotation": config})
        return ModelQuantizer(qconfig).quantize_model(model, data, progress=False)

    reference = build_model(model_type)
    data = token_batches(2, seq=16, vocab=reference.config.get_text_config().vocab_size)
    with_r4, without = rotated(True), rotated(False)
    online = {n: m for n, m in with_r4.named_modules() if online_rotation(m) is not None}
    experts = [n for n, m in online.items() if isinstance(m, QuantFusedExperts)]
    assert experts and not any(online_rotation(m) for m in without.modules())
    blocks = with_r4.get_submodule(LLMTemplate.get(model_type).algorithm_configs["rotation"].model_decoder_layers)
    assert all(any(online_rotation(m) is not None for m in block.modules()) for block in blocks)
    for name in experts:
        module, plain = with_r4.get_submodule(name), without.get_submodule(name)
        for proj, _ in module.quantized_projections():
            a, b = module.float_weight(proj), plain.float_weight(proj)
            assert torch.equal(a, b) == (proj.role != "down"), (name, proj.path)
    with torch.no_grad(), quantizers_off(with_r4):
        assert _rel(logits(with_r4, data), logits(reference, data)) < 1e-4


@pytest.mark.parametrize("model_type", [t for t in _types_with_rotation_defaults()
                                        if LLMTemplate.get(t).algorithm_configs["rotation"].stream_writers])
def test_stream_writers_rotate_like_the_embeddings(model_type):
    """A multimodal template's stream writers (projector / merger outputs that enter the residual
    stream) write ``y Q`` after rotation, with the same ``Q`` as the embeddings (``E <- E Q``)."""
    from quark.torch.algorithm.rotation import find_stream_writers
    from quark.torch.testing.tiny_models import build_model

    reference, model = build_model(model_type), build_model(model_type)
    config = copy.deepcopy(LLMTemplate.get(model_type).algorithm_configs["rotation"])
    ALGORITHM.prepare_model(model, config)
    embedding = config.embedding_layers[0]
    E, E_rot = (m.get_submodule(embedding).weight.detach().double() for m in (reference, model))
    Q = torch.linalg.lstsq(E, E_rot).solution  # E has more rows (tokens) than columns
    assert torch.allclose(Q @ Q.T, torch.eye(Q.shape[0], dtype=Q.dtype), atol=1e-5)  # float32 weights
    writers = find_stream_writers(reference, config.stream_writers)
    assert len(writers) >= 1
    g = torch.Generator().manual_seed(0)
    for path, module in writers:
        x = torch.randn(5, module.in_features, generator=g)
        with torch.no_grad():
            y, y_rot = module(x).double(), model.get_submodule(path)(x).double()
        assert _rel(y_rot, y @ Q) < 1e-5, path
        assert _rel(y_rot, y) > 0.1, path


def _default_and_partial_rotation(build: Callable[[], nn.Module], model_type: str, partial_writers: list[str]
                                  ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Three copies of a tiny model from ``build``: untouched, rotated with the template's default, and
    rotated with the default but only ``partial_writers`` as its stream writers."""
    reference, rotated, partial = build(), build(), build()
    config = copy.deepcopy(LLMTemplate.get(model_type).algorithm_configs["rotation"])
    ALGORITHM.prepare_model(rotated, config)
    config.stream_writers = partial_writers
    ALGORITHM.prepare_model(partial, config)
    return reference, rotated, partial


def _llama4_image_logits(model: nn.Module, ids: torch.Tensor, pixel_values: torch.Tensor,
                         image_positions: list[int]) -> torch.Tensor:
    """Logits with an image: ``Llama4ForConditionalGeneration.forward``'s image path (projected image
    features replace the embeddings at the image tokens; its own forward cannot build its output in
    transformers 5.24), then its language model."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = model.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        projected = model.multi_modal_projector(features.reshape(-1, features.shape[-1]))
        embeds[:, image_positions] = projected.reshape(1, len(image_positions), -1)
        return model.language_model(inputs_embeds=embeds, use_cache=False).logits.float()


def test_llama4_rotation_keeps_image_features():
    """Image features enter Llama 4's residual stream through ``multi_modal_projector.linear_1``: the
    template rotates it (``stream_writers``) and the logits of a prompt with an image stay the same;
    without it the image tokens would enter the rotated stream unrotated."""
    from quark.torch.testing.tiny_models import build_model

    assert LLMTemplate.get("llama4").algorithm_configs["rotation"].stream_writers == ["multi_modal_projector.linear_1"]
    reference, model, unrotated_images = _default_and_partial_rotation(lambda: build_model("llama4"), "llama4", [])
    g = torch.Generator().manual_seed(0)
    vision = reference.config.vision_config
    pixel_values = torch.randn(1, vision.num_channels, vision.image_size, vision.image_size, generator=g)
    ids = torch.randint(1, reference.config.text_config.vocab_size, (1, 12), generator=g)
    positions = [1, 2, 3, 4]  # the tiny vision model yields 4 image tokens
    expected = _llama4_image_logits(reference, ids, pixel_values, positions)
    assert _rel(_llama4_image_logits(model, ids, pixel_values, positions), expected) < 1e-4
    assert _rel(logits(unrotated_images, [{"input_ids": ids}]), logits(reference, [{"input_ids": ids}])) < 1e-4
    assert _rel(_llama4_image_logits(unrotated_images, ids, pixel_values, positions), expected) > 1e-2


def test_qwen3_vl_rotation_keeps_image_features():
    """Qwen3-VL-MoE's image features enter the stream twice: the merger's output replaces the image
    tokens' embeddings and the DeepStack mergers' outputs are added to early blocks' hidden states.
    With the template default (both rotated) the logits of a prompt with an image (the model's own
    forward, M-RoPE included) stay the same; rotating the merger alone is not enough."""
    from quark.torch.testing.tiny_models import build_model

    def tiny() -> nn.Module:
        model = build_model("qwen3_vl_moe")
        model.config.image_token_id, model.config.vision_start_token_id = 5, 4  # inside the tiny vocabulary
        return model

    reference, model, merger_only = _default_and_partial_rotation(tiny, "qwen3_vl_moe", ["model.visual.merger.linear_fc2"])
    vision = reference.config.vision_config
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 4, 4]])  # one image of 4 x 4 patches -> 4 tokens after the 2 x 2 merge
    pixel_values = torch.randn(16, 3 * vision.temporal_patch_size * vision.patch_size ** 2, generator=g)
    ids = torch.randint(10, reference.config.text_config.vocab_size, (1, 12), generator=g)
    ids[0, 1], ids[0, 2:6] = 4, 5

    def image_logits(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid,
                     mm_token_type_ids=(ids == 5).int(), use_cache=False).logits.float()

    expected = image_logits(reference)
    assert _rel(image_logits(model), expected) < 1e-4
    assert _rel(image_logits(merger_only), expected) > 0.1


def test_kimi_k25_rotation_keeps_image_features():
    """Kimi K2.5's image features replace the image tokens' embeddings through ``mm_projector``: with
    the template default (``mm_projector.out_proj`` rotated) the logits of a prompt with an image (the
    model's own forward) stay the same, without it they do not."""
    from quark.torch.testing.tiny_models import build_model

    def tiny() -> nn.Module:
        model = build_model("kimi_k25")
        model.config.image_token_id, model.config.video_token_id = 5, 6  # inside the tiny vocabulary
        return model

    reference, model, unrotated_images = _default_and_partial_rotation(tiny, "kimi_k25", [])
    patch = reference.config.vision_config.patch_size
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 4, 4]])  # 4 x 4 patches -> 4 tokens after the 2 x 2 merge
    pixel_values = torch.randn(16, 3, patch, patch, generator=g)
    ids = torch.randint(10, reference.config.text_config.vocab_size, (1, 12), generator=g)
    ids[0, 2:6] = 5

    def image_logits(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, use_cache=False).logits.float()

    expected = image_logits(reference)
    assert _rel(image_logits(model), expected) < 1e-4
    assert _rel(image_logits(unrotated_images), expected) > 0.1


def test_r2_on_a_fused_qkv_names_the_missing_v_projection():
    from quark.torch.testing.tiny_models import build_model

    model = build_model("phi3")
    config = copy.deepcopy(LLMTemplate.get("phi3").algorithm_configs["rotation"])
    config.v_proj, config.fused_qkv = "self_attn.v_proj", False
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"r2: .*self_attn.v_proj.*fused_qkv=True.*set r2=False"):
        ALGORITHM.prepare_model(model, config)
    config.v_proj, config.fused_qkv = "self_attn.qkv_proj", True
    config.o_proj = "mlp.down_proj"  # 128 inputs: no rows left for the keys and values, refused
    with pytest.raises(ValueError, match=r"r2: model.layers.0.self_attn.qkv_proj has 128 outputs, not 128 query"):
        ALGORITHM.prepare_model(model, config)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # planned before changing


def test_r2_on_a_fused_qkv_rotates_only_the_value_rows(batches):
    """Phi-3's ``qkv_proj`` (rows ``[q; k; v]``): R2 rotates each value head's rows and o_proj's
    matching columns; the query and key rows (RoPE follows them) are untouched; logits unchanged."""
    from quark.torch.testing.tiny_models import build_model

    reference, model = build_model("phi3"), build_model("phi3")
    config = copy.deepcopy(LLMTemplate.get("phi3").algorithm_configs["rotation"])
    config.r1 = False
    ALGORITHM.prepare_model(model, config)
    assert _rel(logits(model, batches), logits(reference, batches)) < 1e-4
    attention = reference.model.layers[0].self_attn
    q_width = attention.config.num_attention_heads * attention.head_dim
    kv_width = attention.config.num_key_value_heads * attention.head_dim
    before, after = reference.model.layers[0].self_attn.qkv_proj.weight, model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(after[: q_width + kv_width], before[: q_width + kv_width])
    h = ALGORITHM._rotation(attention.head_dim, config, config.seed + 1, "r2").matrix(torch.float64)
    v_before = before[q_width + kv_width :].double().view(-1, attention.head_dim, before.shape[1])
    expected = torch.einsum("hdi,de->hei", v_before, h).reshape(kv_width, -1)
    assert torch.allclose(after[q_width + kv_width :].double(), expected, atol=1e-6)


def test_moe_roles_are_checked_before_anything_changes():
    from quark.torch.testing.tiny_models import build_model

    model = build_model("qwen3_moe")  # block 0 dense, block 1 MoE
    before = [p.detach().clone() for p in model.parameters()]
    config = copy.deepcopy(LLMTemplate.get("qwen3_moe").algorithm_configs["rotation"])
    typo = copy.deepcopy(config)
    typo.mlp_inputs = [*config.mlp_inputs, "mlp.expert"]
    with pytest.raises(ValueError, match=r"\['mlp.expert'\] match no module in any decoder block"):
        ALGORITHM.prepare_model(model, typo)
    dense_only = copy.deepcopy(config)
    dense_only.mlp_outputs = ["mlp.down_proj"]  # the MoE block writes through its experts
    with pytest.raises(ValueError, match=r"block model.layers.1 has none of the MLP outputs \['mlp.down_proj'\]"):
        ALGORITHM.prepare_model(model, dense_only)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_rotation_reduces_w8a8_error_of_moe_models(model_type, batches):
    """Outlier channels on both norms of a MoE model: with the router, the fused experts (per-expert
    int8 inputs) and the shared expert reading the rotated stream, W8A8's logit error drops (measured:
    mixtral 0.110 -> 0.065, qwen2_moe 0.131 -> 0.075)."""
    from quark.torch.testing.tiny_models import build_model

    def outlier_moe() -> nn.Module:
        model = build_model(model_type)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            for layer in model.model.layers:
                layer.input_layernorm.weight[:2] *= 40
                layer.post_attention_layernorm.weight[5:7] *= 40
        return model

    reference = logits(outlier_moe(), batches)
    errors = {}
    for algorithm in (None, ["rotation"]):
        config = LLMTemplate.get(model_type).get_config("int8", algorithm=algorithm)
        model = ModelQuantizer(config).quantize_model(outlier_moe(), batches, progress=False)
        errors[bool(algorithm)] = _rel(logits(model, batches), reference)
    assert errors[True] < 0.7 * errors[False]


LAYER_NORM_ROTATION = ["cohere", "dbrx", "gptj", "olmo", "opt", "phi"]


def _layer_norm_model(model_type: str) -> nn.Module:
    """A tiny model of a LayerNorm architecture whose norms have random weights and biases (where
    they have them) and whose embeddings have channel means far from 0, so that neither the folding
    nor the stream's mean is trivial."""
    from quark.torch.testing.tiny_models import build_model

    model = build_model(model_type)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norms = {f"{n}.{p}" for n, m in model.named_modules() if "LayerNorm" in type(m).__name__
                 for p, _ in m.named_parameters(recurse=False)}
        for name, p in model.named_parameters():
            if name in norms:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight")
                        else torch.randn(p.shape, generator=g) * 0.3)
            elif ("embed" in name or "wte" in name) and p.dim() == 2:
                p.add_(torch.randn(1, p.shape[1], generator=g))
    assert norms or model_type == "olmo"  # (OLMo's LayerNorms have no parameters)
    return model


@pytest.mark.parametrize("model_type", LAYER_NORM_ROTATION)
@pytest.mark.parametrize("r4", [False, True])
def test_layer_norm_rotation_keeps_the_float_model(model_type, r4, batches):
    """LayerNorm models (mean subtraction, biases): R1 keeps the all-ones direction, so every token
    vector keeps its mean and the logits are unchanged; the norms are plain normalisations afterwards,
    except OPT's final norm, whose bias stays (rotated) because lm_head has no bias to take it."""
    if r4 and model_type in MOE_ROTATION:
        pytest.skip("R4 on fused experts needs them quantized (test_r4_rotates_the_fused_experts_down_inputs_online)")
    reference, model = _layer_norm_model(model_type), _layer_norm_model(model_type)
    config = copy.deepcopy(LLMTemplate.get(model_type).algorithm_configs["rotation"])
    config.r4 = r4
    ALGORITHM.prepare_model(model, config)
    assert _rel(logits(model, batches), logits(reference, batches)) < 1e-4
    for path in config.embedding_layers:
        E, E_rot = (m.get_submodule(path).weight.detach() for m in (reference, model))
        assert torch.allclose(E_rot.mean(-1), E.mean(-1), atol=1e-6)
        assert _rel(E_rot, E) > 0.5
    # a bias stays in its norm (rotated) where a reader has no bias to take it: OPT's lm_head, GPT-J's q/k/v
    blocks = config.model_decoder_layers
    kept = {"opt": {config.final_norm}, "gptj": {f"{blocks}.0.ln_1", f"{blocks}.1.ln_1"}}.get(model_type, set())
    norms = [(n, m) for n, m in model.named_modules() if "LayerNorm" in type(m).__name__]
    assert len(norms) == 1 + 2 * 2 - (model_type in ("cohere", "gptj", "phi")) * 2  # parallel blocks: one norm each
    for name, norm in norms:
        if isinstance(getattr(norm, "weight", None), torch.Tensor):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight)), name
        if isinstance(getattr(norm, "bias", None), torch.Tensor):
            assert (name in kept) == bool(norm.bias.abs().max() > 0.1), name


@pytest.mark.parametrize("model_type", ["opt", "cohere", "phi"])
def test_rotation_reduces_w8a8_error_of_layer_norm_models(model_type, batches):
    """Outlier channels in a LayerNorm model's stream (embeddings) and norm weights (OPT: norms with
    biases; Cohere and Phi: one norm feeding attention and MLP): the per-tensor int8 input error of
    the layers reading the stream drops with rotation (measured: 0.012-0.017 -> 0.0044-0.0050, the
    error of a channel-balanced input)."""
    config = LLMTemplate.get(model_type).algorithm_configs["rotation"]
    blocks = config.model_decoder_layers
    names = [f"{blocks}.{i}.{n}" for i in (0, 1) for n in (config.attn_inputs[0], config.mlp_inputs[0])]

    def outlier_model() -> nn.Module:
        model = _layer_norm_model(model_type)
        with torch.no_grad():
            model.get_submodule(config.embedding_layers[0]).weight[:, 10:12] *= 30  # outliers in the stream
            for layer in model.get_submodule(blocks):
                layer.get_submodule(config.attn_norm).weight[:2] *= 40
                layer.get_submodule(config.mlp_norm).weight[5:7] *= 40
        return model

    errors = {}
    for algorithm in (None, ["rotation"]):
        quant_config = LLMTemplate.get(model_type).get_config("int8", algorithm=algorithm)
        model = ModelQuantizer(quant_config).quantize_model(outlier_model(), batches, progress=False)
        errors[bool(algorithm)] = _activation_errors(model, batches, names)
    for n in names:
        assert errors[True][n] < 0.45 * errors[False][n], (n, errors)


def test_mllama_rotation_keeps_cross_attention_with_images():
    """Mllama's cross-attention blocks run only with images: with tiled images, the rotated model's
    logits equal the original's (cross_attn.q_proj reads the rotated stream, cross_attn.o_proj writes
    it, R2 rotates the vision values' heads), and they differ from the text-only logits (the
    cross-attention blocks really ran)."""
    from quark.torch.testing import coverage
    from quark.torch.testing.tiny_models import build_model

    reference, model = build_model("mllama"), build_model("mllama")
    config = copy.deepcopy(LLMTemplate.get("mllama").algorithm_configs["rotation"])
    ALGORITHM.prepare_model(model, config)
    cross = model.model.language_model.layers[1].cross_attn
    assert not torch.equal(cross.q_proj.weight, reference.model.language_model.layers[1].cross_attn.q_proj.weight)
    assert not torch.equal(cross.v_proj.weight, reference.model.language_model.layers[1].cross_attn.v_proj.weight)
    assert torch.equal(cross.k_proj.weight, reference.model.language_model.layers[1].cross_attn.k_proj.weight)
    with_images = coverage.batches(2, seq=16, model=reference)
    assert "pixel_values" in with_images[0]
    rotated, original = logits(model, with_images), logits(reference, with_images)
    assert _rel(rotated, original) < 1e-4
    text_only = [{"input_ids": b["input_ids"]} for b in with_images]
    assert _rel(logits(reference, text_only), original) > 1e-3


def test_a_rotation_that_changes_the_float_model_is_refused():
    """Gemma 2's post-norms scale each branch's output before it joins the stream, which no rotation
    commutes with: a hand-written RotationConfig that leaves them out (its roles are otherwise
    complete) makes the quantizer's float check fail with the reason, instead of quantizing a model
    that computes something else. The same roles on a copy whose post-norm weights are 0 (a uniform
    scale of 1, which does commute) pass."""
    from quark.torch.quantization.config.algo_configs import RotationConfig
    from quark.torch.testing.tiny_models import build_model

    roles = RotationConfig(model_decoder_layers="model.layers", attn_norm="input_layernorm",
                           mlp_norm="pre_feedforward_layernorm", r2=False)
    batches = token_batches(2, seq=16)

    def quantize_gemma2(post_norm_weight: float | None) -> nn.Module:
        model = build_model("gemma2")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand(p.shape, generator=g) - 0.5 if post_norm_weight is None or "post_" not in name
                            else torch.full_like(p, post_norm_weight))
        config = LLMTemplate.get("gemma2").get_config("int8", algorithm="rotation", algo_configs={"rotation": roles})
        return ModelQuantizer(config).quantize_model(model, batches, progress=False)

    with pytest.raises(ValueError, match=r"rotation changed the float model's function: its logits on a calibration "
                                         r"batch moved by .*post-norm"):
        quantize_gemma2(None)
    quantize_gemma2(0.0)


def test_a_large_one_plus_weight_in_bfloat16_is_told_from_a_plain_weight():
    """In bfloat16 a weight near 40 fits both ``w`` and ``1 + w`` within the probe's tolerance: the
    closer one (``1 + w``) is chosen."""
    from quark.torch.algorithm.rotation import norm_kind

    g = torch.Generator().manual_seed(0)
    norm = _OnePlusRMSNorm(40 + torch.rand(256, generator=g)).to(torch.bfloat16)
    assert norm_kind(norm, "norm", 256) == ("rms", 1.0)
    plain = _BiasedRMSNorm(40 + torch.rand(256, generator=g), torch.zeros(256)).to(torch.bfloat16)
    assert norm_kind(plain, "norm", 256) == ("rms", 0.0)
