"""GPT-J (``modeling_gptj.py``): parallel attention and MLP behind one LayerNorm ``ln_1``.

``ln_1`` feeds ``attn.{q,k,v}_proj`` and ``mlp.fc_in``: one scaling site measured on the whole
block (``inspect=""``). Multi-head attention: ``v_proj -> out_proj`` is exact. ``fc_in -> fc_out``
has a GELU in between: no pair. No gate/up layers; LayerNorm rules out rotation.
"""

from __future__ import annotations

from ._common import algorithms, pair, template

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
        ),
    ),
]
