"""Qwen (v1) remote code (``model_type: qwen``, ``modeling_qwen.py`` of Qwen/Qwen-7B;
``QWenLMHeadModel``).

Names: ``transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1, mlp.w2, mlp.c_proj}``,
RMSNorm. ``c_attn`` is the fused QKV projection (its output scale bounds the K/V cache scale; no
separate Q layer). The MLP computes ``c_proj(w1(x) * silu(w2(x)))``: ``w2`` is the gate, ``w1`` the
linear "up" branch, so ``w1 -> c_proj`` is an exact scaling site. No rotation (fused QKV).
"""

from __future__ import annotations

from ._common import algorithms, pair, template

TEMPLATES = [
    template(
        "qwen",
        kv=["*c_attn"],
        q=None,
        gate_up=["*mlp.w2", "*mlp.w1"],
        exclude=[],
        algorithm_configs=algorithms(
            "transformer.h",
            pairs=[
                pair("ln_1", ["attn.c_attn"], "attn"),
                pair("ln_2", ["mlp.w1", "mlp.w2"], "mlp"),
                pair("mlp.w1", ["mlp.c_proj"]),
            ],
            groups=[["attn.c_attn"], ["attn.c_proj"], ["mlp.w1", "mlp.w2"], ["mlp.c_proj"]],
        ),
    ),
]
