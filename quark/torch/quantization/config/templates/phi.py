"""Phi (phi-1/1.5/2) and Phi-3 (Phi-3, Phi-3.5, Phi-4), module names from ``modeling_phi.py`` and
``modeling_phi3.py`` of transformers 5.24.

Phi: one LayerNorm (``input_layernorm``) feeds attention and MLP in parallel, so q, k, v and
``mlp.fc1`` form one scaling site measured on the whole block (``inspect=""``). Multi-head
attention (no grouped K/V in the released models), so ``v_proj -> dense`` is exact. ``fc1 -> fc2``
has a GELU in between, which does not commute with a scale: no pair. No gate/up layers. Rotation:
R1 by a rotation that keeps the all-ones direction (LayerNorms; their biases fold into q/k/v/fc1's and
lm_head's biases),
the one ``input_layernorm`` folded once into attention and MLP; R2 on ``v_proj -> dense``; R4 on
``fc2``.

Phi-3: fused ``self_attn.qkv_proj`` and ``mlp.gate_up_proj``. The fused QKV output scale covers
q, k and v together, a safe (if loose) bound for the K/V cache scale; no separate Q layer.
``gate_up_proj -> down_proj`` would scale only the up half of a fused output: no pair. Rotation: the
norms are pre-norm RMSNorms, so R1 (the fused ``qkv_proj`` and ``gate_up_proj`` read the rotated
stream as a whole), R2 on the value rows of ``qkv_proj`` (``fused_qkv``: rows ``[q; k; v]``, as
``Phi3Attention`` splits them) and ``o_proj``, and R4 (``down_proj``) apply.
"""

from __future__ import annotations

from ._common import algorithms, pair, rotation, template

TEMPLATES = [
    template(
        "phi",
        kv=["*k_proj", "*v_proj"],
        q="*q_proj",
        gate_up=None,
        exclude=[],
        algorithm_configs=algorithms(
            "model.layers",
            pairs=[
                pair(
                    "input_layernorm",
                    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"],
                    "",
                ),
                pair("self_attn.v_proj", ["self_attn.dense"]),
            ],
            groups=[
                ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "mlp.fc1"],
                ["self_attn.dense"],
                ["mlp.fc2"],
            ],
            rotation_config=rotation(
                "model.layers",
                final_norm="model.final_layernorm",
                attn_norm="input_layernorm",
                o_proj="self_attn.dense",
                mlp_norm="input_layernorm",
                mlp_inputs=["mlp.fc1"],
                down_proj="mlp.fc2",
            ),
        ),
    ),
    template(
        "phi3",
        kv=["*qkv_proj"],
        q=None,
        gate_up=["*gate_up_proj"],
        exclude=[],
        algorithm_configs=algorithms(
            "model.layers",
            pairs=[
                pair("input_layernorm", ["self_attn.qkv_proj"], "self_attn"),
                pair("post_attention_layernorm", ["mlp.gate_up_proj"], "mlp"),
            ],
            groups=[["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]],
            rotation_config=rotation(
                "model.layers",
                attn_inputs=["self_attn.qkv_proj"],
                mlp_inputs=["mlp.gate_up_proj"],
                v_proj="self_attn.qkv_proj",
                fused_qkv=True,
            ),
        ),
    ),
]
