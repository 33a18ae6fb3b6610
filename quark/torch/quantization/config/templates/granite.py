"""Granite 4.0 hybrid (``modeling_granitemoehybrid.py``): Mamba-2 and attention blocks, MoE + shared MLP.

Each block has either ``mamba.{in_proj, norm, out_proj}`` or ``self_attn.{q,k,v,o}_proj`` behind
``input_layernorm``; then ``post_attention_layernorm`` feeds ``block_sparse_moe`` (router
``block_sparse_moe.router``, fused experts) *and* ``shared_mlp.{input_linear, output_linear}``
(``input_linear`` is the fused gate+up projection), so it is no scaling site. The gated RMSNorm
``mamba.norm`` has one weight per channel of ``out_proj``'s input: an exact site. Grouped K/V heads:
no ``v -> o``.

Rotation (R1): ``input_layernorm`` feeds q/k/v or ``mamba.in_proj``, and ``self_attn.o_proj`` or
``mamba.out_proj`` writes the stream (the gated norm ``mamba.norm`` acts inside the mixer, before
``out_proj``); the router, the fused experts' input side and ``shared_mlp.input_linear`` read it,
the experts' down side and ``shared_mlp.output_linear`` write it. No R2 (Mamba blocks have no V), no R4.
"""

from __future__ import annotations

from ._common import (
    KV_PROJ,
    Q_PROJ,
    algorithms,
    attn_groups,
    attn_pairs,
    merge_groups,
    pair,
    rotation,
    template,
)

TEMPLATES = [
    template(
        "granitemoehybrid",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=["*shared_mlp.input_linear"],
        exclude=["*router*"],
        algorithm_configs=algorithms(
            "model.layers",
            attn_pairs()
            + [
                pair("input_layernorm", ["mamba.in_proj"], "mamba"),
                pair("mamba.norm", ["mamba.out_proj"]),
            ],
            merge_groups(attn_groups(), [["mamba.in_proj"], ["mamba.out_proj"]])
            + [["shared_mlp.input_linear"], ["shared_mlp.output_linear"]],
            rotation(
                "model.layers",
                attn_inputs=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mamba.in_proj"],
                o_proj="self_attn.o_proj|mamba.out_proj",
                mlp_inputs=["block_sparse_moe.router", "block_sparse_moe.experts", "shared_mlp.input_linear"],
                mlp_outputs=["block_sparse_moe.experts", "shared_mlp.output_linear"],
                r2=False,
            ),
        ),
    ),
]
