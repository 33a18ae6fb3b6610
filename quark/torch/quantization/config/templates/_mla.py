"""Building blocks for DeepSeek-style decoders: MLA attention and DeepSeek-MoE MLPs.

MLA (multi-head latent attention, DeepSeek-V2 paper): ``input_layernorm`` feeds ``q_a_proj`` (or
``q_proj`` when ``q_lora_rank`` is None) and ``kv_a_proj_with_mqa``; ``q_a_layernorm`` feeds
``q_b_proj``; ``kv_a_layernorm`` feeds ``kv_b_proj`` (which emits K-nope and V per head); the heads
go through ``o_proj``. DeepSeek-V3.2 / GLM-5 (DSA) add a lightning indexer inside ``self_attn``:
``indexer.wk`` and ``indexer.weights_proj`` also read the normed hidden state and ``indexer.wq_b``
reads the ``q_a_layernorm`` output, so those consumers join the corresponding scaling sites.
``indexer.weights_proj`` (per-head scoring weights, kept in high precision in the released
checkpoints) is excluded from quantization but still takes the scale.

DeepSeek-MoE MLP: ``mlp.{gate,up,down}_proj`` in the first ``first_k_dense_replace`` blocks; then
router ``mlp.gate``, routed experts ``mlp.experts`` and ``mlp.shared_experts.{gate,up,down}_proj``.
In transformers 5 the routed experts are fused 3-D parameters; the DeepSeek remote code (deepseek,
kimi_k2, deepseek_vl_v2) keeps one ``nn.Linear`` per expert, ``mlp.experts.N.{gate,up,down}_proj``,
and a ``MoEGate`` router holding a ``weight`` used as a linear map.

Rotation (:func:`moe_rotation`): the router, the fused experts' gate/up, the shared experts' gate/up
(and a dense block's gate/up) read the rotated residual stream; the experts', shared experts' (and
dense) down projections write it. With MLA, ``q_a_proj`` and ``kv_a_proj_with_mqa`` read the stream
(R1); R2 does not apply (V is a slice of ``kv_b_proj``'s per-head output, behind ``kv_a_layernorm``).
"""

from __future__ import annotations

from typing import Any

from quark.torch.quantization.config.algo_configs import RotationConfig

from ._common import mlp_groups, mlp_pairs, pair, rotation

ROUTER = "*mlp.gate"
INDEXER_WEIGHTS = "*indexer.weights_proj"

_ATTN = "self_attn"


def mla_pairs(*, q_lora: bool = True, no_q_lora: bool = False, indexer: bool = False) -> list:
    """Scaling sites of MLA attention; ``q_lora`` / ``no_q_lora`` select the query layouts to cover."""
    extra_hidden = [f"{_ATTN}.indexer.wk", f"{_ATTN}.indexer.weights_proj"] if indexer else []
    extra_q = [f"{_ATTN}.indexer.wq_b"] if indexer else []
    pairs = []
    if q_lora:
        pairs += [
            pair(
                "input_layernorm", [f"{_ATTN}.q_a_proj", f"{_ATTN}.kv_a_proj_with_mqa", *extra_hidden], _ATTN
            ),
            pair(f"{_ATTN}.q_a_layernorm", [f"{_ATTN}.q_b_proj", *extra_q], _ATTN),
        ]
    if no_q_lora:
        pairs.append(
            pair("input_layernorm", [f"{_ATTN}.q_proj", f"{_ATTN}.kv_a_proj_with_mqa", *extra_hidden], _ATTN)
        )
    pairs.append(pair(f"{_ATTN}.kv_a_layernorm", [f"{_ATTN}.kv_b_proj"], _ATTN))
    return pairs


def mla_groups(*, no_q_lora: bool = False, indexer: bool = False) -> list[list[str]]:
    """GPTQ order of MLA attention: the projections of the hidden state, then of the latents, then o."""
    first = [f"{_ATTN}.q_a_proj", *([f"{_ATTN}.q_proj"] if no_q_lora else []), f"{_ATTN}.kv_a_proj_with_mqa"]
    second = [f"{_ATTN}.q_b_proj", f"{_ATTN}.kv_b_proj"]
    if indexer:
        first.append(f"{_ATTN}.indexer.wk")
        second.append(f"{_ATTN}.indexer.wq_b")
    return [first, second, [f"{_ATTN}.o_proj"]]


def moe_pairs(*, linear_experts: bool = False) -> list:
    """Dense-block MLP sites, shared-expert ``up -> down`` and, for per-expert ``nn.Linear``
    experts, the norm -> router + experts + shared experts site of a MoE block."""
    pairs = mlp_pairs("post_attention_layernorm") + mlp_pairs(None, mlp="mlp.shared_experts")
    if linear_experts:
        pairs.append(
            pair(
                "post_attention_layernorm",
                [
                    "mlp.gate",
                    "mlp.experts.*.gate_proj",
                    "mlp.experts.*.up_proj",
                    "mlp.shared_experts.gate_proj",
                    "mlp.shared_experts.up_proj",
                ],
                "mlp",
            )
        )
    return pairs


def moe_groups(*, linear_experts: bool = False) -> list[list[str]]:
    prefixes = ("mlp", "mlp.shared_experts") + (("mlp.experts.*",) if linear_experts else ())
    return mlp_groups(prefixes)


def moe_rotation(decoder_layers: str = "model.layers", *, mla: bool = False, no_q_lora: bool = False,
                 indexer: bool = False, **roles: Any) -> RotationConfig:
    """Rotation roles of a DeepSeek-MoE decoder with fused experts (dense first blocks included);
    ``mla``: MLA attention (R1 through ``q_a_proj`` / ``kv_a_proj_with_mqa``; R2 on the value part of
    each head of ``kv_b_proj``, whose heads hold ``[k_nope; v]``, and ``o_proj``), ``no_q_lora``: or ``q_proj`` where a checkpoint has no q-LoRA (DeepSeek-V2-Lite),
    ``indexer``: the sparse-attention indexer's key and weight projections read the stream too (blocks
    with a shared indexer have none); ``roles``: other :class:`RotationConfig` fields (a multimodal
    model's paths)."""
    attention: dict[str, Any] = {}
    if mla:
        q = [f"{_ATTN}.q_a_proj|{_ATTN}.q_proj"] if no_q_lora else [f"{_ATTN}.q_a_proj"]
        keys = [f"{_ATTN}.indexer.wk", f"{_ATTN}.indexer.weights_proj"] if indexer else []
        attention = {"attn_inputs": [*q, f"{_ATTN}.kv_a_proj_with_mqa", *keys], "v_proj": f"{_ATTN}.kv_b_proj",
                     "kv_per_head": True}
    return rotation(
        decoder_layers,
        mlp_inputs=["mlp.gate_proj", "mlp.up_proj", "mlp.gate", "mlp.experts",
                    "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"],
        mlp_outputs=["mlp.down_proj", "mlp.experts", "mlp.shared_experts.down_proj"],
        **attention,
        **roles,
    )
