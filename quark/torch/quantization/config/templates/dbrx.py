"""DBRX (``modeling_dbrx.py``): ``transformer.blocks.N.{norm_attn_norm.{norm_1, attn.Wqkv,
attn.out_proj, norm_2}, ffn.{router.layer, experts.mlp}}``.

Attention uses one fused ``Wqkv`` (clipped to ``clip_qkv``): its output scale bounds the K/V cache
scale; no separate Q layer. The experts are fused parameters ``ffn.experts.mlp.{w1, v1, w2}``
(``w1`` gate, ``v1`` up, ``w2`` down), so ``norm_2`` (which also feeds the router) is no scaling
site; ``norm_1`` (a LayerNorm without bias) feeds ``Wqkv`` alone. Clipping acts on Wqkv's output, so
scaling its input stays exact.

No rotation default: DBRX's norms are LayerNorms (mean subtraction), and ``Wqkv`` fuses Q, K and V.
"""

from __future__ import annotations

from ._common import algorithms, pair, template

_ATTN = "norm_attn_norm.attn"

TEMPLATES = [
    template(
        "dbrx",
        kv=["*Wqkv"],
        q=None,
        gate_up=["*w1", "*v1"],
        exclude=["*router*"],
        algorithm_configs=algorithms(
            "transformer.blocks",
            [pair("norm_attn_norm.norm_1", [f"{_ATTN}.Wqkv"], _ATTN)],
            [[f"{_ATTN}.Wqkv"], [f"{_ATTN}.out_proj"]],
        ),
    ),
]
