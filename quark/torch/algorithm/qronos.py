"""Qronos (Zhang, Zhang, Colbert, Saab 2025, "Qronos: Correcting the Past by Shaping the Future...
in Post-Training Quantization", arXiv:2505.11695).

Qronos quantizes a layer so that its output on the *quantized* stream ``X~`` matches the *float*
model's output on the float stream ``X`` (tokens x features, one output row ``w`` at a time)::

    min_q || X w - X~ q ||^2

sequentially over the columns ``t = 1..n``, alternating two optimal steps (the paper's iteration):

* correcting the past: ``q_t = Q(argmin_p || X w - sum_{j<t} X~_j q_j - X~_t p - sum_{j>t} X~_j w_j^(t-1) ||)``,
  the best value of column ``t`` given the quantized past and the current future, then rounded;
* shaping the future: ``w_{>t}^(t) = argmin_v || X w - sum_{j<=t} X~_j q_j - X~_{>t} v ||``, the
  least-squares update of every later column given the quantized past.

The paper shows the efficient equivalent we implement: after the first step the future columns are
always the least-squares optimum given the past, so for ``t >= 2`` the correction step returns the
current ``w_t`` and the diffusion step is GPTQ's update with ``H~ = X~^T X~`` (Cholesky of ``H~^-1``,
lazy batches; :func:`~.hessian_solver.solve`). Only ``t = 1`` differs, and it needs the float
stream through ``G = X~^T X``::

    p   = (G_1,: w - H~_1,>1 w_>1) / H~_11,        q_1 = Q(p)
    w_>1 = (H~_>1,>1 + lambda_beta I)^-1 (G_>1,: w - H~_>1,1 q_1)

Damping (the paper's ``alpha``/``beta`` knobs; exact placement is this implementation's choice):
``H~`` is damped by ``alpha * mean(diag H~)`` everywhere (the scalar step and the GPTQ diffusion),
and the least-squares correction of ``w_>1`` - a full inverse that amplifies ill-conditioned
directions - is a ridge regression toward the current weights with ``lambda_beta = alpha * beta *
mean(diag H~)``: ``w_>1 = (H~_>1,>1 + lambda I)^-1 (G_>1,: w - H~_>1,1 q_1 + lambda w_>1)`` (a ridge
toward zero instead would shrink the weights as the damping grows). Defaults ``alpha = 1e-2``,
``beta = 100`` (``lambda = mean(diag H~)``): the correction fits the float model's outputs from the
quantized inputs of 16k calibration tokens and overfits them when weakly damped, worst when the
activations are quantized too. On SmolLM2 (shared protocol) nearly undamped statistics (alpha 1e-6)
give int4_wo_64 ppl 56.6, worse than RTN's 41.1; beta 1 gives 32.9 there but 104.8 on mxfp4 (RTN
85.7; per-block output errors: lower than GPTAQ's on the calibration tokens, higher on held-out
ones); beta 100 gives 32.4 and 61.4.
Columns run in natural order (no act-order); a group's qparams are computed when the group is
reached (by the clipping search of :func:`~.hessian_solver.search_clipped_qparams` when
``clip_search_steps`` > 0), the first group's from ``p`` and the original later columns. Statistics
are float32 sums, and the correction solve is float32 (float64 when its float32 Cholesky fails);
``G`` is accumulated as ``H~ + X~^T (X - X~)`` with the drift term's products in the config's
``cross_term_dtype`` (float32 by default; bfloat16 is faster and less accurate, :mod:`.precision`).
"""

from __future__ import annotations

from typing import Any

import torch

from quark.torch.quantization.config.algo_configs import QronosConfig
from quark.torch.quantization.modules import QuantLinear

from . import register_algorithm
from .gptq import GPTQ, cross_term_dtype
from .hessian_solver import ColumnQuantizer, Gram, Solution, damp, inverse_cholesky, solve


def _ridge_correction(W: torch.Tensor, H: torch.Tensor, WG: torch.Tensor, q1: torch.Tensor, dead: torch.Tensor,
                      lam: torch.Tensor) -> torch.Tensor:
    """``(H~_>1,>1 + lam I)^-1 (G_>1,: w - H~_>1,1 q_1 + lam w_>1)`` for every row ``w`` of ``W``
    (``WG = W G^T``): in float32 (as GPTQ's factorisation; ``lam`` keeps the system as well conditioned
    as GPTQ's damped Hessian), in float64 when the float32 Cholesky fails."""
    for dtype in (torch.float32, torch.float64):
        lam_d = lam.to(dtype)
        rhs = WG[:, 1:].to(dtype).sub(q1.to(dtype)[:, None] * H[0, 1:].to(dtype)[None])
        rhs.add_(W[:, 1:].to(dtype), alpha=float(lam_d))  # the damping pulls toward the current weights
        A = H[1:, 1:].to(dtype).clone()
        A.diagonal().add_(lam_d)
        A[dead[1:], dead[1:]] = 1.0
        L, info = torch.linalg.cholesky_ex(A)
        if info.item() == 0:
            out = torch.cholesky_solve(rhs.T, L).T
            if torch.isfinite(out).all():
                return out.float()
    raise torch.linalg.LinAlgError("Qronos's correction system is not positive definite even in float64: raise alpha")


def qronos_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    G: torch.Tensor | None,
    spec: Any,
    alpha: float = 1e-2,
    beta: float = 1.0,
    block_size: int = 128,
    row_splits: list[int] | None = None,
    clip_steps: int = 0,
    clip_min: float = 0.6,
    WG: torch.Tensor | None = None,
    zero_dead: bool = True,
) -> Solution:
    """Qronos on ``W`` ``[rows, n]`` with ``H = 2/N X~^T X~`` and ``G = 2/N X~^T X`` (quantized-stream
    and float-stream inputs of the same tokens). The float stream only enters through ``W G^T`` (row
    ``r``: ``2/N sum_t y_tr x~_t`` with ``y = X W^T`` the float outputs): ``WG`` gives it directly
    instead of ``G`` (then the float outputs of features dead on the quantized stream stay in the
    target). ``zero_dead``: as :func:`~.hessian_solver.quantize_weight` (off: such inputs are treated
    as live ones, their columns kept by the ridge and rounded). Returns the fake-quantized weight and
    its qparams."""
    W = W.detach().float().clone()
    Hd, dead = damp(H.float(), alpha)
    if zero_dead:
        W[:, dead] = 0
    else:
        dead = torch.zeros_like(dead)
    if WG is None:
        G = G.float().clone()
        G[dead] = 0
        WG = W @ G.T
    else:
        WG = WG.float().clone()
        WG[:, dead] = 0  # x~ is zero there: already zero up to rounding
    quantizer = ColumnQuantizer(spec, W, row_splits, importance=torch.diagonal(Hd), clip_steps=clip_steps,
                                clip_min=clip_min)
    rows, n = W.shape
    # t = 1, correcting the past: the best first column given the original future, then rounded
    p = (WG[:, 0] - W[:, 1:] @ Hd[1:, 0]) / Hd[0, 0]
    Wt = W.clone()
    Wt[:, 0] = p
    q1 = quantizer(0, p, lambda cols: Wt[:, cols.to(Wt.device)])
    Q = torch.zeros_like(W)
    Q[:, 0] = q1
    if n > 1:
        # t = 1, shaping the future: least squares of the later columns given q_1
        Wt[:, 1:] = _ridge_correction(W, H, WG, q1, dead, alpha * beta * Hd.diagonal().mean())
        Wt[:, 1:][:, dead[1:]] = 0
        # t >= 2: GPTQ's diffusion with H~ from column 2 on
        Wt[:, 0] = q1
        solve(Wt, inverse_cholesky(Hd), quantizer, block_size, start=1, Q=Q)
    return Solution(Q, quantizer.qparams())


class Qronos(GPTQ):
    """Qronos on each layer group of the block, in order (see the module docstring)."""

    config_class = QronosConfig
    needs_float_stream = True

    def new_stats(self, cross_dtype: torch.dtype | None = None) -> dict[str, Gram]:
        return {"H": Gram(), "C": Gram(cross_dtype), "WG": Gram()}

    def float_output_layers(self, layers: dict[str, QuantLinear], config: QronosConfig) -> set[str]:
        """Layers narrower out than in (down_proj): ``W G^T`` from their float outputs costs
        ``rows / n`` of ``G``'s products (SmolLM2's down_proj: 576 / 1536). Not with a reduced
        ``cross_term_dtype``, which applies to ``G``'s drift term."""
        if not layers or cross_term_dtype(config, layers) is not None:
            return set()
        return {n for n, m in layers.items() if m.out_features < m.in_features}

    def accumulate(self, stats: dict[str, Gram], x_quant: torch.Tensor, x_float: torch.Tensor | None,
                   y_float: torch.Tensor | None = None) -> None:
        stats["H"].add_batch(x_quant)
        if y_float is not None and y_float.shape[-1] < x_quant.shape[-1]:  # the stack's rows < its inputs
            stats["WG"].add_batch(y_float, x_quant)
            return
        # G = X~^T X = H + X~^T (X - X~): the drift term C alone goes through cross_term_dtype, so its
        # rounding is relative to the (small) drift, not to G
        stats["C"].add_batch(x_quant, x_float.to(x_quant.device) - x_quant)

    def solve_stack(self, weight: torch.Tensor, stats: dict[str, Gram], spec: Any, splits: list[int],
                    config: QronosConfig, zero_dead: bool = True) -> Solution:
        H = stats["H"].value
        WG = stats["WG"].value
        return qronos_quantize(
            weight, H, None if WG is not None else H + stats["C"].value, spec,
            alpha=config.alpha, beta=config.beta, block_size=config.block_size, row_splits=splits,
            clip_steps=config.clip_search_steps, clip_min=config.clip_search_min, WG=WG, zero_dead=zero_dead,
        )


ALGORITHM = register_algorithm(Qronos())
