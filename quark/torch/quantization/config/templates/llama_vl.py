"""Llama 4 and Llama 3.2 Vision (mllama), loaded as ``*ForConditionalGeneration``.

Llama 4 (``modeling_llama4.py``): text decoder at ``language_model.model.layers``, LM head
``language_model.lm_head``; every block has ``self_attn.{q,k,v,o}_proj`` (parameter-free L2 q/k norm)
and a ``feed_forward`` that is either a dense ``Llama4TextMLP`` (``gate_proj``/``up_proj``/``down_proj``,
interleaved in Maverick) or a MoE (``feed_forward.router``, an ``nn.Linear`` subclass; fused
``feed_forward.experts``; ``feed_forward.shared_expert.{gate,up,down}_proj``). The MoE norm also feeds
the router and fused experts: SmoothQuant's and AWQ's MoE pair (from rotation's ``mlp_inputs``). ``vision_model`` and ``multi_modal_projector``
are excluded.

Mllama (``modeling_mllama.py``): text decoder at ``model.language_model.layers`` mixing self-attention
blocks (``self_attn``) and cross-attention blocks (``cross_attn``, whose k/v read the vision states,
so only ``cross_attn.q_proj`` follows ``input_layernorm``). Text-only calibration skips the
cross-attention blocks entirely. ``vision_model`` and ``multi_modal_projector`` are excluded.

Grouped K/V heads in both: no ``v -> o``.

Rotation (R1, R2) for Llama 4: pre-norm RMSNorms; the router, the fused experts' and the shared
expert's gate/up (or a dense block's gate/up) read the rotated stream, their down projections write
it (the router's scores scale the experts' inputs per token, which commutes with the rotation); the
image features replace image-token embeddings, so ``multi_modal_projector.linear_1`` is rotated like
the embeddings (``stream_writers``). Rotation (R1, R2) for Mllama: self-attention blocks as Llama's;
in cross-attention blocks only ``cross_attn.q_proj`` reads the stream (k/v read the vision states,
which are not rotated), ``cross_attn.o_proj`` writes it, and R2 rotates ``cross_attn.v_proj``'s heads
(the vision keys/values mixed by the attention) with ``cross_attn.o_proj``'s inputs; the tanh gates
are scalars.
"""

from __future__ import annotations

from ._common import (
    GATE_UP_PROJ,
    KV_PROJ,
    Q_PROJ,
    algorithms,
    attn_groups,
    attn_pairs,
    merge_groups,
    mlp_groups,
    mlp_pairs,
    multimodal_rotation_roles,
    pair,
    rotation,
    template,
)

TEMPLATES = [
    template(
        "llama4",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=GATE_UP_PROJ,
        exclude=["language_model.lm_head", "*router*", "*vision_model*", "*multi_modal_projector*"],
        algorithm_configs=algorithms(
            "language_model.model.layers",
            attn_pairs()
            + mlp_pairs("post_attention_layernorm", mlp="feed_forward")
            + mlp_pairs(None, mlp="feed_forward.shared_expert"),
            attn_groups() + mlp_groups(("feed_forward", "feed_forward.shared_expert")),
            rotation(
                "language_model.model.layers",
                mlp_inputs=["feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.router",
                            "feed_forward.experts", "feed_forward.shared_expert.gate_proj",
                            "feed_forward.shared_expert.up_proj"],
                down_proj="feed_forward.down_proj",
                mlp_outputs=["feed_forward.down_proj", "feed_forward.experts", "feed_forward.shared_expert.down_proj"],
                **multimodal_rotation_roles(
                    "language_model.model", ["multi_modal_projector.linear_1"], lm_head="language_model.lm_head"
                ),
            ),
        ),
    ),
    template(
        "mllama",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=GATE_UP_PROJ,
        exclude=["*vision_model*", "*multi_modal_projector*"],
        algorithm_configs=algorithms(
            "model.language_model.layers",
            attn_pairs()
            + [pair("input_layernorm", ["cross_attn.q_proj"], "cross_attn")]
            + mlp_pairs("post_attention_layernorm"),
            merge_groups(attn_groups(), attn_groups("cross_attn")) + mlp_groups(),
            rotation(
                "model.language_model.layers",
                embedding_layers=["model.language_model.embed_tokens"],
                final_norm="model.language_model.norm",
                attn_inputs=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "cross_attn.q_proj"],
                v_proj="self_attn.v_proj|cross_attn.v_proj",
                o_proj="self_attn.o_proj|cross_attn.o_proj",
            ),
        ),
    ),
]
