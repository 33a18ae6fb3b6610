"""Cohere (Command-R): parallel attention and MLP fed by one LayerNorm (``modeling_cohere.py``).

``input_layernorm`` (a LayerNorm with a weight and no bias) feeds q, k, v *and* gate, up, so they
form one scaling site whose error is measured on the whole block (``inspect=""``). Command-R+
uses grouped K/V heads, so no ``v -> o`` pair. Rotation: R1 by a rotation that keeps the all-ones direction (LayerNorm,
see :mod:`quark.torch.algorithm.rotation`), ``input_layernorm`` folded once into attention and MLP;
R2 and R4 as in Llama.
"""

from __future__ import annotations

from ._common import GATE_UP_PROJ, KV_PROJ, Q_PROJ, algorithms, pair, rotation, template

_QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]

TEMPLATES = [
    template(
        "cohere",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=GATE_UP_PROJ,
        exclude=[],
        algorithm_configs=algorithms(
            "model.layers",
            pairs=[
                pair("input_layernorm", [*_QKV, "mlp.gate_proj", "mlp.up_proj"], ""),
                pair("mlp.up_proj", ["mlp.down_proj"]),
            ],
            groups=[
                ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "mlp.up_proj", "mlp.gate_proj"],
                ["self_attn.o_proj"],
                ["mlp.down_proj"],
            ],
            rotation_config=rotation("model.layers", attn_norm="input_layernorm", mlp_norm="input_layernorm"),
        ),
    ),
]
