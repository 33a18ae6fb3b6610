"""GPTQ, GPTAQ and Qronos on fused MoE experts, one expert at a time.

transformers 5 keeps a MoE block's routed experts as 3-D parameters
(:mod:`quark.torch.quantization.fused_experts`). Each expert's slice of a projection is an ordinary
``[out, in]`` weight whose inputs are the tokens routed to that expert, so the GPTQ family (Frantar
et al. 2022, arXiv:2210.17323; GPTAQ, Li et al. 2025; Qronos, Zhang et al. 2025) applies to it
unchanged, with statistics over that expert's routed calibration tokens only: the algorithm's own
``new_stats`` / ``accumulate`` / ``solve_stack`` (:class:`ExpertSolver`, which :class:`~.gptq.GPTQ` and
its subclasses implement). GPTQ's block driver (:mod:`.gptq`) records what each experts module receives
(:class:`~quark.torch.quantization.moe.RoutedTokens`) and calls :func:`quantize_experts`; this module
does not import :mod:`.gptq`. Which projections are solved, the routing capture and the iteration over
the experts come from :mod:`quark.torch.quantization.moe`.

Order (true sequential, after the block's ``nn.Linear`` groups): for each expert, its input
projections (``gate_up``, or ``gate`` and ``up``, stacked when they share a weight spec), then its
``down`` projection, whose inputs are computed from the expert's tokens with its just-quantized
gate/up (and their activation quantizers, and rotation's online R4, as the quantized model runs them). Experts do not feed
each other, so expert after expert is the same as stage after stage.

The float stream (GPTAQ, Qronos): a token's float input to an expert is the float model's input of
the experts module at that token (the float model may route it elsewhere; the target is still what
this expert's float weights make of it), and its float ``down`` input is that through the expert's
float gate/up, computed before they are quantized. With dense routing (each expert's block holds
its tokens scaled by their routing weight, Llama 4) the two streams' rows do not pair up, and the
quantized stream stands in for the float one (GPTAQ's drift term is then zero: GPTQ).

Memory: one pass of the block records what each experts module receives per batch (its hidden
states and routing: about one more copy of the block's activations; with dense routing the routed
rows only); one expert's statistics are held at a time, whatever the number of experts.

Two things differ from a dense layer: an expert that received no calibration token keeps its
round-to-nearest (min-max) weight and qparams, and inputs that were zero on all of an expert's
tokens are rounded rather than zeroed (they need not be zero on the tokens it will see later).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from quark.torch.quantization.fused_experts import FusedProjection, QuantFusedExperts, stack_qparams
from quark.torch.quantization.moe import (
    DOWN_ROLES,
    INPUT_ROLES,
    RoutedTokens,
    expert_matrix,
    iter_experts,
    static_weight_projections,
)
from quark.torch.quantization.tensor_quantize import compute_qparams

from . import precision, quantizers_off
from .hessian_solver import Solution


class ExpertSolver(Protocol):
    """What the expert stage needs of the algorithm: its statistics and its solver for one stack of
    matrices sharing an input."""

    def new_stats(self, cross_dtype: torch.dtype | None = None) -> dict[str, Any]: ...

    def accumulate(self, stats: dict[str, Any], x_quant: torch.Tensor, x_float: torch.Tensor | None,
                   y_float: torch.Tensor | None = None) -> None: ...

    def solve_stack(self, weight: torch.Tensor, stats: dict[str, Any], spec: Any, splits: list[int],
                    config: Any, zero_dead: bool = True) -> Solution: ...


def _stacks(projections: list[FusedProjection]) -> list[list[FusedProjection]]:
    """Projections of one stage that share a weight spec (solved as one stacked matrix per expert)."""
    stacks: dict[str, list[FusedProjection]] = {}
    for fp in projections:
        stacks.setdefault(repr(fp.weight_quantizer.spec), []).append(fp)
    return list(stacks.values())


def quantize_experts(record: RoutedTokens, algorithm: ExpertSolver, config: Any) -> list[int]:
    """Quantize every expert of ``record.module`` with ``algorithm`` (input projections, then down);
    returns the experts left at round-to-nearest for want of calibration tokens."""
    module = record.module
    stages = [p for p in (static_weight_projections(module, INPUT_ROLES), static_weight_projections(module, DOWN_ROLES))
              if p]
    if not stages:
        return []
    first = module.float_weight(stages[0][0].proj)
    cross = precision.resolve(getattr(config, "cross_term_dtype", "float32"), first.device, first.dtype)
    # the parameters as they are: an expert's solved slice is already on its grid (no fake-quantization needed)
    raw = {p.path: module.float_weight(p) for p in module.fused_layout.projections}
    qparams: dict[int, list[Any]] = {id(fp): [] for stage in stages for fp in stage}
    unrouted = []
    for expert in iter_experts(record, unrouted=True):
        e, inputs = expert.index, expert.inputs
        if not inputs:  # no token: round-to-nearest, min-max qparams of the float weight
            unrouted.append(e)
            for fp in (fp for stage in stages for fp in stage):
                w = expert_matrix(module, fp, e).detach().float()
                qparams[id(fp)].append(compute_qparams(w, fp.weight_quantizer.spec))
            continue
        float_down = None
        if any(fp.proj.role in DOWN_ROLES for fp in stages[-1]) and any(xq is not xf for xq, xf in inputs):
            with torch.no_grad(), quantizers_off(module):  # the float hidden, before gate/up change
                float_down = [module.down_input(xf, e, raw) for _, xf in inputs]
        for stage in stages:
            if stage[0].proj.role in DOWN_ROLES:
                with torch.no_grad():
                    quant_down = [module.down_input(xq, e, raw) for xq, _ in inputs]
                pairs = list(zip(quant_down, float_down or quant_down))
            else:
                pairs = inputs
            for stack in _stacks(stage):
                _solve_stack(module, stack, e, pairs, algorithm, config, cross, qparams)
    for stage in stages:
        for fp in stage:
            fp.set_weight_qparams(stack_qparams(qparams[id(fp)]))
    return unrouted


def _solve_stack(module: QuantFusedExperts, stack: list[FusedProjection], e: int,
                 pairs: list[tuple[torch.Tensor, torch.Tensor]], algorithm: ExpertSolver, config: Any,
                 cross: torch.dtype | None, qparams: dict[int, list[Any]]) -> None:
    stats = algorithm.new_stats(cross)
    for xq, xf in pairs:
        algorithm.accumulate(stats, xq, xf)
    views = [expert_matrix(module, fp, e) for fp in stack]
    splits = [w.shape[0] for w in views]
    sol = algorithm.solve_stack(torch.cat([w.detach() for w in views], 0), stats, stack[0].weight_quantizer.spec,
                                splits, config, zero_dead=False)
    with torch.no_grad():
        for fp, w, q, qp in zip(stack, views, sol.Q.split(splits, 0), sol.qparams):
            w.copy_(q.to(w.dtype))
            qparams[id(fp)].append(qp)
