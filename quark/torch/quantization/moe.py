"""Fused MoE experts as the calibration algorithms and the export see them: which experts modules a
block holds, which calibration tokens each expert receives, and one expert at a time.

:mod:`.fused_experts` owns the experts module itself (:class:`~.fused_experts.QuantFusedExperts`: its
layouts, quantizers and forward, :meth:`~.fused_experts.QuantFusedExperts.routed_tokens` for one call)
and finds such modules in a model (:func:`~.fused_experts.fused_experts_modules`,
:func:`~.fused_experts.find_fused_experts`). This module holds what the users of those modules share:

- discovery in a decoder block: :func:`block_fused_experts`, :func:`static_weight_projections` (the
  projections whose float weight an algorithm may still change), :func:`has_static_weights`, and the
  roles :data:`INPUT_ROLES` (the projections reading the experts' input) and :data:`DOWN_ROLES` (the
  one reading their hidden);
- routing capture: :class:`RoutedTokens`, what one experts module received on every calibration
  batch (the token rows and, per expert, which of them were routed to it, with the float model's rows
  of the same tokens where they pair up), filled by :func:`record_routed_tokens` (one float pass of
  the block) or call by call from the caller's own pass (:meth:`RoutedTokens.add_call`);
- per-expert iteration: :func:`iter_experts` (each expert with its routed rows, :class:`RoutedExpert`)
  and :func:`expert_matrix` (an expert's ``[out, in]`` matrix of a projection, a view into the fused
  parameter).

Users: the GPTQ family's expert stage (``quark.torch.algorithm.gptq_experts``), the per-expert
``up -> down`` scales of SmoothQuant, AWQ and AutoSmoothQuant (``quark.torch.algorithm.expert_scaling``),
AWQ's per-expert clipping (``quark.torch.algorithm.awq``) and the per-expert checkpoint tensors
(``quark.torch.export.experts``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from .driver import BlockInputs, run_block
from .fused_experts import FusedProjection, QuantFusedExperts, fused_experts_modules
from .tensor_quantizer import quantizers_off

__all__ = [
    "DOWN_ROLES",
    "INPUT_ROLES",
    "RoutedExpert",
    "RoutedTokens",
    "block_fused_experts",
    "expert_matrix",
    "has_static_weights",
    "iter_experts",
    "record_routed_tokens",
    "static_weight_projections",
]

#: roles of the projections that read the experts' input (the first stage), then of the one that reads their hidden
INPUT_ROLES = ("gate_up", "gate", "up")
DOWN_ROLES = ("down",)


# ---------------------------------------------------------------------------------------------
# discovery in a block
# ---------------------------------------------------------------------------------------------
def static_weight_projections(module: QuantFusedExperts, roles: tuple[str, ...]) -> list[FusedProjection]:
    """The projections of ``roles`` with a static weight quantizer on a float, not yet frozen, weight
    (those an algorithm may still change and whose qparams follow the weight)."""
    return [
        fp for proj, fp in module.quantized_projections()
        if proj.role in roles and fp.weight_quantizer is not None and not fp.frozen
        and not fp.weight_quantizer.is_dynamic and module.float_weight(proj) is not None
    ]


def has_static_weights(module: nn.Module) -> bool:
    """Whether ``module`` is fused experts with some projection of :func:`static_weight_projections`."""
    return isinstance(module, QuantFusedExperts) and bool(
        static_weight_projections(module, INPUT_ROLES + DOWN_ROLES))


def block_fused_experts(block: nn.Module, static_weights: bool = False) -> dict[str, QuantFusedExperts]:
    """The fused-experts modules of ``block`` by name relative to it (:func:`~.fused_experts.fused_experts_modules`);
    with ``static_weights``, only those with some projection of :func:`static_weight_projections`."""
    return {name: m for name, m in fused_experts_modules(block) if not static_weights or has_static_weights(m)}


# ---------------------------------------------------------------------------------------------
# routing capture
# ---------------------------------------------------------------------------------------------
class RoutedTokens:
    """What one experts module received on every calibration batch: per batch the token rows, per
    expert the indices of its rows (:meth:`QuantFusedExperts.routed_tokens`), and, for the float
    stream, the float model's rows of the same tokens (None: not paired). The float stream pairs up
    by token with top-k routing only; with dense routing (each expert's block holds its tokens scaled
    by their routing weight, Llama 4) the quantized rows stand in for the float ones."""

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
        """How many calibration tokens were routed to expert ``e``."""
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


def record_routed_tokens(block: nn.Module, inputs: BlockInputs, index: int,
                         modules: dict[str, QuantFusedExperts]) -> dict[str, RoutedTokens]:
    """One float pass of ``block`` (quantizers off) on its cached calibration ``inputs`` (block
    ``index`` of the loop), recording what each experts module of ``modules`` receives, by name."""
    records = {name: RoutedTokens(m) for name, m in modules.items()}
    hooks = [m.register_forward_pre_hook(lambda _m, a, k, r=records[name]: r.add_call(a, k), with_kwargs=True)
             for name, m in modules.items()]
    try:
        with quantizers_off(block), torch.no_grad():
            run_block(block, inputs, index)
    finally:
        for h in hooks:
            h.remove()
    return records


# ---------------------------------------------------------------------------------------------
# one expert at a time
# ---------------------------------------------------------------------------------------------
@dataclass
class RoutedExpert:
    """One expert of an experts module and the calibration tokens routed to it."""

    module: QuantFusedExperts
    index: int
    #: per batch where it has tokens: its rows on the quantized stream and on the float stream
    #: (:meth:`RoutedTokens.expert_inputs`); empty for an expert that received no token
    inputs: list[tuple[torch.Tensor, torch.Tensor]]

    def tokens(self) -> torch.Tensor:
        """Its rows on the quantized stream, every batch's concatenated ``[tokens, hidden]``."""
        return torch.cat([xq for xq, _ in self.inputs])

    def float_hidden(self) -> torch.Tensor:
        """Its down projection's input (:meth:`QuantFusedExperts.expert_hidden`, before any online
        rotation) on its quantized-stream rows with every quantizer of the module off, ``[tokens, I]``."""
        with quantizers_off(self.module), torch.no_grad():
            return torch.cat([self.module.expert_hidden(xq, self.index) for xq, _ in self.inputs])


def iter_experts(routed: RoutedTokens, unrouted: bool = False) -> Iterator[RoutedExpert]:
    """Every expert of ``routed.module`` in order, with the tokens routed to it; the experts that
    received none only with ``unrouted`` (their ``inputs`` empty)."""
    for e in range(int(routed.module.num_experts)):
        inputs = routed.expert_inputs(e)
        if inputs or unrouted:
            yield RoutedExpert(routed.module, e, inputs)


def expert_matrix(module: QuantFusedExperts, fp: FusedProjection, e: int) -> torch.Tensor:
    """Expert ``e``'s ``[out, in]`` matrix of projection ``fp`` of ``module``: a view into the fused
    float parameter (writing it changes the parameter)."""
    return fp.view(module.float_weight(fp.proj))[e]
