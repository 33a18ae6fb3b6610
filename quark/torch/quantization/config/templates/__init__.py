"""Per-architecture template data: one small module per model family.

Each module defines ``TEMPLATES: list[dict]`` whose dicts are the keyword arguments of
:class:`~quark.torch.quantization.config.template.LLMTemplate`; :data:`ALL_TEMPLATES` collects them
in the order of the documented model-type list. Conventions for the layer names are described in
:mod:`._common`; ``docs/template_coverage.md`` summarises what each architecture gets.
"""

from __future__ import annotations

from typing import Any

from . import (
    chatglm,
    cohere,
    dbrx,
    deepseek,
    gemma,
    glm,
    gptj,
    granite,
    grok,
    llama,
    llama_vl,
    minimax,
    mixtral,
    opt,
    phi,
    qwen,
    qwen_moe,
)

#: the model types of the documented ``LLMTemplate.get`` list, in that order
MODEL_TYPES = (
    "chatglm",
    "cohere",
    "dbrx",
    "deepseek",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "deepseek_v4",
    "deepseek_vl_v2",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "glm4_moe",
    "glm4_moe_lite",
    "glm_moe_dsa",
    "gptj",
    "gpt_oss",
    "granitemoehybrid",
    "grok-1",
    "instella",
    "kimi_k2",
    "kimi_k25",
    "llama",
    "llama4",
    "minimax_m2",
    "minimax_m3_vl",
    "mistral",
    "mixtral",
    "mllama",
    "olmo",
    "opt",
    "phi",
    "phi3",
    "qwen",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_vl_moe",
    "qwen3_5_moe",
)

_FAMILIES = (
    chatglm,
    cohere,
    dbrx,
    deepseek,
    gemma,
    glm,
    gptj,
    granite,
    grok,
    llama,
    llama_vl,
    minimax,
    mixtral,
    opt,
    phi,
    qwen,
    qwen_moe,
)


def _collect() -> list[dict[str, Any]]:
    by_type: dict[str, dict[str, Any]] = {}
    for family in _FAMILIES:
        for kwargs in family.TEMPLATES:
            if kwargs["model_type"] in by_type:
                raise ValueError(f"template {kwargs['model_type']!r} is defined twice")
            by_type[kwargs["model_type"]] = kwargs
    missing = [t for t in MODEL_TYPES if t not in by_type]
    extra = [t for t in by_type if t not in MODEL_TYPES]
    if missing or extra:
        raise ValueError(f"template data out of sync with MODEL_TYPES: missing {missing}, unlisted {extra}")
    return [by_type[t] for t in MODEL_TYPES]


#: keyword arguments of ``LLMTemplate`` for every built-in model type, in documented order
ALL_TEMPLATES: list[dict[str, Any]] = _collect()

__all__ = ["ALL_TEMPLATES", "MODEL_TYPES"]
