"""``QuantConfigParser``: a :class:`QConfig` from a custom (non-quark) quantization config.

transformers' quark integration calls ``QuantConfigParser.from_custom_config(config, is_bias_quantized=False)``
for checkpoints whose ``quant_method`` is ``"awq"`` or ``"fp8"`` (legacy / custom exports), and
:func:`quark.torch.import_model_from_safetensors` uses it for AutoAWQ-layout exports.

- AutoAWQ: ``{quant_method: "awq", bits: 4, group_size, zero_point, version: "gemm",
  modules_to_not_convert}``: ``zero_point=True`` is uint4 asymmetric, ``False`` int4 symmetric, per
  group (``group_size=-1``: per output channel), weight only.
- fp8 (vLLM / transformers ``fp8`` configs): ``{quant_method: "fp8", activation_scheme: "static" |
  "dynamic", ignored_layers, kv_cache_scheme}``: fp8 e4m3 per-tensor weights and inputs.
"""

from __future__ import annotations

from typing import Any

from quark.torch.quantization.config.config import (
    FP8E4M3PerTensorSpec,
    Int4PerChannelSpec,
    Int4PerGroupSpec,
    QConfig,
    QLayerConfig,
    Uint4PerChannelSpec,
    Uint4PerGroupSpec,
)

#: K/V layers of the usual q/k/v naming, used when an fp8 config asks for an fp8 KV cache
KV_LAYERS = ("*k_proj", "*v_proj")


def _substring_patterns(names: list[str] | None) -> list[str]:
    """AutoAWQ / vLLM skip a layer when a listed name is a substring of the layer's name."""
    return [f"*{n}*" for n in names or []]


class QuantConfigParser:
    """Builds a :class:`QConfig` from configs written by other exporters."""

    @staticmethod
    def from_custom_config(config: dict[str, Any], is_bias_quantized: bool = False) -> QConfig:
        if is_bias_quantized:
            raise ValueError("custom quantization configs with a quantized bias are not supported")
        method = str(config.get("quant_method", "")).lower()
        if method == "awq":
            return QuantConfigParser.from_awq_config(config)
        if method == "fp8":
            return QuantConfigParser.from_fp8_config(config)
        raise ValueError(f"custom quant_method={config.get('quant_method')!r}; supported: 'awq', 'fp8'")

    @staticmethod
    def from_awq_config(config: dict[str, Any]) -> QConfig:
        bits = int(config.get("bits", config.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"AWQ config with bits={bits}: only 4-bit AWQ checkpoints are supported")
        version = str(config.get("version", config.get("format", "gemm"))).lower()
        if version != "gemm":
            raise ValueError(f"AWQ config with version={version!r}: only the 'gemm' packing is supported")
        group = int(config.get("group_size", config.get("q_group_size", 128)))
        zero_point = bool(config.get("zero_point", True))
        if group == -1:
            spec = (Uint4PerChannelSpec(symmetric=False) if zero_point else Int4PerChannelSpec()).to_quantization_spec()
        else:
            helper = Uint4PerGroupSpec(symmetric=False, group_size=group) if zero_point else Int4PerGroupSpec(group_size=group)
            spec = helper.to_quantization_spec()
        exclude = _substring_patterns(config.get("modules_to_not_convert"))
        if "*lm_head*" not in exclude:
            exclude.append("*lm_head*")
        return QConfig(global_quant_config=QLayerConfig(weight=spec), exclude=exclude)

    @staticmethod
    def from_fp8_config(config: dict[str, Any]) -> QConfig:
        scheme = str(config.get("activation_scheme", "static")).lower()
        if scheme not in ("static", "dynamic"):
            raise ValueError(f"fp8 config activation_scheme={scheme!r}; allowed: static, dynamic")
        weight = FP8E4M3PerTensorSpec().to_quantization_spec()
        act = FP8E4M3PerTensorSpec(is_dynamic=scheme == "dynamic").to_quantization_spec()
        layer = QLayerConfig(weight=weight, input_tensors=act)
        exclude = list(config.get("ignored_layers") or config.get("modules_to_not_convert") or [])
        if not any("lm_head" in p for p in exclude):
            exclude.append("lm_head")
        kv: dict[str, QLayerConfig] = {}
        layer_quant: dict[str, QLayerConfig] = {}
        if config.get("kv_cache_scheme"):
            out = FP8E4M3PerTensorSpec().to_quantization_spec()
            for pattern in KV_LAYERS:
                kv[pattern] = QLayerConfig(weight=weight, input_tensors=act, output_tensors=out)
                layer_quant[pattern] = kv[pattern]
        return QConfig(
            global_quant_config=layer, layer_quant_config=layer_quant, kv_cache_quant_config=kv, exclude=exclude
        )
