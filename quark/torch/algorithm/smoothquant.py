"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438): migrate activation outliers into the weights.

Per-tensor activation quantization suffers from a few input channels with outliers far larger than
the rest. Per scaling pair of the template, SmoothQuant divides input channel ``j`` of the
activations by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (clamped below at ``scale_clamp_min``)

and multiplies the weights' column ``j`` by it, folded into the previous op (norm weight, or a
previous linear's output rows) so the float model is unchanged. ``max|X_j|`` is taken over every
calibration token reaching the pair's layers, ``max|W_j|`` over every layer of the pair; ``alpha``
balances the difficulty between activations and weights (0.5 in the paper).

After rotation with ``r4`` (``algorithm=["rotation", "smoothquant"]``) down_proj rotates its input
online; SmoothQuant then scales in the unrotated basis (statistics of the input before the rotation,
``W <- (W Q^T diag(s)) Q`` for the stored ``W Q``), i.e. it smooths and *then* rotates, the
combination SmoothRot (Czakó et al. 2025, arXiv:2506.05413) describes: the rotation spreads what
smoothing moved into the weights and whatever outliers are left in the activations.

In MoE blocks the MLP norm feeds a router and the fused experts (3-D weights) besides any shared
expert: a pair may list those (``post_attention_layernorm -> mlp.gate, mlp.experts``); the scale
multiplies the router's columns and every expert's gate/up input columns, and ``max|W_j|`` is over all
of them. The MoE templates derive that pair from rotation's ``mlp_inputs`` (the same readers). Inside
each fused expert, ``up -> down`` gets the expert's own scale (:mod:`.expert_scaling`).

The scale formula (:func:`~.scaling.smooth_scale`, :func:`~.scaling.smooth_candidate`) lives in
:mod:`.scaling`, where AutoSmoothQuant and the per-expert rules take it from too.
"""

from __future__ import annotations

import torch.nn as nn

from quark.torch.quantization.config.algo_configs import SmoothQuantConfig

from . import BlockAlgorithm, BlockContext, register_algorithm
from .expert_scaling import scale_block_experts, smooth_rule
from .scaling import capture, check_pairs, fold, resolve_sites, smooth_candidate


class SmoothQuant(BlockAlgorithm):
    config_class = SmoothQuantConfig

    def prepare_model(self, model: nn.Module, config: SmoothQuantConfig) -> None:
        check_pairs(model, config)

    def apply(self, ctx: BlockContext, config: SmoothQuantConfig) -> None:
        sites = resolve_sites(ctx, config.scaling_layers, through_online_rotation=True, algorithm=self.name)
        datas, _ = capture(ctx, sites, search=False)
        scales = [smooth_candidate(site, data.stats.absmax, config.alpha, config.scale_clamp_min)
                  for site, data in zip(sites, datas)]
        for site, s in zip(sites, scales):  # all statistics come from the unscaled block
            fold(site, s)
        # inside every fused MoE expert: up -> down, from a float pass of the block as folded so far
        if config.scale_expert_down:
            scale_block_experts(ctx, smooth_rule(config.alpha, config.scale_clamp_min), self.name)


ALGORITHM = register_algorithm(SmoothQuant())
