"""GPTQ, GPTAQ and Qronos on fused MoE experts, one expert at a time.

transformers 5 keeps a MoE block's routed experts as 3-D parameters
(:mod:`quark.torch.quantization.fused_experts`). Each expert's slice of a projection is an ordinary
``[out, in]`` weight whose inputs are the tokens routed to that expert, so the GPTQ family (Frantar
et al. 2022, arXiv:2210.17323; GPTAQ, Li et al. 2025; Qronos, Zhang et al. 2025) applies to it
unchanged, with statistics over that expert's routed calibration tokens only: the algorithm's own
``new_stats`` / ``accumulate`` / ``solve_stack`` (:class:`~.gptq.GPTQ` and its subclasses).

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

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from quark.torch.quantization.fused_experts import FusedProjection, QuantFusedExperts, stack_qparams
from quark.torch.quantization.tensor_quantize import compute_qparams

from . import precision, quantizers_off

if TYPE_CHECKING:
    from .gptq import GPTQ

#: roles that read the experts' input (the first stage), then the one that reads their hidden
INPUT_ROLES = ("gate_up", "gate", "up")
DOWN_ROLES = ("down",)


def solvable(module: nn.Module) -> bool:
    """Whether ``module`` is fused experts with some projection these algorithms solve (a static
    weight quantizer on a float, not yet frozen, weight)."""
    return isinstance(module, QuantFusedExperts) and bool(solvable_projections(module, INPUT_ROLES + DOWN_ROLES))


def block_experts(block: nn.Module) -> dict[str, QuantFusedExperts]:
    """The block's solvable fused-experts modules, by name."""
    return {name: m for name, m in block.named_modules() if solvable(m)}


def solvable_projections(module: QuantFusedExperts, roles: tuple[str, ...]) -> list[FusedProjection]:
    """The projections of ``roles`` with a static weight quantizer on a float, not yet frozen, weight."""
    return [
        fp for proj, fp in module.quantized_projections()
        if proj.role in roles and fp.weight_quantizer is not None and not fp.frozen
        and not fp.weight_quantizer.is_dynamic and module.float_weight(proj) is not None
    ]


def _stacks(projections: list[FusedProjection]) -> list[list[FusedProjection]]:
    """Projections of one stage that share a weight spec (solved as one stacked matrix per expert)."""
    stacks: dict[str, list[FusedProjection]] = {}
    for fp in projections:
        stacks.setdefault(repr(fp.weight_quantizer.spec), []).append(fp)
    return list(stacks.values())


class RoutedRecord:
    """What one experts module received on every calibration batch: per batch the token rows, per
    expert the indices of its rows (:meth:`QuantFusedExperts.routed_tokens`), and, for the float
    stream, the float model's rows of the same tokens (None: not paired, see the module doc)."""

    def __init__(self, module: QuantFusedExperts) -> None:
        self.module = module
        self.batches: list[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]] = []

    def add_call(self, args: tuple, kwargs: dict, float_hidden: torch.Tensor | None = None) -> None:
        """One batch's call of the experts module; ``float_hidden``: the float model's hidden states
        passed to it on that batch (paired by token with top-k routing only)."""
        x, rows = self.module.routed_tokens(*args, **kwargs)
        paired = float_hidden is not None and self.module.fused_layout.routing != "dense"
        x_float = float_hidden.reshape(-1, x.shape[-1]).to(x.device) if paired else None
        if x_float is not None and x_float.shape != x.shape:
            raise ValueError(f"float stream {tuple(x_float.shape)} and quantized stream {tuple(x.shape)} differ")
        self.batches.append((x.detach(), rows, x_float))

    def tokens(self, e: int) -> int:
        return sum(int(rows[e].numel()) for _, rows, _ in self.batches)

    def expert_inputs(self, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Expert ``e``'s rows on the quantized and on the float stream (the quantized ones where the
        float stream is not paired), per batch where it has some."""
        out = []
        for x, rows, x_float in self.batches:
            if rows[e].numel():
                xq = x[rows[e]]
                out.append((xq, xq if x_float is None else x_float[rows[e]]))
        return out


def _expert_weight(module: QuantFusedExperts, fp: FusedProjection, e: int) -> torch.Tensor:
    """Expert ``e``'s ``[out, in]`` matrix of a projection: a view into the fused parameter."""
    return fp.view(module.float_weight(fp.proj))[e]


def quantize_experts(record: RoutedRecord, algorithm: GPTQ, config: Any) -> list[int]:
    """Quantize every expert of ``record.module`` with ``algorithm`` (input projections, then down);
    returns the experts left at round-to-nearest for want of calibration tokens."""
    module = record.module
    stages = [p for p in (solvable_projections(module, INPUT_ROLES), solvable_projections(module, DOWN_ROLES)) if p]
    if not stages:
        return []
    first = module.float_weight(stages[0][0].proj)
    cross = precision.resolve(getattr(config, "cross_term_dtype", "float32"), first.device, first.dtype)
    # the parameters as they are: an expert's solved slice is already on its grid (no fake-quantization needed)
    raw = {p.path: module.float_weight(p) for p in module.fused_layout.projections}
    qparams: dict[int, list[Any]] = {id(fp): [] for stage in stages for fp in stage}
    unrouted = []
    for e in range(int(module.num_experts)):
        inputs = record.expert_inputs(e)
        if not inputs:  # no token: round-to-nearest, min-max qparams of the float weight
            unrouted.append(e)
            for fp in (fp for stage in stages for fp in stage):
                w = _expert_weight(module, fp, e).detach().float()
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
                 pairs: list[tuple[torch.Tensor, torch.Tensor]], algorithm: GPTQ, config: Any,
                 cross: torch.dtype | None, qparams: dict[int, list[Any]]) -> None:
    stats = algorithm.new_stats(cross)
    for xq, xf in pairs:
        algorithm.accumulate(stats, xq, xf)
    views = [_expert_weight(module, fp, e) for fp in stack]
    splits = [w.shape[0] for w in views]
    sol = algorithm.solve_stack(torch.cat([w.detach() for w in views], 0), stats, stack[0].weight_quantizer.spec,
                                splits, config, zero_dead=False)
    with torch.no_grad():
        for fp, w, q, qp in zip(stack, views, sol.Q.split(splits, 0), sol.qparams):
            w.copy_(q.to(w.dtype))
            qparams[id(fp)].append(qp)
