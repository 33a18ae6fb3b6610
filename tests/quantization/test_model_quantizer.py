"""ModelQuantizer on tiny random models: every scheme, precedence, KV/attention, freeze, flows."""

import copy
import logging

import pytest
import torch
import torch.nn as nn

from quark.torch import LLMTemplate
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.config import (
    FP8E4M3PerTensorSpec,
    Int8PerTensorSpec,
    QConfig,
    QLayerConfig,
    Uint4PerGroupSpec,
)
from quark.torch.quantization.config.type import QuantFlow
from quark.torch.quantization.modules import QuantLinear, quantized_linears
from tests.helpers import tiny_llama, token_batches

# relative logit error bound per scheme on the tiny random llama (measured values are 1.5-3x below)
ERROR_BOUND = {
    "int8": 0.05, "fp8": 0.1, "ptpc_fp8": 0.1, "bfp16": 0.05, "mx9": 0.05, "mx6": 0.15,
    "mxfp6_e2m3": 0.15, "mxfp6_e3m2": 0.2,
}
DEFAULT_BOUND = 0.35  # 4-bit formats


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def batches():
    return token_batches(2, seq=16)


@pytest.fixture(scope="module")
def reference(batches):
    model = tiny_llama(hidden=128)
    with torch.no_grad():
        return [model(**b).logits for b in batches]


@pytest.mark.parametrize("scheme", LLMTemplate.list_schemes())
def test_every_scheme_quantizes_and_freezes(scheme, batches, reference):
    model = tiny_llama(hidden=128)  # 128 so that every group size (up to 128) divides
    cfg = LLMTemplate.get("llama").get_config(scheme)
    ModelQuantizer(cfg).quantize_model(model, batches, progress=False)
    linears = quantized_linears(model)
    assert len(linears) == 2 * 7  # q k v o gate up down per block, lm_head excluded
    assert not isinstance(model.lm_head, QuantLinear)
    with torch.no_grad():
        fake = model(**batches[0]).logits
    assert torch.isfinite(fake).all()
    err = _rel(fake, reference[0])
    assert 0 < err < ERROR_BOUND.get(scheme, DEFAULT_BOUND), (scheme, err)
    ModelQuantizer.freeze(model)
    with torch.no_grad():
        frozen = model(**batches[0]).logits
    torch.testing.assert_close(frozen, fake, rtol=0, atol=0)
    assert all(not isinstance(q.weight, nn.Parameter) for _, q in linears)


def test_frozen_weight_memory_is_the_quantized_size():
    model = tiny_llama()
    ModelQuantizer(LLMTemplate.get("llama").get_config("int4_wo_32")).quantize_model(model, progress=False)
    q = model.model.layers[0].mlp.down_proj
    float_bytes = q.weight.numel() * 4
    ModelQuantizer.freeze(model)
    # per-group int4 is stored transposed and packed along N: int32 [K, N / 8] (FORMATS.md section 4)
    assert q.weight.dtype == torch.int32 and q.weight.shape == (128, 64 // 8)
    stored = q.weight.numel() * 4 + q.weight_quantizer.scale.numel() * 4
    assert stored == float_bytes // 8 + float_bytes // 32


def test_weight_only_needs_no_data_but_static_activations_do():
    model = tiny_llama()
    ModelQuantizer(LLMTemplate.get("llama").get_config("uint4_wo_64")).quantize_model(model, progress=False)
    with pytest.raises(ValueError, match="dataloader"):
        ModelQuantizer(LLMTemplate.get("llama").get_config("int8")).quantize_model(tiny_llama(), progress=False)
    # fully dynamic activations need no data either
    ModelQuantizer(LLMTemplate.get("llama").get_config("ptpc_fp8")).quantize_model(tiny_llama(), progress=False)


def test_one_linear_model_matches_hand_computed_int8():
    """The llama template's int8 config on a one-Linear model (no decoder stack: calibrated as a whole).
    Weight amax 255/128 gives s_w = 2^-6, inputs calibrated to +-0.99609375 give s_x = 2^-7
    (FORMATS.md 2a.1); every product below is exact."""
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.9921875, -0.5, 0.25], [0.1, 0.0, -1.0]]))
    model = nn.Sequential(lin)
    cfg = LLMTemplate.get("llama").get_config("int8")
    calibration = [torch.tensor([[0.5, -0.99609375, 0.25]]), torch.tensor([[0.99609375, -0.1, 0.0]])]
    ModelQuantizer(cfg).quantize_model(model, calibration, progress=False)
    q = model[0]
    assert isinstance(q, QuantLinear)
    assert q.weight_quantizer.scale.item() == 2.0**-6 and q.input_quantizer.scale.item() == 2.0**-7
    # codes by hand: W * 64 = [127.5 -> 128 -> 127, -32, 16], [6.4 -> 6, 0, -64]; x * 128 = [-128, 127, -2]
    wq = torch.tensor([[127.0, -32.0, 16.0], [6.0, 0.0, -64.0]]) * 2.0**-6
    xq = torch.tensor([[-128.0, 127.0, -2.0]]) * 2.0**-7
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[-0.99609375, 0.99609375, -0.01171875]])), xq @ wq.t())


def test_a_template_stack_path_the_model_lacks(caplog):
    """A template's ``model_decoder_layers`` that the model does not have: without an algorithm the whole
    model is calibrated at once (one log line); with one, the error names the path, the model class and
    the field to set."""
    cfg = LLMTemplate.get("llama").get_config("int8")
    model = nn.Sequential(nn.Linear(8, 4))
    with caplog.at_level(logging.INFO, logger="quark.torch.quantization.api"):
        ModelQuantizer(cfg).quantize_model(model, [torch.randn(2, 8)], progress=False)
    assert [r.message for r in caplog.records if "model.layers" in r.message] == [
        "model_decoder_layers='model.layers' does not exist in Sequential: calibrating the whole model at once"]
    assert model[0].input_quantizer.scale is not None
    gptq = LLMTemplate.get("llama").get_config("int4_wo_32", algorithm="gptq")
    with pytest.raises(ValueError, match=r"^model_decoder_layers='model.layers' does not exist in Sequential: "
                                         r"algorithm\(s\) gptq run block by block .* set model_decoder_layers"):
        ModelQuantizer(gptq).quantize_model(nn.Sequential(nn.Linear(64, 32)), [torch.randn(2, 64)], progress=False)


def test_precedence_exclude_over_layer_over_type_over_global(batches):
    model = tiny_llama()
    t = LLMTemplate.get("llama")
    cfg = t.get_config(
        "uint4_wo_64",
        layer_config={"*down_proj": "int8", "*.0.self_attn.o_proj": "fp8"},
        exclude_layers=["model.layers.1.mlp.down_proj"],
    )
    ModelQuantizer(cfg).quantize_model(model, batches, progress=False)
    layers = model.model.layers
    assert layers[0].mlp.down_proj.weight_quantizer.spec.dtype.value == "int8"
    assert layers[0].mlp.down_proj.input_quantizer is not None
    assert not isinstance(layers[1].mlp.down_proj, QuantLinear)
    assert layers[0].self_attn.o_proj.weight_quantizer.spec.dtype.value == "fp8_e4m3"
    assert layers[1].self_attn.o_proj.weight_quantizer.spec.dtype.value == "uint4"
    assert layers[0].mlp.up_proj.input_quantizer is None


def test_layer_type_config_applies():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(x))

    w8 = QLayerConfig(weight=Int8PerTensorSpec().to_quantization_spec())
    cfg = QConfig(layer_type_quant_config={nn.Linear: w8}, layer_quant_config={"b": QLayerConfig()})
    net = ModelQuantizer(cfg).quantize_model(Net(), progress=False)
    assert isinstance(net.a, QuantLinear) and not isinstance(net.b, QuantLinear)


def test_kv_cache_and_attention_scales_present_and_used(batches):
    model = tiny_llama()
    cfg = LLMTemplate.get("llama").get_config("fp8", kv_cache_scheme="fp8", attention_scheme="fp8", min_kv_scale=0.5)
    ModelQuantizer(cfg).quantize_model(model, batches, progress=False)
    attn = model.model.layers[0].self_attn
    for proj in (attn.k_proj, attn.v_proj):
        scale = proj.output_quantizer.scale
        assert scale is not None and scale.item() >= 0.5  # the min_kv_scale floor
    assert attn.q_proj.output_quantizer.scale is not None and attn.q_proj.output_quantizer.scale.item() < 0.5
    assert attn.softmax_quantizer.scale.item() == pytest.approx(1 / 448, rel=0.02)  # probabilities' amax is ~1
    assert model.config._attn_implementation == "quark_eager"
    # the scales are used: changing the k scale changes the output
    with torch.no_grad():
        before = model(**batches[0]).logits
        attn.k_proj.output_quantizer.scale *= 64
        after = model(**batches[0]).logits
    assert not torch.equal(before, after)


def test_per_block_flow_equals_whole_model_flow(batches):
    cfg = LLMTemplate.get("llama").get_config("int8", kv_cache_scheme="fp8")
    a, b = tiny_llama(), tiny_llama()
    ModelQuantizer(cfg).quantize_model(a, batches, progress=False)
    cfg_block = copy.deepcopy(cfg)
    cfg_block.quant_flow = QuantFlow.per_block
    ModelQuantizer(cfg_block).quantize_model(b, batches, device="cpu", progress=False)
    for (na, qa), (_, qb) in zip(quantized_linears(a), quantized_linears(b)):
        for role in ("input_quantizer", "output_quantizer", "weight_quantizer"):
            ta, tb = getattr(qa, role), getattr(qb, role)
            if ta is not None:
                torch.testing.assert_close(ta.scale, tb.scale, rtol=0, atol=0, msg=f"{na}.{role}")
    with torch.no_grad():
        torch.testing.assert_close(a(**batches[0]).logits, b(**batches[0]).logits, rtol=0, atol=0)

def test_calibration_batches_go_to_the_models_own_device(batches, monkeypatch):
    """A model already on a GPU is calibrated with batches the dataloader left on the CPU: the capture
    pass must move them to the model's device (it once ran them where they were, and the embedding
    lookup failed on the H200: "index is on cpu, different from other tensors on cuda:0")."""
    import quark.torch.quantization.api as api

    seen = []
    real = api.capture_block_inputs

    def spy(model, layers, data, device=None, progress=True, **kwargs):
        seen.append(device)
        return real(model, layers, data, device=device, progress=progress, **kwargs)

    monkeypatch.setattr(api, "capture_block_inputs", spy)
    cfg = LLMTemplate.get("llama").get_config("int8")
    ModelQuantizer(cfg).quantize_model(tiny_llama(), batches, progress=False)
    assert seen == [torch.device("cpu")]



def test_calibration_is_sequential_on_quantized_inputs(batches):
    """Block 1's input scale is observed on block 0's *quantized* output."""
    model = tiny_llama()
    spec = FP8E4M3PerTensorSpec().to_quantization_spec()
    w4 = Uint4PerGroupSpec(group_size=32).to_quantization_spec()
    cfg = QConfig(global_quant_config=QLayerConfig(weight=w4, input_tensors=spec), exclude=["lm_head"])
    ModelQuantizer(cfg).quantize_model(model, batches, progress=False)
    observed = model.model.layers[1].self_attn.q_proj.input_quantizer.scale
    # recompute: block 0 quantized, then block 1's input_layernorm output amax
    with torch.no_grad():
        amax = 0.0
        for b in batches:
            hs = model(**b, output_hidden_states=True).hidden_states[1]
            amax = max(amax, model.model.layers[1].input_layernorm(hs).abs().max().item())
    assert observed.item() == pytest.approx(amax / 448, rel=1e-6)


def test_group_size_that_does_not_divide_is_a_clear_error():
    model = tiny_llama(hidden=48)
    cfg = LLMTemplate.get("llama").get_config("int4_wo_32")
    with pytest.raises(ValueError, match=r"group_size=32 does not divide in_features=48"):
        ModelQuantizer(cfg).quantize_model(model, progress=False)


def test_no_matching_layer_warns(caplog):
    cfg = QConfig(global_quant_config=QLayerConfig(weight=Int8PerTensorSpec().to_quantization_spec()), exclude=["*"])
    with caplog.at_level("WARNING"):
        ModelQuantizer(cfg).quantize_model(nn.Sequential(nn.Linear(2, 2)), progress=False)
    assert "no layer was quantized" in caplog.text


def test_moe_model_quantizes_attention_and_excludes_router():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    model = Qwen2MoeForCausalLM(cfg).eval()
    ref = copy.deepcopy(model)
    qcfg = LLMTemplate.get("qwen2_moe").get_config("fp8", kv_cache_scheme="fp8")
    batches = token_batches(2)
    ModelQuantizer(qcfg).quantize_model(model, batches, progress=False)
    names = [n for n, _ in quantized_linears(model)]
    assert "model.layers.0.self_attn.k_proj" in names
    assert not any(n.endswith("mlp.gate") for n in names)
    assert any("shared_expert." in n for n in names)
    with torch.no_grad():
        y, r = model(**batches[0]).logits, ref(**batches[0]).logits
    assert torch.isfinite(y).all() and _rel(y, r) < 0.1


def test_weight_cache_only_inside_weight_caching_and_follows_changes():
    """Inside ``weight_caching`` the fake-quantized weight is computed once per (weight, qparams)
    state, also for a weight that requires grad under no_grad; outside it, at every forward."""
    from quark.torch.quantization.modules import weight_caching

    spec = Int8PerTensorSpec().to_quantization_spec()
    q = QuantLinear.from_linear(nn.Linear(4, 3, bias=False), QLayerConfig(weight=spec))
    calls = []
    q.weight_quantizer.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 4)

    def fresh() -> torch.Tensor:  # recomputed outside the cache
        n = len(calls)
        y = q(x)
        del calls[n:]
        return y

    with torch.no_grad():
        q(x), q(x)
        assert len(calls) == 2  # no cache outside weight_caching
        with weight_caching():
            y1 = q(x)
            y2 = q(x)
            assert len(calls) == 3 and torch.equal(y1, y2)
            q.weight.mul_(0.5)  # in place: the version changes
            y3 = q(x)
            assert len(calls) == 4 and not torch.equal(y3, y1)
        assert torch.equal(y3, fresh())
        with weight_caching():
            q(x)
            q.weight_quantizer.scale.mul_(4.0)  # the qparams change in place
            y4 = q(x)
            assert len(calls) == 6 and not torch.equal(y4, y3)
        assert torch.equal(y4, fresh())
    with weight_caching():  # grad enabled and a weight that requires grad: no cache (training)
        q(x), q(x)
    assert len(calls) == 8


@pytest.mark.parametrize("data, error, message", [
    (None, ValueError, r"algorithm\(s\) gptq need calibration data: pass dataloader="),
    ([], ValueError, r"dataloader is empty"),
    (["some text"], TypeError, r"calibration batch 0 holds text \(str\), not tokens: the dataloader must yield token ids"),
    ([{"input_ids": torch.zeros(1, 8, dtype=torch.long)}, {"text": "x"}], TypeError, r"calibration batch 1 holds text \(dict\)"),
    (torch.zeros(2, 8, dtype=torch.long), ValueError, r"calibration batch 0 is 1-D token ids \[8\]: give \[batch, seq\]"),
    ([{"input_ids": torch.zeros(8, dtype=torch.long)}], ValueError, r"calibration batch 0 is 1-D token ids \[8\]"),
])
def test_unusable_calibration_data_is_refused_before_any_work(data, error, message):
    """Missing, empty, untokenized or 1-D calibration data fails before the model is touched, with the
    fix in the message (a [batch, seq] tensor passed as the dataloader iterates into 1-D rows)."""
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        ModelQuantizer(LLMTemplate.get("llama").get_config("int4_wo_32", algorithm="gptq")).quantize_model(
            model, data, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
