"""SmoothQuant and AutoSmoothQuant on a tiny random llama (int8 W8A8, static per-tensor)."""

import logging

import pytest
import torch

from quark.torch.algorithm import quantizers_off
from quark.torch.algorithm.autosmoothquant import alpha_grid
from quark.torch.algorithm.smoothquant import smooth_scale
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


@pytest.mark.parametrize(("algorithm", "ratio"), [("smoothquant", 0.278), ("autosmoothquant", 0.330)])
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
