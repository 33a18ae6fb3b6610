"""Checkpoint names of a quantized model's state: the fixed rename between module state names and
checkpoint names that transformers' quark loader applies (``<layer>.weight_quantizer.scale`` <->
``<layer>.weight_scale`` ..., ``<attn>.prob_output_quantizer.scale`` <-> ``<attn>.prob_output_scale``).
Used by :mod:`.api` and :mod:`.experts`.
"""

from __future__ import annotations

#: checkpoint suffix -> module attribute path (transformers' quark loader applies exactly these)
CHECKPOINT_KEYS = {
    f"{role}_{name}": f"{role}_quantizer.{name}"
    for role in ("weight", "bias", "input", "output")
    for name in ("scale", "zero_point")
}
#: the softmax quantizer of fp8 attention is registered under this name on a loaded model
PROB_QUANTIZER = "prob_output_quantizer"
_SOFTMAX_QUANTIZER = "softmax_quantizer"


def _to_module_key(key: str) -> str:
    """Checkpoint name -> module state name (the suffix rename transformers applies)."""
    for src, dst in CHECKPOINT_KEYS.items():
        if key.endswith(src):
            return key[: -len(src)] + dst
    return key


def _to_checkpoint_key(key: str) -> str:
    """Module state name -> checkpoint name (inverse of :func:`_to_module_key`)."""
    for quantizer in (_SOFTMAX_QUANTIZER, PROB_QUANTIZER):
        marker = f".{quantizer}."
        if marker in key:
            head, _, name = key.rpartition(marker)
            return f"{head}.prob_output_{name}"
    for src, dst in CHECKPOINT_KEYS.items():
        if key.endswith("." + dst):
            return key[: -len(dst)] + src
    return key
