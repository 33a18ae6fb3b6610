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


def test_gguf_in_int4_gguf_out_on_smollm2(tmp_path):
    """The bundled GGUF -> int4 g32 (fp16 scales) -> GGUF: transformers reloads model and tokenizer,
    the logits equal the quantized model's and the tokenizer encodes identically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quark.torch import LLMTemplate
    from quark.torch.export.gguf import export_gguf
    from quark.torch.quantization.api import ModelQuantizer
    from quark.torch.quantization.config.config import QConfig, QLayerConfig
    from quark.torch.quantization.config.type import ScaleType
    from quark.torch.utils.model_loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()
    cfg = LLMTemplate.get("llama").get_config("int4_wo_32")
    weight = cfg.global_quant_config.weight.with_changes(scale_type=ScaleType.float16)
    ModelQuantizer(QConfig(global_quant_config=QLayerConfig(weight=weight), exclude=cfg.exclude)).quantize_model(model)
    path = export_gguf(model, tmp_path, strict=True)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    back_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok(text, return_tensors="pt").input_ids
    assert torch.equal(back_tok(text, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert path.stat().st_size < 0.35 * 538_060_288  # Q4_0 blocks + the fp32 tied embedding
