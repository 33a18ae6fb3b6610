"""GPTQ: the shared solver on single layers (every weight format), and the block algorithm on a tiny llama."""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from quark.torch import LLMTemplate
from quark.torch.algorithm import get_algorithm
from quark.torch.algorithm.gptq import GPTQ, layer_groups
from quark.torch.algorithm.hessian_solver import (
    Gram,
    damp,
    inverse_cholesky,
    quantize_weight,
    search_clipped_qparams,
)
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.algo_configs import GPTQConfig
from quark.torch.quantization.modules import QuantLinear
from quark.torch.quantization.tensor_quantize import compute_qparams, fake_quantize
from tests.helpers import tiny_llama, token_batches

FORMATS = ["int4_wo_32", "uint4_wo_64", "int4_wo_per_channel", "uint4_wo_per_channel", "int8", "fp8", "ptpc_fp8",
           "mxfp4", "mxfp6_e2m3", "mx6", "bfp16", "amdfp4", "int4_fp8", "nvfp4"]


def weight_spec(scheme: str):
    return LLMTemplate.get_scheme(scheme).config.weight


def layer_problem(seed: int = 0, rows: int = 48, n: int = 128, tokens: int = 2048):
    """A weight and correlated inputs (what makes error compensation pay off)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, n, generator=g)
    X = torch.randn(tokens, n, generator=g) @ torch.randn(n, n, generator=g) * 0.2
    return W, X


def hessian(X: torch.Tensor) -> torch.Tensor:
    gram = Gram()
    for chunk in X.split(500):
        gram.add_batch(chunk)
    return gram.value


def mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of elements that differ beyond float32 rounding (a group scale one ulp off moves
    every element of the group by an ulp; a different rounding decision moves it by a grid step)."""
    return (~torch.isclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)).double().mean().item()


def out_err(Q: torch.Tensor, W: torch.Tensor, X: torch.Tensor) -> float:
    return ((Q - W) @ X.T).pow(2).sum().item()


def test_gram_is_the_running_mean_hessian():
    _, X = layer_problem(tokens=1234)
    torch.testing.assert_close(hessian(X), 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-5)


def test_inverse_cholesky_factor():
    _, X = layer_problem()
    H, _ = damp(hessian(X), 0.01)
    U = inverse_cholesky(H)
    assert torch.equal(U, U.triu())
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H.double()).float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("n", [100, 777, 1600])  # a plain product; odd halves; two levels of halves
def test_triangular_products_by_halves(n):
    """triu(A B^T, 1) and T U of upper-triangular matrices: the float64 full products, and exactly
    zero below the diagonal."""
    from quark.torch.algorithm.hessian_solver import strict_upper_abt, upper_mm

    g = torch.Generator().manual_seed(n)
    A, B = (torch.randn(n, n, generator=g).triu() for _ in range(2))
    S = strict_upper_abt(A, B)
    T = S / n ** 0.5
    R = upper_mm(T, B)
    assert torch.equal(S, S.triu(1)) and torch.equal(R, R.triu())
    torch.testing.assert_close(S.double(), torch.triu(A.double() @ B.double().T, 1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(R.double(), T.double() @ B.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [200, 600])  # one triangular solve; halves down to 150 columns
def test_inverse_cholesky_is_the_upper_factor_of_the_inverse(n):
    """U is the unique upper factor of H^-1 with a positive diagonal: the float64 reference (the
    upper Cholesky factor of inv(H)) to float32 accuracy, also through the inverse by halves."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    H = X.T @ X / len(X)
    H.diagonal().add_(0.01 * H.diagonal().mean())
    expected = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    U = inverse_cholesky(H.float())
    assert U.dtype == torch.float32 and torch.equal(U, U.triu())
    assert ((U.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("scheme", FORMATS)
def test_identity_hessian_is_rounding_to_nearest(scheme):
    W, _ = layer_problem()
    spec = weight_spec(scheme)
    sol = quantize_weight(W, torch.eye(W.shape[1]), spec, block_size=32)
    assert torch.equal(sol.Q, fake_quantize(W, spec))


@pytest.mark.parametrize("scheme", ["int4_wo_32", "uint4_wo_64", "mxfp4"])
def test_identity_hessian_with_clip_search_is_rounding_with_the_searched_scales(scheme):
    W, _ = layer_problem()
    spec = weight_spec(scheme)
    ones = torch.ones(W.shape[1])
    sol = quantize_weight(W, torch.eye(W.shape[1]), spec, block_size=32, static_groups=True, clip_steps=20)
    searched = search_clipped_qparams(W, spec, ones, 20, 0.6)
    assert torch.equal(sol.Q, fake_quantize(W, spec, searched))
    minmax = ((fake_quantize(W, spec) - W) ** 2).sum()
    assert ((sol.Q - W) ** 2).sum() < minmax


def test_clip_search_by_hand():
    # one int4 group of 32 (symmetric, scale amax / 7.5): an outlier 7.0 and 31 values 0.4. Min-max
    # gives scale 14/15 and rounds every 0.4 to 0 (0.43 steps); the shrink factor 0.9 still rounds them
    # to 0 (0.48 steps), 0.8 to one step 0.747 (error 0.35 each), 0.7 to 0.653 (0.25), 0.6 to 0.56
    # (0.16; the outlier is clipped to 7 * 0.56 = 3.92)
    spec = weight_spec("int4_wo_32")
    w = torch.full((1, 32), 0.4)
    w[0, 0] = 7.0
    small_matter = torch.full((32,), 100.0)
    small_matter[0] = 1.0
    qp = search_clipped_qparams(w, spec, small_matter, steps=4, lowest=0.6)
    assert qp.scale.item() == pytest.approx(0.6 * 7 / 7.5)
    outlier_matters = torch.ones(32)
    outlier_matters[0] = 1e6
    scale = search_clipped_qparams(w, spec, outlier_matters, steps=4, lowest=0.6).scale
    assert scale.item() == (torch.tensor(7.0) / 7.5).item()


def reference_clip_search(w, spec, importance, steps, lowest):
    """The search one candidate at a time, element by element (what the vectorised search must equal)."""
    best = compute_qparams(w, spec)
    rows, k = w.shape[0], best.scale.numel()

    def loss(qp):
        err = (fake_quantize(w, spec, qp) - w) ** 2 * importance[None, :]
        return err.sum().reshape(1) if k == 1 else err.reshape(rows, k // rows, -1).sum(-1).reshape(-1)

    scale, zp = best.scale.clone().reshape(-1), None if best.zero_point is None else best.zero_point.clone().reshape(-1)
    best_loss = loss(best)
    for i in range(1, steps + 1):
        qp = compute_qparams(w * (1.0 - i * (1.0 - lowest) / steps), spec)
        cur = loss(qp)
        for j in range(cur.numel()):
            if cur[j] < best_loss[j]:
                best_loss[j] = cur[j]
                scale[j] = qp.scale.reshape(-1)[j if k != 1 else 0]
                if zp is not None:
                    zp[j] = qp.zero_point.reshape(-1)[j if k != 1 else 0]
    return scale.reshape(best.scale.shape), None if zp is None else zp.reshape(best.zero_point.shape)


@pytest.mark.parametrize("scheme", ["int4_wo_32", "uint4_wo_64", "uint4_wo_per_channel", "mxfp4", "fp8", "int8"])
@pytest.mark.parametrize("elements", [1 << 20, 1000])
def test_clip_search_equals_the_candidate_by_candidate_search(scheme, elements, monkeypatch):
    """All candidates at once (in row chunks of any size) choose exactly what one candidate at a time
    chooses, per qparam element."""
    from quark.torch.algorithm import hessian_solver

    monkeypatch.setattr(hessian_solver, "SEARCH_ELEMENTS", elements)
    W, X = layer_problem(seed=4)
    W[:, 5] *= 6  # outliers worth clipping in some groups
    spec = weight_spec(scheme)
    importance = (X ** 2).mean(0)
    got = search_clipped_qparams(W, spec, importance, 20, 0.6)
    scale, zp = reference_clip_search(W, spec, importance, 20, 0.6)
    assert torch.equal(got.scale, scale)
    assert (got.zero_point is None and zp is None) or torch.equal(got.zero_point, zp)
    if scheme != "fp8":  # (a per-tensor fp8 scale gains nothing from clipping here)
        assert not torch.equal(got.scale, compute_qparams(W, spec).scale)  # the search did clip somewhere


@pytest.mark.parametrize("scheme", FORMATS)
@pytest.mark.parametrize("desc_act,static_groups", [(False, False), (True, True), (True, False)])
def test_gptq_result_is_its_own_fake_quantization_and_beats_rounding(scheme, desc_act, static_groups):
    W, X = layer_problem()
    spec = weight_spec(scheme)
    sol = quantize_weight(W, hessian(X), spec, block_size=32, desc_act=desc_act, static_groups=static_groups)
    (qp,) = sol.qparams
    assert torch.equal(fake_quantize(sol.Q, spec, qp), sol.Q)  # what the QuantLinear will compute
    assert out_err(sol.Q, W, X) < 0.6 * out_err(fake_quantize(W, spec), W, X)


def test_static_groups_are_the_natural_groups_of_the_original_weight():
    W, X = layer_problem()
    spec = weight_spec("uint4_wo_64")
    sol = quantize_weight(W, hessian(X), spec, desc_act=True, static_groups=True)
    rtn = compute_qparams(W, spec)
    assert torch.equal(sol.qparams[0].scale, rtn.scale) and torch.equal(sol.qparams[0].zero_point, rtn.zero_point)


def test_dynamic_groups_take_their_qparams_when_reached():
    W, X = layer_problem()
    spec = weight_spec("int4_wo_32")
    sol = quantize_weight(W, hessian(X), spec, block_size=128)
    rtn = compute_qparams(W, spec).scale
    scale = sol.qparams[0].scale
    assert scale.shape == rtn.shape == (48, 4)
    assert torch.equal(scale[:, 0], rtn[:, 0])  # the first group is reached before any update
    assert not torch.equal(scale[:, 1:], rtn[:, 1:])  # later groups see the compensated weights


@pytest.mark.parametrize("desc_act", [False, True])
def test_lazy_batches_do_not_change_the_result(desc_act):
    """Block size only changes when later columns receive their updates (and when group qparams
    read pending updates): results agree up to float32 rounding of the sums."""
    W, X = layer_problem(rows=64, n=96)
    H = hessian(X)
    spec = weight_spec("int4_wo_32")
    one = quantize_weight(W, H, spec, block_size=1, desc_act=desc_act).Q
    for bs in (7, 32, 96):
        other = quantize_weight(W, H, spec, block_size=bs, desc_act=desc_act).Q
        assert mismatch(other, one) < 2e-3


def test_matches_the_textbook_obs_loop():
    """Against a direct implementation of GPTQ's update with explicitly eliminated inverse
    Hessians (float64, per-channel grid fixed up front): same quantized weight."""
    W, X = layer_problem(rows=32, n=64)
    H = hessian(X)
    spec = weight_spec("int4_wo_per_channel")
    sol = quantize_weight(W, H, spec, damp_percent=0.01, block_size=16)
    qp = compute_qparams(W, spec)
    Hd = damp(H, 0.01)[0].double()
    Hinv = torch.linalg.inv(Hd)
    w = W.double().clone()
    Q = torch.zeros_like(w)
    for j in range(W.shape[1]):
        Q[:, j] = fake_quantize(w[:, j:j + 1].float(), spec, qp).double()[:, 0]
        w[:, j:] -= ((w[:, j] - Q[:, j]) / Hinv[0, 0])[:, None] * Hinv[0][None]
        Hinv = Hinv[1:, 1:] - Hinv[1:, :1] @ Hinv[:1, 1:] / Hinv[0, 0]
    assert mismatch(sol.Q, Q) < 2e-3


def test_dead_inputs_get_zero_weights():
    W, X = layer_problem()
    X[:, 5] = 0
    sol = quantize_weight(W, hessian(X), weight_spec("int4_wo_32"))
    assert (sol.Q[:, 5] == 0).all()


def test_stacked_layers_equal_separate_solves():
    """Rows are independent: q/k/v solved as one matrix give each layer's own solution; per-tensor
    qparams stay per layer."""
    W, X = layer_problem(rows=40)
    H = hessian(X)
    spec = weight_spec("int8")
    both = quantize_weight(W, H, spec, row_splits=[16, 24])
    a = quantize_weight(W[:16], H, spec)
    b = quantize_weight(W[16:], H, spec)
    assert mismatch(both.Q, torch.cat([a.Q, b.Q])) < 2e-3
    assert torch.equal(both.qparams[0].scale, a.qparams[0].scale)
    assert torch.equal(both.qparams[1].scale, b.qparams[0].scale)


# ---------------------------------------------------------------------------------------------
# the block algorithm
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batches():
    return token_batches(8, seq=32)


def quantize(model: nn.Module, scheme: str, batches: list[dict], algorithm: str | None = None, **fields):
    template = LLMTemplate.get("llama")
    overrides = None
    if algorithm is not None:
        cfg = copy.deepcopy(template.algorithm_configs[algorithm])
        for k, v in fields.items():
            setattr(cfg, k, v)
        overrides = {algorithm: cfg}
    config = template.get_config(scheme, algorithm=algorithm, algo_configs=overrides)
    return ModelQuantizer(config).quantize_model(model, batches, progress=False)


def output_error(model: nn.Module, reference: nn.Module, batches: list[dict], block: int | None = 0) -> float:
    """Squared error against the float model: of one block's output, or (None) of the logits."""
    outs = {"q": [], "f": []}
    handles = []
    if block is not None:
        for key, m in (("q", model), ("f", reference)):
            handles.append(m.model.layers[block].register_forward_hook(
                lambda _m, _a, out, key=key: outs[key].append(out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        for b in batches:
            lq, lf = model(**b).logits, reference(**b).logits
            if block is None:
                outs["q"].append(lq)
                outs["f"].append(lf)
    for h in handles:
        h.remove()
    return sum(((q - f) ** 2).sum().item() for q, f in zip(outs["q"], outs["f"]))


@pytest.mark.parametrize("scheme,ratio", [("int4_wo_32", 0.445), ("mxfp4", 0.678), ("fp8", 0.707)])
def test_gptq_lowers_the_block_error_versus_rounding(batches, scheme, ratio):
    reference = tiny_llama()
    rtn = output_error(quantize(tiny_llama(), scheme, batches), reference, batches)
    gptq = output_error(quantize(tiny_llama(), scheme, batches, "gptq"), reference, batches)
    assert gptq / rtn == pytest.approx(ratio, rel=0.02)  # measured


def test_weights_hold_the_result_and_keep_its_qparams(batches):
    model = quantize(tiny_llama(), "int4_wo_32", batches, "gptq")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.weight_qparams_fixed for m in layers)
    with torch.no_grad():
        for m in layers:
            scale = m.weight_quantizer.scale.clone()
            m.update_weight_qparams()  # what the quantizer loop does after the algorithms: keeps them
            assert torch.equal(m.weight_quantizer.scale, scale)
            assert torch.equal(m.quantized_weight(), m.weight)  # the stored weight is the solver's result
        logits = [model(**b).logits for b in batches]
        ModelQuantizer.freeze(model)
        for b, before in zip(batches, logits):
            assert torch.equal(model(**b).logits, before)


def test_groups_are_quantized_in_order_on_the_quantized_stream(batches, monkeypatch):
    """Group 2 (o_proj) sees the inputs produced by the already-quantized group 1 (q/k/v): its
    Hessian equals the one from the final model, whose o_proj inputs depend only on q/k/v."""
    order, hessians = [], {}
    original = GPTQ.solve_stack

    def spy(self, weight, stats, spec, splits, config):
        order.append(len(splits))
        hessians.setdefault(len(order), stats["H"].value.clone())
        return original(self, weight, stats, spec, splits, config)

    monkeypatch.setattr(GPTQ, "solve_stack", spy)
    model = quantize(tiny_llama(layers=1), "int4_wo_32", batches, "gptq",
                     inside_layer_modules=[["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
                                           ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]])
    assert order == [3, 1, 2, 1]  # q/k/v stacked, o, gate/up stacked, down
    expected = Gram()
    o_proj = model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda _m, args: expected.add_batch(args[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    torch.testing.assert_close(hessians[2], expected.value, rtol=1e-5, atol=1e-6)


def test_layer_groups_first_match_wins_and_empty_groups_are_dropped():
    model = tiny_llama(layers=1)
    config = LLMTemplate.get("llama").get_config("int4_wo_32")
    ModelQuantizer(config)._swap_linears(model)

    class Ctx:
        block = model.model.layers[0]

        def linears(self, patterns):
            from quark.torch.algorithm import BlockContext

            return BlockContext.linears(self, patterns)

    groups = layer_groups(Ctx(), [["mlp.*"], ["mlp.down_proj", "self_attn.o_proj"], ["nothing"], ["*"]])
    assert [sorted(g) for g in groups] == [
        ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"],
        ["self_attn.o_proj"],
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
    ]
    assert [sorted(g) for g in layer_groups(Ctx(), [])] == [sorted(n for n, _ in Ctx.block.named_modules()
                                                                  if isinstance(_, QuantLinear))]


def test_static_activation_quantizers_are_calibrated_after_gptq(batches):
    """int8 has static input quantizers: off while GPTQ collects, calibrated afterwards."""
    reference = tiny_llama()
    model = quantize(tiny_llama(), "int8", batches, "gptq")
    assert all(m.input_quantizer.has_qparams for m in model.modules() if isinstance(m, QuantLinear))
    rtn = output_error(quantize(tiny_llama(), "int8", batches), reference, batches, block=None)
    assert output_error(model, reference, batches, block=None) < rtn


def test_registered_under_its_name():
    algo = get_algorithm("gptq")
    assert isinstance(algo, GPTQ) and algo.name == "gptq" and not algo.needs_float_stream
    assert isinstance(LLMTemplate.get("llama").algorithm_configs["gptq"], GPTQConfig)


@pytest.mark.parametrize("element", ["fp4", "int8"])
def test_dtype_mx_specs(element):
    """``dtype=mx`` (always blocks of 32) is quantized column by column inside its block."""
    from quark.torch.quantization.config.config import QTensorConfig

    spec = QTensorConfig(dtype="mx", mx_element_dtype=element, qscheme="per_group", group_size=32, is_dynamic=False)
    W, X = layer_problem()
    assert torch.equal(quantize_weight(W, torch.eye(W.shape[1]), spec).Q, fake_quantize(W, spec))
    sol = quantize_weight(W, hessian(X), spec, desc_act=True)
    assert torch.equal(fake_quantize(sol.Q, spec, sol.qparams[0]), sol.Q)
    assert out_err(sol.Q, W, X) < 0.6 * out_err(fake_quantize(W, spec), W, X)


@pytest.mark.parametrize("flush", [1, 700, 10_000])
def test_gram_buffers_batches_without_changing_the_value(flush, monkeypatch):
    """However batches are grouped into products, the Gram is 2/N sum a^T b over all N tokens
    (float64 reference), with the cross term and the Hessian in one object each."""
    monkeypatch.setattr(Gram, "FLUSH_TOKENS", flush)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1300, 24, generator=g), torch.randn(1300, 24, generator=g)
    H, D = Gram(), Gram()
    for ca, cb in zip(a.split(300), b.split(300)):
        H.add_batch(ca)
        D.add_batch(ca, cb)
    torch.testing.assert_close(H.value.double(), 2 / 1300 * a.double().T @ a.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(D.value.double(), 2 / 1300 * a.double().T @ b.double(), rtol=1e-5, atol=1e-5)
    assert H.tokens == D.tokens == 1300
    mixed = Gram()  # symmetric batches, then cross ones; a bfloat16 batch is accumulated in float32
    mixed.add_batch(a[:300])
    mixed.add_batch(a[300:600], b[300:600])
    mixed.add_batch(a[600:900].bfloat16(), b[600:900].bfloat16())
    a16, b16 = a[600:900].bfloat16().double(), b[600:900].bfloat16().double()
    expected = a[:300].double().T @ a[:300].double() + a[300:600].double().T @ b[300:600].double() + a16.T @ b16
    torch.testing.assert_close(mixed.value.double(), 2 / 900 * expected, rtol=1e-5, atol=1e-5)
    H.add_batch(a[:10])  # accumulating after reading the value
    torch.testing.assert_close(H.value.double(), 2 / 1310 * (a.double().T @ a.double() + a[:10].double().T @ a[:10].double()),
                               rtol=1e-5, atol=1e-5)


def counted_quantization(monkeypatch, scheme: str, batches: list[dict], **patches):
    """Quantize a tiny llama with GPTQ while counting calls of LlamaAttention and LlamaMLP;
    ``patches`` maps "Class.attr" of quark.torch.algorithm.gptq to a replacement for the run."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

    from quark.torch.algorithm import gptq

    calls = {"attn": 0, "mlp": 0}

    def counting(cls, key):
        original = cls.forward

        def forward(self, *args, **kwargs):
            calls[key] += 1
            return original(self, *args, **kwargs)

        return forward

    with monkeypatch.context() as m:
        m.setattr(LlamaAttention, "forward", counting(LlamaAttention, "attn"))
        m.setattr(LlamaMLP, "forward", counting(LlamaMLP, "mlp"))
        for target, value in patches.items():
            cls, attr = target.split(".")
            m.setattr(getattr(gptq, cls), attr, value)
        model = quantize(tiny_llama(), scheme, batches, "gptq")
    return model, calls


def same_logits(a: nn.Module, b: nn.Module, batches: list[dict]) -> bool:
    with torch.no_grad():
        return all(torch.equal(a(**x).logits, b(**x).logits) for x in batches)


@pytest.mark.parametrize("scheme,replays", [("int4_wo_32", True), ("mxfp4", True), ("int8", False)])
def test_output_pass_replays_attention_without_changing_the_result(batches, monkeypatch, scheme, replays):
    """The loop's output pass replays the attention outputs GPTQ memoized with the final weights,
    and the MLP by running down_proj alone on the inputs kept from the down_proj pass: the quantized
    model is bit-identical to one whose output pass recomputes them, and the attention and the MLP
    run one time fewer per batch and block. With static activation quantizers (int8: off during
    GPTQ's passes, calibrated before the output pass) nothing is replayed."""
    replayed, n_replayed = counted_quantization(monkeypatch, scheme, batches)
    plain, n_plain = counted_quantization(monkeypatch, scheme, batches,
                                          **{"GPTQ.output_pass": lambda self, ctx, config: contextlib.nullcontext()})
    saved = len(batches) * len(plain.model.layers) if replays else 0
    assert n_plain["attn"] - n_replayed["attn"] == saved
    assert n_plain["mlp"] - n_replayed["mlp"] == saved
    assert same_logits(replayed, plain, batches)


@pytest.mark.parametrize("scheme", ["int4_wo_32", "mxfp4", "int8"])
def test_attention_is_replayed_from_o_proj_input_without_changing_the_result(batches, monkeypatch, scheme):
    """Once o_proj is final, the gate/up pass replays the attention by running o_proj alone on the
    input kept from the o_proj pass: bit-identical to recomputing the attention, one attention call
    fewer per batch and block."""
    replayed, n_replayed = counted_quantization(monkeypatch, scheme, batches)
    plain, n_plain = counted_quantization(monkeypatch, scheme, batches, **{"BlockRunner._tail": lambda self, layers: None})
    assert n_plain["attn"] - n_replayed["attn"] == len(batches) * len(plain.model.layers)
    assert same_logits(replayed, plain, batches)


def test_a_submodule_that_changes_its_layer_output_is_not_replayed_from_the_layer():
    """The replay from a layer's input needs the submodule to return the layer's output object as is."""
    from quark.torch.algorithm import BlockContext
    from quark.torch.algorithm.gptq import BlockRunner
    from quark.torch.quantization.driver import BlockInputs

    config = LLMTemplate.get("llama").get_config("int4_wo_32")

    class Inner(nn.Module):
        def __init__(self, returns_as_is: bool):
            super().__init__()
            self.a, self.o = nn.Linear(64, 64), nn.Linear(64, 64)
            self.as_is = returns_as_is

        def forward(self, x):
            y = self.o(torch.relu(self.a(x)))
            return y if self.as_is else y * 2

    class Block(nn.Module):
        def __init__(self, as_is: bool):
            super().__init__()
            self.inner, self.after = Inner(as_is), nn.Linear(64, 64)

        def forward(self, x):
            return self.after(self.inner(x))

    for as_is in (True, False):
        torch.manual_seed(0)
        block = Block(as_is)
        ModelQuantizer(config)._swap_linears(block)
        hidden = [torch.randn(2, 4, 64) for _ in range(3)]
        ctx = BlockContext(block, 0, BlockInputs(hidden, [[((), {})] for _ in hidden]))
        runner = BlockRunner(ctx)
        runner.finalize([block.inner.a])
        list(runner.inputs({"inner.o": block.inner.o}))
        assert len(runner._tails.get("inner", {})) == (3 if as_is else 0)
        runner.finalize([block.inner.o])
        with torch.no_grad():
            block.inner.o.weight.mul_(0.5)  # "quantized": the replay must use the final weight
        got = [x["after"] for x in runner.inputs({"after": block.after})]
        with torch.no_grad():
            assert all(torch.equal(g, block.inner(h)) for g, h in zip(got, hidden))


def test_parallel_layers_stop_the_pass_at_the_first_of_them_after_the_first_batch():
    """gate/up read one tensor: the first batch shows it (gate computes, up's hook stops the pass);
    later batches stop at gate's hook, so neither product nor the activation runs again, and every
    batch yields the post-attention norm's output for both."""
    from quark.torch.algorithm import BlockContext
    from quark.torch.algorithm.gptq import BlockRunner
    from quark.torch.quantization.driver import BlockInputs

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.gate, self.up, self.down = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            h = self.norm(x)
            return x + self.down(torch.relu(self.gate(h)) * self.up(h))

    torch.manual_seed(0)
    block = Block()
    ModelQuantizer(LLMTemplate.get("llama").get_config("int4_wo_32"))._swap_linears(block)
    calls = {"gate": 0, "up": 0}
    for name in calls:
        getattr(block, name).register_forward_hook(lambda *_a, name=name: calls.__setitem__(name, calls[name] + 1))
    hidden = [torch.randn(2, 4, 32) for _ in range(4)]
    runner = BlockRunner(BlockContext(block, 0, BlockInputs(hidden, [[((), {})] for _ in hidden])))
    got = list(runner.inputs({"gate": block.gate, "up": block.up}))
    assert calls == {"gate": 1, "up": 0}
    with torch.no_grad():
        for seen, h in zip(got, hidden):
            assert seen["gate"] is seen["up"] and torch.equal(seen["gate"], block.norm(h))


@pytest.mark.parametrize("in_place", [False, True])
def test_a_memoized_output_changed_in_place_is_computed_again(in_place):
    """A final submodule's output is kept as is (no copy) for the next pass; a consumer that changes it
    in place bumps its version counter, and the next pass computes it again instead of replaying the
    changed tensor: every pass sees the true inputs either way."""
    from quark.torch.algorithm import BlockContext
    from quark.torch.algorithm.gptq import BlockRunner
    from quark.torch.quantization.driver import BlockInputs

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.after = nn.Sequential(nn.Linear(32, 32)), nn.Linear(32, 32)

        def forward(self, x):
            y = self.inner(x)
            y = y.mul_(2) if in_place else y * 2
            return self.after(y)

    torch.manual_seed(0)
    block = Block()
    ModelQuantizer(LLMTemplate.get("llama").get_config("int4_wo_32"))._swap_linears(block)
    calls = {"inner": 0}
    block.inner[0].register_forward_hook(lambda *_a: calls.__setitem__("inner", calls["inner"] + 1))
    hidden = [torch.randn(2, 4, 32) for _ in range(3)]
    runner = BlockRunner(BlockContext(block, 0, BlockInputs(hidden, [[((), {})] for _ in hidden])))
    runner.finalize([block.inner[0]])
    for _ in range(3):  # the first pass stores, the next ones replay (or recompute)
        got = [x["after"] for x in runner.inputs({"after": block.after})]
        with torch.no_grad():
            assert all(torch.equal(g, block.inner(h) * 2) for g, h in zip(got, hidden))
    calls["inner"] -= 3 * len(hidden)  # the reference computations above
    assert calls["inner"] == (3 if in_place else 1) * len(hidden)


@pytest.mark.parametrize("budget, cached", [(None, {"self_attn"}), (0, {"self_attn", "mlp.gate_proj", "mlp.up_proj"})])
def test_only_outputs_a_later_pass_reads_are_kept(batches, monkeypatch, budget, cached):
    """At the output pass, the runner holds the attention's outputs (replayed there) and the MLP's
    down_proj tail, not q/k/v/o's or gate/up's outputs (their enclosing module replays instead: those
    were [tokens, features] tensors per layer held to the block's end for nothing). Without the
    budget for down_proj's tail, gate/up's outputs are what the output pass replays, so they stay."""
    from quark.torch.algorithm import gptq

    if budget is not None:
        monkeypatch.setattr(gptq.BlockRunner, "TAIL_BUDGET_BYTES", budget)
    seen = []
    original = gptq.GPTQ.output_pass

    def output_pass(self, ctx, config):
        runner = ctx.scratch[self.name][0]
        seen.append(({n for n, c in runner._cache.items() if c}, {n for n, t in runner._tails.items() if t}))
        return original(self, ctx, config)

    monkeypatch.setattr(gptq.GPTQ, "output_pass", output_pass)
    quantize(tiny_llama(), "int4_wo_32", batches, "gptq")
    assert seen and all(c == cached for c, _ in seen)
    assert all(t == ({"mlp"} if budget is None else set()) for _, t in seen)


def test_widening_layer_inputs_are_only_kept_within_the_budget(batches, monkeypatch):
    """down_proj's inputs are wider than the hidden states: with no budget for them the MLP is
    computed in the output pass (the attention is still replayed), with the same result."""
    kept, n_kept = counted_quantization(monkeypatch, "int4_wo_32", batches)
    recomputed, n_recomputed = counted_quantization(monkeypatch, "int4_wo_32", batches,
                                                    **{"BlockRunner.TAIL_BUDGET_BYTES": 0})
    assert n_recomputed["mlp"] - n_kept["mlp"] == len(batches) * len(kept.model.layers)
    assert n_recomputed["attn"] == n_kept["attn"]
    assert same_logits(kept, recomputed, batches)


@pytest.mark.parametrize("features", [383, 384, 577])
def test_wide_hessians_are_accumulated_by_panels_and_exactly_symmetric(features):
    """From PANEL_MIN_FEATURES on, the Hessian is built from the row panels of its upper triangle and
    mirrored: the float64 reference value, and exactly symmetric."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, features, generator=g)
    H = Gram()
    for chunk in x.split(1000):
        H.add_batch(chunk)
    torch.testing.assert_close(H.value.double(), 2 / 3000 * x.double().T @ x.double(), rtol=1e-5, atol=1e-5)
    if features >= Gram.PANEL_MIN_FEATURES:
        assert torch.equal(H.value, H.value.T)


def test_a_cross_term_after_panels_sees_the_mirrored_lower_triangle():
    """Panels fill only the upper triangle until the value is read; a full (cross-term) product
    arriving after them must first complete the lower one."""
    g = torch.Generator().manual_seed(6)
    n = Gram.PANEL_MIN_FEATURES + 1
    x, a, b = (torch.randn(Gram.FLUSH_TOKENS, n, generator=g) for _ in range(3))
    G = Gram()
    G.add_batch(x)  # one full flush: panels
    G.add_batch(a, b)
    expected = 2 / (2 * Gram.FLUSH_TOKENS) * (x.double().T @ x.double() + a.double().T @ b.double())
    torch.testing.assert_close(G.value.double(), expected, rtol=1e-5, atol=1e-5)


def test_no_replay_after_a_weight_changed_since_gptq(batches, monkeypatch):
    """An algorithm running after GPTQ that changes a weight of the block (here: a spy that scales
    one) makes GPTQ's output pass compute the block instead of replaying stale outputs."""
    from quark.torch.algorithm.gptq import BlockRunner

    entered = []
    original_apply = GPTQ.apply
    original_replay = BlockRunner.replay

    def apply_then_change(self, ctx, config):
        original_apply(self, ctx, config)
        with torch.no_grad():
            ctx.block.mlp.down_proj.weight.mul_(1.0)  # an in-place change, even of no value

    def spy_replay(self):
        entered.append(1)
        return original_replay(self)

    monkeypatch.setattr(GPTQ, "apply", apply_then_change)
    monkeypatch.setattr(BlockRunner, "replay", spy_replay)
    quantize(tiny_llama(), "int4_wo_32", batches, "gptq")
    assert entered == []
    monkeypatch.setattr(GPTQ, "apply", original_apply)
    quantize(tiny_llama(), "int4_wo_32", batches, "gptq")
    assert len(entered) == len(tiny_llama().model.layers)
