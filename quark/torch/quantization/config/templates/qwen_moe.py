"""Qwen MoE family: Qwen1.5/2-MoE, Qwen3-MoE, Qwen3-Next, Qwen3-VL-MoE, Qwen3.5-MoE.

Module names from transformers 5.24 (``modeling_qwen2_moe.py``, ``modeling_qwen3_moe.py``,
``modeling_qwen3_next.py``, ``modeling_qwen3_vl_moe.py``, ``modeling_qwen3_5_moe.py``).

* Routed experts are fused 3-D parameters (``mlp.experts.gate_up_proj`` / ``down_proj``), the router
  is ``mlp.gate`` (a ``TopKRouter`` holding a weight) and Qwen2-MoE / Qwen3-Next / Qwen3.5 add a
  shared expert ``mlp.shared_expert.{gate,up,down}_proj`` with its sigmoid gate
  ``mlp.shared_expert_gate`` (a 1-output linear, kept in high precision like the router).
* ``post_attention_layernorm`` feeds the router and the fused experts of a MoE block, so it is no
  scaling site there; only ``shared_expert.up_proj -> down_proj`` is. Blocks listed in
  ``mlp_only_layers`` hold a dense ``mlp.{gate,up,down}_proj`` and get the usual MLP pairs.
* Qwen3-Next / Qwen3.5 interleave Gated-DeltaNet blocks (``linear_attn.in_proj_qkvz`` +
  ``in_proj_ba`` in Qwen3-Next, ``in_proj_qkv`` + ``in_proj_z`` + ``in_proj_b`` + ``in_proj_a`` in
  Qwen3.5, then ``out_proj``) with full-attention blocks (``self_attn``, whose ``q_proj`` also
  emits the output gate). Their RMSNorms compute ``norm(x) * (1 + w)``. The gated norm before
  ``linear_attn.out_proj`` has one weight per head dimension shared by all heads: no scaling site.
* Grouped K/V heads everywhere: no ``v -> o``. Rotation (R1, R2) for Qwen2-MoE and Qwen3-MoE: the
  router, the fused experts' gate/up and the shared expert's gate/up and sigmoid gate read the
  rotated stream, the experts' and shared expert's down projections write it (dense
  ``mlp_only_layers`` blocks use ``mlp.{gate,up,down}_proj``); R4 needs one down-projection linear
  per block, which MoE blocks do not have. Qwen3-VL-MoE as Qwen3-MoE, with the vision merger's and
  the DeepStack mergers' last linears (their outputs enter the residual stream) rotated like the
  embeddings (``stream_writers``). Qwen3-Next (R1): the ``(1 + w)`` norms fold like RMSNorms; the
  Gated-DeltaNet blocks read the stream through ``in_proj_qkvz``/``in_proj_ba`` and write it
  through ``linear_attn.out_proj`` (no R2: those blocks have no V). Qwen3.5-MoE likewise (its
  DeltaNet inputs ``in_proj_{qkv,z,b,a}``), with the vision merger's last linear rotated like the
  embeddings (no DeepStack mergers).
* Qwen3-VL-MoE and Qwen3.5-MoE are loaded as ``*ForConditionalGeneration``: the text decoder sits at
  ``model.language_model.layers`` and the vision tower ``model.visual`` is excluded.
"""

from __future__ import annotations

from typing import Any

from quark.torch.quantization.config.algo_configs import RotationConfig

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

_ROUTER = "*mlp.gate"
_SHARED_GATE = "*mlp.shared_expert_gate"
_VISION = ("*visual*",)

#: dense MLP blocks (``mlp_only_layers``)
_DENSE_PAIRS = mlp_pairs("post_attention_layernorm")
_SHARED_PAIRS = mlp_pairs(None, mlp="mlp.shared_expert")

_DELTANET_QWEN3_NEXT = ["linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba"]
_DELTANET_QWEN3_5 = [
    "linear_attn.in_proj_qkv",
    "linear_attn.in_proj_z",
    "linear_attn.in_proj_b",
    "linear_attn.in_proj_a",
]


def _qwen_moe(
    model_type: str,
    decoder_layers: str,
    *,
    shared_expert: bool,
    dense_blocks: bool,
    deltanet: list[str] | None = None,
    exclude: tuple[str, ...] = (),
    with_rotation: bool = False,
    rotation_roles: dict | None = None,
) -> dict:
    pairs = attn_pairs()
    attention = attn_groups()
    if deltanet:
        pairs.append(pair("input_layernorm", deltanet, "linear_attn"))
        attention = merge_groups(attention, [deltanet, ["linear_attn.out_proj"]])
    mlp_prefixes: tuple[str, ...] = ()
    if dense_blocks:
        pairs += _DENSE_PAIRS
        mlp_prefixes += ("mlp",)
    if shared_expert:
        pairs += _SHARED_PAIRS
        mlp_prefixes += ("mlp.shared_expert",)
    groups = attention + (mlp_groups(mlp_prefixes) if mlp_prefixes else [])
    return template(
        model_type,
        kv=KV_PROJ,
        q=Q_PROJ,
        # shared-expert / dense gate and up; the fused experts keep one gate_up_proj tensor
        gate_up=GATE_UP_PROJ,
        exclude=[_ROUTER, *([_SHARED_GATE] if shared_expert else []), *exclude],
        algorithm_configs=algorithms(
            decoder_layers, pairs, groups,
            _rotation(decoder_layers, shared_expert, dense_blocks, deltanet, **(rotation_roles or {}))
            if with_rotation
            else None,
        ),
    )


def _rotation(decoder_layers: str, shared_expert: bool, dense_blocks: bool, deltanet: list[str] | None = None,
              **roles: Any) -> RotationConfig:
    """Rotation roles of a MoE block (and of a dense ``mlp_only_layers`` block); ``deltanet``: the
    Gated-DeltaNet blocks' input projections (they read the stream, ``linear_attn.out_proj`` writes it;
    no R2, those blocks have no V); ``roles``: other :class:`RotationConfig` fields (a multimodal
    model's paths)."""
    shared = ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"]
    if deltanet:
        roles = {
            "attn_inputs": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", *deltanet],
            "o_proj": "self_attn.o_proj|linear_attn.out_proj",
            "r2": False,
            **roles,
        }
    return rotation(
        decoder_layers,
        mlp_inputs=[*(["mlp.gate_proj", "mlp.up_proj"] if dense_blocks else []), "mlp.gate", "mlp.experts",
                    *(shared if shared_expert else [])],
        mlp_outputs=[*(["mlp.down_proj"] if dense_blocks else []), "mlp.experts",
                     *(["mlp.shared_expert.down_proj"] if shared_expert else [])],
        **roles,
    )


#: Qwen3-VL: the vision merger's output replaces the image-token embeddings and each DeepStack
#: merger's output is added to the hidden states of an early block: both write the residual stream
_VL_ROTATION_ROLES = multimodal_rotation_roles(
    "model.language_model", ["model.visual.merger.linear_fc2", "model.visual.deepstack_merger_list.*.linear_fc2"]
)


TEMPLATES = [
    _qwen_moe("qwen2_moe", "model.layers", shared_expert=True, dense_blocks=True, with_rotation=True),
    _qwen_moe("qwen3_moe", "model.layers", shared_expert=False, dense_blocks=True, with_rotation=True),
    _qwen_moe(
        "qwen3_next", "model.layers", shared_expert=True, dense_blocks=True, deltanet=_DELTANET_QWEN3_NEXT,
        with_rotation=True,
    ),
    _qwen_moe(
        "qwen3_vl_moe", "model.language_model.layers", shared_expert=False, dense_blocks=True, exclude=_VISION,
        with_rotation=True, rotation_roles=_VL_ROTATION_ROLES,
    ),
    _qwen_moe(
        "qwen3_5_moe",
        "model.language_model.layers",
        shared_expert=True,
        dense_blocks=False,
        deltanet=_DELTANET_QWEN3_5,
        exclude=_VISION,
        with_rotation=True,
        rotation_roles=multimodal_rotation_roles("model.language_model", ["model.visual.merger.linear_fc2"]),
    ),
]
