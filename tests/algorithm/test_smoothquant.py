"""SmoothQuant and AutoSmoothQuant on a tiny random llama (int8 W8A8, static per-tensor)."""

import dataclasses
import logging

import pytest
import torch

from quark.torch.algorithm import quantizers_off
from quark.torch.algorithm.autosmoothquant import alpha_grid
from quark.torch.algorithm.scaling import smooth_scale
from quark.torch.quantization.config.algo_configs import ScalingPair
from tests.algorithm.test_awq import block0_error, outlier_llama, quantize
from tests.helpers import token_batches

ALGORITHMS = ["smoothquant", "autosmoothquant"]


@pytest.fixture(scope="module")
def batches():
    return token_batches(4, seq=32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_smooth_scale_formula():
    act = torch.tensor([4.0, 1.0, 0.0, 100.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.25])
    s = smooth_scale(act, w, alpha=0.5, clamp_min=1e-3)
    expected = torch.tensor([2.0, 0.5, max(1e-5**0.5 / 2**0.5, 1e-3), 20.0])
    torch.testing.assert_close(s, expected)
    assert smooth_scale(act, w, alpha=0.5, clamp_min=0.6)[1] == 0.6  # the clamp


def test_alpha_grid():
    assert alpha_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert alpha_grid(1) == [0.5]
    with pytest.raises(ValueError):
        alpha_grid(0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_smoothing_keeps_the_float_model(batches, algorithm):
    reference = outlier_llama()
    model = quantize(outlier_llama(), "int8", batches, algorithm)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, reference.model.layers[0].mlp.up_proj.weight)
    with torch.no_grad(), quantizers_off(model):
        for b in batches:
            assert _rel(model(**b).logits, reference(**b).logits) < 1e-5


# measured under FORMATS.md 2a.1 (amax / 127.5); under amax / 127 they were 0.278 / 0.330
@pytest.mark.parametrize(("algorithm", "ratio"), [("smoothquant", 0.329), ("autosmoothquant", 0.318)])
def test_smoothing_lowers_block_error_versus_rounding(batches, algorithm, ratio):
    reference = outlier_llama()
    rtn = block0_error(quantize(outlier_llama(), "int8", batches), reference, batches)
    smoothed = block0_error(quantize(outlier_llama(), "int8", batches, algorithm), reference, batches)
    assert rtn == pytest.approx(3.745, rel=0.02)
    assert smoothed / rtn == pytest.approx(ratio, rel=0.02)


@pytest.mark.parametrize("loss", ["mse", "mae", "rmse"])
def test_autosmoothquant_losses(batches, loss):
    reference = outlier_llama()
    rtn = block0_error(quantize(outlier_llama(), "int8", batches), reference, batches)
    model = quantize(outlier_llama(), "int8", batches, "autosmoothquant", compute_scale_loss=loss, num_grid=6)
    assert block0_error(model, reference, batches) < 0.5 * rtn


def test_autosmoothquant_rejects_an_unknown_loss(batches):
    with pytest.raises(ValueError, match="compute_scale_loss"):
        quantize(outlier_llama(), "int8", batches, "autosmoothquant", compute_scale_loss="l4")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gqa_v_to_o_pair_is_skipped(batches, caplog, algorithm):
    reference = outlier_llama()
    pairs = [ScalingPair("self_attn.v_proj", ["self_attn.o_proj"]), ScalingPair("mlp.up_proj", ["mlp.down_proj"])]
    with caplog.at_level(logging.INFO, logger="quark.torch.algorithm.scaling"):
        model = quantize(outlier_llama(), "int8", batches, algorithm, scaling_layers=pairs)
    assert "skipped in 2 of 2 blocks" in caplog.text and "v_proj" in caplog.text
    block, ref = model.model.layers[1], reference.model.layers[1]
    assert torch.equal(block.self_attn.o_proj.weight, ref.self_attn.o_proj.weight)
    assert not torch.equal(block.mlp.down_proj.weight, ref.mlp.down_proj.weight)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_missing_pair_name_is_a_clear_error(batches, algorithm):
    with pytest.raises(ValueError, match="self_attn.qkv_proj"):
        quantize(outlier_llama(), "int8", batches, algorithm,
                 scaling_layers=[ScalingPair("input_layernorm", ["self_attn.qkv_proj"], "self_attn")])


def test_multi_head_v_to_o_pair_is_folded_exactly(batches):
    """Without grouped K/V heads, v -> o is a valid site: folded exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def mha():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
        return LlamaForCausalLM(cfg).eval()

    reference = mha()
    pairs = [ScalingPair("self_attn.v_proj", ["self_attn.o_proj"])]
    model = quantize(mha(), "int8", batches, "smoothquant", scaling_layers=pairs)
    assert not torch.equal(model.model.layers[0].self_attn.o_proj.weight, reference.model.layers[0].self_attn.o_proj.weight)
    with torch.no_grad(), quantizers_off(model):
        assert _rel(model(**batches[0]).logits, reference(**batches[0]).logits) < 1e-5


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_pair_for_another_variant_is_logged_and_the_others_still_apply(batches, caplog, algorithm):
    reference = outlier_llama()
    pairs = [ScalingPair("input_layernorm", ["self_attn.qkv_proj"], "self_attn"),  # another variant's names
             ScalingPair("mlp.up_proj", ["mlp.down_proj"])]
    with caplog.at_level(logging.WARNING, logger="quark.torch.algorithm.scaling"):
        model = quantize(outlier_llama(), "int8", batches, algorithm, scaling_layers=pairs)
    assert "'input_layernorm' -> ['self_attn.qkv_proj'] applies to no decoder block" in caplog.text
    block, ref = model.model.layers[1], reference.model.layers[1]
    assert not torch.equal(block.mlp.down_proj.weight, ref.mlp.down_proj.weight)
    assert torch.equal(block.input_layernorm.weight, ref.input_layernorm.weight)


# -- MoE blocks: the MLP norm feeds a router and fused 3-D experts -------------------------------------
def _moe(model_type: str, boost: float = 1.0):
    """The tiny random MoE model, its MLP norms' first 4 channels multiplied by ``boost`` (outliers)."""
    from quark.torch.testing.tiny_models import build_model

    model = build_model(model_type)
    with torch.no_grad():
        for block in model.model.layers:
            block.post_attention_layernorm.weight[:4] *= boost
    return model


def _moe_batches(model):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, model.config.vocab_size, (2, 32), generator=g)} for _ in range(4)]


def _experts_error(model, batches) -> float:
    """Squared error that quantization adds to every fused-experts module's output, on the calls the
    quantized model makes (each call against the same module with its quantizers off, same inputs and
    routing). Unlike the logits error it does not jump when an expert's top-k choice flips somewhere
    upstream: on these tiny random models such flips dominate the logits error, which then moves by
    10x between neighbouring outlier strengths while this measure moves by a few percent."""
    from quark.torch.quantization.fused_experts import fused_experts_modules
    from quark.torch.testing.calls import record_calls

    total = 0.0
    with torch.no_grad():
        for m, args, kwargs in record_calls(model, [m for _, m in fused_experts_modules(model)], batches):
            quantized = m(*args, **kwargs).float()
            with quantizers_off(m):
                total += float((quantized - m(*args, **kwargs).float()).pow(2).sum())
    return total


def _errors(make, model_type: str, scheme: str, algorithm: str, exclude: list[str],
            float_unchanged: bool = False, fields: dict | None = None, experts: bool = False) -> dict:
    """Squared logits error against ``make()``'s float model of rounding (``None``) and of ``algorithm``,
    each on a fresh ``make()`` with ``exclude`` left in float; ``float_unchanged``: also check that the
    quantized model with its quantizers off still gives the float logits (relative 1e-5);
    ``fields``: replaced in the algorithm's template config; ``experts``: measure the experts' own
    quantization error (:func:`_experts_error`) instead of the logits error."""
    from quark.torch import LLMTemplate
    from quark.torch.quantization.api import ModelQuantizer

    reference = make()
    batches = _moe_batches(reference)
    with torch.no_grad():
        ref = [reference(**b).logits for b in batches]
    template = LLMTemplate.get(model_type)
    algo_configs = {algorithm: dataclasses.replace(template.algorithm_configs[algorithm], **fields)} if fields else None
    errors = {}
    for algo in (None, algorithm):
        model = make()
        config = template.get_config(scheme, algorithm=algo, exclude_layers=exclude,
                                     algo_configs=algo_configs if algo else None)
        ModelQuantizer(config).quantize_model(model, batches, progress=False)
        with torch.no_grad():
            if experts:
                errors[algo] = _experts_error(model, batches)
            else:
                errors[algo] = sum(float((model(**b).logits - r).pow(2).sum()) for b, r in zip(batches, ref))
            if float_unchanged:
                with quantizers_off(model):
                    for b, r in zip(batches, ref):
                        assert _rel(model(**b).logits, r) < 1e-5
    return errors


def test_moe_templates_give_smoothquant_and_awq_the_norm_to_router_and_experts_site():
    from quark.torch import LLMTemplate

    for model_type, readers in [
        ("mixtral", ["mlp.gate", "mlp.experts"]),
        ("gpt_oss", ["mlp.router", "mlp.experts"]),
        # the dense blocks' gate/up keep their own pair; the shared expert and its gate read the norm too
        ("qwen2_moe", ["mlp.gate", "mlp.experts", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                       "mlp.shared_expert_gate"]),
    ]:
        configs = LLMTemplate.get(model_type).algorithm_configs
        for name in ("smoothquant", "awq", "autosmoothquant"):  # the searches evaluate candidates on the MoE block
            pairs = [(p.prev_op, p.layers, p.inspect) for p in configs[name].scaling_layers]
            assert ("post_attention_layernorm", readers, "mlp") in pairs
    llama = LLMTemplate.get("llama").algorithm_configs
    assert llama["smoothquant"].scaling_layers == llama["autosmoothquant"].scaling_layers  # dense: nothing added


@pytest.mark.parametrize("algorithm, scheme", [("smoothquant", "int8"), ("awq", "uint4_wo_32")])
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_the_moe_site_scales_the_router_and_every_experts_gate_up_columns_exactly(model_type, algorithm, scheme):
    """The norm's weight is divided by s and the router's and every expert's gate/up input columns
    are multiplied by the same s; the float model (quantizers off) is unchanged."""
    from quark.torch import LLMTemplate
    from quark.torch.algorithm.rotation import StreamModule
    from quark.torch.quantization.api import ModelQuantizer

    reference = _moe(model_type, boost=20.0)
    batches = _moe_batches(reference)
    model = _moe(model_type, boost=20.0)
    template = LLMTemplate.get(model_type)
    config = template.get_config(scheme, algorithm=algorithm, algo_configs={
        "awq": dataclasses.replace(template.algorithm_configs["awq"], clip_search=False)})  # clipping moves weights
    ModelQuantizer(config).quantize_model(model, batches, progress=False)
    router = "gate" if model_type == "mixtral" else "router"
    for b_ref, b in zip(reference.model.layers, model.model.layers):
        s = b_ref.post_attention_layernorm.weight / b.post_attention_layernorm.weight
        assert s.max() / s.min() > 2  # the outlier channels got a larger scale
        for path in (f"mlp.{router}", "mlp.experts"):
            before = StreamModule(b_ref.get_submodule(path), path, writes=False).matrices()
            after = StreamModule(b.get_submodule(path), path, writes=False).matrices()
            for w0, w1 in zip(before, after):
                if path == "mlp.experts" and model_type == "mixtral":
                    # [gate; up]: the per-expert up -> down scale also divides the up rows
                    w0, w1 = w0[:, : w0.shape[1] // 2], w1[:, : w1.shape[1] // 2]
                torch.testing.assert_close(w1, w0 * s, rtol=1e-5, atol=1e-7)
    with torch.no_grad(), quantizers_off(model):
        for batch in batches:
            assert _rel(model(**batch).logits, reference(**batch).logits) < 1e-5


@pytest.mark.parametrize("model_type, ratio", [("gpt_oss", 0.232)])
def test_smoothing_the_moe_site_lowers_the_error_of_int8_experts(model_type, ratio):
    """Outliers entering the experts (MLP norm channels x 40); only the experts' gate/up (weights and
    inputs) quantized, so the error is the site's: SmoothQuant's MoE site brings the experts' W8A8
    error to 0.232 of rounding's (0.25 / 0.22 at x20 / x50). (GPT-OSS: its clamped gate keeps the
    experts' down inputs unscaled; where the per-expert up -> down site applies, it moves scale into
    the up rows too.)"""
    errors = _errors(lambda: _moe(model_type, boost=40.0), model_type, "int8", "smoothquant",
                     ["*self_attn*", "lm_head", "*experts.down_proj"], experts=True)
    assert errors["smoothquant"] / errors[None] == pytest.approx(ratio, rel=0.03)  # measured


@pytest.mark.parametrize("model_type, ratio", [("mixtral", 0.4), ("gpt_oss", 0.3), ("qwen3_moe", 0.6)])
def test_awq_on_the_moe_site_lowers_the_error_of_int4_experts(model_type, ratio):
    """MLP norm channels x 10; only the experts' gate/up (and the router) quantized (uint4, groups of
    32): AWQ's scale for the norm -> router + experts site and its clipping search, which includes
    every expert's gate/up, bring the logits error to 0.28 (Mixtral), 0.17 (GPT-OSS), 0.50 (Qwen3-MoE)
    of rounding's (0.43 / 0.45 / 0.58 with the clipping search off)."""
    errors = _errors(lambda: _moe(model_type, boost=10.0), model_type, "uint4_wo_32", "awq",
                     ["*self_attn*", "lm_head", "*experts.down_proj"])
    assert errors["awq"] < ratio * errors[None]


@pytest.mark.parametrize("model_type, ratio", [("gpt_oss", 0.35), ("mixtral", 0.2), ("qwen3_moe", 0.45)])
def test_autosmoothquant_on_the_moe_site_lowers_the_error_of_int8_experts(model_type, ratio):
    """MLP norm channels x 40, only the experts' gate/up (and the router) quantized (W8A8):
    AutoSmoothQuant's search for the norm -> router + experts site, which simulates the experts' input
    quantization, and its per-expert up -> down search bring the logits error to 0.28 (GPT-OSS), 0.11
    (Mixtral), 0.34 (Qwen3-MoE) of rounding's (SmoothQuant: 0.23, 6.5, 0.43); float outputs unchanged."""
    errors = _errors(lambda: _moe(model_type, boost=40.0), model_type, "int8", "autosmoothquant",
                     ["*self_attn*", "lm_head", "*experts.down_proj"], float_unchanged=True)
    assert errors["autosmoothquant"] < ratio * errors[None]


def test_the_moe_sites_search_needs_the_experts_input_quantization(monkeypatch):
    """The GPT-OSS case above with the experts' input rounding left out of the candidates' error
    (weights only): AutoSmoothQuant then picks scales that leave 0.83 of rounding's error instead of 0.28."""
    from quark.torch.algorithm import scaling
    from quark.torch.quantization.fused_experts import QuantFusedExperts

    case = (lambda: _moe("gpt_oss", boost=40.0), "gpt_oss", "int8", "autosmoothquant",
            ["*self_attn*", "lm_head", "*experts.down_proj"])
    simulated = _errors(*case)
    original = scaling._act_quant
    monkeypatch.setattr(scaling, "_act_quant", lambda layer, s, stats: None if isinstance(layer, QuantFusedExperts)
                        else original(layer, s, stats))
    weights_only = _errors(*case)
    assert simulated["autosmoothquant"] < 0.5 * weights_only["autosmoothquant"]



@pytest.mark.parametrize("algorithm", [*ALGORITHMS, "awq"])
def test_a_pair_listing_a_module_without_an_input_matrix_names_it(batches, algorithm):
    """A pair may list linears, routers and fused experts; a norm (a 1-D weight) is refused up front,
    by name, before anything is scaled."""
    reference = outlier_llama()
    model = outlier_llama()
    pairs = [ScalingPair("input_layernorm", ["post_attention_layernorm"])]
    with pytest.raises(TypeError, match=r"scaling pair layer 'post_attention_layernorm' is a .*RMSNorm: a scaling "
                                        r"pair may list linear layers, routers .* and fused MoE experts modules"):
        quantize(model, "int8", batches, algorithm, scaling_layers=pairs)
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, p_ref)

# -- inside every fused expert: up -> down ------------------------------------------------------------
def _boost_up_rows(model, boost: float):
    """Multiply the first 4 up rows of every expert (Mixtral / Qwen3-MoE: [gate; up] fused, [E, 2I, H])
    by ``boost``: outlier channels in every expert's down input."""
    with torch.no_grad():
        for block in model.model.layers:
            experts = getattr(block.mlp, "experts", None)
            if experts is None:
                continue
            half = experts.gate_up_proj.shape[1] // 2
            experts.gate_up_proj[:, half:half + 4] *= boost
    return model


#: every linear and the experts' gate/up left in float: only the fused experts' down projections are quantized
DOWN_ONLY = ["*self_attn*", "lm_head", "*experts.gate_up_proj", "*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj"]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_each_expert_gets_its_own_up_to_down_scale_exactly(model_type):
    """Expert e's down columns are multiplied by s_e and its up rows divided by it; s_e differs from
    expert to expert and from 1; the float model is unchanged."""
    from quark.torch import LLMTemplate
    from quark.torch.quantization.api import ModelQuantizer

    reference = _boost_up_rows(_moe(model_type), 20.0)
    batches = _moe_batches(reference)
    model = _boost_up_rows(_moe(model_type), 20.0)
    ModelQuantizer(LLMTemplate.get(model_type).get_config("int8", algorithm="smoothquant")).quantize_model(
        model, batches, progress=False)
    checked = 0
    for b_ref, b in zip(reference.model.layers, model.model.layers):
        if getattr(b_ref.mlp, "experts", None) is None:
            continue
        e_ref, e_new = b_ref.mlp.experts, b.mlp.experts
        half = e_ref.gate_up_proj.shape[1] // 2
        s = e_new.down_proj / e_ref.down_proj  # [E, H, I]: the same s_e[j] down every column j
        torch.testing.assert_close(s, s[:, :1].expand_as(s), rtol=1e-5, atol=0)
        s = s[:, 0]  # [E, I]
        assert (s.max(dim=1).values / s.min(dim=1).values > 3).all()  # the boosted channels scaled down more
        assert not torch.allclose(s[0], s[1])  # per expert
        # the up rows also took the MLP norm's scale on their columns (the norm -> router + experts site)
        s_norm = b_ref.post_attention_layernorm.weight / b.post_attention_layernorm.weight
        torch.testing.assert_close(e_new.gate_up_proj[:, half:],
                                   e_ref.gate_up_proj[:, half:] * s_norm / s[:, :, None], rtol=1e-4, atol=1e-7)
        checked += 1
    assert checked
    with torch.no_grad(), quantizers_off(model):
        for batch in batches:
            assert _rel(model(**batch).logits, reference(**batch).logits) < 1e-5


@pytest.mark.parametrize("model_type, ratio", [("mixtral", 0.11), ("qwen3_moe", 0.198)])
def test_smoothing_inside_the_experts_lowers_the_error_of_int8_down_projections(model_type, ratio):
    """Outlier channels in every expert's down input (up rows x 20), only the experts' down projections
    quantized (W8A8): SmoothQuant's per-expert scales bring the experts' error to 0.11 (Mixtral) /
    0.198 (Qwen3-MoE) of rounding's (0.09-0.17 / 0.195-0.22 for outliers x 30 ... x 10)."""
    errors = _errors(lambda: _boost_up_rows(_moe(model_type), 20.0), model_type, "int8", "smoothquant", DOWN_ONLY,
                     experts=True)
    assert errors["smoothquant"] / errors[None] == pytest.approx(ratio, rel=0.03)  # measured


@pytest.mark.parametrize("model_type, ratio", [("mixtral", 0.103), ("qwen3_moe", 0.184)])
def test_autosmoothquant_inside_the_experts_lowers_the_error_of_int8_down_projections(model_type, ratio):
    """The case above for AutoSmoothQuant: its per-expert search (alpha grid, down input and weight
    quantization simulated on the expert's tokens) brings the experts' error to 0.103 (Mixtral) /
    0.184 (Qwen3-MoE) of rounding's, below SmoothQuant's fixed alpha at every outlier strength from
    x10 to x30; the float model is unchanged."""
    errors = _errors(lambda: _boost_up_rows(_moe(model_type), 20.0), model_type, "int8", "autosmoothquant", DOWN_ONLY,
                     float_unchanged=True, experts=True)
    assert errors["autosmoothquant"] / errors[None] == pytest.approx(ratio, rel=0.03)  # measured


def test_gpt_oss_experts_keep_unscaled_down_projections_and_say_why(caplog):
    from quark.torch import LLMTemplate
    from quark.torch.quantization.api import ModelQuantizer

    reference = _moe("gpt_oss")
    model = _moe("gpt_oss")
    with caplog.at_level(logging.INFO, logger="quark.torch.algorithm.expert_scaling"):
        ModelQuantizer(LLMTemplate.get("gpt_oss").get_config("int8", algorithm="smoothquant")).quantize_model(
            model, _moe_batches(model), progress=False)
    assert "gate function is not linear in the up half" in caplog.text
    for b_ref, b in zip(reference.model.layers, model.model.layers):
        torch.testing.assert_close(b.mlp.experts.down_proj, b_ref.mlp.experts.down_proj, rtol=0, atol=0)


def test_smoothquant_on_a_whole_moe_model_with_norm_outliers():
    """Qwen3-MoE (MoE and dense blocks), MLP norm channels x 10, everything but attention W8A8: both
    MoE sites and the dense blocks' sites together bring the logits error to 0.35 of rounding's."""
    errors = _errors(lambda: _moe("qwen3_moe", boost=10.0), "qwen3_moe", "int8", "smoothquant",
                     ["*self_attn*", "lm_head"])
    assert errors["smoothquant"] < 0.45 * errors[None]


@pytest.mark.parametrize("model_type, ratio", [("mixtral", 0.75), ("qwen3_moe", 0.45)])
def test_awq_inside_the_experts_lowers_the_error_of_int4_down_projections(model_type, ratio):
    """Up rows x 20 (outlier channels in every expert's down input), only the experts' down projections
    quantized (uint4, groups of 32): AWQ's per-expert search brings the logits error to 0.63 (Mixtral) /
    0.34 (Qwen3-MoE) of rounding's; the float model is unchanged (clipping, which changes it, is off)."""
    errors = _errors(lambda: _boost_up_rows(_moe(model_type), 20.0), model_type, "uint4_wo_32", "awq", DOWN_ONLY,
                     float_unchanged=True, fields={"clip_search": False})
    assert errors["awq"] < ratio * errors[None]


@pytest.mark.parametrize("algorithm, scheme", [("smoothquant", "int8"), ("awq", "uint4_wo_32"),
                                               ("autosmoothquant", "int8")])
def test_scale_expert_down_false_leaves_the_experts_down_projections_alone(algorithm, scheme):
    from quark.torch import LLMTemplate
    from quark.torch.quantization.api import ModelQuantizer
    from quark.torch.quantization.config.algo_configs import with_field_overrides

    reference = _boost_up_rows(_moe("mixtral"), 20.0)
    batches = _moe_batches(reference)
    template = LLMTemplate.get("mixtral")
    downs = {}
    for switch in ("true", "false"):
        model = _boost_up_rows(_moe("mixtral"), 20.0)
        assignments = [f"{algorithm}.scale_expert_down={switch}"]
        if algorithm == "awq":  # clipping, which also changes the experts' down weights, off
            assignments.append("awq.clip_search=false")
        overrides = with_field_overrides(template.algorithm_configs, assignments)
        ModelQuantizer(template.get_config(scheme, algorithm=algorithm, algo_configs=overrides)).quantize_model(
            model, batches, progress=False)
        downs[switch] = [b.mlp.experts.down_proj.detach().clone() for b in model.model.layers]
    for before, on, off in zip([b.mlp.experts.down_proj for b in reference.model.layers], downs["true"], downs["false"]):
        torch.testing.assert_close(off, before, rtol=0, atol=0)
        assert not torch.equal(on, before)
    with pytest.raises(ValueError, match="scale_expert_down"):
        dataclasses.replace(template.algorithm_configs[algorithm], scale_expert_down="yes").validate()


# -- AWQ's clipping search on every expert ---------------------------------------------------------------
#: a scaling pair away from the experts (attention is left in float by these tests, so it changes nothing there)
ATTENTION_ONLY = [ScalingPair("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                              "self_attn")]

@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_awq_clips_each_experts_groups_only_by_clamping_them(model_type):
    """AWQ without scaling pairs (its per-expert up -> down site off): every expert matrix it changes
    is its float matrix clamped per group of 32 input columns to a narrower range, the clamp bounds
    no wider than the group's own minimum and maximum; some groups of gate/up and of down are
    clipped. GPT-OSS stores its experts [E, in, out]; its clamped gate does not matter here."""
    from quark.torch import LLMTemplate
    from quark.torch.quantization.api import ModelQuantizer

    reference = _moe(model_type)
    batches = _moe_batches(reference)
    model = _moe(model_type)
    template = LLMTemplate.get(model_type)
    awq = dataclasses.replace(template.algorithm_configs["awq"], scaling_layers=ATTENTION_ONLY, scale_expert_down=False)
    config = template.get_config("uint4_wo_32", algorithm="awq", algo_configs={"awq": awq},
                                 exclude_layers=["*self_attn*", "lm_head"])
    ModelQuantizer(config).quantize_model(model, batches, progress=False)
    clipped = {}
    for b_ref, b in zip(reference.model.layers, model.model.layers):
        for path in ("gate_up_proj", "down_proj"):
            w0, w1 = getattr(b_ref.mlp.experts, path), getattr(b.mlp.experts, path)
            if model_type == "gpt_oss":  # [E, in, out] -> [E, out, in]
                w0, w1 = w0.transpose(1, 2), w1.transpose(1, 2)
            g0 = w0.reshape(*w0.shape[:2], -1, 32)
            g1 = w1.reshape(*w1.shape[:2], -1, 32)
            lo, hi = g1.amin(-1, keepdim=True), g1.amax(-1, keepdim=True)
            assert (lo >= g0.amin(-1, keepdim=True)).all() and (hi <= g0.amax(-1, keepdim=True)).all()
            torch.testing.assert_close(g1, torch.minimum(torch.maximum(g0, lo), hi), rtol=0, atol=0)
            clipped[path] = clipped.get(path, 0) + int((g1 != g0).any(-1).sum())
    assert clipped["gate_up_proj"] > 0 and clipped["down_proj"] > 0


@pytest.mark.parametrize("model_type, ratio", [("mixtral", 0.97), ("qwen3_moe", 0.9), ("gpt_oss", 0.8)])
def test_clipping_the_experts_lowers_the_error_of_int4_experts(model_type, ratio):
    """Only the experts quantized (uint4, groups of 32), no scaling: AWQ's clipping search on each
    expert's own tokens brings the logits error to 0.94 (Mixtral), 0.83 (Qwen3-MoE), 0.72 (GPT-OSS)
    of rounding's (random weights, so modest: nothing is an outlier)."""
    errors = _errors(lambda: _moe(model_type), model_type, "uint4_wo_32", "awq",
                     ["*self_attn*", "lm_head", "*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj"],
                     fields={"scaling_layers": ATTENTION_ONLY, "scale_expert_down": False})
    assert errors["awq"] < ratio * errors[None]


def test_a_search_whose_moe_forward_fails_under_bfloat16_autocast_falls_back_to_the_models_dtype(caplog):
    """transformers' DBRX experts add their bfloat16 products into a float32 buffer (``index_add_``)
    under autocast: the MoE site's candidates are then evaluated in float32, with the same scale as
    a float32 search, and the search says so once."""
    from quark.torch import LLMTemplate
    from quark.torch.algorithm import scaling
    from quark.torch.quantization.api import ModelQuantizer
    from quark.torch.testing.tiny_models import build_model

    template = LLMTemplate.get("dbrx")
    reference = {n: p for n, p in build_model("dbrx").named_parameters() if "norm" in n}
    moe_pairs = [p for p in template.algorithm_configs["awq"].scaling_layers if "experts" in " ".join(p.layers)]
    assert moe_pairs
    norms = {}
    for dtype in ("bfloat16", "float32"):
        model = build_model("dbrx")
        awq = dataclasses.replace(template.algorithm_configs["awq"], search_dtype=dtype, scaling_layers=moe_pairs,
                                  clip_search=False)
        scaling._AUTOCAST_FALLBACKS.clear()
        with caplog.at_level(logging.INFO, logger="quark.torch.algorithm.scaling"):
            ModelQuantizer(template.get_config("uint4_wo_32", algorithm="awq", algo_configs={"awq": awq})).quantize_model(
                model, _moe_batches(model), progress=False)
        norms[dtype] = {n: p.detach().clone() for n, p in model.named_parameters() if n in reference}
        fallbacks = caplog.text.count("fails under torch.bfloat16 autocast")
        assert fallbacks == (1 if dtype == "bfloat16" else 0)
        caplog.clear()
    for name in reference:
        torch.testing.assert_close(norms["bfloat16"][name], norms["float32"][name], rtol=0, atol=0)
    assert any(not torch.equal(norms["float32"][n], ref) for n, ref in reference.items())  # the site scaled
