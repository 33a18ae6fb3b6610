"""Fused MoE experts (transformers-5 3-D expert weights) quantized per expert, kept fused.

Tiny random models of quark/torch/testing/tiny_models.py (4 experts, top-2): Qwen3-MoE and Mixtral
(the experts interface, [E, out, in]), GPT-OSS (transposed, interleaved gate/up, biases), DBRX and
Llama 4 (their own layouts, CLASS_LAYOUTS).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from quark.torch import LLMTemplate
from quark.torch.export.api import export_safetensors, import_model_from_safetensors, load_params, save_params
from quark.torch.export.safetensors_io import load_tensors
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.fused_experts import (
    ExpertsActQuantizer,
    QuantFusedExperts,
    expert_view,
    fused_experts_modules,
)
from quark.torch.quantization.modules import QuantLinear, quantized_linears
from quark.torch.quantization.tensor_quantize import compute_qparams, fake_quantize
from quark.torch.testing.coverage import batches, logits
from quark.torch.testing.tiny_models import build_model


@pytest.fixture(scope="module")
def data():
    return batches()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _quantized(model_type: str, scheme: str, data, **kwargs):
    model = build_model(model_type)
    ref = logits(model, data[0])
    ModelQuantizer(LLMTemplate.get(model_type).get_config(scheme, **kwargs)).quantize_model(model, data, progress=False)
    return model, ref


def _float_experts(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n and "shared" not in n}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_int4_is_per_expert_2d_fake_quantization(model_type, data):
    model = build_model(model_type)
    ref = logits(model, data[0])
    before = _float_experts(model)
    ModelQuantizer(LLMTemplate.get(model_type).get_config("int4_wo_32")).quantize_model(model, progress=False)
    experts = fused_experts_modules(model)
    assert experts, "the fused experts were not quantized"
    for name, m in experts:
        assert set(p.path for p, _ in m.quantized_projections()) == {"gate_up_proj", "down_proj"}
        for proj, fp in m.quantized_projections():
            w = before[f"{name}.{proj.path}"]
            view = expert_view(w, fp.num_experts, proj.transposed)  # [E, out, in]
            e_, n_, k_ = view.shape
            # per-expert qparams, per group of 32 along each expert's input dim
            assert tuple(fp.weight_quantizer.scale.shape) == (e_, n_, k_ // 32)
            fq = expert_view(fp.effective_weight(m.float_weight(proj)), fp.num_experts, proj.transposed)
            spec = fp.weight_quantizer.spec
            for e in range(e_):
                # hand check: the expert's 2-D [out, in] matrix quantized on its own
                two_d = view[e].contiguous()
                expected = fake_quantize(two_d, spec, compute_qparams(two_d, spec))
                assert torch.equal(fq[e], expected), (name, proj.path, e)
    assert _rel(logits(model, data[0]), ref) < 0.35


def _never_route_last_expert(model: nn.Module) -> list:
    """Forward hooks on the routers: tokens routed to the last expert go to another one instead."""
    handles = []
    for name, m in model.named_modules():
        if name.endswith("mlp.gate") and hasattr(m, "num_experts"):
            last = m.num_experts - 1

            def hook(_mod, _inp, out, last=last):
                logits_, scores, idx = out
                idx = idx.clone()
                for row in idx:
                    for j in range(row.numel()):
                        if row[j] == last:
                            row[j] = next(e for e in range(last) if e not in row.tolist())
                return logits_, scores, idx

            handles.append(m.register_forward_hook(hook))
    assert handles
    return handles


def test_expert_without_tokens_gets_valid_scales(data, caplog):
    model = build_model("qwen3_moe")
    handles = _never_route_last_expert(model)
    with caplog.at_level(logging.INFO, logger="quark.torch.quantization.api"):
        ModelQuantizer(LLMTemplate.get("qwen3_moe").get_config("fp8")).quantize_model(model, data, progress=False)
    (name, m), = fused_experts_modules(model)
    for _, fp in m.quantized_projections():
        w_scale, in_scale = fp.weight_quantizer.scale, fp.input_quantizer.scale
        assert w_scale.shape == in_scale.shape == (4,)
        assert torch.isfinite(w_scale).all() and (w_scale > 0).all()  # weights are static: every expert
        assert torch.isfinite(in_scale).all() and (in_scale > 0).all()
        assert fp.input_quantizer.unobserved == [3]
        assert in_scale[3] == in_scale[:3].max()  # the fallback: the largest calibrated scale
    assert "received no calibration tokens" in caplog.text and "[3]" in caplog.text
    for h in handles:
        h.remove()
    out = logits(model, data[0])  # the expert now receiving tokens quantizes with its borrowed scale
    assert torch.isfinite(out).all()


def test_fp8_per_expert_scales_and_names_on_disk(data, tmp_path):
    model, ref = _quantized("qwen3_moe", "fp8", data)
    (name, m), = fused_experts_modules(model)
    inter = m.fused_quant["down_proj"].in_features
    for _, fp in m.quantized_projections():
        assert isinstance(fp.input_quantizer, ExpertsActQuantizer)
        assert fp.input_quantizer.scale.shape == (4,) and fp.weight_quantizer.scale.shape == (4,)
        assert len(set(fp.input_quantizer.scale.tolist())) > 1  # each expert calibrated on its own tokens
    assert _rel(logits(model, data[0]), ref) < 0.1
    export_safetensors(model, tmp_path / "out")
    t = load_tensors(tmp_path / "out")
    gu = m.fused_quant["gate_up_proj"]
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            prefix = f"{name}.{e}.{proj}"
            assert t[f"{prefix}.weight"].dtype == torch.float8_e4m3fn
            assert t[f"{prefix}.weight"].shape == ((inter, 64) if proj != "down_proj" else (64, inter))
            assert t[f"{prefix}.weight_scale"].shape == t[f"{prefix}.input_scale"].shape == ()
        # gate and up share the expert's gate_up input and weight scales
        assert t[f"{name}.{e}.gate_proj.input_scale"] == t[f"{name}.{e}.up_proj.input_scale"] == gu.input_quantizer.scale[e]
        assert t[f"{name}.{e}.gate_proj.weight_scale"] == t[f"{name}.{e}.up_proj.weight_scale"]
    assert not [k for k in t if k.startswith(name + ".") and not k[len(name) + 1].isdigit()]  # nothing fused left


def test_fake_quantized_export_splits_gate_and_up_rows(data, tmp_path):
    model, _ = _quantized("mixtral", "int4_wo_32", data)
    name, m = fused_experts_modules(model)[0]
    gu = m.fused_quant["gate_up_proj"]
    fq = expert_view(gu.effective_weight(m.float_weight(gu.proj)), 4, False)
    export_safetensors(model, tmp_path / "fake", weight_format="fake_quantized")
    t = load_tensors(tmp_path / "fake")
    half = gu.out_features // 2
    for e in range(4):  # Mixtral's names: w1 (gate), w3 (up), w2 (down), as transformers' loader merges them
        assert torch.equal(t[f"{name}.{e}.w1.weight"], fq[e, :half])
        assert torch.equal(t[f"{name}.{e}.w3.weight"], fq[e, half:])
        assert t[f"{name}.{e}.w1.weight_scale"].shape == (half, 64 // 32)
        assert f"{name}.{e}.w2.weight" in t


@pytest.mark.parametrize("scheme", ["int4_wo_32", "fp8", "mxfp4"])
def test_freeze_equals_fake_quantized(scheme, data):
    model, _ = _quantized("mixtral", scheme, data)
    fake = logits(model, data[0])
    ModelQuantizer.freeze(model)
    for _, m in fused_experts_modules(model):
        for proj, fp in m.quantized_projections():
            assert fp.frozen and m.float_weight(proj) is None
            assert fp.stored_weight.shape[0] == 4
    assert not [n for n, _ in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert torch.equal(logits(model, data[0]), fake)


def test_frozen_export_equals_fake_quantized_export(data, tmp_path):
    model, _ = _quantized("qwen3_moe", "fp8", data)
    export_safetensors(model, tmp_path / "fake")
    ModelQuantizer.freeze(model)
    export_safetensors(model, tmp_path / "frozen")
    a, b = load_tensors(tmp_path / "fake"), load_tensors(tmp_path / "frozen")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]) for k in a)


@pytest.mark.parametrize(
    "model_type, scheme, disk",
    [
        ("qwen3_moe", "int4_wo_32", "experts.{e}.gate_proj"),
        ("qwen3_moe", "fp8", "experts.{e}.down_proj"),
        ("mixtral", "fp8", "experts.{e}.w3"),
        ("gpt_oss", "fp8", "experts.{e}.gate_up_proj"),
        ("gpt_oss", "mxfp4", "experts.{e}.down_proj"),
        ("dbrx", "fp8", "experts.{e}.v1"),
        ("llama4", "fp8", "experts.{e}.gate_up_proj"),
    ],
)
def test_export_import_logits_equal(model_type, scheme, disk, data, tmp_path):
    model, _ = _quantized(model_type, scheme, data)
    ref = [logits(model, b) for b in data]
    export_safetensors(model, tmp_path / "out")
    names = set(load_tensors(tmp_path / "out"))
    assert all(any(disk.format(e=e) + ".weight" in k for k in names) for e in range(4)), sorted(names)[:20]
    back = import_model_from_safetensors(None, tmp_path / "out")
    assert fused_experts_modules(back) and all(m.frozen for _, m in fused_experts_modules(back))
    for b, r in zip(data, ref):
        assert torch.equal(logits(back, b), r)


def test_save_and_load_params_keep_fused_experts(data, tmp_path):
    model, _ = _quantized("qwen3_moe", "fp8", data)
    ref = logits(model, data[0])
    save_params(model, tmp_path)
    back = load_params(build_model("qwen3_moe"), tmp_path / "model.json", tmp_path / "model.safetensors")
    assert torch.equal(logits(back, data[0]), ref)
    ModelQuantizer.freeze(model)
    save_params(model, tmp_path / "frozen")
    back = load_params(build_model("qwen3_moe"), tmp_path / "frozen" / "model.json", tmp_path / "frozen" / "model.safetensors")
    assert all(m.frozen for _, m in fused_experts_modules(back))
    assert torch.equal(logits(back, data[0]), ref)


def test_routers_excluded_and_shared_experts_quantized(data):
    model, _ = _quantized("qwen2_moe", "fp8", data)
    names = {n for n, _ in quantized_linears(model)}
    assert not [n for n in names if n.endswith(("mlp.gate", "shared_expert_gate"))]
    assert {"model.layers.1.mlp.shared_expert.gate_proj", "model.layers.1.mlp.shared_expert.down_proj"} <= names
    router = model.get_submodule("model.layers.1.mlp.gate")
    assert not isinstance(router, (QuantLinear, QuantFusedExperts))
    assert not any(isinstance(x, QuantLinear) or hasattr(x, "fused_quant") for x in router.modules())


@pytest.mark.parametrize("algorithm, scheme, solved", [
    ("gptq", "int4_wo_32", True), ("awq", "int4_wo_32", False), ("smoothquant", "int8", False),
])
def test_scaling_algorithms_do_not_solve_fused_experts_and_gptq_solves_them(algorithm, scheme, solved, data, caplog):
    with caplog.at_level(logging.INFO, logger="quark.torch.quantization.api"):
        model, ref = _quantized("qwen3_moe", scheme, data, algorithm=algorithm)
    assert (f"{algorithm}: the 1 fused-experts modules are not solved" in caplog.text) is not solved
    (_, m), = fused_experts_modules(model)
    assert all(fp.weight_quantizer.has_qparams for _, fp in m.quantized_projections())
    # GPTQ's per-expert qparams are kept (fixed), min-max ones follow the weight
    assert all(fp.weight_qparams_fixed is solved for _, fp in m.quantized_projections())
    assert _rel(logits(model, data[0]), ref) < 0.35


def test_excluded_experts_stay_float(data):
    model = build_model("qwen3_moe")
    before = _float_experts(model)
    cfg = LLMTemplate.get("qwen3_moe").get_config("int4_wo_32", exclude_layers=["*experts.down_proj"])
    ModelQuantizer(cfg).quantize_model(model, progress=False)
    (name, m), = fused_experts_modules(model)
    assert [p.path for p, _ in m.quantized_projections()] == ["gate_up_proj"]
    assert torch.equal(m.down_proj, before[f"{name}.down_proj"])


def test_group_size_must_divide_expert_input_dim():
    model = build_model("qwen3_moe")
    cfg = LLMTemplate.get("qwen3_moe").get_config("int4_wo_128", exclude_layers=["*self_attn*", "*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj"])
    with pytest.raises(ValueError, match="experts.gate_up_proj.*group_size=128"):
        ModelQuantizer(cfg).quantize_model(model, progress=False)


def test_file_to_file_refuses_fused_experts(tmp_path):
    build_model("qwen3_moe").save_pretrained(tmp_path / "src")
    quantizer = ModelQuantizer(LLMTemplate.get("qwen3_moe").get_config("int4_wo_32"))
    with pytest.raises(NotImplementedError, match="fused MoE experts"):
        quantizer.direct_quantize_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()
