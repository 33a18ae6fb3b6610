"""AutoSmoothQuant: SmoothQuant (Xiao et al. 2022, arXiv:2211.10438) with ``alpha`` searched per pair.

The paper picks one migration strength ``alpha`` for the whole model; the best value differs from
layer to layer. Per scaling pair of the template, this searches ``alpha`` over ``num_grid`` evenly
spaced values in ``[0, 1]`` (plus "no smoothing"), each giving the SmoothQuant scale
``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (clamped below at ``scale_clamp_min``), and keeps the
one whose quantized output of the pair's ``inspect`` module (or single layer) is closest to the
float output under ``compute_scale_loss`` (MSE, MAE or RMSE). The pair's layers are evaluated with
their weight *and* input quantization acting on the scaled tensors; a static per-tensor input scale
is computed during the search from the min-max range of the scaled activations over the whole
calibration set (what a min-max observer records after the fold). The scale is then folded like
SmoothQuant's.

Every pair is searched on the unmodified block (the other layers float) and the scales are folded
afterwards. A pair may list a MoE router and fused experts (the MLP norm's site of the MoE
templates): the candidates scale the router's and every expert's gate/up columns, and the experts'
input quantization is simulated with one per-tensor range for all experts (the calibration set's;
each expert's own observer sees a sub-range of it). Inside each fused expert, ``up -> down`` gets
its own searched scale (:func:`~.expert_scaling.autosmooth_rule`, ``scale_expert_down``). Cost: ``num_grid + 1`` evaluations of the inspect module on about
:data:`~.scaling.SEARCH_TOKENS` calibration tokens (whole sequences) per pair.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from quark.torch.quantization.config.algo_configs import AutoSmoothQuantConfig

from . import BlockAlgorithm, BlockContext, register_algorithm, scaling
from .expert_scaling import autosmooth_rule, scale_block_experts
from .scaling import ScaleEvaluator, capture, check_pairs, fold, resolve_sites, search, smooth_candidate

logger = logging.getLogger(__name__)


def alpha_grid(num_grid: int) -> list[float]:
    """``num_grid`` evenly spaced values in ``[0, 1]`` (both ends included)."""
    if num_grid < 1:
        raise ValueError(f"num_grid={num_grid}; it must be at least 1")
    return [0.5] if num_grid == 1 else [i / (num_grid - 1) for i in range(num_grid)]


class AutoSmoothQuant(BlockAlgorithm):
    config_class = AutoSmoothQuantConfig

    def prepare_model(self, model: nn.Module, config: AutoSmoothQuantConfig) -> None:
        check_pairs(model, config)

    def apply(self, ctx: BlockContext, config: AutoSmoothQuantConfig) -> None:
        sites = resolve_sites(ctx, config.scaling_layers, algorithm=self.name)
        single = {n: m for site in sites if site.inspect is None for n, m in site.layers.items()}
        datas, samples = capture(ctx, sites, search=True, stats_tokens=scaling.STATS_TOKENS, sample_layers=single)
        alphas = alpha_grid(config.num_grid)
        scales = []
        for site, data in zip(sites, datas):
            absmax = data.stats.absmax
            candidates = [torch.ones_like(absmax)] + [
                smooth_candidate(site, absmax, a, config.scale_clamp_min) for a in alphas
            ]
            evaluator = ScaleEvaluator(site, data, samples, config.compute_scale_loss,
                                        search_dtype=config.search_dtype)
            best, losses = search(evaluator, candidates)
            logger.debug("autosmoothquant block %d %s: %s loss %.3g (no smoothing %.3g)", ctx.index,
                         site.describe(), "no smoothing" if best == 0 else f"alpha={alphas[best - 1]:.2f}",
                         losses[best], losses[0])
            scales.append(candidates[best] if best else None)
        for site, s in zip(sites, scales):
            if s is not None:
                fold(site, s)
        # inside every fused MoE expert: up -> down, searched on the expert's own tokens
        if config.scale_expert_down:
            scale_block_experts(ctx, autosmooth_rule(alphas, config.scale_clamp_min), self.name)


ALGORITHM = register_algorithm(AutoSmoothQuant())
