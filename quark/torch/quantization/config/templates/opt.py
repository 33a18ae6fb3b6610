"""OPT (``modeling_opt.py``): LayerNorm pre-norms, ``self_attn.{q,k,v,out}_proj``, ``fc1 -> ReLU -> fc2``.

Multi-head attention, so ``v_proj -> out_proj`` is exact; ReLU is positively homogeneous, so
``fc1 -> fc2`` is too. The norm pairs assume ``do_layer_norm_before=True`` (every OPT size except
350m, which is post-norm: pass ``algo_configs`` for it).

Rotation: R1 by a rotation that keeps the all-ones direction (LayerNorms, see
:mod:`quark.torch.algorithm.rotation`), the block norms' biases folded into q/k/v's and fc1's biases,
the final norm's kept in the norm (lm_head has no bias), the learned position embeddings rotated with
the token embeddings; R2 on ``v_proj -> out_proj``; R4 on ``fc2``. OPT-350m (post-norm,
``project_in``/``project_out``) is refused before anything changes: it has no ``final_layer_norm``.
"""

from __future__ import annotations

from ._common import algorithms, attn_groups, attn_pairs, pair, rotation, template

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
            rotation_config=rotation(
                _DECODER,
                embedding_layers=["model.decoder.embed_tokens", "model.decoder.embed_positions"],
                final_norm="model.decoder.final_layer_norm",
                attn_norm="self_attn_layer_norm",
                o_proj="self_attn.out_proj",
                mlp_norm="final_layer_norm",
                mlp_inputs=["fc1"],
                down_proj="fc2",
            ),
        ),
    ),
]
