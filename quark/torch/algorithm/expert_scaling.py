"""The ``up -> down`` scaling site inside every fused MoE expert (SmoothQuant and AWQ).

A dense gated MLP computes ``down(act(gate(x)) * up(x))``: the down projection's input is linear in
each row of ``up``, so SmoothQuant (Xiao et al. 2022, arXiv:2211.10438) divides up's output row ``j``
by ``s_j`` and multiplies down's input column ``j`` by it (the template pair ``mlp.up_proj ->
mlp.down_proj``). In a transformers-5 fused experts module every expert has its own up rows and down
columns, and its own tokens, so each expert gets its own scale::

    s_e = max|H_e|^alpha / max|W_down,e|^(1 - alpha)      (per hidden channel, at least clamp_min)

with ``H_e`` the expert's down input on the calibration tokens routed to it (float model) and the
maximum of ``|W_down,e|`` over its output rows. AWQ (Lin et al. 2023, arXiv:2306.00978) instead
searches ``s_e = mean|H_e|^alpha`` (normalised, ``alpha`` on its grid), and AutoSmoothQuant searches
SmoothQuant's ``s_e`` over its ``alpha`` grid, for the lowest error of the expert's down output with
its weight and input quantized as after the fold, ``Q_in(H_e / s) Q_w(W_down,e diag(s))^T`` against
``H_e W_down,e^T``. The fold is exact when the down input is linear in each
up row: separate gate and up projections with ``act(gate) * up``, or a fused ``gate_up`` whose gate
function (the class's ``_apply_gate``, else ``act(gate) * up`` on the two halves) passes a probe
(scaling the up channels, concatenated ``[gate; up]`` or interleaved, scales its output by the same
factors). It does not apply where the gate function fails the probe (GPT-OSS clamps ``up`` and adds
one), where rotation's R4 rotates the down input online, or to experts without a gate. An expert that
got no calibration token keeps its weights.

Where the pieces come from: the float pass recording each expert's tokens and the iteration over the
experts (:func:`~quark.torch.quantization.moe.record_routed_tokens`,
:func:`~quark.torch.quantization.moe.iter_experts`) from :mod:`quark.torch.quantization.moe`; the
candidate scales (:func:`~.scaling.smooth_scale`, :func:`~.scaling.awq_candidates`) and the simulated
quantization after a fold from :mod:`.scaling`. The plugins (:mod:`.smoothquant`, :mod:`.awq`,
:mod:`.autosmoothquant`) call :func:`scale_block_experts` with their rule; this module imports none of them.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

import torch

from quark.torch.quantization.fused_experts import Projection, QuantFusedExperts, expert_view
from quark.torch.quantization.moe import RoutedTokens, block_fused_experts, iter_experts, record_routed_tokens
from quark.torch.quantization.online_rotation import online_rotation

from . import BlockContext
from .scaling import awq_candidates, quantized_scaled_matrix, scaled_input_quant, smooth_scale

logger = logging.getLogger(__name__)


def _gate_function(module: QuantFusedExperts) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a fused ``gate_up`` projection's output goes through (as :meth:`QuantFusedExperts.expert_hidden`)."""
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate
    act = operator.attrgetter(module.fused_layout.act)(module)

    def gate(z: torch.Tensor) -> torch.Tensor:
        g, u = z.chunk(2, dim=-1)
        return act(g) * u

    return gate


def _probe_up_rows(module: QuantFusedExperts, width: int) -> torch.Tensor | None:
    """The rows of a fused ``gate_up`` output that the gate function's output ``j`` is linear in
    (``[width]`` indices), or None when neither the concatenated nor the interleaved layout passes."""
    fn = _gate_function(module)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 2 * width, generator=g, dtype=torch.float64)
    c = torch.rand(width, generator=g, dtype=torch.float64) * 3 + 0.25
    device = module.float_weight(module.fused_layout.projection("gate_up")).device
    base = fn(z.to(device)).double().cpu()
    for rows in (torch.arange(width, 2 * width), torch.arange(1, 2 * width, 2)):
        scaled = z.clone()
        scaled[:, rows] *= c
        if torch.allclose(fn(scaled.to(device)).double().cpu(), base * c, rtol=1e-9, atol=1e-12):
            return rows
    return None


def down_site(module: QuantFusedExperts) -> tuple[Projection, torch.Tensor | slice, Projection] | str:
    """``(up projection, its rows feeding the down input, down projection)`` of an experts module whose
    down input is linear in those rows, or why it is not (a message)."""
    lay = module.fused_layout
    if online_rotation(module) is not None:
        return "rotation's R4 rotates its down input online"
    down = lay.projection("down")
    up = lay.projection("gate_up") or (lay.projection("up") if lay.projection("gate") is not None else None)
    if down is None or up is None or module.float_weight(down) is None or module.float_weight(up) is None:
        return "it has no gated up projection with float weights"
    if up.role == "up":
        return up, slice(None), down
    width = expert_view(module.float_weight(down), int(module.num_experts), down.transposed).shape[-1]
    rows = _probe_up_rows(module, width)
    if rows is None:
        return "its gate function is not linear in the up half (e.g. GPT-OSS's clamped SwiGLU)"
    return up, rows.to(module.float_weight(up).device), down


ScaleRule = Callable[[QuantFusedExperts, int, torch.Tensor, torch.Tensor], torch.Tensor | None]


@torch.no_grad()
def scale_expert_downs(record: RoutedTokens, site: tuple[Projection, torch.Tensor | slice, Projection],
                       rule: ScaleRule) -> int:
    """Scale every expert of ``record.module`` by ``rule(module, e, H_e, W_down,e)`` (a ``[I]`` scale,
    or None to leave the expert alone; ``H_e``: its float down inputs ``[tokens, I]``, ``W_down,e``:
    ``[hidden, I]``): divide its up rows (and bias), multiply its down columns. ``site``: the module's
    :func:`down_site`. Returns how many experts were scaled."""
    module = record.module
    up, rows, down = site
    num = int(module.num_experts)
    up_w = expert_view(module.float_weight(up).detach(), num, up.transposed)  # [E, I or 2I, hidden]
    down_w = expert_view(module.float_weight(down).detach(), num, down.transposed)  # [E, hidden, I]
    up_bias = module.bias(up)
    scaled = 0
    for expert in iter_experts(record):
        e = expert.index
        s = rule(module, e, expert.float_hidden(), down_w[e])
        if s is None:
            continue
        s = s.to(up_w.device, torch.float32)
        up_w[e, rows] = (up_w[e, rows].float() / s[:, None]).to(up_w.dtype)
        if up_bias is not None:
            up_bias.data[e, rows] = (up_bias.data[e, rows].float() / s).to(up_bias.dtype)
        down_w[e].copy_(down_w[e].float() * s)
        scaled += 1
    return scaled


def smooth_rule(alpha: float, clamp_min: float) -> ScaleRule:
    """SmoothQuant's per-expert scale (:func:`~.scaling.smooth_scale` of the expert's down input
    and down weight)."""

    def rule(_module: QuantFusedExperts, _e: int, hidden: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return smooth_scale(hidden.abs().amax(0), down.float().abs().amax(0), alpha, clamp_min)

    return rule


def _down_projection(module: QuantFusedExperts) -> Any:
    return next((fp for proj, fp in module.quantized_projections() if proj.role == "down"), None)


def _down_errors(fp: Any, hidden: torch.Tensor, down: torch.Tensor, candidates: list[torch.Tensor]) -> list[float]:
    """Squared error of the expert's down output on its down inputs ``hidden`` for every candidate
    scale, with the down projection's weight and input quantization as they act after the fold:
    ``Q_in(H / s) Q_w(W diag(s))^T`` against ``H W^T``. ``hidden`` holds every token routed to the
    expert, so a static per-tensor input scale is exactly the one its per-expert observer records."""
    x, w = hidden.float(), down.float()
    target = x @ w.T
    lo, hi = x.amin(0), x.amax(0)
    wspec = None if fp.weight_quantizer is None else fp.weight_quantizer.spec
    out = []
    for s in candidates:
        xs = x if fp.input_quantizer is None else scaled_input_quant(fp.input_quantizer, s, lo, hi)(x)
        out.append(float((xs @ quantized_scaled_matrix(w, s, wspec).T - target).pow(2).sum()))
    return out


def _searched_rule(candidates_of: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]],
                   weights_only: bool) -> ScaleRule:
    """A rule choosing, among ``candidates_of(H_e, W_down,e)`` (the first: no scaling), the scale with
    the lowest :func:`_down_errors`; None when that is no scaling, or when the down projection has
    no static weight quantizer (``weights_only``) or nothing quantized at all."""

    def rule(module: QuantFusedExperts, _e: int, hidden: torch.Tensor, down: torch.Tensor) -> torch.Tensor | None:
        fp = _down_projection(module)
        if fp is None:
            return None
        wq = fp.weight_quantizer
        if weights_only and (wq is None or wq.is_dynamic):
            return None
        if wq is None and fp.input_quantizer is None:
            return None
        candidates = candidates_of(hidden, down)
        losses = _down_errors(fp, hidden, down, candidates)
        best = min(range(len(losses)), key=lambda i: (losses[i], i))
        return candidates[best] if best else None

    return rule


def awq_rule(num_grid: int) -> ScaleRule:
    """AWQ's per-expert scale: the grid candidate (:func:`~.scaling.awq_candidates` of the expert's mean
    ``|H_e|``) with the lowest squared error of the expert's down output on ``H_e`` (:func:`_down_errors`:
    weight and input quantization as after the fold); None when the down projection has no static
    weight quantizer or the best candidate is no scaling."""
    return _searched_rule(lambda hidden, _down: awq_candidates(hidden.float().abs().mean(0), num_grid), True)


def autosmooth_rule(alphas: list[float], clamp_min: float) -> ScaleRule:
    """AutoSmoothQuant's per-expert scale: no scaling or SmoothQuant's scale for each of ``alphas``,
    whichever gives the lowest :func:`_down_errors` on the expert's down inputs."""

    def candidates(hidden: torch.Tensor, down: torch.Tensor) -> list[torch.Tensor]:
        act, w = hidden.abs().amax(0), down.float().abs().amax(0)
        return [torch.ones_like(act, dtype=torch.float32)] + [smooth_scale(act, w, a, clamp_min) for a in alphas]

    return _searched_rule(candidates, False)


def scale_block_experts(ctx: BlockContext, rule: ScaleRule, algorithm: str,
                        records: dict[str, RoutedTokens] | None = None) -> None:
    """The per-expert ``up -> down`` scales (``rule``) of every fused experts module of the block (the
    statistics come from a float pass after the block's other folds; ``records``: that pass's
    :func:`~quark.torch.quantization.moe.record_routed_tokens`, when the caller already made it). Modules without such a site are logged on
    the first block the loop processes."""
    first_block = ctx.index == min(ctx.inputs.called, default=ctx.index)
    modules: dict[str, QuantFusedExperts] = {}
    sites = {}
    for name, m in block_fused_experts(ctx.block).items():
        site = down_site(m)
        if isinstance(site, str):
            if first_block:
                logger.info("%s: %s's experts keep unscaled down projections: %s", algorithm, name, site)
            continue
        modules[name], sites[name] = m, site
    if not modules:
        return
    records = record_routed_tokens(ctx.block, ctx.inputs, ctx.index, modules) if records is None else records
    for name, m in modules.items():
        scaled = scale_expert_downs(records[name], sites[name], rule)
        logger.debug("%s block %d: %s: %d of %d experts' down inputs scaled", algorithm, ctx.index, name, scaled,
                     int(m.num_experts))
