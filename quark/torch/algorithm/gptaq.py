"""GPTAQ: GPTQ with asymmetric calibration (Li et al. 2025, "GPTAQ: Efficient Finetuning-Free
Quantization for Asymmetric Calibration", arXiv:2504.02692; ICML 2025).

GPTQ fits each quantized layer to its own output on the *quantized* stream, ``min ||(Q - W) X~||``,
so the error the earlier quantized layers put into its input ``X~`` is never corrected. GPTAQ
fits the quantized layer on ``X~`` to the *float* model's output on the float input ``X``:

    min_Q || Q X~ - W X ||^2 = || (Q - W) X~ - W dX ||^2,   dX = X - X~   (features x tokens)

Following the paper's derivation from optimal brain compression: when column ``q`` is quantized,
the optimal update of the not-yet-quantized columns ``F`` is GPTQ's plus a term that makes them
absorb the input drift of column ``q`` (the paper's "neuron decomposition" of the residual
``W dX`` into per-column parts ``w_q dX_q``)::

    dW_F = -(w_q - Q(w_q)) / [H_F^-1]_qq * [H_F^-1]_q,F  +  w_q dX_q X~_F^T (X~_F X~_F^T)^-1

and, with the upper Cholesky factor ``U`` of ``H^-1`` (``H = X~ X~^T``; the inverse Hessian of the
trailing columns is ``U_FF^T U_FF``), all those second terms are rows of one matrix (the paper's
Cholesky reformulation)::

    P = triu(D U^T, 1) U,     D = dX X~^T   (here: 2/N sum over tokens of (x - x~)^T x~)

so column ``j``'s update is ``W[:, j+1:] += w_j P[j, j+1:]`` next to GPTQ's (lazily, by blocks, as
GPTQ's). ``w_j`` is the column's value when it is quantized (after the earlier columns' updates), as
in the paper's sequential algorithm. ``alpha`` scales ``D`` (the paper's ``alpha``, default 0.25):
``alpha = 0`` is GPTQ exactly. ``H`` is damped by ``damp_percent`` as in GPTQ; act-order permutes
``D`` with ``H``. The float stream ``X`` is the block's float inputs (``ctx.float_hidden``) through
the block's original weights with every quantizer off.

Only ``D``'s upper triangle in the processing order reaches ``P`` (``U`` is upper, so entry
``(i, j > i)`` of ``D U^T`` reads ``D[i, k]`` for ``k >= j`` only): both streams' inputs of a stack
are kept until the solver has chosen its column order, and ``D`` is then accumulated in that order
by row panels of its upper triangle (:class:`~.hessian_solver.Gram` with ``upper=True``), about 0.6
of the full product's work. ``D``'s products run in the config's ``cross_term_dtype`` (float32 by
default; bfloat16 is faster and less accurate, :mod:`.precision`), ``H``'s in float32.
"""

from __future__ import annotations

from typing import Any

import torch

from quark.torch.quantization.config.algo_configs import GPTAQConfig

from . import register_algorithm
from .gptq import GPTQ
from .hessian_solver import Gram, strict_upper_abt, upper_mm


def gptaq_residual(D: torch.Tensor, alpha: float):
    """``residual(U, perm)`` for :func:`~.hessian_solver.quantize_weight`: ``alpha triu(D U^T, 1) U``
    with ``D`` permuted like the Hessian."""

    def residual(U: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
        Dp = D if perm is None else D[perm][:, perm]
        # only D's upper triangle reaches the kept entries (U is upper): both products are triangular
        return upper_mm(strict_upper_abt(Dp.triu(), U).mul_(alpha), U)

    return residual


class DriftStreams:
    """One stack's inputs on both streams, kept until the solver knows its column order; then
    :meth:`residual` accumulates ``D = 2/N sum (x - x~)^T x~`` in that order, upper triangle only."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add_batch(self, x_quant: torch.Tensor, x_float: torch.Tensor) -> None:
        self.batches.append((x_quant, x_float))

    def drift_gram(self, perm: torch.Tensor | None) -> torch.Tensor:
        """``D`` with rows and columns in the order ``perm`` (None: natural), zero below the diagonal;
        the kept inputs are released."""
        D = Gram(self.dtype, upper=True)
        batches, self.batches = self.batches, []
        for x_quant, x_float in batches:
            D.add_batch(x_float.to(x_quant.device) - x_quant, x_quant, columns=perm)
        return D.value

    def residual(self, alpha: float):
        """``residual(U, perm)`` for :func:`~.hessian_solver.quantize_weight` (see the module doc)."""

        def residual(U: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
            return gptaq_residual(self.drift_gram(perm), alpha)(U, None)

        return residual


class GPTAQ(GPTQ):
    """GPTQ whose updates also absorb the float/quantized input drift (see the module docstring)."""

    config_class = GPTAQConfig
    needs_float_stream = True

    def new_stats(self, cross_dtype: torch.dtype | None = None) -> dict[str, Any]:
        return {"H": Gram(), "D": DriftStreams(cross_dtype)}

    def accumulate(self, stats: dict[str, Any], x_quant: torch.Tensor, x_float: torch.Tensor | None,
                   y_float: torch.Tensor | None = None) -> None:
        stats["H"].add_batch(x_quant)
        stats["D"].add_batch(x_quant, x_float)

    def residual(self, stats: dict[str, Any], config: GPTAQConfig):
        return stats["D"].residual(config.alpha) if config.alpha else None


ALGORITHM = register_algorithm(GPTAQ())
