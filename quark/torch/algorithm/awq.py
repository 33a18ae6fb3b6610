"""AWQ: Activation-aware Weight Quantization (Lin et al. 2023, arXiv:2306.00978).

Weight channels that meet large activations matter most. Scaling input channel ``j`` of the
weights up by ``s_j`` (and the activations down by the same factor, folded into the previous op, so
the float model is unchanged) shrinks the relative rounding error of those salient weights. Per
scaling pair of the template, AWQ

1. measures the mean activation magnitude per input channel ``m_j = mean|x_j|`` over the block's
   calibration inputs;
2. searches ``s = m^alpha`` (normalised to ``sqrt(max(s) min(s)) = 1``) over ``num_grid`` values
   ``alpha = 0, 1/n, ..., (n-1)/n`` for the lowest MSE of the pair's ``inspect`` module output (or
   of its single layer) with the pair's layers quantized, against the float output
   (``alpha = 0`` is plain rounding, so the search never does worse than it on its data);
3. folds the winning scale into the previous op (norm weight, or a previous linear's output rows
   for ``v -> o`` and ``up -> down``) and the layers.

Every pair is searched on the unmodified block (the other layers float) and the scales are folded
afterwards, as in the reference implementation, so the captured inputs stay valid for every search.

Then the weight clipping search (optional, ``clip_search``): for every quantized linear of the
block except ``clip_exclude`` (none by default; AutoAWQ excludes q/k), each quantization group's
range is shrunk to ``[r_lo min, r_hi max]`` with ratios on a grid of ``num_grid`` values in
``(0.5, 1]``, choosing per group the ratios with the lowest output error
``||x (W - Q(clip(W)))^T||^2`` on the layer's (scaled) calibration inputs: both ends together as in
the paper, then each end alone (:func:`clip_layer`); the weights are clamped to the chosen ranges.
The error of a group only depends on its own range, so all groups are searched at once through the
per-group Gram matrices ``X_g^T X_g`` of the inputs. Fused MoE experts (:func:`clip_block_experts`)
get the same search per expert: its gate/up and down matrices on the tokens routed to it
(routing capture and the per-expert iteration: :mod:`quark.torch.quantization.moe`). The candidate
scales (:func:`~.scaling.awq_candidates`) live in :mod:`.scaling`, where the per-expert ``up -> down``
rule (:func:`~.expert_scaling.awq_rule`) takes them from too.

Cost: the scale search runs the inspect module ``num_grid`` times on about
:data:`~.scaling.SEARCH_TOKENS` calibration tokens (whole sequences); statistics use every token.
"""

from __future__ import annotations

import fnmatch
import logging

import torch
import torch.nn as nn

from quark.torch.quantization.config.algo_configs import AWQConfig
from quark.torch.quantization.config.config import first_stage
from quark.torch.quantization.config.type import QSchemeType
from quark.torch.quantization.fused_experts import FusedProjection
from quark.torch.quantization.modules import QuantLinear
from quark.torch.quantization.moe import (
    DOWN_ROLES,
    INPUT_ROLES,
    RoutedTokens,
    block_fused_experts,
    expert_matrix,
    iter_experts,
    record_routed_tokens,
    static_weight_projections,
)
from quark.torch.quantization.online_rotation import online_rotation
from quark.torch.quantization.tensor_quantize import fake_quantize

from . import BlockAlgorithm, BlockContext, register_algorithm, scaling
from .expert_scaling import awq_rule, scale_block_experts
from .scaling import ScaleEvaluator, awq_candidates, capture, check_pairs, fold, resolve_sites, search

logger = logging.getLogger(__name__)

#: the clipping search shrinks each group's range to at most this fraction
MAX_SHRINK = 0.5


def clip_group_width(spec: object, in_features: int) -> int | None:
    """The group width the clipping search works on for a weight of ``spec`` (``in_features`` for
    per-row scales), or None when its scales are not per row / per group (per-tensor, two-stage)."""
    if spec is None or isinstance(spec, list):
        return None
    spec = first_stage(spec)
    if spec.qscheme is QSchemeType.per_group and spec.group_size:
        return int(spec.group_size)
    if spec.qscheme is QSchemeType.per_channel and (spec.ch_axis or 0) == 0:
        return in_features
    return None


def _clip_groups(layer: QuantLinear) -> int | None:
    q = layer.weight_quantizer
    return None if q is None else clip_group_width(q.spec, layer.in_features)


def clip_layer(layer: QuantLinear, x: torch.Tensor, num_grid: int, max_shrink: float = MAX_SHRINK,
               refine_rounds: int = 2) -> torch.Tensor:
    """Clamp the layer's weight, per quantization group, to the range with the lowest output error on
    inputs ``x`` ([tokens, in_features]) (:func:`clip_matrix`); returns the chosen ``(low, high)``
    ratios per (row, group), ``[rows, groups, 2]``."""
    g = _clip_groups(layer)
    if g is None:
        raise ValueError("clip_layer needs a per-group or per-row weight quantizer")
    clipped, ratios = clip_matrix(layer.weight.detach(), layer.weight_quantizer.spec, g, x, num_grid, max_shrink,
                                  refine_rounds)
    with torch.no_grad():
        layer.weight.copy_(clipped)
    return ratios


def clip_matrix(w: torch.Tensor, spec: object, g: int, x: torch.Tensor, num_grid: int,
                max_shrink: float = MAX_SHRINK, refine_rounds: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[out, in]`` weight ``w`` (quantized as ``spec`` in groups of ``g`` input columns) clamped,
    per group, to the range with the lowest output error on inputs ``x`` ([tokens, in]), and the
    chosen ``(low, high)`` ratios per (row, group), ``[rows, groups, 2]``.

    The range ``[r_lo * min, r_hi * max]`` of each group is searched on the grid ``r = 1, 1 -
    max_shrink / num_grid, ...`` (``num_grid`` values): first both ends together (``r_lo = r_hi``),
    then ``refine_rounds`` rounds of the high end alone and the low end alone (coordinate descent: a
    group whose largest and smallest weights are not equally extreme may want only one end clipped).
    Every step keeps a group's range unless the error drops, so the result never does worse than the
    unclipped weight on ``x``. From the second round on, a sweep skips the groups whose other end has
    not moved since that end's last sweep (it would evaluate the same pairs again): the same result
    as evaluating every group, with about a third fewer evaluations."""
    w = w.detach()
    n, k = w.shape
    groups = k // g
    wf = w.float()
    # one quantization group per row, group-major (item j * n + r is group j of row r): a selection of
    # items in increasing order is sorted by group, and all items are one contiguous block per group
    flat = wf.view(n, groups, g).transpose(0, 1).reshape(groups * n, g)
    lo, hi = flat.amin(-1), flat.amax(-1)  # [G * n]
    xg = x.float().reshape(-1, groups, g).transpose(0, 1)  # [G, T, g]
    use_gram = g <= xg.shape[1]
    gram = xg.transpose(1, 2) @ xg if use_gram else None  # [G, g, g]

    def select(mask: torch.Tensor | None) -> tuple[torch.Tensor | slice, list[int], torch.Tensor]:
        """The items of ``mask`` ([G * n]; None: all, as ``slice(None)``), the count per group, and their
        weights ``[m, g]``."""
        if mask is None:
            return slice(None), [n] * groups, flat
        items = mask.nonzero().squeeze(1)
        return items, torch.bincount(items // n, minlength=groups).tolist(), flat[items]

    def clamp(wi: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """``torch.clamp(wi, low, high)`` with bounds per row of ``wi``, as maximum then minimum: the same
        values (also where the bounds cross) at about 4x the speed of clamp's broadcast-tensor kernel on CPU."""
        return torch.minimum(torch.maximum(wi, low[..., None]), high[..., None])

    def error(sel: tuple, r_lo: torch.Tensor, r_hi: torch.Tensor) -> torch.Tensor:
        """Output error of the selected groups clamped to ``[lo r_lo, hi r_hi]`` and quantized ([m])."""
        items, counts, wi = sel
        clipped = clamp(wi, lo[items] * r_lo, hi[items] * r_hi)
        d = fake_quantize(clipped.to(w.dtype), spec).float() - wi  # [m, g]: one group per row
        if isinstance(items, slice):  # every group: one batched product
            d = d.view(groups, n, g)
            return (((d @ gram) * d).sum(-1) if use_gram else (xg @ d.transpose(1, 2)).pow(2).sum(1)).reshape(-1)
        out = []
        for j, dj in enumerate(d.split(counts)):
            if dj.shape[0]:
                out.append(((dj @ gram[j]) * dj).sum(-1) if use_gram else (xg[j] @ dj.t()).pow(2).sum(0))
        return torch.cat(out)

    every = select(None)
    best_lo, best_hi = torch.ones_like(lo), torch.ones_like(hi)
    best = error(every, best_lo, best_hi)

    def consider(sel: tuple, r_lo: torch.Tensor, r_hi: torch.Tensor) -> None:
        items = sel[0]
        err, was = error(sel, r_lo, r_hi), best[items]
        better = err < was
        best[items] = torch.where(better, err, was)
        best_lo[items] = torch.where(better, r_lo, best_lo[items])
        best_hi[items] = torch.where(better, r_hi, best_hi[items])

    def sweep(sel: tuple, end: str) -> None:
        """Search one end of the selected groups' ranges over the grid, the other end fixed."""
        items, _, wi = sel
        if wi.shape[0] == 0:
            return
        fixed = (best_lo if end == "hi" else best_hi)[items].clone()
        for r in ratios:
            ratio = torch.full_like(fixed, r)
            if end == "hi":
                consider(sel, fixed, ratio)
            else:
                consider(sel, ratio, fixed)

    ratios = [1.0 - max_shrink * i / num_grid for i in range(1, num_grid)]
    for r in ratios:
        both = torch.full_like(lo, r)
        consider(every, both, both)
    # Coordinate descent. A sweep whose fixed end has not moved since the same end's last sweep would
    # evaluate the same pairs again, and those cannot win again: from the second round on, a high-end
    # sweep needs only the groups whose low end the last low-end sweep moved, and a low-end sweep those
    # whose high end the sweep before it moved (on SmolLM2 about 17% and 2% of the groups)
    moved_lo = moved_hi = None
    for round_ in range(refine_rounds):
        before = best_hi.clone()
        sweep(every if round_ == 0 else select(moved_lo), "hi")
        moved_hi = best_hi != before
        before = best_lo.clone()
        sweep(every if round_ == 0 else select(moved_hi), "lo")
        moved_lo = best_lo != before
    final = clamp(flat, lo * best_lo, hi * best_hi)  # group-major, as the search
    clipped = final.view(groups, n, g).transpose(0, 1).reshape(n, k).to(w.dtype)
    return clipped, torch.stack([best_lo.view(groups, n).t(), best_hi.view(groups, n).t()], -1)  # [n, G, 2]


def clip_block_experts(ctx: BlockContext, num_grid: int, exclude: list[str] | tuple[str, ...] = (),
                       records: dict[str, RoutedTokens] | None = None) -> int:
    """AWQ's clipping search (:func:`clip_matrix`) on every expert of every fused experts module of the
    block: each expert's gate/up and down matrices, on the float inputs of the calibration tokens
    routed to it (``records``: :func:`~quark.torch.quantization.moe.record_routed_tokens` of a float
    pass of the block after its scales are folded, made here when None; the down projection's inputs
    are computed before the expert's gate/up matrices are clipped). Projections matching ``exclude``
    (``<module>.<parameter path>``), without per-group / per-row static weight scales, or whose input
    is rotated online (R4) keep their range, and so do experts that got no token. Returns how many
    expert matrices were searched."""
    plans: dict[str, list[tuple[FusedProjection, int]]] = {}
    for name, m in block_fused_experts(ctx.block).items():
        roles = INPUT_ROLES if online_rotation(m) is not None else INPUT_ROLES + DOWN_ROLES
        plan = []
        for fp in static_weight_projections(m, roles):
            if any(fnmatch.fnmatchcase(f"{name}.{fp.proj.path}", pat) for pat in exclude):
                continue
            g = clip_group_width(fp.weight_quantizer.spec, fp.in_features)
            if g is not None:
                plan.append((fp, g))
        if plan:
            plans[name] = plan
    if not plans:
        return 0
    if records is None:
        records = record_routed_tokens(ctx.block, ctx.inputs, ctx.index,
                                       {name: ctx.block.get_submodule(name) for name in plans})
    searched = 0
    for name, plan in plans.items():
        for expert in iter_experts(records[name]):
            x = expert.tokens()
            if any(fp.proj.role in DOWN_ROLES for fp, _ in plan):
                hidden = expert.float_hidden()
            for fp, g in plan:
                w = expert_matrix(expert.module, fp, expert.index)
                clipped, _ = clip_matrix(w, fp.weight_quantizer.spec, g,
                                         hidden if fp.proj.role in DOWN_ROLES else x, num_grid)
                with torch.no_grad():
                    w.copy_(clipped)
                searched += 1
    return searched


class AWQ(BlockAlgorithm):
    config_class = AWQConfig

    def prepare_model(self, model: nn.Module, config: AWQConfig) -> None:
        check_pairs(model, config)

    def apply(self, ctx: BlockContext, config: AWQConfig) -> None:
        sites = resolve_sites(ctx, config.scaling_layers, algorithm=self.name)
        clip = {}
        if config.clip_search:
            for name, layer in ctx.linears().items():
                if any(fnmatch.fnmatchcase(name, p) for p in config.clip_exclude):
                    continue
                if _clip_groups(layer) is None:
                    logger.debug("awq: %s has no per-group/per-row weight scales; no clipping", name)
                    continue
                clip[name] = layer
        single = {n: m for site in sites if site.inspect is None for n, m in site.layers.items()}
        datas, samples = capture(ctx, sites, search=True, stats_tokens=scaling.STATS_TOKENS, sample_layers={**single, **clip})
        scales = []
        for site, data in zip(sites, datas):
            candidates = awq_candidates(data.stats.absmean, config.num_grid)
            evaluator = ScaleEvaluator(site, data, samples, "mse", search_dtype=config.search_dtype)
            best, losses = search(evaluator, candidates)
            logger.debug("awq block %d %s: alpha=%.2f loss %.3g (rounding %.3g)", ctx.index, site.describe(),
                         best / config.num_grid, losses[best], losses[0])
            scales.append(candidates[best] if best else None)
        for site, s in zip(sites, scales):
            if s is None:
                continue
            fold(site, s)
            for name in site.layers:
                if name in samples:
                    samples[name] = samples[name] / s.to(samples[name].device)
        for name, layer in clip.items():
            if name in samples:  # a layer no calibration token reached (an idle expert) keeps its range
                clip_layer(layer, samples[name], config.num_grid)
        # inside every fused MoE expert: up -> down scales, then clipping, both on the expert's own
        # tokens from one float pass (the down scales leave the experts' inputs as they are)
        experts = block_fused_experts(ctx.block)
        records = (record_routed_tokens(ctx.block, ctx.inputs, ctx.index, experts)
                   if experts and (config.scale_expert_down or config.clip_search) else None)
        if config.scale_expert_down:
            scale_block_experts(ctx, awq_rule(config.num_grid), self.name, records)
        if config.clip_search:
            searched = clip_block_experts(ctx, config.num_grid, config.clip_exclude, records)
            if searched:
                logger.debug("awq block %d: clipping searched on %d expert matrices", ctx.index, searched)


ALGORITHM = register_algorithm(AWQ())
