"""DeepSeek family and its derivatives (Kimi K2 / K2.5, DeepSeek-VL2). See :mod:`._mla`.

Sources of the module names:

* ``deepseek``: remote code of deepseek-ai/deepseek-moe-16b (``modeling_deepseek.py``,
  ``DeepseekForCausalLM``): Llama attention ``self_attn.{q,k,v,o}_proj`` with 16 heads and 16 K/V
  heads (so ``v -> o`` is exact), DeepSeek-MoE MLP with ``nn.Linear`` experts.
* ``deepseek_v2`` / ``deepseek_v3`` / ``deepseek_v32`` / ``deepseek_v4``: transformers 5.24
  (fused experts). DeepSeek-V2-Lite has ``q_lora_rank=None`` (``self_attn.q_proj``).
* ``kimi_k2``: remote code of moonshotai/Kimi-K2-Instruct (DeepSeek-V3 ``modeling_deepseek.py``,
  ``nn.Linear`` experts). ``kimi_k25``: transformers 5.24 ``Kimi_K25ForConditionalGeneration`` (a
  DeepSeek-V3 text decoder at ``model.language_model.layers``, ``vision_tower`` + ``mm_projector``).
* ``deepseek_vl_v2``: remote code of deepseek-ai/DeepSeek-VL2 (``DeepseekVLV2ForCausalLM``): SigLIP
  ``vision``, ``projector``, and a DeepSeek-V2 ``language`` model (``language.model.layers``,
  ``language.lm_head``) with ``nn.Linear`` experts; VL2 / VL2-Small use MLA (VL2-Small without
  q-LoRA), VL2-Tiny plain multi-head attention (``self_attn.{q,k,v,o}_proj``).

DeepSeek-V4 (``modeling_deepseek_v4.py``): every block is MoE (hash or top-k router ``mlp.gate``,
fused experts, ``mlp.shared_experts``); attention has ``q_a_proj -> q_a_norm -> q_b_proj``, one
shared K=V projection ``kv_proj`` (the KV cache), a grouped ``o_a_proj`` (a block-diagonal
``nn.Linear`` subclass with its own forward, excluded so it is never swapped for a plain quantized
linear) and ``o_b_proj``. Compressed-attention blocks add ``compressor.{kv,gate}_proj`` (HCA and
CSA) and ``compressor.indexer.{kv,gate,q_b}_proj`` + ``compressor.indexer.scorer.weights_proj``
(CSA only), so the consumers of ``input_layernorm`` and ``q_a_norm`` differ per block kind. The
scaling sites name them with patterns that expand to exactly the consumers present in each kind:
``self_attn*.[kgw]*_proj`` = every ``kv_proj`` / ``gate_proj`` / ``weights_proj`` under
``self_attn`` (all read the normed hidden state; ``q_b_proj`` and ``o_*_proj`` do not), and
``self_attn*q_b_proj`` = the attention and indexer query projections (both read ``q_a_norm``).
The shared experts clamp their gate and up outputs (``swiglu_limit``), which rules out
``up -> down``. The ``gate_proj`` names inside the compressor are not MLP gates: the gate/up
patterns are anchored on ``shared_experts``.

Rotation defaults for DeepSeek-V2 (``q_proj`` or ``q_a_proj``, whichever a block has), V3, V3.2 (the
indexer's ``wk`` and ``weights_proj`` read the stream too) and Kimi K2.5 (R1 through MLA and the MoE
MLP, R2 on ``kv_b_proj``'s value rows: :func:`._mla.moe_rotation`; Kimi K2.5's image features enter the stream through
``mm_projector.out_proj``, rotated like the embeddings); none for V4 (its hyper-connections mix
several residual streams; compressor layers), the remote-code types and DeepSeek-VL2.
"""

from __future__ import annotations

from ._common import (
    GATE_UP_PROJ,
    KV_MLA,
    KV_PROJ,
    Q_MLA,
    Q_PROJ,
    algorithms,
    attn_groups,
    attn_pairs,
    multimodal_rotation_roles,
    pair,
    template,
)
from ._mla import INDEXER_WEIGHTS, ROUTER, mla_groups, mla_pairs, moe_groups, moe_pairs, moe_rotation


def _mla_model(
    model_type: str,
    decoder_layers: str = "model.layers",
    *,
    no_q_lora: bool = False,
    indexer: bool = False,
    linear_experts: bool = False,
    exclude: tuple[str, ...] = (),
    with_rotation: bool = False,
    rotation_roles: dict | None = None,
) -> dict:
    return template(
        model_type,
        kv=KV_MLA,
        q=[Q_PROJ, Q_MLA] if no_q_lora else Q_MLA,
        gate_up=GATE_UP_PROJ,
        exclude=[ROUTER, *([INDEXER_WEIGHTS] if indexer else []), *exclude],
        algorithm_configs=algorithms(
            decoder_layers,
            mla_pairs(no_q_lora=no_q_lora, indexer=indexer) + moe_pairs(linear_experts=linear_experts),
            mla_groups(no_q_lora=no_q_lora, indexer=indexer) + moe_groups(linear_experts=linear_experts),
            moe_rotation(decoder_layers, mla=True, no_q_lora=no_q_lora, indexer=indexer, **(rotation_roles or {}))
            if with_rotation
            else None,
        ),
    )


_V4_ATTN = "self_attn"
_V4_HIDDEN_CONSUMERS = [
    f"{_V4_ATTN}.q_a_proj",
    f"{_V4_ATTN}.kv_proj",
    f"{_V4_ATTN}.compressor.kv_proj",
    f"{_V4_ATTN}.compressor.gate_proj",
    f"{_V4_ATTN}.compressor.indexer.kv_proj",
    f"{_V4_ATTN}.compressor.indexer.gate_proj",
]

TEMPLATES = [
    template(
        "deepseek",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=GATE_UP_PROJ,
        exclude=[ROUTER],
        algorithm_configs=algorithms(
            "model.layers",
            attn_pairs(v_to_o=("v_proj", "o_proj")) + moe_pairs(linear_experts=True),
            attn_groups() + moe_groups(linear_experts=True),
        ),
    ),
    _mla_model("deepseek_v2", no_q_lora=True, with_rotation=True),
    _mla_model("deepseek_v3", with_rotation=True),
    _mla_model("deepseek_v32", indexer=True, with_rotation=True),
    template(
        "deepseek_v4",
        kv=[f"*{_V4_ATTN}.kv_proj"],
        q=f"*{_V4_ATTN}.q_b_proj",
        gate_up=["*shared_experts.gate_proj", "*shared_experts.up_proj"],
        exclude=[ROUTER, "*weights_proj", f"*{_V4_ATTN}.o_a_proj"],
        algorithm_configs=algorithms(
            "model.layers",
            pairs=[
                pair("input_layernorm", [f"{_V4_ATTN}.q_a_proj", f"{_V4_ATTN}*.[kgw]*_proj"], _V4_ATTN),
                pair(f"{_V4_ATTN}.q_a_norm", [f"{_V4_ATTN}*q_b_proj"], _V4_ATTN),
                pair(f"{_V4_ATTN}.o_a_proj", [f"{_V4_ATTN}.o_b_proj"]),
            ],
            groups=[
                _V4_HIDDEN_CONSUMERS,
                [f"{_V4_ATTN}.q_b_proj", f"{_V4_ATTN}.compressor.indexer.q_b_proj"],
                [f"{_V4_ATTN}.o_b_proj"],
                ["mlp.shared_experts.up_proj", "mlp.shared_experts.gate_proj"],
                ["mlp.shared_experts.down_proj"],
            ],
        ),
    ),
    template(
        "deepseek_vl_v2",
        # MLA (VL2, VL2-Small) and plain multi-head attention (VL2-Tiny)
        kv=[*KV_MLA, *KV_PROJ],
        q=[Q_PROJ, Q_MLA],
        gate_up=GATE_UP_PROJ,
        exclude=[ROUTER, "language.lm_head", "vision.*", "projector.*"],
        algorithm_configs=algorithms(
            "language.model.layers",
            attn_pairs() + mla_pairs(no_q_lora=True) + moe_pairs(linear_experts=True),
            # the plain-attention names merge into the MLA groups: k/v/q with the first group
            [
                ["self_attn.k_proj", "self_attn.v_proj", *mla_groups(no_q_lora=True)[0]],
                *mla_groups(no_q_lora=True)[1:],
                *moe_groups(linear_experts=True),
            ],
        ),
    ),
    _mla_model("kimi_k2", linear_experts=True),
    _mla_model(
        "kimi_k25",
        "model.language_model.layers",
        exclude=("*vision_tower*", "*mm_projector*"),
        with_rotation=True,
        # image features replace token embeddings
        rotation_roles=multimodal_rotation_roles("model.language_model", ["model.mm_projector.out_proj"]),
    ),
]
