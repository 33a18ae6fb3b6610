"""Dense Llama-style decoders: pre-norm RMSNorm, ``self_attn.{q,k,v,o}_proj``, gated ``mlp``.

Module names from transformers 5.24 (``modeling_llama.py``, ``modeling_mistral.py``,
``modeling_qwen2.py``, ``modeling_qwen3.py``, ``modeling_olmo.py``) and, for Instella (remote code,
``model_type: instella``), from the published ``hf_instella/modeling_instella.py`` of
AMD-AIG-AIMA/Instella: ``pre_attention_layernorm`` / ``pre_feedforward_layernorm`` instead of
``input_layernorm`` / ``post_attention_layernorm``, q/k RMSNorm over the whole projection.

``v_proj -> o_proj`` is left out: current Llama 3 / Mistral / Qwen2 / Qwen3 checkpoints use grouped
K/V heads, where v's output is narrower than o's input. Rotation (QuaRot/SpinQuant R1/R2) applies:
every norm is a pre-norm RMSNorm whose weight can be fused into the following linears.

OLMo (v1) normalises with a parameter-free LayerNorm, so its norms cannot take a scale; its optional
``clip_qkv`` clamps v's output (OLMo-1.7), so ``v -> o`` is not exact either. Only ``up_proj ->
down_proj`` remains as a scaling site. Rotation: R1 by a rotation that keeps the all-ones direction (LayerNorm, see
:mod:`quark.torch.algorithm.rotation`); R2 is off by default because ``clip_qkv`` clamps v's output
elementwise, which a rotation of v's heads does not commute with (``r2=True`` is exact for checkpoints
with ``clip_qkv: null``).
"""

from __future__ import annotations

from ._common import (
    GATE_UP_PROJ,
    KV_PROJ,
    Q_PROJ,
    algorithms,
    attn_groups,
    llama_like,
    mlp_groups,
    mlp_pairs,
    rotation,
    template,
)

TEMPLATES = [
    llama_like("llama", with_rotation=True),
    llama_like("mistral", with_rotation=True),
    llama_like("qwen2", with_rotation=True),
    llama_like("qwen3", with_rotation=True),
    llama_like(
        "instella",
        attn_norm="pre_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        with_rotation=True,
    ),
    template(
        "olmo",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=GATE_UP_PROJ,
        exclude=[],
        algorithm_configs=algorithms(
            "model.layers",
            pairs=mlp_pairs(norm=None),
            groups=attn_groups() + mlp_groups(),
            rotation_config=rotation("model.layers", r2=False),
        ),
    ),
]
