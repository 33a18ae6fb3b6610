"""The quantization config: what to quantize and how (pure data, no torch modules).

- :class:`QTensorConfig` (alias ``QuantizationSpec``): how one tensor is quantized.
- :class:`QLayerConfig` (alias ``QuantizationConfig``): the specs of a layer's input, output, weight
  and bias. A spec may be a list of two for two-stage formats (see :mod:`.specs`).
- :class:`QConfig` (alias ``Config``): the whole model: global / per-type / per-name layer configs,
  exclusions, KV cache and softmax specs, and the ordered algorithm list.

``to_dict()`` / ``from_dict()`` round-trip exactly; the dict is what lands in config.json as the
``quantization_config`` of an export.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field, fields
from typing import Any, Union

# Besides what this module uses, the imports below re-export names users import from here (``from
# quark.torch.quantization.config.config import Int8PerTensorSpec, QTensorConfig``): the algorithm
# configs, QTensorConfig (one module lower, :mod:`.tensor_config`, because the spec helpers build on
# it) and the spec helpers (:mod:`.specs`). The dependencies go one way: config -> specs -> tensor_config.
from .algo_configs import (  # noqa: F401
    AlgoConfig,
    AutoSmoothQuantConfig,
    AWQConfig,
    GPTAQConfig,
    GPTQConfig,
    QronosConfig,
    RotationConfig,
    ScalingPair,
    SmoothQuantConfig,
    algo_config_from_dict,
)
from .specs import *  # noqa: F401,F403
from .tensor_config import OBSERVER_NAMES, SCALE_FORMATS, QTensorConfig, QuantizationSpec  # noqa: F401
from .type import (  # noqa: F401
    Dtype,
    QSchemeType,
    QuantFlow,
    RoundType,
    ScaleCalculationMode,
    ScaleType,
    ZeroPointType,
)

TensorSpec = Union[QTensorConfig, list[QTensorConfig], None]


def _spec_from_any(value: Any, field_name: str) -> TensorSpec:
    if value is None or isinstance(value, QTensorConfig):
        return value
    if hasattr(value, "to_quantization_spec"):
        return _spec_from_any(value.to_quantization_spec(), field_name)
    if isinstance(value, dict):
        return QTensorConfig.from_dict(value)
    if isinstance(value, (list, tuple)):
        specs = [_spec_from_any(v, field_name) for v in value]
        if len(specs) != 2 or not all(isinstance(s, QTensorConfig) for s in specs):
            raise ValueError(f"{field_name}: a list of specs must hold exactly two QTensorConfig (two stages)")
        return specs
    raise TypeError(f"{field_name}: expected a QTensorConfig, a list of two, or None; got {type(value).__name__}")


def _spec_to_dict(spec: TensorSpec) -> Any:
    if spec is None:
        return None
    if isinstance(spec, list):
        return [s.to_dict() for s in spec]
    return spec.to_dict()


def first_stage(spec: TensorSpec) -> QTensorConfig | None:
    """The spec that determines a tensor's element format (the first stage of a two-stage spec)."""
    return spec[0] if isinstance(spec, list) else spec


@dataclass(eq=True)
class QLayerConfig:
    """Quantization specs of one layer's tensors; ``None`` leaves a tensor in float."""

    input_tensors: TensorSpec = None
    output_tensors: TensorSpec = None
    weight: TensorSpec = None
    bias: TensorSpec = None

    def __post_init__(self) -> None:
        for name in ("input_tensors", "output_tensors", "weight", "bias"):
            setattr(self, name, _spec_from_any(getattr(self, name), name))
        for name in ("input_tensors", "output_tensors"):
            spec = first_stage(getattr(self, name))
            if spec is not None and spec.qscheme is QSchemeType.per_group and not spec.is_dynamic:
                raise ValueError(
                    f"{name}: static per_group activation quantization cannot work (activation groups are "
                    "only known at run time); set is_dynamic=True or use qscheme=per_tensor"
                )

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, n) is None for n in ("input_tensors", "output_tensors", "weight", "bias"))

    def needs_calibration(self) -> bool:
        """True when some activation spec is static, i.e. its scale comes from calibration data."""
        for name in ("input_tensors", "output_tensors"):
            spec = getattr(self, name)
            for s in spec if isinstance(spec, list) else [spec]:
                if s is not None and not s.is_dynamic:
                    return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {n: _spec_to_dict(getattr(self, n)) for n in ("input_tensors", "output_tensors", "weight", "bias")}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> QLayerConfig:
        data = dict(data or {})
        data.pop("target_device", None)
        known = {"input_tensors", "output_tensors", "weight", "bias"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QLayerConfig has no field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)


QuantizationConfig = QLayerConfig


def _type_key(key: Any) -> str:
    """Layer types are keyed by class name so the config stays JSON-serialisable."""
    if isinstance(key, type):
        return key.__name__
    if isinstance(key, str):
        return key
    raise TypeError(f"layer_type_quant_config keys must be module classes or class names, got {key!r}")


def _layer_config(value: Any, where: str) -> QLayerConfig:
    if isinstance(value, QLayerConfig):
        return value
    if isinstance(value, dict):
        return QLayerConfig.from_dict(value)
    raise TypeError(f"{where}: expected a QLayerConfig, got {type(value).__name__}")


@dataclass(eq=True)
class QConfig:
    """Quantization config of a whole model.

    Resolving a layer (:meth:`resolve`): ``exclude`` > ``layer_quant_config`` (fnmatch on the full
    module name, first match in insertion order) > ``layer_type_quant_config`` (class name) >
    ``global_quant_config``. ``kv_cache_quant_config`` maps K/V layer patterns to the config applied
    to their outputs (merged over the layer's own config); ``softmax_quant_spec`` quantizes attention
    probabilities.
    """

    global_quant_config: QLayerConfig = field(default_factory=QLayerConfig)
    layer_type_quant_config: dict[str, QLayerConfig] = field(default_factory=dict)
    layer_quant_config: dict[str, QLayerConfig] = field(default_factory=dict)
    kv_cache_quant_config: dict[str, QLayerConfig] = field(default_factory=dict)
    min_kv_scale: float = 0.0
    softmax_quant_spec: QTensorConfig | None = None
    exclude: list[str] = field(default_factory=list)
    algo_config: list[AlgoConfig] | None = None
    quant_flow: QuantFlow | None = None
    shared_scale_groups: list[list[str]] | None = None
    #: path of the ``nn.ModuleList`` of decoder blocks that block-by-block calibration walks
    #: (``"model.layers"``); the algorithm configs' own ``model_decoder_layers`` take precedence,
    #: None: guessed from the model (``LLMTemplate.get_config`` fills in the template's)
    model_decoder_layers: str | None = None

    def __post_init__(self) -> None:
        self.global_quant_config = _layer_config(self.global_quant_config, "global_quant_config")
        self.layer_type_quant_config = {
            _type_key(k): _layer_config(v, f"layer_type_quant_config[{k!r}]")
            for k, v in self.layer_type_quant_config.items()
        }
        self.layer_quant_config = {
            str(k): _layer_config(v, f"layer_quant_config[{k!r}]") for k, v in self.layer_quant_config.items()
        }
        self.kv_cache_quant_config = {
            str(k): _layer_config(v, f"kv_cache_quant_config[{k!r}]") for k, v in self.kv_cache_quant_config.items()
        }
        if isinstance(self.softmax_quant_spec, dict):
            self.softmax_quant_spec = QTensorConfig.from_dict(self.softmax_quant_spec)
        if self.min_kv_scale is None or self.min_kv_scale < 0:
            raise ValueError(f"min_kv_scale={self.min_kv_scale!r} must be a float >= 0")
        self.min_kv_scale = float(self.min_kv_scale)
        self.exclude = list(self.exclude or [])
        if self.algo_config is not None:
            algos = self.algo_config if isinstance(self.algo_config, list) else [self.algo_config]
            self.algo_config = [a if isinstance(a, AlgoConfig) else algo_config_from_dict(a) for a in algos]
        if self.quant_flow is not None:
            self.quant_flow = QuantFlow.parse(self.quant_flow, "quant_flow")

    # -- resolution -------------------------------------------------------------------------
    def is_excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def resolve(self, name: str, module_type: type | str | None = None) -> QLayerConfig | None:
        """The layer config of module ``name`` (of class ``module_type``), or None when excluded."""
        if self.is_excluded(name):
            return None
        for pattern, cfg in self.layer_quant_config.items():
            if fnmatch.fnmatchcase(name, pattern):
                return cfg
        if module_type is not None:
            candidates = [module_type] if isinstance(module_type, str) else [c.__name__ for c in module_type.__mro__]
            for cls_name in candidates:
                if cls_name in self.layer_type_quant_config:
                    return self.layer_type_quant_config[cls_name]
        return self.global_quant_config

    def kv_cache_config(self, name: str) -> QLayerConfig | None:
        for pattern, cfg in self.kv_cache_quant_config.items():
            if fnmatch.fnmatchcase(name, pattern):
                return cfg
        return None

    def layer_configs(self) -> list[QLayerConfig]:
        """The global, per-type and per-pattern layer configs (not the KV-cache ones)."""
        return [self.global_quant_config, *self.layer_type_quant_config.values(), *self.layer_quant_config.values()]

    def needs_calibration(self) -> bool:
        layers = self.layer_configs() + list(self.kv_cache_quant_config.values())
        if self.softmax_quant_spec is not None and not self.softmax_quant_spec.is_dynamic:
            return True
        return any(cfg.needs_calibration() for cfg in layers)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "global_quant_config": self.global_quant_config.to_dict(),
            "layer_type_quant_config": {k: v.to_dict() for k, v in self.layer_type_quant_config.items()},
            "layer_quant_config": {k: v.to_dict() for k, v in self.layer_quant_config.items()},
            "kv_cache_quant_config": {k: v.to_dict() for k, v in self.kv_cache_quant_config.items()},
            "min_kv_scale": self.min_kv_scale,
            "softmax_quant_spec": _spec_to_dict(self.softmax_quant_spec),
            "exclude": list(self.exclude),
            "algo_config": None if self.algo_config is None else [a.to_dict() for a in self.algo_config],
            "quant_flow": None if self.quant_flow is None else self.quant_flow.value,
            "shared_scale_groups": copy.deepcopy(self.shared_scale_groups),
            "model_decoder_layers": self.model_decoder_layers,
        }

    #: keys an exported config.json carries beside the QConfig fields; from_dict ignores them
    EXPORT_KEYS = ("quant_method", "quant_mode", "version", "export", "pack_method", "weight_format")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QConfig:
        data = {k: v for k, v in data.items() if k not in cls.EXPORT_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QConfig has no field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)


Config = QConfig

