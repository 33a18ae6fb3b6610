"""Gemma 2 / Gemma 3 (``modeling_gemma2.py``, ``modeling_gemma3.py``).

Sandwich norms: ``input_layernorm`` feeds q, k, v; ``post_attention_layernorm`` normalises the
*attention output* (so it is no scaling site); ``pre_feedforward_layernorm`` feeds gate, up;
``post_feedforward_layernorm`` normalises the MLP output. Gemma's RMSNorm computes
``norm(x) * (1 + w)``: folding a scale ``s`` must turn ``w`` into ``(1 + w) / s - 1``.
Grouped K/V heads (no ``v -> o``); post-norms rule out rotation.

``gemma3`` is the multimodal model (``Gemma3ForConditionalGeneration``: SigLIP ``vision_tower`` and
``multi_modal_projector`` excluded, text decoder at ``model.language_model.layers``);
``gemma3_text`` is the text-only ``Gemma3ForCausalLM`` (Gemma 3 1B).
"""

from __future__ import annotations

from ._common import (
    GATE_UP_PROJ,
    KV_PROJ,
    Q_PROJ,
    algorithms,
    attn_groups,
    attn_pairs,
    mlp_groups,
    mlp_pairs,
    template,
)

_PAIRS = attn_pairs("input_layernorm") + mlp_pairs("pre_feedforward_layernorm")
_GROUPS = attn_groups() + mlp_groups()
_VISION = ["*vision_tower*", "*multi_modal_projector*"]


def _gemma(model_type: str, decoder_layers: str, exclude: list[str]) -> dict:
    return template(
        model_type,
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=GATE_UP_PROJ,
        exclude=exclude,
        algorithm_configs=algorithms(decoder_layers, _PAIRS, _GROUPS),
    )


TEMPLATES = [
    _gemma("gemma2", "model.layers", []),
    _gemma("gemma3", "model.language_model.layers", _VISION),
    _gemma("gemma3_text", "model.layers", []),
]
