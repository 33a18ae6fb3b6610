"""Qronos: the efficient form against the paper's iteration, and the block algorithm on a tiny llama."""

import pytest
import torch

from quark.torch.algorithm import get_algorithm
from quark.torch.algorithm.hessian_solver import Gram, quantize_weight
from quark.torch.algorithm.qronos import Qronos, qronos_quantize
from quark.torch.quantization.tensor_quantize import compute_qparams, fake_quantize
from tests.algorithm.test_gptaq import drifted_layer
from tests.algorithm.test_gptq import mismatch, output_error, quantize, weight_spec
from tests.helpers import tiny_llama, token_batches


@pytest.fixture(scope="module")
def batches():
    return token_batches(8, seq=32)


def grams(X: torch.Tensor, Xq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    H, G = Gram(), Gram()
    H.add_batch(Xq)
    G.add_batch(Xq, X)
    return H.value, G.value


def paper_iteration(W, X, Xq, spec):
    """Qronos as the paper states it, step by step on the token matrices (float64): round the best
    value of column t given the quantized past and the current future, then refit every later
    column by least squares given the quantized past."""
    qp = compute_qparams(W, spec)
    W, X, Xq = W.double(), X.double(), Xq.double()
    target = X @ W.T  # [tokens, rows]
    v = W.clone()
    Q = torch.zeros_like(W)
    n = W.shape[1]
    for t in range(n):
        r = target - Xq[:, :t] @ Q[:, :t].T - Xq[:, t + 1:] @ v[:, t + 1:].T
        p = (Xq[:, t] @ r) / (Xq[:, t] @ Xq[:, t])
        Q[:, t] = fake_quantize(p[:, None].float(), spec, qp).double()[:, 0]  # per-channel grid
        if t + 1 < n:
            rest = target - Xq[:, : t + 1] @ Q[:, : t + 1].T
            v[:, t + 1:] = torch.linalg.lstsq(Xq[:, t + 1:], rest).solution.T
    return Q


def test_efficient_form_equals_the_papers_iteration():
    W, X, Xq = drifted_layer(rows=16, n=32, tokens=1024)
    spec = weight_spec("int4_wo_per_channel")
    H, G = grams(X, Xq)
    sol = qronos_quantize(W, H, G, spec, alpha=1e-7, beta=1.0)
    assert mismatch(sol.Q, paper_iteration(W, X, Xq, spec)) == 0.0  # equal up to float rounding


def test_without_drift_qronos_is_gptq():
    """With identical streams (G = H) and vanishing damping the first step is GPTQ's first step, and
    the rest is GPTQ's diffusion."""
    W, X, _ = drifted_layer(rows=32, n=64)
    # Qronos's first column p = (W G^T - ...) / H_00 is W's first column up to float rounding. Under
    # FORMATS.md 2a.1 a group's most negative element sits exactly on the tie -7.5 steps, so a
    # rounding-sized difference there flips its code (-8 or -7) and GPTQ's diffusion spreads that over
    # the row: keep column 0 off the groups' extremes
    W[:, 0] *= 0.5
    H, G = grams(X, X)
    spec = weight_spec("int4_wo_32")
    qronos = qronos_quantize(W, H, G, spec, alpha=1e-7, beta=1.0).Q
    gptq = quantize_weight(W, H, spec, damp_percent=1e-7).Q
    assert mismatch(qronos, gptq) == 0.0


def test_qronos_lowers_the_float_target_error_of_a_layer():
    W, X, Xq = drifted_layer()
    H, G = grams(X, Xq)
    spec = weight_spec("int4_wo_32")
    sol = qronos_quantize(W, H, G, spec)
    assert torch.equal(fake_quantize(sol.Q, spec, sol.qparams[0]), sol.Q)
    gptq = quantize_weight(W, H, spec).Q

    def asym(Q):  # || X w - X~ q ||^2
        return (Xq @ Q.T - X @ W.T).pow(2).sum().item()

    # measured 0.585: Qronos refits every later column to the float target (the least-squares floor
    # of this drift is 0.53 of GPTQ's error)
    assert asym(sol.Q) / asym(gptq) == pytest.approx(0.585, rel=0.02)


@pytest.mark.parametrize("scheme,ratio", [("int4_wo_32", 0.205), ("mxfp4", 0.398)])
def test_qronos_lowers_the_block_error_versus_rounding(batches, scheme, ratio):
    reference = tiny_llama()
    rtn = output_error(quantize(tiny_llama(), scheme, batches), reference, batches)
    qronos = output_error(quantize(tiny_llama(), scheme, batches, "qronos"), reference, batches)
    gptq = output_error(quantize(tiny_llama(), scheme, batches, "gptq"), reference, batches)
    assert qronos / rtn == pytest.approx(ratio, rel=0.02)  # measured
    assert qronos < gptq


def test_cross_term_pairs_quantized_and_float_inputs(batches, monkeypatch):
    """G accumulates x~^T x with x the float model's input of the same layer and tokens; for
    down_proj (fewer outputs than inputs) W G^T accumulates y^T x~ with y the float model's output
    of that layer instead."""
    seen = []
    original = Qronos.accumulate

    def spy(self, stats, x_quant, x_float, y_float=None):
        seen.append((x_quant, x_float, y_float))
        return original(self, stats, x_quant, x_float, y_float)

    monkeypatch.setattr(Qronos, "accumulate", spy)
    model = quantize(tiny_llama(layers=1), "int4_wo_32", batches, "qronos")
    reference = tiny_llama(layers=1)
    down_proj = reference.model.layers[0].mlp.down_proj
    assert down_proj.out_features < down_proj.in_features
    expected, outputs = [], []
    h = down_proj.register_forward_pre_hook(lambda _m, a: expected.append(a[0]))
    h2 = down_proj.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    with torch.no_grad():
        for b in batches:
            reference(**b)
    h.remove()
    h2.remove()
    assert all(y is None for _, _, y in seen[:3 * len(batches)])  # q/k/v, o, gate/up: more rows than inputs
    down = seen[3 * len(batches):]
    assert len(down) == len(expected)
    for (xq, xf, yf), want, y in zip(down, expected, outputs):
        torch.testing.assert_close(xf, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(yf, y, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(xq, xf)  # the quantized stream differs
    assert all(m.weight_qparams_fixed for m in model.modules() if hasattr(m, "weight_qparams_fixed"))


def test_float_outputs_give_the_same_solution_as_the_cross_term():
    """W G^T from the float outputs (y = X W^T) equals W (X~^T X)^T: the same quantized weight."""
    W, X, Xq = drifted_layer(rows=24, n=64)
    H, G = grams(X, Xq)
    WG = Gram()
    WG.add_batch(X @ W.T, Xq)
    spec = weight_spec("int4_wo_32")
    via_g = qronos_quantize(W, H, G, spec)
    via_outputs = qronos_quantize(W, H, None, spec, WG=WG.value)
    assert mismatch(via_g.Q, via_outputs.Q) == 0.0  # equal up to float rounding


def test_registered_under_its_name():
    algo = get_algorithm("qronos")
    assert isinstance(algo, Qronos) and algo.needs_float_stream
