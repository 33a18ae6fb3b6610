"""ModelQuantizer on decoder stacks that are not a plain chain of blocks returning hidden states.

* GLM-MoE-DSA: blocks return ``(hidden_states, topk_indices)`` and the next block reuses the indices;
* Mllama: the text stack mixes self- and cross-attention block classes, and text-only calibration
  never calls the cross-attention blocks (block 1 of the tiny model); calibration on images does;
* configs without an algorithm walk the template's decoder stack (``QConfig.model_decoder_layers``).
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from quark.torch import LLMTemplate
from quark.torch.export.api import export_safetensors
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.algo_configs import GPTAQConfig, GPTQConfig
from quark.torch.quantization.config.config import QConfig
from quark.torch.testing.coverage import batches
from quark.torch.testing.tiny_models import build_model

TEXT = "model.language_model.layers"


def _skip_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "quark.torch.quantization.api" and "were not called by the model" in r.getMessage()]


def test_templates_put_their_decoder_stack_in_every_config():
    t = LLMTemplate.get("mllama")
    assert t.decoder_layers == TEXT
    cfg = t.get_config("fp8", kv_cache_scheme="fp8")
    assert cfg.algo_config is None and cfg.model_decoder_layers == TEXT
    assert QConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert LLMTemplate.get("llama").get_config("int4_wo_128").model_decoder_layers == "model.layers"
    # explicit, and no default when the algorithm configs disagree
    assert LLMTemplate("x", decoder_layers="transformer.h").get_config("fp8").model_decoder_layers == "transformer.h"
    gptq = GPTQConfig(model_decoder_layers="model.layers")
    assert LLMTemplate("x", algorithm_configs={"gptq": gptq, "gptaq": None}).decoder_layers == "model.layers"
    other = GPTAQConfig(model_decoder_layers="model.blocks")
    assert LLMTemplate("x", algorithm_configs={"gptq": gptq, "gptaq": other}).decoder_layers is None


@pytest.mark.parametrize("path", [TEXT, None], ids=["template path", "guessed"])
def test_mllama_static_kv_calibrates_the_text_stack(path, caplog, tmp_path):
    model = build_model("mllama")
    cfg = LLMTemplate.get("mllama").get_config("fp8", kv_cache_scheme="fp8")
    cfg.model_decoder_layers = path  # None: the guess must find the text stack (mixed block classes)
    data = batches()
    with caplog.at_level(logging.WARNING, logger="quark.torch.quantization.api"):
        ModelQuantizer(cfg).quantize_model(model, data, progress=False)
    layers = model.get_submodule(TEXT)
    for i in (0, 2):  # the self-attention blocks: K/V output and input scales calibrated
        for name in ("k_proj", "v_proj"):
            linear = getattr(layers[i].self_attn, name)
            assert linear.output_quantizer.has_qparams and linear.input_quantizer.has_qparams
    # block 1 (cross-attention) never ran: weights quantized from the weights, activations uncalibrated
    cross = layers[1].cross_attn.k_proj
    assert cross.weight_quantizer.has_qparams
    assert not cross.input_quantizer.has_qparams and not cross.output_quantizer.has_qparams
    assert cross.input_quantizer.uncalibrated_reason.startswith(f"{TEXT}.1.cross_attn.k_proj.input_quantizer is in a")
    warnings = _skip_warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith(f"blocks [1] of '{TEXT}' were not called")
    assert "9 static activation quantizers (e.g. 1.cross_attn.q_proj.input_quantizer) stay uncalibrated" in warnings[0]
    with torch.no_grad():
        assert torch.isfinite(model(**data[0]).logits).all()  # text-only inference skips block 1
    with pytest.raises(RuntimeError, match=r"static quantizer used before calibration: .*layers\.1\.cross_attn"):
        cross.input_quantizer(torch.ones(2, 64))
    with pytest.raises(ValueError, match=rf"cannot export: static activation quantizer {TEXT}\.1\.cross_attn\.q_proj"
                                         r"\.input_quantizer and 8 more has no qparams; .* did not call"):
        export_safetensors(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mllama_gptq_skips_the_blocks_it_has_no_inputs_for(caplog):
    model = build_model("mllama")
    layers = model.get_submodule(TEXT)
    float_cross = layers[1].cross_attn.q_proj.weight.detach().clone()
    cfg = LLMTemplate.get("mllama").get_config("int4_wo_32", algorithm="gptq")
    with caplog.at_level(logging.WARNING, logger="quark.torch.quantization.api"):
        ModelQuantizer(cfg).quantize_model(model, batches(), progress=False)
    assert _skip_warnings(caplog) == [
        f"blocks [1] of '{TEXT}' were not called by the model on the calibration data: their weights are quantized "
        "from the weights; gptq skipped there (they need the blocks' inputs)"
    ]
    assert layers[0].self_attn.q_proj.weight_qparams_fixed and layers[2].mlp.down_proj.weight_qparams_fixed
    q = layers[1].cross_attn.q_proj
    assert not q.weight_qparams_fixed and torch.equal(q.weight, float_cross)
    expected = copy.deepcopy(q.weight_quantizer)
    expected.calibrate_from(float_cross)
    assert torch.equal(q.weight_quantizer.scale, expected.scale)  # min-max from the weight


@pytest.mark.parametrize("scheme, algorithm", [("fp8", None), ("int8", "smoothquant"), ("int4_wo_32", "gptq")])
def test_mllama_image_batches_calibrate_the_cross_attention_block(scheme, algorithm, caplog, tmp_path):
    """With image batches (``batches(model=...)``: tiled pixel values, aspect ratios, cross-attention
    mask) the model calls block 1 with the vision states: the driver captures them as the block's
    keyword arguments, every quantizer of the block is calibrated, the algorithm runs there too,
    and the model exports and reloads with the same logits."""
    from quark.torch.export.api import import_model_from_safetensors
    from quark.torch.quantization.driver import capture_block_inputs
    from quark.torch.quantization.tensor_quantizer import TensorQuantizer

    model = build_model("mllama")
    layers = model.get_submodule(TEXT)
    data = batches(model=model)
    captured = capture_block_inputs(model, layers, data, progress=False)
    assert captured.skipped == [] and captured.called == [0, 1, 2]
    for extras in captured.extras:
        kwargs = extras[1][1]
        # the vision states: 4 tiles of 16 patches + CLS per sample, projected to the text width
        assert kwargs["cross_attention_states"].shape == (4, 17, 64)
        assert kwargs["cross_attention_mask"].shape == (1, 1, 16, 4 * 17)
        assert kwargs["full_text_row_masked_out_mask"].shape == (1, 1, 16, 1)
    float_q = layers[1].cross_attn.q_proj.weight.detach().clone()
    cfg = LLMTemplate.get("mllama").get_config(scheme, algorithm=algorithm,
                                               kv_cache_scheme="fp8" if scheme == "fp8" else None)
    with caplog.at_level(logging.WARNING, logger="quark.torch.quantization.api"):
        ModelQuantizer(cfg).quantize_model(model, data, progress=False)
    assert _skip_warnings(caplog) == []
    quantizers = {n: q for n, q in layers[1].named_modules() if isinstance(q, TensorQuantizer)}
    assert quantizers and all(q.has_qparams and q.uncalibrated_reason is None for q in quantizers.values())
    cross = layers[1].cross_attn
    if scheme == "fp8":  # the cross-attention K/V outputs (the vision states' cache) have scales
        assert cross.k_proj.output_quantizer.has_qparams and cross.v_proj.output_quantizer.has_qparams
    if algorithm == "gptq":
        assert cross.q_proj.weight_qparams_fixed
    if algorithm == "smoothquant":  # input_layernorm -> cross_attn.q_proj was smoothed
        assert not torch.equal(cross.q_proj.weight, float_q)
    with torch.no_grad():
        ref = [model(**b).logits for b in data]
    export_safetensors(model, tmp_path / "out")
    back = import_model_from_safetensors(None, tmp_path / "out")
    with torch.no_grad():
        for b, r in zip(data, ref):
            torch.testing.assert_close(back(**b).logits, r, rtol=0, atol=1e-3 * float(r.abs().max()))


@pytest.mark.parametrize("algorithm", [None, "gptq"])
def test_glm_moe_dsa_quantizes_block_by_block(algorithm):
    model = build_model("glm_moe_dsa")
    scheme = "int4_wo_32" if algorithm else "fp8"
    cfg = LLMTemplate.get("glm_moe_dsa").get_config(scheme, algorithm=algorithm,
                                                     kv_cache_scheme=None if algorithm else "fp8")
    data = batches()
    ModelQuantizer(cfg).quantize_model(model, data, progress=False)
    for block in model.model.layers:
        if algorithm:
            assert block.self_attn.kv_b_proj.weight_qparams_fixed
        else:
            assert block.self_attn.kv_b_proj.output_quantizer.has_qparams
    with torch.no_grad():
        assert torch.isfinite(model(**data[0]).logits).all()
