"""``JsonExporterConfig``: the ``export`` block of an exported ``config.json``.

transformers' quark integration builds it as ``JsonExporterConfig(**config["quantization_config"]["export"])``
(or with no argument for legacy / custom exports) and reads ``pack_method``; vLLM reads
``kv_cache_group`` and ``pack_method`` from the same block.  Keys written by other exporters that
this version does not know are kept (``extra``) rather than refused, so such checkpoints still load.
"""

from __future__ import annotations

from typing import Any

WEIGHT_FORMATS = ("real_quantized", "fake_quantized")
PACK_METHODS = ("reorder", "order")


class JsonExporterConfig:
    """How a model was exported.

    Args:
        weight_format: ``real_quantized`` (stored codes and scales) or ``fake_quantized`` (dequantized
            float weights plus the scales).
        pack_method: nibble order of int4 words: ``reorder`` (AutoAWQ order) or ``order``.
        kv_cache_group: patterns of the layers whose outputs are the K/V cache (``["*k_proj", "*v_proj"]``).
        min_kv_scale: lower bound applied to the K/V cache scales.
        weight_merge_groups: groups of layers whose weight scales were merged (``None``: none were).
        **extra: keys of other exporters, kept as attributes and in :meth:`to_dict`.
    """

    def __init__(
        self,
        weight_format: str = "real_quantized",
        pack_method: str = "reorder",
        kv_cache_group: list[str] | None = None,
        min_kv_scale: float = 0.0,
        weight_merge_groups: list[list[str]] | None = None,
        **extra: Any,
    ) -> None:
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format={weight_format!r}; allowed: {', '.join(WEIGHT_FORMATS)}")
        if pack_method not in PACK_METHODS:
            raise ValueError(f"pack_method={pack_method!r}; allowed: {', '.join(PACK_METHODS)}")
        self.weight_format = weight_format
        self.pack_method = pack_method
        self.kv_cache_group = list(kv_cache_group or [])
        self.min_kv_scale = float(min_kv_scale or 0.0)
        self.weight_merge_groups = None if weight_merge_groups is None else [list(g) for g in weight_merge_groups]
        self.extra = dict(extra)
        for key, value in extra.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kv_cache_group": list(self.kv_cache_group),
            "min_kv_scale": self.min_kv_scale,
            "pack_method": self.pack_method,
            "weight_format": self.weight_format,
            "weight_merge_groups": self.weight_merge_groups,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> JsonExporterConfig:
        return cls(**(data or {}))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonExporterConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"JsonExporterConfig({self.to_dict()!r})"
