"""OPT (``modeling_opt.py``): LayerNorm pre-norms, ``self_attn.{q,k,v,out}_proj``, ``fc1 -> ReLU -> fc2``.

Multi-head attention, so ``v_proj -> out_proj`` is exact; ReLU is positively homogeneous, so
``fc1 -> fc2`` is too. The norm pairs assume ``do_layer_norm_before=True`` (every OPT size except
350m, which is post-norm: pass ``algo_configs`` for it).

No rotation default: LayerNorm (mean subtraction, bias) rules it out.
"""

from __future__ import annotations

from ._common import algorithms, attn_groups, attn_pairs, pair, template

_DECODER = "model.decoder.layers"

TEMPLATES = [
    template(
        "opt",
        kv=["*k_proj", "*v_proj"],
        q="*q_proj",
        gate_up=None,
        exclude=[],
        algorithm_configs=algorithms(
            _DECODER,
            pairs=[
                *attn_pairs("self_attn_layer_norm", v_to_o=("v_proj", "out_proj")),
                pair("final_layer_norm", ["fc1"]),
                pair("fc1", ["fc2"]),
            ],
            groups=attn_groups(out="out_proj") + [["fc1"], ["fc2"]],
        ),
    ),
]
