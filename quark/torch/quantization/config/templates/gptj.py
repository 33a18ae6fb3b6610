"""GPT-J (``modeling_gptj.py``): parallel attention and MLP behind one LayerNorm ``ln_1``.

``ln_1`` feeds ``attn.{q,k,v}_proj`` and ``mlp.fc_in``: one scaling site measured on the whole
block (``inspect=""``). Multi-head attention: ``v_proj -> out_proj`` is exact. ``fc_in -> fc_out``
has a GELU in between: no pair. No gate/up layers. Rotation: R1 by a rotation that keeps the all-ones
direction (LayerNorms, see :mod:`quark.torch.algorithm.rotation`), ``ln_1`` folded once into attention
and MLP; its bias stays in the norm, rotated (q/k/v have no bias to take it), ``ln_f``'s folds into
lm_head's bias; R2 on ``v_proj -> out_proj``; R4 on ``fc_out``.
"""

from __future__ import annotations

from ._common import algorithms, pair, rotation, template

TEMPLATES = [
    template(
        "gptj",
        kv=["*k_proj", "*v_proj"],
        q="*q_proj",
        gate_up=None,
        exclude=[],
        algorithm_configs=algorithms(
            "transformer.h",
            pairs=[
                pair("ln_1", ["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"], ""),
                pair("attn.v_proj", ["attn.out_proj"]),
            ],
            groups=[
                ["attn.k_proj", "attn.v_proj", "attn.q_proj", "mlp.fc_in"],
                ["attn.out_proj"],
                ["mlp.fc_out"],
            ],
            rotation_config=rotation(
                "transformer.h",
                embedding_layers=["transformer.wte"],
                final_norm="transformer.ln_f",
                attn_norm="ln_1",
                attn_inputs=["attn.q_proj", "attn.k_proj", "attn.v_proj"],
                v_proj="attn.v_proj",
                o_proj="attn.out_proj",
                mlp_norm="ln_1",
                mlp_inputs=["mlp.fc_in"],
                down_proj="mlp.fc_out",
            ),
        ),
    ),
]
