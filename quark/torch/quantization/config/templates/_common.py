"""Shared builders for the per-architecture template data.

Every family module in this package defines ``TEMPLATES: list[dict]``; each dict holds exactly the
keyword arguments of :class:`~quark.torch.quantization.config.template.LLMTemplate`. The helpers here
only assemble data: no model is imported and nothing depends on a model type.

Conventions for the names inside algorithm configs (what the algorithms may rely on):

* Names are relative to one decoder block (an item of the ``nn.ModuleList`` at
  ``model_decoder_layers``) and are fnmatch patterns (``"mlp.experts.*.gate_proj"``); an entry
  stands for every module of the block it matches. ``""`` names the decoder block itself (used as
  ``inspect`` for parallel attention + MLP blocks, where one norm feeds both).
* A :class:`ScalingPair` applies to a block only when ``prev_op`` and *every* entry of ``layers``
  match a module in that block; otherwise the block skips it. Architectures whose blocks differ
  (dense vs MoE MLP, full vs linear attention, self- vs cross-attention) list one pair per block
  kind, and the template guarantees that whenever a pair applies, ``layers`` names *all* consumers
  of ``prev_op``'s output in that block, so folding a scale into ``prev_op`` is exact. Layers in a
  pair may be excluded from quantization (a MoE router): they still have to take the scale.
* A norm ``prev_op`` is a weight-only RMSNorm/LayerNorm (``y = norm(x) * w (+ b)``) unless the
  family module says otherwise: Gemma, Qwen3-Next/Qwen3.5 and MiniMax-M3 norms compute
  ``norm(x) * (1 + w)``, so the fold there must act on ``1 + w``.
* GPTQ-style ``inside_layer_modules`` are ordered groups; entries that match nothing in a block are
  dropped for that block and empty groups are skipped. Excluded layers are never listed.
* Transformers 5 stores the routed experts of most MoE models as fused 3-D parameters inside one
  module (``mlp.experts.gate_up_proj`` / ``down_proj``); such experts are not ``nn.Linear`` layers
  and are left out of the GPTQ groups (GPTQ, GPTAQ and Qronos solve them per expert after the
  groups). SmoothQuant, AWQ and AutoSmoothQuant get one more pair per MoE template,
  the MLP norm -> every reader of it (router, fused experts, shared expert), derived from rotation's
  ``mlp_inputs`` by :func:`moe_norm_pairs`; inside each expert, all three also scale up -> down per expert
  (:mod:`quark.torch.algorithm.expert_scaling`, no template data needed). ``ModelQuantizer`` quantizes them per expert, min-max, in place
  (:mod:`quark.torch.quantization.fused_experts`; each fused parameter resolves the config like a
  linear named ``<experts>.<parameter>``, so exclusions such as ``*mlp.gate`` leave them alone and
  ``*mlp.experts.*`` would exclude them). Remote-code models with one ``nn.Linear`` per expert list them.
"""

from __future__ import annotations

from typing import Any

from ..algo_configs import (
    ALGO_CONFIG_CLASSES,
    AutoSmoothQuantConfig,
    AWQConfig,
    GPTAQConfig,
    GPTQConfig,
    QronosConfig,
    RotationConfig,
    ScalingPair,
    SmoothQuantConfig,
)

#: exclusion every template carries
LM_HEAD = "lm_head"

#: K/V, Q and gate/up patterns of the usual ``q_proj``/``k_proj``/``v_proj`` + ``gate_proj``/``up_proj`` naming
KV_PROJ = ["*k_proj", "*v_proj"]
Q_PROJ = "*q_proj"
GATE_UP_PROJ = ["*gate_proj", "*up_proj"]
#: MLA (DeepSeek-V2/V3 style): K and V come out of ``kv_b_proj``, Q out of ``q_b_proj``
#: (or ``q_proj`` when ``q_lora_rank`` is None)
KV_MLA = ["*kv_b_proj"]
Q_MLA = "*q_b_proj"
#: transformers-5 fused experts: one 3-D ``gate_up_proj`` parameter per MoE block
FUSED_GATE_UP = ["*experts.gate_up_proj"]


def pair(prev_op: str, layers: list[str], inspect: str | None = None) -> ScalingPair:
    """One scaling site: ``prev_op`` feeds exactly ``layers``; ``inspect`` measures the error."""
    return ScalingPair(prev_op=prev_op, layers=list(layers), inspect=inspect)


def attn_pairs(
    norm: str = "input_layernorm",
    attn: str = "self_attn",
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj"),
    v_to_o: tuple[str, str] | None = None,
) -> list[ScalingPair]:
    """``norm -> q, k, v`` (inspect the attention module), plus ``v -> o`` when ``v_to_o`` is given.

    ``v_to_o`` is only valid when v's output features equal o's input features (multi-head
    attention, no grouped K/V) and nothing clips v's output.
    """
    pairs = [pair(norm, [f"{attn}.{name}" for name in qkv], attn)]
    if v_to_o is not None:
        pairs.append(pair(f"{attn}.{v_to_o[0]}", [f"{attn}.{v_to_o[1]}"]))
    return pairs


def mlp_pairs(
    norm: str | None = "post_attention_layernorm",
    mlp: str = "mlp",
    gate: str = "gate_proj",
    up: str = "up_proj",
    down: str = "down_proj",
) -> list[ScalingPair]:
    """``norm -> gate, up`` (skipped when ``norm`` is None) and ``up -> down`` for a gated MLP."""
    pairs = [] if norm is None else [pair(norm, [f"{mlp}.{gate}", f"{mlp}.{up}"], mlp)]
    pairs.append(pair(f"{mlp}.{up}", [f"{mlp}.{down}"]))
    return pairs


def attn_groups(
    attn: str = "self_attn",
    qkv: tuple[str, ...] = ("k_proj", "v_proj", "q_proj"),
    out: str = "o_proj",
) -> list[list[str]]:
    """GPTQ order for attention: the K/V/Q projections together, then the output projection."""
    return [[f"{attn}.{name}" for name in qkv], [f"{attn}.{out}"]]


def mlp_groups(
    prefixes: tuple[str, ...] = ("mlp",),
    gate: str = "gate_proj",
    up: str = "up_proj",
    down: str = "down_proj",
) -> list[list[str]]:
    """GPTQ order for gated MLPs: up+gate of every prefix (dense MLP, shared expert ...), then down."""
    return [
        [name for p in prefixes for name in (f"{p}.{up}", f"{p}.{gate}")],
        [f"{p}.{down}" for p in prefixes],
    ]


def merge_groups(*layouts: list[list[str]]) -> list[list[str]]:
    """Merge alternative block layouts position by position (group i of each layout goes together).

    Used where blocks differ (self- vs cross-attention, full vs linear attention): names absent from
    a block are dropped there, so the merged order is right for every block kind.
    """
    width = max(len(layout) for layout in layouts)
    merged: list[list[str]] = []
    for i in range(width):
        group: list[str] = []
        for layout in layouts:
            if i < len(layout):
                group.extend(name for name in layout[i] if name not in group)
        merged.append(group)
    return merged


def moe_norm_pairs(pairs: list[ScalingPair], rotation_config: RotationConfig | None) -> list[ScalingPair]:
    """SmoothQuant's and AWQ's site at a MoE block's MLP norm: ``mlp_norm -> mlp_inputs`` of the rotation config
    (which lists every reader of that norm: router, fused experts, shared expert and its gate, and the
    dense MLP of the model's dense blocks) less the layers a pair from the same norm already lists
    (the dense blocks' site). Only for templates whose rotation names MoE outputs (``mlp_outputs``)."""
    if rotation_config is None or not rotation_config.mlp_outputs:
        return []
    dense = {name for p in pairs if p.prev_op == rotation_config.mlp_norm for name in p.layers}
    readers = [name for name in rotation_config.mlp_inputs if name not in dense]
    if not readers:
        return []
    # AWQ evaluates candidates on the smallest module holding every reader (the MoE block, or "": the decoder block)
    parts = [r.split(".")[:-1] for r in readers]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return [pair(rotation_config.mlp_norm, readers, ".".join(common))]


def scaling_algorithms(decoder_layers: str, pairs: list[ScalingPair],
                       moe: list[ScalingPair] | None = None) -> dict[str, Any]:
    """AWQ, SmoothQuant and AutoSmoothQuant defaults sharing one list of scaling sites; ``moe``: sites
    with routers or fused experts (:func:`moe_norm_pairs`)."""
    sites = list(pairs) + list(moe or [])
    return {
        "awq": AWQConfig(model_decoder_layers=decoder_layers, scaling_layers=list(sites)),
        "smoothquant": SmoothQuantConfig(model_decoder_layers=decoder_layers, scaling_layers=list(sites)),
        "autosmoothquant": AutoSmoothQuantConfig(model_decoder_layers=decoder_layers, scaling_layers=list(sites)),
    }


def sequential_algorithms(decoder_layers: str, groups: list[list[str]]) -> dict[str, Any]:
    """GPTQ, GPTAQ and Qronos defaults sharing one ordered list of layer groups."""
    return {
        "gptq": GPTQConfig(
            model_decoder_layers=decoder_layers, inside_layer_modules=[list(g) for g in groups]
        ),
        "gptaq": GPTAQConfig(
            model_decoder_layers=decoder_layers, inside_layer_modules=[list(g) for g in groups]
        ),
        "qronos": QronosConfig(
            model_decoder_layers=decoder_layers, inside_layer_modules=[list(g) for g in groups]
        ),
    }


def rotation(decoder_layers: str, **roles: Any) -> RotationConfig:
    """Rotation roles; the defaults of :class:`RotationConfig` are the Llama names."""
    return RotationConfig(model_decoder_layers=decoder_layers, **roles)


def multimodal_rotation_roles(text_model: str, stream_writers: list[str], lm_head: str = "lm_head") -> dict[str, Any]:
    """Model-level rotation roles of a ``*ForConditionalGeneration`` whose text model (``embed_tokens``,
    ``norm``) sits at ``text_model``; ``stream_writers`` are the vision modules whose outputs enter
    the residual stream."""
    return {
        "embedding_layers": [f"{text_model}.embed_tokens"],
        "final_norm": f"{text_model}.norm",
        "lm_head": lm_head,
        "stream_writers": stream_writers,
    }


def algorithms(
    decoder_layers: str,
    pairs: list[ScalingPair] | None = None,
    groups: list[list[str]] | None = None,
    rotation_config: RotationConfig | None = None,
) -> dict[str, Any]:
    """Every algorithm key: defaults where the architecture has them, ``None`` elsewhere."""
    configs: dict[str, Any] = dict.fromkeys(ALGO_CONFIG_CLASSES)
    if pairs:
        configs.update(scaling_algorithms(decoder_layers, pairs, moe_norm_pairs(pairs, rotation_config)))
    if groups:
        configs.update(sequential_algorithms(decoder_layers, groups))
    configs["rotation"] = rotation_config
    return configs


def template(
    model_type: str,
    *,
    kv: list[str] | None,
    q: str | list[str] | None,
    gate_up: list[str] | None,
    exclude: list[str],
    algorithm_configs: dict[str, Any],
) -> dict[str, Any]:
    """The keyword arguments of ``LLMTemplate`` for one model type (``lm_head`` always excluded)."""
    excluded = [LM_HEAD] + [p for p in exclude if p != LM_HEAD]
    return {
        "model_type": model_type,
        "kv_layers_name": list(kv) if kv else None,
        "q_layer_name": list(q) if isinstance(q, list) else q,
        "gate_up_layers_name": list(gate_up) if gate_up else None,
        "exclude_layers_name": excluded,
        "algorithm_configs": algorithm_configs,
    }


def llama_like(
    model_type: str,
    decoder_layers: str = "model.layers",
    *,
    attn_norm: str = "input_layernorm",
    mlp_norm: str = "post_attention_layernorm",
    v_to_o: bool = False,
    with_rotation: bool = False,
    exclude: list[str] | None = None,
    embedding: str = "model.embed_tokens",
    final_norm: str = "model.norm",
    lm_head: str = "lm_head",
) -> dict[str, Any]:
    """A dense pre-norm decoder with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``."""
    pairs = attn_pairs(attn_norm, v_to_o=("v_proj", "o_proj") if v_to_o else None) + mlp_pairs(mlp_norm)
    groups = attn_groups() + mlp_groups()
    rot = (
        rotation(
            decoder_layers,
            embedding_layers=[embedding],
            lm_head=lm_head,
            final_norm=final_norm,
            attn_norm=attn_norm,
            mlp_norm=mlp_norm,
        )
        if with_rotation
        else None
    )
    return template(
        model_type,
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=GATE_UP_PROJ,
        exclude=exclude or [],
        algorithm_configs=algorithms(decoder_layers, pairs, groups, rot),
    )
