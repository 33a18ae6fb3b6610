"""fp8 KV cache + fp8 attention on architecture-specific attention (issue: sliding windows and
soft-capping (gemma2/3), q/k norms (qwen3), attention sinks (gpt_oss), MLA (deepseek_v3)).

The attention quantization runs the model's own eager attention with a quantizer after the
softmax, so with every quantizer off the model must compute exactly its float function (sinks,
soft-capping and windows included); the softmax and K/V quantizers must be calibrated, and the
export must reload to the same logits."""

import copy

import pytest
import torch

from quark.torch import LLMTemplate
from quark.torch.algorithm import quantizers_off
from quark.torch.export.api import export_safetensors, import_model_from_safetensors
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.tensor_quantizer import TensorQuantizer
from quark.torch.testing.tiny_models import build_model

TYPES = ["gemma2", "gemma3_text", "qwen3", "gpt_oss", "deepseek_v3"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("model_type", TYPES)
def test_fp8_attention_keeps_the_float_function_and_reloads(model_type, tmp_path):
    torch.manual_seed(0)
    model = build_model(model_type)
    reference = copy.deepcopy(model)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids}]
    config = LLMTemplate.get(model_type).get_config("fp8", kv_cache_scheme="fp8", attention_scheme="fp8")
    ModelQuantizer(config).quantize_model(model, batches, progress=False)

    softmax = [q for n, q in model.named_modules() if n.endswith("softmax_quantizer")]
    kv = [m.output_quantizer for m in model.modules() if isinstance(getattr(m, "output_quantizer", None), TensorQuantizer)]
    assert len(softmax) == model.config.get_text_config().num_hidden_layers
    assert softmax and all(q.has_qparams for q in softmax) and kv and all(q.has_qparams for q in kv)

    with torch.no_grad():
        float_logits = reference(input_ids=ids).logits
        with quantizers_off(model):
            assert _rel(model(input_ids=ids).logits, float_logits) < 1e-5
        quantized = model(input_ids=ids).logits
    assert 0 < _rel(quantized, float_logits) < 0.25  # fp8 everywhere on a random tiny model

    export_safetensors(model, tmp_path / "out")
    loaded = import_model_from_safetensors(None, tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, quantized, rtol=0, atol=0)
