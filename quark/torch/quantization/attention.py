"""fp8 attention: quantize the softmax probabilities inside transformers' attention.

transformers routes attention through ``AttentionInterface``. We register one implementation,
``"quark_eager"``, which runs the model's own ``eager_attention_forward`` (so softcapping, sinks and
other per-architecture details stay exactly as the model defines them) while every softmax it takes
is followed by the attention module's ``softmax_quantizer``. SDPA / flash kernels never expose the
probabilities, so a model using them is switched to this implementation, and a log line says so.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from .config.config import QTensorConfig
from .tensor_quantizer import TensorQuantizer

logger = logging.getLogger(__name__)

IMPLEMENTATION = "quark_eager"
_original_softmax = torch.nn.functional.softmax


@contextlib.contextmanager
def _quantized_softmax(quantizer: TensorQuantizer) -> Iterator[None]:
    def softmax(*args: Any, **kwargs: Any) -> torch.Tensor:
        return quantizer(_original_softmax(*args, **kwargs))

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = _original_softmax


def quark_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"attention_scheme=fp8: {type(module).__name__} has no eager_attention_forward in its modeling "
            "module, so its softmax cannot be quantized; use attention_scheme=None for this model"
        )
    quantizer = getattr(module, "softmax_quantizer", None)
    if quantizer is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    with _quantized_softmax(quantizer):
        return eager(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    """Register the attention function and, so that masks are built as eager attention expects them
    (SDPA may pass no mask and rely on is_causal), eager's mask function under the same name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, quark_eager_attention)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


def enable_softmax_quantization(model: nn.Module, attention_modules: list[nn.Module], spec: QTensorConfig) -> int:
    """Give each attention module a ``softmax_quantizer`` and route the model's attention through
    :func:`quark_eager_attention`. Returns the number of modules set up."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise ValueError("attention_scheme=fp8 needs a transformers model (one with config._attn_implementation)")
    _register()
    for attn in attention_modules:
        device = next(attn.parameters()).device
        attn.softmax_quantizer = TensorQuantizer(spec).to(device)
    previous = config._attn_implementation
    if previous != IMPLEMENTATION:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(IMPLEMENTATION)
        if config._attn_implementation != IMPLEMENTATION:
            config._attn_implementation = IMPLEMENTATION
        logger.warning(
            "attention_scheme=fp8: switched attention from %r to eager with fp8 softmax quantization (%s) "
            "in %d attention modules", previous, IMPLEMENTATION, len(attention_modules)
        )
    return len(attention_modules)
