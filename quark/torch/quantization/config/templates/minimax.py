"""MiniMax-M2 and MiniMax-M3 (VL).

MiniMax-M2 (``model_type: minimax_m2``) has two layouts:

* transformers 5.24 ``MiniMaxM2ForCausalLM``: ``mlp.gate`` router + fused ``mlp.experts``;
* the remote code of MiniMaxAI/MiniMax-M2 (``modeling_minimax_m2.py``, also the checkpoint names
  vLLM reads): ``block_sparse_moe.gate`` (an ``nn.Linear`` router, plus an
  ``e_score_correction_bias``) and ``block_sparse_moe.experts.N.{w1,w2,w3}`` (``w1`` gate, ``w3`` up,
  ``w2`` down).

The template covers both: the per-expert sites only apply where the experts are ``nn.Linear``.
Attention is grouped-K/V ``self_attn.{q,k,v,o}_proj`` with q/k RMSNorms after the projections.

MiniMax-M3 VL (transformers 5.24 ``MiniMaxM3SparseForConditionalGeneration``, text decoder at
``model.language_model.layers``): RMSNorms compute ``norm(x) * (1 + w)``; dense blocks use a fused
``mlp.gate_up_proj`` + ``mlp.down_proj`` (with clamps and ``(up + 1)``, so no ``up -> down``),
sparse blocks a router ``mlp.gate``, fused experts and ``mlp.shared_experts.{gate_up,down}_proj``.
Sparse-attention blocks add a lightning indexer ``self_attn.indexer.{q,k}_proj`` that also reads the
normed hidden state: the K/V and Q patterns are anchored on ``self_attn.`` so the indexer never
counts as K/V, and the attention scaling site uses ``self_attn*.[qkv]_proj``, which expands to
q, k, v plus the indexer projections exactly where the indexer exists.

Rotation (R1, R2) for MiniMax-M2's transformers layout: the router ``mlp.gate`` and the fused experts
read the stream, the experts' down side writes it (the q/k RMSNorms act on the projections' outputs,
which R1 leaves unchanged); the remote layout (``block_sparse_moe.experts.N``) is refused by name
(pass ``algo_configs``). MiniMax-M3 (R1, R2): its ``(1 + w)`` norms fold like RMSNorms; q/k/v and, in
sparse-attention blocks, the indexer's q/k projections read the stream; dense blocks' ``gate_up_proj``
or the router, the fused experts and the shared experts' ``gate_up_proj`` read it, the down
projections write it; both projector outputs (``linear_2``, ``merge_linear_2``) replace image-token
embeddings and are rotated like them.
"""

from __future__ import annotations

from ._common import (
    FUSED_GATE_UP,
    KV_PROJ,
    Q_PROJ,
    algorithms,
    attn_groups,
    attn_pairs,
    multimodal_rotation_roles,
    pair,
    rotation,
    template,
)

_MOE = "block_sparse_moe"
_EXPERT = f"{_MOE}.experts.*"

TEMPLATES = [
    template(
        "minimax_m2",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=["*w1", "*w3", *FUSED_GATE_UP],
        exclude=["*mlp.gate", f"*{_MOE}.gate"],
        algorithm_configs=algorithms(
            "model.layers",
            attn_pairs()
            + [
                pair("post_attention_layernorm", [f"{_MOE}.gate", f"{_EXPERT}.w1", f"{_EXPERT}.w3"], _MOE),
            ],
            attn_groups() + [[f"{_EXPERT}.w3", f"{_EXPERT}.w1"], [f"{_EXPERT}.w2"]],
            rotation("model.layers", mlp_inputs=["mlp.gate", "mlp.experts"], mlp_outputs=["mlp.experts"]),
        ),
    ),
    template(
        "minimax_m3_vl",
        kv=["*self_attn.k_proj", "*self_attn.v_proj"],
        q="*self_attn.q_proj",
        gate_up=["*gate_up_proj"],
        exclude=["*mlp.gate", "*vision_tower*", "*multi_modal_projector*"],
        algorithm_configs=algorithms(
            "model.language_model.layers",
            [
                pair("input_layernorm", ["self_attn*.[qkv]_proj"], "self_attn"),
                pair("post_attention_layernorm", ["mlp.gate_up_proj"], "mlp"),
            ],
            attn_groups(qkv=("k_proj", "v_proj", "q_proj", "indexer.k_proj", "indexer.q_proj"))
            + [
                ["mlp.gate_up_proj", "mlp.shared_experts.gate_up_proj"],
                ["mlp.down_proj", "mlp.shared_experts.down_proj"],
            ],
            rotation(
                "model.language_model.layers",
                attn_inputs=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.indexer.q_proj",
                             "self_attn.indexer.k_proj"],
                mlp_inputs=["mlp.gate_up_proj", "mlp.gate", "mlp.experts", "mlp.shared_experts.gate_up_proj"],
                mlp_outputs=["mlp.down_proj", "mlp.experts", "mlp.shared_experts.down_proj"],
                **multimodal_rotation_roles(
                    "model.language_model",
                    ["model.multi_modal_projector.linear_2", "model.multi_modal_projector.merge_linear_2"],
                ),
            ),
        ),
    ),
]
