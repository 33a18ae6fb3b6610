"""End-to-end on the real bundled SmolLM2-135M (slow: `make test-slow`)."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_fp8_with_fp8_kv_quantize_eval_freeze_on_smollm2():
    from quark.torch import LLMTemplate
    from quark.torch.evaluation import calibration_dataloader, evaluate_shared_protocol
    from quark.torch.quantization.api import ModelQuantizer
    from quark.torch.utils.model_loading import load_model_and_tokenizer, model_size_bytes

    model, tok = load_model_and_tokenizer()
    size = model_size_bytes(model)
    cfg = LLMTemplate.get(model.config.model_type).get_config("fp8", kv_cache_scheme="fp8")
    ModelQuantizer(cfg).quantize_model(model, calibration_dataloader(tok, 8, 256))
    ppl = evaluate_shared_protocol(model, tok, num_windows=8)
    batch = calibration_dataloader(tok, 1, 64)[0]
    with torch.no_grad():
        fake = model(**batch).logits
        ModelQuantizer.freeze(model)
        frozen = model(**batch).logits
    torch.testing.assert_close(frozen, fake, rtol=0, atol=0)
    assert model_size_bytes(model) < 0.5 * size
    assert 20 < ppl < 40, ppl  # fp32 on these 8 windows is ~27
