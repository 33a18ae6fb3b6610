"""Every algorithm on a bfloat16 model (what users calibrate in on GPUs, ``--dtype bfloat16``): it runs,
the weights stay bfloat16, and the weight-correcting ones still beat round-to-nearest on the model's
output (the Hessians and solvers work in float32 whatever the model's dtype)."""

import pytest
import torch

from quark.torch import LLMTemplate
from quark.torch.quantization.api import ModelQuantizer
from tests.helpers import tiny_llama, token_batches


@pytest.fixture(scope="module")
def batches():
    return token_batches(8, seq=32)


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits.float() for b in batches])


def quantized_error(scheme, algorithm, batches):
    model = tiny_llama(seed=3).to(torch.bfloat16)
    reference = logits(model, batches)
    config = LLMTemplate.get("llama").get_config(scheme, algorithm=algorithm)
    ModelQuantizer(config).quantize_model(model, batches, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = logits(model, batches)
    assert torch.isfinite(out).all()
    return ((out - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("algorithm", [["gptq"], ["gptaq"], ["qronos"], ["awq"], ["rotation", "gptq"]])
def test_weight_algorithms_beat_rounding_on_a_bfloat16_model(batches, algorithm):
    assert quantized_error("int4_wo_64", algorithm, batches) < quantized_error("int4_wo_64", None, batches)


@pytest.mark.parametrize("algorithm", [["smoothquant"], ["autosmoothquant"]])
def test_smoothing_beats_rounding_on_a_bfloat16_w8a8_model(batches, algorithm):
    assert quantized_error("int8", algorithm, batches) < quantized_error("int8", None, batches)
