"""Mixtral (``modeling_mixtral.py``) and GPT-OSS (``modeling_gpt_oss.py``): attention + fused MoE.

Both keep every routed expert in fused 3-D parameters (``mlp.experts.gate_up_proj`` /
``down_proj``; GPT-OSS adds biases and clamps the SwiGLU), so the only linears are the attention
projections. ``post_attention_layernorm`` feeds the router and the fused experts: SmoothQuant's and
AWQ's MoE pair (derived from rotation's ``mlp_inputs``; AutoSmoothQuant takes linears only).
Grouped K/V heads: no ``v -> o``. Routers: Mixtral ``mlp.gate``, GPT-OSS ``mlp.router`` (with a
bias). GPT-OSS attention also carries per-head ``sinks`` (a parameter, not a module).

Rotation (R1, R2): pre-norm RMSNorms; the router and every expert's gate/up matrix read the rotated
stream, every expert's down matrix (and GPT-OSS's down bias) writes it. No R4: it rotates one
down-projection linear per block online, and the experts are fused.
"""

from __future__ import annotations

from ._common import FUSED_GATE_UP, KV_PROJ, Q_PROJ, algorithms, attn_groups, attn_pairs, rotation, template

TEMPLATES = [
    template(
        "mixtral",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=FUSED_GATE_UP,
        exclude=["*mlp.gate"],
        algorithm_configs=algorithms(
            "model.layers", attn_pairs(), attn_groups(),
            rotation("model.layers", mlp_inputs=["mlp.gate", "mlp.experts"], mlp_outputs=["mlp.experts"]),
        ),
    ),
    template(
        "gpt_oss",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=FUSED_GATE_UP,
        exclude=["*router*"],
        algorithm_configs=algorithms(
            "model.layers", attn_pairs(), attn_groups(),
            rotation("model.layers", mlp_inputs=["mlp.router", "mlp.experts"], mlp_outputs=["mlp.experts"]),
        ),
    ),
]
