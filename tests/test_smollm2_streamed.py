"""The streamed flow on the real SmolLM2-135M (slow: `make test-slow`): the bundled GGUF saved as a
float32 safetensors folder, quantized block by block from disk, equals quantize_model +
export_safetensors bit for bit (every tensor, config.json) for the issue's four recipes."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from quark.torch.evaluation import calibration_dataloader
    from quark.torch.utils.model_loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()  # float32
    folder = tmp_path_factory.mktemp("smollm2") / "src"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, calibration_dataloader(tok, 4, 128)


@pytest.mark.parametrize("scheme, kwargs, export", [
    ("int4_wo_64", dict(algorithm=["gptq"]), {}),
    ("uint4_wo_64", dict(algorithm=["awq"]), dict(custom_mode="awq")),
    ("int8", dict(algorithm=["smoothquant"]), {}),
    ("fp8", dict(kv_cache_scheme="fp8"), {}),
], ids=["gptq-int4", "awq-uint4", "smoothquant-int8", "fp8-kv"])
def test_streamed_smollm2_equals_in_memory(smollm2, tmp_path, scheme, kwargs, export):
    from transformers import AutoModelForCausalLM

    from quark.torch import LLMTemplate
    from quark.torch.export.api import export_safetensors
    from quark.torch.export.safetensors_io import load_tensors
    from quark.torch.quantization.api import ModelQuantizer

    src, batches = smollm2
    model = AutoModelForCausalLM.from_pretrained(src)
    ModelQuantizer(LLMTemplate.get("llama").get_config(scheme, **kwargs)).quantize_model(model, batches, progress=False)
    export_safetensors(model, tmp_path / "mem", **export)
    del model
    ModelQuantizer(LLMTemplate.get("llama").get_config(scheme, **kwargs)).direct_quantize_checkpoint(
        src, tmp_path / "stream", dataloader=batches, progress=False, **export)
    a, b = load_tensors(tmp_path / "mem"), load_tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8),
                                                        b[k].reshape(-1).view(torch.uint8)), k
    assert json.loads((tmp_path / "mem" / "config.json").read_text()) == \
        json.loads((tmp_path / "stream" / "config.json").read_text())
