"""How one tensor is quantized: :class:`QTensorConfig` (alias ``QuantizationSpec``).

The lowest module of the config layer besides :mod:`.type`: :mod:`.specs` (the spec helpers) and
:mod:`.config` (layer and model configs) both build on it, and :mod:`.config` re-exports everything
here, so ``from quark.torch.quantization.config.config import QTensorConfig`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .type import Dtype, QSchemeType, RoundType, ScaleCalculationMode, ScaleType, ZeroPointType

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
