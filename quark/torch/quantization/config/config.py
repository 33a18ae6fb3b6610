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

from .algo_configs import AlgoConfig, algo_config_from_dict
from .type import (
    Dtype,
    QSchemeType,
    QuantFlow,
    RoundType,
    ScaleCalculationMode,
    ScaleType,
    ZeroPointType,
)

#: Observer names a spec may carry (the classes live in ``quark.torch.quantization.observers``).
OBSERVER_NAMES = (
    "PlaceholderObserver",
    "PerTensorMinMaxObserver",
    "PerTensorHistogramObserver",
    "PerTensorPercentileObserver",
    "PerTensorMSEObserver",
    "PerChannelMinMaxObserver",
    "PerGroupMinMaxObserver",
    "PerBlockMXObserver",
    "PerBlockBFPObserver",
)

#: ``scale_format`` strings and the ScaleType each one implies.
SCALE_FORMATS = {
    "e8m0": ScaleType.float8_e8m0fnu,
    "e5m3": ScaleType.float8_e5m3,
    "float32": ScaleType.float32,
    "float16": ScaleType.float16,
    "bfloat16": ScaleType.bfloat16,
}

#: Block sizes fixed by the shared-exponent formats.
_FIXED_BLOCK = {Dtype.mx6: 16, Dtype.mx9: 16, Dtype.bfp16: 8}

_ENUM_FIELDS = {
    "dtype": Dtype,
    "qscheme": QSchemeType,
    "round_method": RoundType,
    "scale_type": ScaleType,
    "scale_calculation_mode": ScaleCalculationMode,
    "mx_element_dtype": Dtype,
    "zero_point_type": ZeroPointType,
}


@dataclass(eq=True)
class QTensorConfig:
    """How one tensor (a weight, an input or an output activation) is quantized.

    Validated on construction: every error names the offending field and says what is allowed.
    """

    dtype: Dtype
    observer_cls: str | None = None
    is_dynamic: bool | None = None
    qscheme: QSchemeType | None = None
    ch_axis: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    round_method: RoundType | None = None
    scale_type: ScaleType | None = None
    scale_format: str | None = None
    scale_calculation_mode: ScaleCalculationMode | None = None
    mx_element_dtype: Dtype | None = None
    zero_point_type: ZeroPointType | None = None
    is_scale_quant: bool = False

    def __post_init__(self) -> None:
        for name, enum in _ENUM_FIELDS.items():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, enum.parse(value, name))
        if self.dtype is None:
            raise ValueError("dtype is required; allowed: " + ", ".join(d.value for d in Dtype))
        if isinstance(self.observer_cls, type):
            self.observer_cls = self.observer_cls.__name__
        if self.observer_cls is not None and self.observer_cls not in OBSERVER_NAMES:
            raise ValueError(f"observer_cls={self.observer_cls!r} is unknown; allowed: {', '.join(OBSERVER_NAMES)}")
        if self.scale_format is not None:
            if self.scale_format not in SCALE_FORMATS:
                raise ValueError(
                    f"scale_format={self.scale_format!r} is unknown; allowed: {', '.join(SCALE_FORMATS)}"
                )
            implied = SCALE_FORMATS[self.scale_format]
            if self.scale_type is None:
                self.scale_type = implied
            elif self.scale_type is not implied:
                raise ValueError(
                    f"scale_format={self.scale_format!r} implies scale_type={implied.value!r}, "
                    f"but scale_type={self.scale_type.value!r} was given"
                )
        self._validate()

    def _validate(self) -> None:
        d = self.dtype
        if d.is_integer and self.scale_type is not ScaleType.float8_e8m0fnu:
            missing = [f for f in ("qscheme", "symmetric", "round_method", "scale_type") if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"integer spec (dtype={d.value}) needs {', '.join(missing)}; "
                    "give qscheme, symmetric, round_method and scale_type"
                )
        if d.is_unsigned and self.symmetric:
            raise ValueError(
                f"symmetric=True cannot work with unsigned dtype={d.value}: use symmetric=False "
                f"(asymmetric, with a zero point) or the signed dtype"
            )
        if d is Dtype.mx and self.mx_element_dtype is None:
            raise ValueError("dtype=mx needs mx_element_dtype (the element format, e.g. fp4)")
        if self.qscheme is QSchemeType.per_group:
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0:
                raise ValueError(
                    f"group_size={self.group_size!r}: qscheme=per_group needs a positive integer group_size"
                )
        elif self.group_size is not None and self.qscheme in (QSchemeType.per_tensor, QSchemeType.per_channel):
            raise ValueError(f"group_size={self.group_size} is only allowed with qscheme=per_group")
        if self.qscheme is QSchemeType.per_channel and self.ch_axis is None:
            raise ValueError("qscheme=per_channel needs ch_axis (0 = per output channel for weights / per token)")
        if d in _FIXED_BLOCK and self.group_size not in (None, _FIXED_BLOCK[d]):
            raise ValueError(f"group_size={self.group_size}: dtype={d.value} uses blocks of {_FIXED_BLOCK[d]}")
        if self.scale_type is ScaleType.float8_e8m0fnu and self.group_size not in (None, 32):
            raise ValueError(f"group_size={self.group_size}: OCP MX (e8m0 scales) uses blocks of 32")
        if self.zero_point_type is not None and self.symmetric:
            raise ValueError("zero_point_type is only meaningful with symmetric=False")

    @property
    def is_integer(self) -> bool:
        return self.dtype.is_integer

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if hasattr(value, "value") else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QTensorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QTensorConfig has no field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def with_changes(self, **changes: Any) -> QTensorConfig:
        """A validated copy with some fields replaced."""
        data = self.to_dict()
        data.update(changes)
        return QTensorConfig.from_dict(data)


QuantizationSpec = QTensorConfig

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


# Spec helpers live in their own module; they are re-exported here because this is where users
# import them from (``from quark.torch.quantization.config.config import Int8PerTensorSpec``).
from .algo_configs import (  # noqa: E402,F401
    AutoSmoothQuantConfig,
    AWQConfig,
    GPTAQConfig,
    GPTQConfig,
    QronosConfig,
    RotationConfig,
    ScalingPair,
    SmoothQuantConfig,
)
from .specs import *  # noqa: E402,F401,F403
