"""AWQ on a tiny random llama: exact folding, lower block error than rounding, clipping, pair checks."""

import copy
import logging

import pytest
import torch
import torch.nn as nn

from quark.torch import LLMTemplate
from quark.torch.algorithm import quantizers_off
from quark.torch.algorithm.awq import clip_layer
from quark.torch.algorithm.scaling import Site, awq_candidates, fold
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.algo_configs import AWQConfig, ScalingPair
from quark.torch.quantization.config.config import Int4PerChannelSpec, QLayerConfig, Uint4PerGroupSpec
from quark.torch.quantization.modules import QuantLinear
from quark.torch.quantization.tensor_quantize import fake_quantize
from tests.helpers import tiny_llama, token_batches


def outlier_llama() -> nn.Module:
    """A tiny llama whose norms produce a few large activation channels (what makes scaling matter)."""
    model = tiny_llama(hidden=128)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 20
            layer.post_attention_layernorm.weight[5:9] *= 20
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def block0_error(model: nn.Module, reference: nn.Module, batches: list[dict]) -> float:
    """Squared error of the first block's output, quantized model vs float model, on ``batches``."""
    outs = {}

    def grab(key):
        def hook(_m, _a, out):
            outs.setdefault(key, []).append(out[0] if isinstance(out, tuple) else out)

        return hook

    handles = [model.model.layers[0].register_forward_hook(grab("q")),
               reference.model.layers[0].register_forward_hook(grab("f"))]
    with torch.no_grad():
        for b in batches:
            model(**b)
            reference(**b)
    for h in handles:
        h.remove()
    return sum(((q - f) ** 2).sum().item() for q, f in zip(outs["q"], outs["f"]))


def quantize(model: nn.Module, scheme: str, batches: list[dict], algorithm: str | None = None, **algo_fields):
    template = LLMTemplate.get("llama")
    overrides = None
    if algorithm is not None:
        cfg = copy.deepcopy(template.algorithm_configs[algorithm])
        for k, v in algo_fields.items():
            setattr(cfg, k, v)
        overrides = {algorithm: cfg}
    config = template.get_config(scheme, algorithm=algorithm, algo_configs=overrides)
    return ModelQuantizer(config).quantize_model(model, batches, progress=False)


@pytest.fixture(scope="module")
def batches():
    return token_batches(4, seq=32)


def test_scaling_keeps_the_float_model(batches):
    reference = outlier_llama()
    model = quantize(outlier_llama(), "uint4_wo_64", batches, "awq", clip_search=False)
    changed = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(changed, reference.model.layers[0].input_layernorm.weight)  # scales were folded
    with torch.no_grad(), quantizers_off(model):
        for b in batches:
            assert _rel(model(**b).logits, reference(**b).logits) < 1e-5


def test_awq_lowers_block_error_versus_rounding(batches):
    reference = outlier_llama()
    rtn = block0_error(quantize(outlier_llama(), "uint4_wo_64", batches), reference, batches)
    scaled = block0_error(quantize(outlier_llama(), "uint4_wo_64", batches, "awq", clip_search=False), reference,
                          batches)
    clipped = block0_error(quantize(outlier_llama(), "uint4_wo_64", batches, "awq"), reference, batches)
    # measured: 20.40 -> 11.90 (scaling) -> 7.01 (scaling + clipping; 7.39 clipping both ends together only,
    # and not q/k)
    assert rtn == pytest.approx(20.40, rel=0.02)
    assert scaled / rtn == pytest.approx(0.583, rel=0.02)
    assert clipped / scaled == pytest.approx(0.589, rel=0.02)


def test_candidates_start_with_rounding_and_are_normalised():
    m = torch.tensor([0.5, 1.0, 4.0, 8.0])
    cands = awq_candidates(m, 4)
    assert torch.equal(cands[0], torch.ones(4))
    s = m.pow(0.5)
    torch.testing.assert_close(cands[2], s / (s.max() * s.min()).sqrt())
    for c in cands:
        torch.testing.assert_close(c.max() * c.min(), torch.tensor(1.0))


@pytest.mark.parametrize("exclude", [[], ["*q_proj", "*k_proj"]])
def test_clipping_clips_every_layer_but_the_excluded_ones(batches, exclude):
    reference = outlier_llama()
    # only up -> down is scaled, so q/k/v/o/gate weights change only by clipping
    model = quantize(outlier_llama(), "uint4_wo_64", batches, "awq",
                     scaling_layers=[ScalingPair("mlp.up_proj", ["mlp.down_proj"])], clip_exclude=exclude)
    for i, block in enumerate(model.model.layers):
        ref = reference.model.layers[i]
        clipped = [(block.self_attn.v_proj, ref.self_attn.v_proj), (block.self_attn.o_proj, ref.self_attn.o_proj),
                   (block.mlp.gate_proj, ref.mlp.gate_proj)]
        for name in ("q_proj", "k_proj"):
            pair = (getattr(block.self_attn, name), getattr(ref.self_attn, name))
            if exclude:
                assert torch.equal(pair[0].weight, pair[1].weight)
            else:
                clipped.append(pair)
        for lin, ref_lin in clipped:
            w, w0 = lin.weight, ref_lin.weight
            assert not torch.equal(w, w0)
            assert (w.abs() <= w0.abs() + 1e-7).all()  # clipping only shrinks magnitudes
            assert ((w == w0) | ((w - w0).abs() > 0)).all()


def test_clip_layer_never_increases_the_output_error():
    torch.manual_seed(0)
    layer = QuantLinear(128, 32, False, QLayerConfig(weight=Uint4PerGroupSpec(group_size=32).to_quantization_spec()))
    with torch.no_grad():
        layer.weight.normal_()
        layer.weight[:, 3] *= 8  # an outlier column: clipping its groups pays off
    x = torch.randn(256, 128)
    w0 = layer.weight.detach().clone()

    def err() -> float:
        with torch.no_grad():
            layer.update_weight_qparams()
            return ((x @ (layer.quantized_weight() - w0).t()) ** 2).sum().item()

    before = err()
    ratios = clip_layer(layer, x, num_grid=20)
    assert ratios.shape == (32, 4, 2)  # (low, high) per row and group
    assert ratios.min() < 1.0 and ratios.max() <= 1.0 and ratios.min() >= 0.5
    assert (ratios[..., 0] != ratios[..., 1]).any()  # some groups clip one end more than the other
    after = err()
    assert after < before
    # the weight is clamped to exactly the chosen ranges (the search clamps with maximum / minimum)
    lo, hi = w0.view(32, 4, 32).amin(-1), w0.view(32, 4, 32).amax(-1)
    expected = torch.clamp(w0.view(32, 4, 32), (lo * ratios[..., 0])[..., None], (hi * ratios[..., 1])[..., None])
    assert torch.equal(layer.weight.detach(), expected.reshape(32, 128))
    with torch.no_grad():  # the refinement of each end alone improves on clipping both ends together
        layer.weight.copy_(w0)
    clip_layer(layer, x, num_grid=20, refine_rounds=0)
    assert after < err()


def _exhaustive_clip(w: torch.Tensor, x: torch.Tensor, spec, g: int, num_grid: int, rounds: int = 2):
    """Reference coordinate descent of clip_layer, every group evaluated in every sweep, errors from
    the quantized weight's outputs on x (no Gram matrices)."""
    n, k = w.shape
    wg = w.view(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)

    def error(r_lo, r_hi):
        clipped = torch.clamp(wg, (lo * r_lo)[..., None], (hi * r_hi)[..., None]).reshape(n, k)
        d = (fake_quantize(clipped, spec) - w).view(n, k // g, g)
        return torch.einsum("tjg,njg->tnj", x.view(-1, k // g, g).double(), d.double()).pow(2).sum(0)

    best_lo, best_hi = torch.ones_like(lo), torch.ones_like(hi)
    best = error(best_lo, best_hi)
    ratios = [1.0 - 0.5 * i / num_grid for i in range(1, num_grid)]

    def consider(r_lo, r_hi):
        nonlocal best, best_lo, best_hi
        err = error(r_lo, r_hi)
        better = err < best * (1 - 1e-9)
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, r_lo, best_lo), torch.where(better, r_hi, best_hi)

    for r in ratios:
        consider(torch.full_like(lo, r), torch.full_like(hi, r))
    for _ in range(rounds):
        fixed = best_lo
        for r in ratios:
            consider(fixed, torch.full_like(hi, r))
        fixed = best_hi
        for r in ratios:
            consider(torch.full_like(lo, r), fixed)
    return torch.stack([best_lo, best_hi], -1)


@pytest.mark.parametrize("spec_cls,kwargs,tokens", [(Uint4PerGroupSpec, {"group_size": 16}, 512),
                                                    (Uint4PerGroupSpec, {"group_size": 32}, 16),  # no Gram
                                                    (Int4PerChannelSpec, {}, 512)])
def test_clip_layer_skips_only_sweeps_that_cannot_win(spec_cls, kwargs, tokens):
    """From the second round on, clip_layer re-searches only the groups whose other end moved: the
    ranges it picks are those of the exhaustive coordinate descent (float64 errors, every group in
    every sweep)."""
    torch.manual_seed(1)
    spec = spec_cls(**kwargs).to_quantization_spec()
    layer = QuantLinear(64, 24, False, QLayerConfig(weight=spec))
    with torch.no_grad():
        layer.weight.normal_()
        layer.weight[:, 5] *= 6
    x = torch.randn(tokens, 64) * torch.linspace(0.2, 2.0, 64)
    w0 = layer.weight.detach().clone()
    ratios = clip_layer(layer, x, num_grid=10)
    expected = _exhaustive_clip(w0, x, spec, kwargs.get("group_size", 64), num_grid=10)
    assert (ratios != 1).any() and (ratios[..., 0] != ratios[..., 1]).any()  # both kinds of steps won
    assert torch.equal(ratios, expected)


def test_gqa_v_to_o_pair_is_skipped_with_a_log_line(batches, caplog):
    reference = outlier_llama()  # 4 heads, 2 K/V heads: v_proj is half as wide as o_proj's input
    pair = ScalingPair("self_attn.v_proj", ["self_attn.o_proj"])
    with caplog.at_level(logging.INFO, logger="quark.torch.algorithm.scaling"):
        model = quantize(outlier_llama(), "uint4_wo_64", batches, "awq", clip_search=False,
                         scaling_layers=[pair, ScalingPair("mlp.up_proj", ["mlp.down_proj"])])
    assert "self_attn.v_proj -> ['self_attn.o_proj'] skipped in 2 of 2 blocks" in caplog.text
    for i, block in enumerate(model.model.layers):
        assert torch.equal(block.self_attn.v_proj.weight, reference.model.layers[i].self_attn.v_proj.weight)
        assert torch.equal(block.self_attn.o_proj.weight, reference.model.layers[i].self_attn.o_proj.weight)
        assert not torch.equal(block.mlp.down_proj.weight, reference.model.layers[i].mlp.down_proj.weight)


@pytest.mark.parametrize("pair", [ScalingPair("post_attention_layernorm", ["mlp.gate_proj", "mlp.upproj"], "mlp"),
                                  ScalingPair("mlp.no_such_op", ["mlp.down_proj"])])
def test_missing_pair_name_is_a_clear_error(batches, pair):
    missing = "mlp.upproj" if "mlp.upproj" in pair.layers else "mlp.no_such_op"
    with pytest.raises(ValueError, match=missing):
        quantize(tiny_llama(hidden=128), "uint4_wo_64", batches, "awq", scaling_layers=[pair])


def test_inspect_module_must_exist(batches):
    pair = ScalingPair("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "feed_forward")
    with pytest.raises(ValueError, match="feed_forward"):
        quantize(tiny_llama(hidden=128), "uint4_wo_64", batches, "awq", scaling_layers=[pair])


class OffsetNorm(nn.Module):
    """A Gemma-style norm: ``norm(x) * (1 + w)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


@pytest.mark.parametrize("norm_cls", [OffsetNorm, nn.LayerNorm])
def test_fold_is_exact_for_offset_norms_and_layernorm(norm_cls):
    torch.manual_seed(0)
    norm, lin = norm_cls(16), nn.Linear(16, 8)
    if isinstance(norm, nn.LayerNorm):
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = lin(norm(x))
        s = torch.rand(16) * 3 + 0.2
        fold(Site(ScalingPair("norm", ["lin"]), norm, {"lin": lin}, None), s)
        torch.testing.assert_close(lin(norm(x)), before, rtol=1e-5, atol=1e-5)


def test_config_round_trip_keeps_defaults():
    cfg = LLMTemplate.get("llama").algorithm_configs["awq"]
    assert isinstance(cfg, AWQConfig) and cfg.num_grid == 20
    assert cfg.clip_exclude == []  # q/k are clipped too (measured: see AWQConfig.clip_exclude)
