"""GLM MoE models of transformers 5.24: GLM-4.5/4.6 (``glm4_moe``), GLM-4.7-Flash
(``glm4_moe_lite``, DeepSeek-V3 style MLA) and GLM-5 (``glm_moe_dsa``, MLA + DSA indexer).

All three use the DeepSeek-MoE layout (dense first blocks, router ``mlp.gate``, fused experts,
``mlp.shared_experts``); see :mod:`._mla`. GLM-4.5 attention is grouped-K/V
``self_attn.{q,k,v,o}_proj`` (no ``v -> o``). In GLM-5, blocks whose indexer type is ``"shared"``
reuse the previous block's top-k and have no ``self_attn.indexer``: the indexer-aware norm sites
then do not apply, which leaves the norm unscaled there rather than scaling it inexactly.

Rotation defaults for GLM-4.5 (R1, R2), GLM-4.7-Flash and GLM-5 (MLA: R2 on ``kv_b_proj``'s value rows; GLM-5's indexer key
and weight projections read the rotated stream where a block has its own indexer),
:func:`._mla.moe_rotation`.
"""

from __future__ import annotations

from ._common import (
    GATE_UP_PROJ,
    KV_MLA,
    KV_PROJ,
    Q_MLA,
    Q_PROJ,
    algorithms,
    attn_groups,
    attn_pairs,
    template,
)
from ._mla import INDEXER_WEIGHTS, ROUTER, mla_groups, mla_pairs, moe_groups, moe_pairs, moe_rotation

TEMPLATES = [
    template(
        "glm4_moe",
        kv=KV_PROJ,
        q=Q_PROJ,
        gate_up=GATE_UP_PROJ,
        exclude=[ROUTER],
        algorithm_configs=algorithms(
            "model.layers", attn_pairs() + moe_pairs(), attn_groups() + moe_groups(), moe_rotation()
        ),
    ),
    template(
        "glm4_moe_lite",
        kv=KV_MLA,
        q=Q_MLA,
        gate_up=GATE_UP_PROJ,
        exclude=[ROUTER],
        algorithm_configs=algorithms(
            "model.layers", mla_pairs() + moe_pairs(), mla_groups() + moe_groups(), moe_rotation(mla=True)
        ),
    ),
    template(
        "glm_moe_dsa",
        kv=KV_MLA,
        q=Q_MLA,
        gate_up=GATE_UP_PROJ,
        exclude=[ROUTER, INDEXER_WEIGHTS],
        algorithm_configs=algorithms(
            "model.layers",
            mla_pairs(indexer=True) + moe_pairs(),
            mla_groups(indexer=True) + moe_groups(),
            moe_rotation(mla=True, indexer=True),
        ),
    ),
]
