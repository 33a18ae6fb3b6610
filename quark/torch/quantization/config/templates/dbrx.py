"""DBRX (``modeling_dbrx.py``): ``transformer.blocks.N.{norm_attn_norm.{norm_1, attn.Wqkv,
attn.out_proj, norm_2}, ffn.{router.layer, experts.mlp}}``.

Attention uses one fused ``Wqkv`` (clipped to ``clip_qkv``): its output scale bounds the K/V cache
scale; no separate Q layer. The experts are fused parameters ``ffn.experts.mlp.{w1, v1, w2}``
(``w1`` gate, ``v1`` up, ``w2`` down), so ``norm_2`` (which also feeds the router) is no scaling
site; ``norm_1`` (a LayerNorm without bias) feeds ``Wqkv`` alone. Clipping acts on Wqkv's output, so
scaling its input stays exact.

Rotation: R1 by a rotation that keeps the all-ones direction (LayerNorms without bias, see
:mod:`quark.torch.algorithm.rotation`):
``Wqkv``, the router and the experts' ``w1``/``v1`` read the rotated stream, ``out_proj`` and the experts'
``w2`` write it. No R2: ``clip_qkv`` (8 in the released checkpoints) clamps ``Wqkv``'s output elementwise,
which a rotation of V's heads does not commute with (``r2=True, fused_qkv=True, v_proj=Wqkv`` is exact
without it). No R4 (no down-projection linear).
"""

from __future__ import annotations

from ._common import algorithms, pair, rotation, template

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
            rotation(
                "transformer.blocks",
                embedding_layers=["transformer.wte"],
                final_norm="transformer.norm_f",
                attn_norm="norm_attn_norm.norm_1",
                attn_inputs=[f"{_ATTN}.Wqkv"],
                o_proj=f"{_ATTN}.out_proj",
                mlp_norm="norm_attn_norm.norm_2",
                mlp_inputs=["ffn.router.layer", "ffn.experts"],
                mlp_outputs=["ffn.experts"],
                r2=False,
            ),
        ),
    ),
]
