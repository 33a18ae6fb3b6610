"""Grok-1 (``model_type: grok-1``, remote code; no transformers class).

Names as in the HF-format Grok-1 checkpoints that SGLang and vLLM serve (``Grok1ForCausalLM``):
``model.layers.N.{pre_attn_norm, self_attn.{q,k,v,o}_proj, post_attn_norm, pre_moe_norm,
block_sparse_moe.gate, block_sparse_moe.experts.M.{w1,w2,w3}, post_moe_norm}`` with ``nn.Linear``
experts (``w1`` gate, ``w3`` up, ``w2`` down, GELU gating). Sandwich norms: ``post_attn_norm`` and
``post_moe_norm`` normalise the sub-block outputs and are no scaling sites. Grouped K/V heads
(48 query / 8 K/V heads): no ``v -> o``.

No rotation default: not built for Grok-1 (remote code, not testable here).
"""

from __future__ import annotations

from ._common import KV_PROJ, Q_PROJ, algorithms, attn_groups, attn_pairs, pair, template

_MOE = "block_sparse_moe"
_EXPERT = f"{_MOE}.experts.*"

TEMPLATES = [
    template(
        "grok-1",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=["*w1", "*w3"],
        exclude=[f"*{_MOE}.gate"],
        algorithm_configs=algorithms(
            "model.layers",
            attn_pairs("pre_attn_norm")
            + [pair("pre_moe_norm", [f"{_MOE}.gate", f"{_EXPERT}.w1", f"{_EXPERT}.w3"], _MOE)],
            attn_groups() + [[f"{_EXPERT}.w3", f"{_EXPERT}.w1"], [f"{_EXPERT}.w2"]],
        ),
    ),
]
