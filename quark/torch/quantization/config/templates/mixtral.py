"""Mixtral (``modeling_mixtral.py``) and GPT-OSS (``modeling_gpt_oss.py``): attention + fused MoE.

Both keep every routed expert in fused 3-D parameters (``mlp.experts.gate_up_proj`` /
``down_proj``; GPT-OSS adds biases and clamps the SwiGLU), so the only linears are the attention
projections. ``post_attention_layernorm`` feeds the router and the fused experts: no scaling site.
Grouped K/V heads: no ``v -> o``. Routers: Mixtral ``mlp.gate``, GPT-OSS ``mlp.router`` (with a
bias). GPT-OSS attention also carries per-head ``sinks`` (a parameter, not a module).
"""

from __future__ import annotations

from ._common import FUSED_GATE_UP, KV_PROJ, Q_PROJ, algorithms, attn_groups, attn_pairs, template

TEMPLATES = [
    template(
        "mixtral",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=FUSED_GATE_UP,
        exclude=["*mlp.gate"],
        algorithm_configs=algorithms("model.layers", attn_pairs(), attn_groups()),
    ),
    template(
        "gpt_oss",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=FUSED_GATE_UP,
        exclude=["*router*"],
        algorithm_configs=algorithms("model.layers", attn_pairs(), attn_groups()),
    ),
]
