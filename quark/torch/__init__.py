"""``quark.torch``: the public verbs of the toolkit.

Heavy pieces (the quantizer, export) are imported lazily so ``from quark.torch import LLMTemplate``
stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .quantization.config.template import LLMTemplate

_LAZY = {
    "ModelQuantizer": "quark.torch.quantization.api",
    "export_safetensors": "quark.torch.export.api",
    "import_model_from_safetensors": "quark.torch.export.api",
    "export_gguf": "quark.torch.export.gguf",
    "load_params": "quark.torch.export.api",
    "save_params": "quark.torch.export.api",
}

__all__ = ["LLMTemplate", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as exc:  # the piece is not built yet in this version
            raise AttributeError(f"quark.torch.{name} is not available in this version: {exc}") from None
        return getattr(module, name)
    raise AttributeError(f"module 'quark.torch' has no attribute {name!r}")
