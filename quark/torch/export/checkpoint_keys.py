"""Checkpoint names of a quantized model's state: the fixed rename between module state names and
checkpoint names that transformers' quark loader applies (``<layer>.weight_quantizer.scale`` <->
``<layer>.weight_scale`` ..., ``<attn>.prob_output_quantizer.scale`` <-> ``<attn>.prob_output_scale``).
Second-stage tensors keep their name (``weight_scale_2``, ``input_scale_2``). Used by every module of
export/ that writes or reads checkpoint names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "CHECKPOINT_KEYS",
    "PROB_QUANTIZER",
    "SOFTMAX_QUANTIZER",
    "to_module_key",
    "to_checkpoint_key",
    "to_module_state",
]

#: checkpoint suffix -> module attribute path (transformers' quark loader applies exactly these)
CHECKPOINT_KEYS = {
    f"{role}_{name}": f"{role}_quantizer.{name}"
    for role in ("weight", "bias", "input", "output")
    for name in ("scale", "zero_point")
}
#: the softmax quantizer of fp8 attention is registered under this name on a loaded model
PROB_QUANTIZER = "prob_output_quantizer"
#: ... and under this one on a model ``ModelQuantizer`` quantized (the attention function reads it)
SOFTMAX_QUANTIZER = "softmax_quantizer"


def to_module_key(key: str) -> str:
    """Checkpoint name -> module state name (the suffix rename transformers applies)."""
    for src, dst in CHECKPOINT_KEYS.items():
        if key.endswith(src):
            return key[: -len(src)] + dst
    return key


def to_checkpoint_key(key: str) -> str:
    """Module state name -> checkpoint name (inverse of :func:`to_module_key`)."""
    for quantizer in (SOFTMAX_QUANTIZER, PROB_QUANTIZER):
        marker = f".{quantizer}."
        if marker in key:
            head, _, name = key.rpartition(marker)
            return f"{head}.prob_output_{name}"
    for src, dst in CHECKPOINT_KEYS.items():
        if key.endswith("." + dst):
            return key[: -len(dst)] + src
    return key


def to_module_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (checkpoint name -> tensor) under their module state names, ready for
    ``load_state``."""
    return {to_module_key(k): v for k, v in tensors.items()}
