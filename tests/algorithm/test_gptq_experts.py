"""GPTQ on fused MoE experts, one expert at a time (``quark/torch/algorithm/gptq_experts.py``)."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from quark.torch import LLMTemplate
from quark.torch.algorithm import get_algorithm, quantizers_off
from quark.torch.algorithm import gptq as gptq_module
from quark.torch.algorithm.gptaq import GPTAQ
from quark.torch.algorithm.gptq_experts import quantize_experts
from quark.torch.algorithm.hessian_solver import Gram, quantize_weight
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.algo_configs import GPTAQConfig, GPTQConfig
from quark.torch.quantization.fused_experts import fused_experts_modules
from quark.torch.quantization.modules import QuantLinear
from quark.torch.quantization.moe import RoutedTokens
from quark.torch.quantization.tensor_quantize import compute_qparams, fake_quantize
from quark.torch.testing.tiny_models import build_model

ROOT = Path(__file__).resolve().parents[2]


def calibration(model, n: int = 4, seq: int = 32, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    return [{"input_ids": torch.randint(0, vocab, (2, seq), generator=g)} for _ in range(n)]


def quantized(model_type: str, algorithm=None, scheme: str = "int4_wo_32"):
    model = build_model(model_type)
    batches = calibration(model)
    config = LLMTemplate.get(model_type).get_config(scheme, algorithm=algorithm)
    return ModelQuantizer(config).quantize_model(model, batches, progress=False), batches


def first_experts(model):
    name, module = fused_experts_modules(model)[0]
    return module


def projection(module, role: str):
    return next((p, fp) for p, fp in module.quantized_projections() if p.role == role)


GPTAQ_ACCUMULATE = GPTAQ.accumulate


def rtn(w: torch.Tensor, spec) -> torch.Tensor:
    return fake_quantize(w, spec, compute_qparams(w, spec))


def test_routed_tokens_top_k():
    module = first_experts(quantized("qwen3_moe")[0])
    assert int(module.num_experts) == 4
    hidden = torch.randn(5, 64)
    index = torch.tensor([[0, 1], [1, 2], [3, 1], [2, 0], [1, 3]])
    x, rows = module.routed_tokens(hidden, index, torch.full((5, 2), 0.5))
    assert x.data_ptr() == hidden.data_ptr() and torch.equal(x, hidden)  # a view: nothing copied
    assert [r.tolist() for r in rows] == [[0, 3], [0, 1, 2, 4], [1, 3], [2, 4]]


def test_routed_tokens_dense_keep_the_nonzero_rows_of_each_block():
    module = first_experts(quantized("llama4")[0])
    assert module.fused_layout.routing == "dense"
    E, T, H = int(module.num_experts), 3, 64
    blocks = torch.zeros(E, T, H)
    blocks[0, 1] = 1.0
    blocks[2, 0] = 2.0
    blocks[2, 2] = 3.0
    x, rows = module.routed_tokens(blocks.reshape(E * T, H))
    assert x[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert [r.tolist() for r in rows] == [[0], [], [1, 2]] + [[]] * (E - 3)


def test_a_recorded_call_pairs_the_float_stream_by_token_with_top_k_routing_only():
    top_k = first_experts(quantized("qwen3_moe")[0])
    hidden, hidden_float = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    index = torch.tensor([[0, 1], [1, 2], [3, 1], [2, 0], [1, 3], [0, 2]])
    record = RoutedTokens(top_k)
    record.add_call((hidden, index, torch.full((6, 2), 0.5)), {}, hidden_float)
    assert record.tokens(0) == 3 and record.tokens(1) == 4
    (xq, xf), = record.expert_inputs(3)
    assert torch.equal(xq, hidden.reshape(6, 64)[[2, 4]]) and torch.equal(xf, hidden_float.reshape(6, 64)[[2, 4]])
    dense = first_experts(quantized("llama4")[0])
    blocks = torch.zeros(int(dense.num_experts), 2, 64)
    blocks[1, 0] = 1.0
    record = RoutedTokens(dense)
    record.add_call((blocks.reshape(-1, 64),), {}, torch.ones_like(blocks).reshape(-1, 64))
    (xq, xf), = record.expert_inputs(1)
    assert xf is xq and torch.equal(xq, blocks[1, :1])  # not paired: the quantized rows stand in


@pytest.fixture(scope="module")
def rtn_experts():
    """A qwen3_moe experts module quantized round-to-nearest, a record of routed tokens (expert 3
    gets none) and its original weights."""
    module = first_experts(quantized("qwen3_moe")[0])
    g = torch.Generator().manual_seed(5)
    H = projection(module, "gate_up")[1].in_features
    x = torch.randn(60, H, generator=g) @ torch.randn(H, H, generator=g) * 0.3
    rows = [torch.arange(0, 40), torch.arange(20, 60), torch.arange(10, 50, 2), torch.arange(0)]
    return module, x, rows


def test_each_expert_is_gptq_on_its_own_tokens_and_unrouted_experts_keep_rtn(rtn_experts):
    template, x, rows = rtn_experts
    module = copy.deepcopy(template)
    (gu_proj, gu), (down_proj, down) = projection(module, "gate_up"), projection(module, "down")
    W_gu = gu.view(module.float_weight(gu_proj)).detach().clone()
    W_down = down.view(module.float_weight(down_proj)).detach().clone()
    record = RoutedTokens(module)
    record.batches = [(x[:30], [r[r < 30] for r in rows], None), (x[30:], [r[r >= 30] - 30 for r in rows], None)]
    config = GPTQConfig()
    assert quantize_experts(record, get_algorithm("gptq"), config) == [3]
    spec = gu.weight_quantizer.spec
    new_gu = gu.view(module.float_weight(gu_proj)).detach()
    new_down = down.view(module.float_weight(down_proj)).detach()
    for e in range(3):
        X = x[rows[e]]
        gram = Gram()
        gram.add_batch(X)
        expected = quantize_weight(W_gu[e], gram.value, spec, damp_percent=config.damp_percent,
                                   block_size=config.block_size, desc_act=config.desc_act,
                                   static_groups=config.static_groups, clip_steps=config.clip_search_steps,
                                   clip_min=config.clip_search_min, zero_dead=False)
        assert torch.equal(new_gu[e], expected.Q)
        # the output error on the expert's tokens is below round-to-nearest's
        assert ((new_gu[e] - W_gu[e]) @ X.T).pow(2).sum() < 0.5 * ((rtn(W_gu[e], spec) - W_gu[e]) @ X.T).pow(2).sum()
        # down sees the hidden of the quantized gate/up
        h = module.expert_hidden(X, e)
        assert ((new_down[e] - W_down[e]) @ h.T).pow(2).sum() < 0.8 * ((rtn(W_down[e], spec) - W_down[e]) @ h.T).pow(2).sum()
    # no token: the float weight stays, with its min-max qparams
    assert torch.equal(new_gu[3], W_gu[3]) and torch.equal(new_down[3], W_down[3])
    for fp, W in ((gu, W_gu), (down, W_down)):
        assert fp.weight_qparams_fixed
        assert torch.equal(fp.weight_quantizer.expert_qparams(3).scale, compute_qparams(W[3], spec).scale)
        # every solved expert's weight is on the grid of its stored qparams (expert 3 keeps its float weight)
        view = fp.view(module.float_weight(fp.proj)).detach()
        for e in range(3):
            assert torch.equal(fake_quantize(view[e], spec, fp.weight_quantizer.expert_qparams(e)), view[e])


def test_input_features_dead_on_an_expert_are_rounded_not_zeroed(rtn_experts):
    template, x, rows = rtn_experts
    module = copy.deepcopy(template)
    gu_proj, gu = projection(module, "gate_up")
    W = gu.view(module.float_weight(gu_proj)).detach().clone()
    x = x.clone()
    x[:, 5] = 0.0
    record = RoutedTokens(module)
    record.batches = [(x, rows, None)]
    quantize_experts(record, get_algorithm("gptq"), GPTQConfig(desc_act=False))
    new = gu.view(module.float_weight(gu_proj)).detach()
    qp = gu.weight_quantizer.expert_qparams(0)
    # column 5 never moved by an update (H has no coupling there) and is rounded on its group's grid
    assert torch.equal(new[0][:, 5], fake_quantize(W[0], gu.weight_quantizer.spec, qp)[:, 5])
    assert new[0][:, 5].abs().sum() > 0


def expert_output_error(model, reference, batches) -> float:
    """``bench/moe_experts.py``'s measure: the experts' output error against the float experts on the
    quantized model's own calls."""
    spec = importlib.util.spec_from_file_location("bench_moe_experts", ROOT / "bench" / "moe_experts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.experts_output_error(model, reference, batches)


@pytest.mark.parametrize("model_type,algorithm,ratio", [
    ("mixtral", "gptq", 0.387), ("gpt_oss", "gptq", 0.301), ("gpt_oss", "gptaq", 0.244), ("gpt_oss", "qronos", 0.182),
    ("llama4", "gptaq", 0.510),
])
def test_the_gptq_family_lowers_the_experts_output_error_versus_rounding(model_type, algorithm, ratio):
    """(Each ratio is about 1.0 when the experts are left at round-to-nearest.)"""
    reference = build_model(model_type)
    model, batches = quantized(model_type)
    rtn_err = expert_output_error(model, reference, batches)
    model, batches = quantized(model_type, algorithm)
    assert expert_output_error(model, reference, batches) / rtn_err == pytest.approx(ratio, rel=0.02)  # measured


def test_the_float_stream_pairs_each_expert_token_with_its_float_input(rtn_experts, monkeypatch):
    """GPTAQ on experts: gate/up see (x~, x) of the expert's tokens; down sees the hidden of the
    quantized gate/up on x~ and the hidden of the float gate/up on x."""
    template, x, rows = rtn_experts
    module, original = copy.deepcopy(template), copy.deepcopy(template)
    x_float = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    record = RoutedTokens(module)
    record.batches = [(x, rows, x_float)]
    algorithm = get_algorithm("gptaq")
    pairs = []
    monkeypatch.setattr(type(algorithm), "accumulate",
                        lambda self, stats, xq, xf, yf=None: (pairs.append((xq, xf)), GPTAQ_ACCUMULATE(self, stats, xq, xf)))
    quantize_experts(record, algorithm, GPTAQConfig())
    assert len(pairs) == 6  # experts 0-2, gate_up then down (one batch each)
    for e in range(3):
        (gq, gf), (dq, df) = pairs[2 * e], pairs[2 * e + 1]
        assert torch.equal(gq, x[rows[e]]) and torch.equal(gf, x_float[rows[e]])
        assert torch.equal(dq, module.expert_hidden(x[rows[e]], e))
        with torch.no_grad(), quantizers_off(original):  # the float experts
            assert torch.equal(df, original.expert_hidden(x_float[rows[e]], e))
    assert not torch.equal(pairs[1][0], pairs[1][1])


def test_experts_are_solved_after_the_linears_and_keep_their_result_through_freeze(monkeypatch):
    seen = []
    original = gptq_module.quantize_experts

    def spy(record, algorithm, config):
        block = next(b for b in model_ref["layers"] if any(m is record.module for m in b.modules()))
        seen.append(all(m.weight_qparams_fixed for m in block.modules() if isinstance(m, QuantLinear)
                        and m.weight_quantizer is not None))
        return original(record, algorithm, config)

    model = build_model("qwen3_moe")
    model_ref = {"layers": list(model.model.layers)}
    monkeypatch.setattr(gptq_module, "quantize_experts", spy)
    batches = calibration(model)
    config = LLMTemplate.get("qwen3_moe").get_config("int4_wo_32", algorithm="gptq")
    model = ModelQuantizer(config).quantize_model(model, batches, progress=False)
    assert seen and all(seen)
    with torch.no_grad():
        logits = [model(**b).logits for b in batches]
        for _, m in fused_experts_modules(model):
            m.update_weight_qparams()  # what the quantizer loop does after the algorithms: keeps them
        assert all(torch.equal(model(**b).logits, before) for b, before in zip(batches, logits))
        ModelQuantizer.freeze(model)
        for b, before in zip(batches, logits):
            assert torch.allclose(model(**b).logits, before, rtol=0, atol=1e-5)
