"""``LLMTemplate``: the per-architecture registry that turns scheme and algorithm names into a QConfig.

A template holds what is specific to one model architecture (which layers are K/V, Q, gate/up,
which layers never get quantized, and the default algorithm configs); the schemes are shared by
all templates. The per-architecture data lives in :mod:`.templates`, one small module per family.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from .algo_configs import ALGO_CONFIG_CLASSES, AlgoConfig
from .config import QConfig, QLayerConfig, QTensorConfig
from .schemes import *  # noqa: F401,F403  (the scheme classes are part of this module's interface)
from .schemes import QuantizationScheme, QuantizationSchemeCollection, builtin_schemes
from .schemes import __all__ as _scheme_names
from .specs import FP8E4M3PerTensorSpec

# ``SUPPORTED_ALGORITHMS`` (the algorithms ``get_config`` knows, in the order the documentation lists
# them) is derived from the registry of algorithm configs on each access: see ``__getattr__`` below.
SUPPORTED_KV_CACHE_SCHEMES = ("fp8",)
SUPPORTED_ATTENTION_SCHEMES = ("fp8",)


def _fp8_static() -> QTensorConfig:
    return FP8E4M3PerTensorSpec(is_dynamic=False).to_quantization_spec()


def _supported_algorithms() -> tuple[str, ...]:
    """The registered algorithm names (``quark.torch.quantization.config.algo_configs.register_algo_config``)."""
    return tuple(ALGO_CONFIG_CLASSES)


def __getattr__(name: str) -> Any:
    # SUPPORTED_ALGORITHMS is computed on access so that it lists every registered algorithm, also one
    # registered after this module was imported
    if name == "SUPPORTED_ALGORITHMS":
        return _supported_algorithms()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "SUPPORTED_ALGORITHMS"])


def _check_choice(value: Any, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def _suffix(pattern: str) -> str:
    """'*self_attn.k_proj' -> 'k_proj': the layer-name suffix a pattern stands for."""
    return pattern.lstrip("*").split(".")[-1]


class LLMTemplate:
    """A configuration template that defines how to quantize one type of LLM.

    Args:
        model_type: the Hugging Face ``config.model_type`` this template is for.
        kv_layers_name: fnmatch patterns of the layers producing K and V (KV-cache quantization).
        q_layer_name: pattern(s) of the layer producing Q (attention quantization).
        gate_up_layers_name: patterns of the MLP gate/up layers (share a global scale in two-stage schemes).
        exclude_layers_name: patterns never quantized (``lm_head``, MoE routers, vision towers ...).
        algorithm_configs: default config per algorithm name; ``None`` = no default for this architecture.
        f2f_weight_converters: weight-name converters used by file-to-file quantization.
        decoder_layers: path of the ``nn.ModuleList`` of decoder blocks (``"model.layers"``); default: the
            ``model_decoder_layers`` the algorithm configs agree on. ``get_config`` puts it in every QConfig,
            so that calibration without an algorithm walks the same blocks.
        **legacy_algorithm_parameters: ``<algorithm>_config=...`` keywords (deprecated).
    """

    _templates: dict[str, LLMTemplate] = {}
    _schemes: QuantizationSchemeCollection = builtin_schemes()

    def __init__(
        self,
        model_type: str,
        kv_layers_name: list[str] | None = None,
        q_layer_name: str | list[str] | None = None,
        gate_up_layers_name: list[str] | None = None,
        exclude_layers_name: list[str] | None = None,
        algorithm_configs: dict[str, AlgoConfig | None] | None = None,
        f2f_weight_converters: list[Any] | None = None,
        decoder_layers: str | None = None,
        **legacy_algorithm_parameters: AlgoConfig | None,
    ) -> None:
        if not isinstance(model_type, str) or not model_type:
            raise ValueError(f"model_type={model_type!r} must be a non-empty string")
        self.model_type = model_type
        self.kv_layers_name = list(kv_layers_name) if kv_layers_name else None
        self.q_layer_name = q_layer_name
        self.gate_up_layers_name = list(gate_up_layers_name) if gate_up_layers_name else None
        self.exclude_layers_name = list(exclude_layers_name or [])
        self.f2f_weight_converters = list(f2f_weight_converters or [])
        configs = dict(algorithm_configs or {})
        for key, value in legacy_algorithm_parameters.items():
            if not key.endswith("_config") or key[: -len("_config")] not in ALGO_CONFIG_CLASSES:
                raise TypeError(f"LLMTemplate got an unexpected keyword argument {key!r}")
            warnings.warn(
                f"LLMTemplate({key}=...) is deprecated; pass algorithm_configs={{'{key[:-7]}': ...}}",
                DeprecationWarning,
                stacklevel=2,
            )
            configs[key[: -len("_config")]] = value
        for name, cfg in configs.items():
            _check_choice(name, _supported_algorithms(), "algorithm")
            if cfg is not None and not isinstance(cfg, ALGO_CONFIG_CLASSES[name]):
                raise TypeError(
                    f"algorithm_configs[{name!r}] must be a {ALGO_CONFIG_CLASSES[name].__name__}, "
                    f"got {type(cfg).__name__}"
                )
        self.algorithm_configs: dict[str, AlgoConfig | None] = configs
        paths = {c.model_decoder_layers for c in configs.values() if c is not None and c.model_decoder_layers}
        # algorithm configs that disagree give no default (each algorithm still walks its own path)
        self.decoder_layers: str | None = decoder_layers or (paths.pop() if len(paths) == 1 else None)

    def __repr__(self) -> str:
        algos = [k for k, v in self.algorithm_configs.items() if v is not None]
        return (
            f"LLMTemplate(model_type={self.model_type!r}, kv_layers_name={self.kv_layers_name!r}, "
            f"q_layer_name={self.q_layer_name!r}, gate_up_layers_name={self.gate_up_layers_name!r}, "
            f"exclude_layers_name={self.exclude_layers_name!r}, algorithms={algos!r})"
        )

    # -- registry -------------------------------------------------------------------------------
    @classmethod
    def list_available(cls) -> list[str]:
        """List all available model names of registered templates."""
        return list(cls._templates)

    @classmethod
    def register_template(cls, template: LLMTemplate) -> None:
        """Register (or replace) a template under its ``model_type``."""
        if not isinstance(template, LLMTemplate):
            raise TypeError(f"template must be an LLMTemplate, got {type(template).__name__}")
        cls._templates[template.model_type] = template

    @classmethod
    def get(cls, model_type: str) -> LLMTemplate:
        """Get a template by model type (``KeyError`` naming the valid ones when unknown)."""
        if model_type not in cls._templates:
            raise KeyError(
                f"no template for model type {model_type!r}; available: {', '.join(cls._templates)}. "
                "Register one with LLMTemplate.register_template(LLMTemplate(model_type=..., ...))"
            )
        return cls._templates[model_type]

    @classmethod
    def register_scheme(cls, scheme_name: str, config: QLayerConfig | QuantizationScheme) -> None:
        """Register a new quantization scheme for every template."""
        cls._schemes.register_scheme(scheme_name, config)

    @classmethod
    def unregister_scheme(cls, scheme_name: str) -> None:
        """Unregister a quantization scheme."""
        cls._schemes.unregister_scheme(scheme_name)

    @classmethod
    def list_schemes(cls) -> list[str]:
        """Names of the registered quantization schemes."""
        return cls._schemes.list_schemes()

    @classmethod
    def get_scheme(cls, scheme_name: str) -> QuantizationScheme:
        return cls._schemes.get_scheme(scheme_name)

    # -- config building ------------------------------------------------------------------------
    def _scheme_config(self, scheme: str, what: str = "scheme") -> QLayerConfig:
        if not isinstance(scheme, str) or scheme not in self._schemes:
            raise ValueError(
                f"unknown quantization {what} {scheme!r}; available: {', '.join(self._schemes.list_schemes())}"
            )
        return self._schemes.get_scheme(scheme).config

    def _algorithm_list(
        self, algorithm: str | list[str] | None, algo_configs: dict[str, AlgoConfig] | None
    ) -> list[AlgoConfig] | None:
        if algorithm is None:
            return None
        names = [algorithm] if isinstance(algorithm, str) else list(algorithm)
        overrides = dict(algo_configs or {})
        for name in overrides:
            _check_choice(name, _supported_algorithms(), "algorithm in algo_configs")
        out: list[AlgoConfig] = []
        for name in names:
            _check_choice(name, _supported_algorithms(), "algorithm")
            cfg = overrides.get(name) or self.algorithm_configs.get(name)
            if cfg is None:
                raise ValueError(
                    f"algorithm {name!r} has no default config for model type {self.model_type!r}; pass "
                    f"algo_configs={{'{name}': {ALGO_CONFIG_CLASSES[name].__name__}(...)}} to get_config"
                )
            if not isinstance(cfg, ALGO_CONFIG_CLASSES[name]):
                raise TypeError(
                    f"algo_configs[{name!r}] must be a {ALGO_CONFIG_CLASSES[name].__name__}, got {type(cfg).__name__}"
                )
            cfg.validate()  # a field may have been changed since the config was built
            out.append(copy.deepcopy(cfg))
        return out

    def _with_output(self, base: QLayerConfig, output: QTensorConfig) -> QLayerConfig:
        return QLayerConfig(input_tensors=base.input_tensors, weight=base.weight, bias=base.bias, output_tensors=output)

    def _default_shared_scale_groups(self, global_config: QLayerConfig) -> list[list[str]] | None:
        """Two-stage schemes with a global scale share it between parallel layers (q/k/v, gate/up)."""
        weight = global_config.weight
        if not (isinstance(weight, list) and weight[1].is_scale_quant):
            return None
        groups: list[list[str]] = []
        q = self.q_layer_name if isinstance(self.q_layer_name, list) else [self.q_layer_name] if self.q_layer_name else []
        qkv = [_suffix(p) for p in q + (self.kv_layers_name or [])]
        if len(qkv) > 1:
            groups.append(qkv)
        gate_up = [_suffix(p) for p in self.gate_up_layers_name or []]
        if len(gate_up) > 1:
            groups.append(gate_up)
        return groups

    def get_config(
        self,
        scheme: str,
        algorithm: str | list[str] | None = None,
        kv_cache_scheme: str | None = None,
        min_kv_scale: float = 0.0,
        attention_scheme: str | None = None,
        layer_config: dict[str, str] | None = None,
        layer_type_config: dict[type, str] | None = None,
        exclude_layers: list[str] | None = None,
        algo_configs: dict[str, AlgoConfig] | None = None,
        shared_scale_groups: list[list[str]] | None = None,
    ) -> QConfig:
        """Create a quantization configuration based on the provided parameters.

        ``exclude_layers`` adds to the template's exclusions (``lm_head``, routers ... stay excluded);
        ``layer_config`` and ``layer_type_config`` map patterns / module classes to
        scheme names; ``algo_configs`` overrides the template's algorithm defaults.
        """
        global_config = self._scheme_config(scheme)
        layer_quant_config: dict[str, QLayerConfig] = {}
        for pattern, name in (layer_config or {}).items():
            layer_quant_config[pattern] = self._scheme_config(name, f"scheme for layer_config[{pattern!r}]")
        layer_type_quant_config = {
            t: self._scheme_config(name, f"scheme for layer_type_config[{t!r}]")
            for t, name in (layer_type_config or {}).items()
        }

        kv_cache_quant_config: dict[str, QLayerConfig] = {}
        if kv_cache_scheme is not None:
            _check_choice(kv_cache_scheme, SUPPORTED_KV_CACHE_SCHEMES, "kv_cache_scheme")
            if not self.kv_layers_name:
                raise ValueError(f"kv_cache_scheme: the template {self.model_type!r} names no kv layers")
            for pattern in self.kv_layers_name:
                base = layer_quant_config.get(pattern, global_config)
                kv_cache_quant_config[pattern] = self._with_output(base, _fp8_static())
                layer_quant_config[pattern] = kv_cache_quant_config[pattern]

        softmax_spec = None
        if attention_scheme is not None:
            _check_choice(attention_scheme, SUPPORTED_ATTENTION_SCHEMES, "attention_scheme")
            if not self.q_layer_name:
                raise ValueError(f"attention_scheme: the template {self.model_type!r} names no q layer")
            q_patterns = self.q_layer_name if isinstance(self.q_layer_name, list) else [self.q_layer_name]
            for pattern in q_patterns:
                base = layer_quant_config.get(pattern, global_config)
                layer_quant_config[pattern] = self._with_output(base, _fp8_static())
            softmax_spec = _fp8_static()

        if shared_scale_groups is None:
            shared_scale_groups = self._default_shared_scale_groups(global_config)
        exclude = self.exclude_layers_name + [p for p in exclude_layers or [] if p not in self.exclude_layers_name]
        return QConfig(
            global_quant_config=global_config,
            layer_type_quant_config=layer_type_quant_config,
            layer_quant_config=layer_quant_config,
            kv_cache_quant_config=kv_cache_quant_config,
            min_kv_scale=min_kv_scale,
            softmax_quant_spec=softmax_spec,
            exclude=exclude,
            algo_config=self._algorithm_list(algorithm, algo_configs),
            shared_scale_groups=shared_scale_groups,
            model_decoder_layers=self.decoder_layers,
        )


def _register_builtin_templates() -> None:
    from .templates import ALL_TEMPLATES

    for kwargs in ALL_TEMPLATES:
        LLMTemplate.register_template(LLMTemplate(**kwargs))


_register_builtin_templates()

__all__ = ["LLMTemplate", "SUPPORTED_ALGORITHMS", *_scheme_names]  # noqa: F405 (SUPPORTED_ALGORITHMS: __getattr__)
