"""ChatGLM2/3 and GLM-4-9B-chat remote code (``model_type: chatglm``, ``modeling_chatglm.py`` of
THUDM/chatglm3-6b and THUDM/glm-4-9b-chat; ``ChatGLMForConditionalGeneration``).

Names: ``transformer.encoder.layers.N.{input_layernorm, self_attention.query_key_value,
self_attention.dense, post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h}``; the LM head
is ``transformer.output_layer`` (no ``lm_head`` module). RMSNorm pre-norms. Q, K and V come out of
the fused ``query_key_value`` (grouped "multi-query" K/V), whose output scale is a safe bound for the
K/V cache scale; ``dense_h_to_4h`` is the fused gate+up projection (``silu(x[0]) * x[1]``), so there is
no ``up -> down`` site. No rotation (fused QKV).
"""

from __future__ import annotations

from ._common import algorithms, pair, template

TEMPLATES = [
    template(
        "chatglm",
        kv=["*query_key_value"],
        q=None,
        gate_up=["*dense_h_to_4h"],
        exclude=["transformer.output_layer"],
        algorithm_configs=algorithms(
            "transformer.encoder.layers",
            pairs=[
                pair("input_layernorm", ["self_attention.query_key_value"], "self_attention"),
                pair("post_attention_layernorm", ["mlp.dense_h_to_4h"], "mlp"),
            ],
            groups=[
                ["self_attention.query_key_value"],
                ["self_attention.dense"],
                ["mlp.dense_h_to_4h"],
                ["mlp.dense_4h_to_h"],
            ],
        ),
    ),
]
