"""Spec helpers: small, readable builders of :class:`QTensorConfig`.

Each helper is a dataclass with the few knobs that matter for its format and a
``to_quantization_spec()`` that returns the full, validated ``QTensorConfig`` (or a list of two
for the two-stage helpers :class:`ProgressiveSpec` and :class:`ScaleQuantSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from .tensor_config import QTensorConfig
from .type import Dtype, QSchemeType, RoundType, ScaleCalculationMode, ScaleType

__all__ = [
    "QuantSpecBase",
    "Int8PerTensorSpec",
    "Int8PerChannelSpec",
    "Int8PerGroupSpec",
    "Uint8PerTensorSpec",
    "Uint8PerChannelSpec",
    "Uint8PerGroupSpec",
    "Int4PerTensorSpec",
    "Int4PerChannelSpec",
    "Int4PerGroupSpec",
    "Uint4PerTensorSpec",
    "Uint4PerChannelSpec",
    "Uint4PerGroupSpec",
    "FP8E4M3PerTensorSpec",
    "FP8E4M3PerChannelSpec",
    "FP8E4M3PerGroupSpec",
    "FP8E5M2PerTensorSpec",
    "FP4PerGroupSpec",
    "AmdFP4Spec",
    "OCP_MXFP4Spec",
    "OCP_MXFP6E3M2Spec",
    "OCP_MXFP6E2M3Spec",
    "OCP_MXFP8E4M3Spec",
    "OCP_MXINT8Spec",
    "MX6Spec",
    "MX9Spec",
    "BFP16Spec",
    "ProgressiveSpec",
    "ScaleQuantSpec",
]

#: per-tensor observer_method -> observer class name
OBSERVER_METHODS = {
    "min_max": "PerTensorMinMaxObserver",
    "histogram": "PerTensorHistogramObserver",
    "percentile": "PerTensorPercentileObserver",
    "mse": "PerTensorMSEObserver",
}


def _observer_for(method: str) -> str:
    key = str(method).lower()
    if key not in OBSERVER_METHODS:
        raise ValueError(f"observer_method={method!r} is unknown; allowed: min_max, histogram, MSE, percentile")
    return OBSERVER_METHODS[key]


class QuantSpecBase:
    """Marker base class of the spec helpers."""

    def to_quantization_spec(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# integers
# ---------------------------------------------------------------------------------------------
@dataclass
class _IntPerTensor(QuantSpecBase):
    observer_method: str = "min_max"
    symmetric: bool = True
    scale_type: str = "float"
    round_method: str = "half_even"
    is_dynamic: bool = False
    zero_point_type: str | None = None
    _dtype = Dtype.int8

    def to_quantization_spec(self) -> QTensorConfig:
        return QTensorConfig(
            dtype=self._dtype,
            observer_cls=_observer_for(self.observer_method),
            is_dynamic=self.is_dynamic,
            qscheme=QSchemeType.per_tensor,
            symmetric=self.symmetric,
            round_method=self.round_method,
            scale_type=self.scale_type,
            zero_point_type=_zp_type(self.symmetric, self.zero_point_type),
        )


def _zp_type(symmetric: bool, given: str | None) -> str | None:
    if symmetric:
        return given
    return given or "int32"


@dataclass
class _IntPerChannel(QuantSpecBase):
    symmetric: bool = True
    scale_type: str = "float"
    round_method: str = "half_even"
    is_dynamic: bool = False
    ch_axis: int = 0
    zero_point_type: str | None = None
    _dtype = Dtype.int8

    def to_quantization_spec(self) -> QTensorConfig:
        return QTensorConfig(
            dtype=self._dtype,
            observer_cls="PerChannelMinMaxObserver",
            is_dynamic=self.is_dynamic,
            qscheme=QSchemeType.per_channel,
            ch_axis=self.ch_axis,
            symmetric=self.symmetric,
            round_method=self.round_method,
            scale_type=self.scale_type,
            zero_point_type=_zp_type(self.symmetric, self.zero_point_type),
        )


@dataclass
class _IntPerGroup(QuantSpecBase):
    symmetric: bool = True
    scale_type: str = "float"
    round_method: str = "half_even"
    is_dynamic: bool = False
    ch_axis: int = -1
    group_size: int = 128
    zero_point_type: str | None = None
    _dtype = Dtype.int8

    def to_quantization_spec(self) -> QTensorConfig:
        return QTensorConfig(
            dtype=self._dtype,
            observer_cls="PerGroupMinMaxObserver",
            is_dynamic=self.is_dynamic,
            qscheme=QSchemeType.per_group,
            ch_axis=self.ch_axis,
            group_size=self.group_size,
            symmetric=self.symmetric,
            round_method=self.round_method,
            scale_type=self.scale_type,
            zero_point_type=_zp_type(self.symmetric, self.zero_point_type),
        )


@dataclass
class Int8PerTensorSpec(_IntPerTensor):
    """int8, symmetric by default, one scale for the tensor."""

    _dtype = Dtype.int8


@dataclass
class Int8PerChannelSpec(_IntPerChannel):
    """int8, symmetric by default, one scale per channel (ch_axis)."""

    _dtype = Dtype.int8


@dataclass
class Int8PerGroupSpec(_IntPerGroup):
    """int8, symmetric by default, one scale per group of group_size along the last dim."""

    _dtype = Dtype.int8


@dataclass
class Uint8PerTensorSpec(_IntPerTensor):
    """uint8, asymmetric (int32 zero point) by default, one scale for the tensor."""

    symmetric: bool = False
    _dtype = Dtype.uint8


@dataclass
class Uint8PerChannelSpec(_IntPerChannel):
    """uint8, asymmetric (int32 zero point) by default, one scale per channel (ch_axis)."""

    symmetric: bool = False
    _dtype = Dtype.uint8


@dataclass
class Uint8PerGroupSpec(_IntPerGroup):
    """uint8, asymmetric (int32 zero point) by default, one scale per group of group_size along the last dim."""

    symmetric: bool = False
    _dtype = Dtype.uint8


@dataclass
class Int4PerTensorSpec(_IntPerTensor):
    """int4, symmetric by default, one scale for the tensor."""

    _dtype = Dtype.int4


@dataclass
class Int4PerChannelSpec(_IntPerChannel):
    """int4, symmetric by default, one scale per channel (ch_axis)."""

    _dtype = Dtype.int4


@dataclass
class Int4PerGroupSpec(_IntPerGroup):
    """int4, symmetric by default, one scale per group of group_size along the last dim."""

    _dtype = Dtype.int4


@dataclass
class Uint4PerTensorSpec(_IntPerTensor):
    """uint4, asymmetric (int32 zero point) by default, one scale for the tensor."""

    symmetric: bool = False
    _dtype = Dtype.uint4


@dataclass
class Uint4PerChannelSpec(_IntPerChannel):
    """uint4, asymmetric (int32 zero point) by default, one scale per channel (ch_axis)."""

    symmetric: bool = False
    _dtype = Dtype.uint4


@dataclass
class Uint4PerGroupSpec(_IntPerGroup):
    """uint4, asymmetric (int32 zero point) by default, one scale per group of group_size along the last dim."""

    symmetric: bool = False
    _dtype = Dtype.uint4


# ---------------------------------------------------------------------------------------------
# minifloats with a float scale
# ---------------------------------------------------------------------------------------------
@dataclass
class FP8E4M3PerTensorSpec(QuantSpecBase):
    """fp8 e4m3fn, one scale (amax / 448) for the tensor."""

    observer_method: str = "min_max"
    scale_type: str = "float"
    is_dynamic: bool = False
    _dtype = Dtype.fp8_e4m3

    def to_quantization_spec(self) -> QTensorConfig:
        return QTensorConfig(
            dtype=self._dtype,
            observer_cls=_observer_for(self.observer_method),
            is_dynamic=self.is_dynamic,
            qscheme=QSchemeType.per_tensor,
            round_method=RoundType.half_even,
            scale_type=self.scale_type,
        )


@dataclass
class FP8E5M2PerTensorSpec(FP8E4M3PerTensorSpec):
    """fp8 e5m2, one scale (amax / 57344) for the tensor."""

    _dtype = Dtype.fp8_e5m2


@dataclass
class FP8E4M3PerChannelSpec(QuantSpecBase):
    """fp8 e4m3fn per channel (weights: per output channel) or, with ``ch_axis=0`` on activations, per token."""

    scale_type: str = "float"
    is_dynamic: bool = False
    ch_axis: int = 0

    def to_quantization_spec(self) -> QTensorConfig:
        return QTensorConfig(
            dtype=Dtype.fp8_e4m3,
            observer_cls="PerChannelMinMaxObserver",
            is_dynamic=self.is_dynamic,
            qscheme=QSchemeType.per_channel,
            ch_axis=self.ch_axis,
            round_method=RoundType.half_even,
            scale_type=self.scale_type,
        )


@dataclass
class FP8E4M3PerGroupSpec(QuantSpecBase):
    group_size: int = 128
    scale_format: str | None = None
    is_dynamic: bool = False
    ch_axis: int = -1
    scale_type: str | None = None

    def to_quantization_spec(self) -> QTensorConfig:
        return QTensorConfig(
            dtype=Dtype.fp8_e4m3,
            observer_cls="PerGroupMinMaxObserver",
            is_dynamic=self.is_dynamic,
            qscheme=QSchemeType.per_group,
            ch_axis=self.ch_axis,
            group_size=self.group_size,
            round_method=RoundType.half_even,
            scale_format=self.scale_format,
            scale_type=self.scale_type if self.scale_type or self.scale_format else ScaleType.float,
        )


@dataclass
class FP4PerGroupSpec(QuantSpecBase):
    """fp4 e2m1 per group; the scale format decides the flavour (float32, e5m3 = AMD fp4, e8m0 = OCP MX)."""

    group_size: int = 32
    scale_format: str | None = "float32"
    scale_calculation_mode: str | None = None
    is_dynamic: bool = False
    ch_axis: int = -1

    def to_quantization_spec(self) -> QTensorConfig:
        mode = self.scale_calculation_mode
        if mode is None and self.scale_format == "e8m0":
            mode = ScaleCalculationMode.even
        return QTensorConfig(
            dtype=Dtype.fp4,
            observer_cls="PerBlockMXObserver" if self.scale_format == "e8m0" else "PerGroupMinMaxObserver",
            is_dynamic=self.is_dynamic,
            qscheme=QSchemeType.per_group,
            ch_axis=self.ch_axis,
            group_size=self.group_size,
            round_method=RoundType.half_even,
            scale_format=self.scale_format,
            scale_type=None if self.scale_format else ScaleType.float,
            scale_calculation_mode=mode,
        )


@dataclass
class AmdFP4Spec(QuantSpecBase):
    """AMD fp4: fp4 e2m1 per group of 16 or 32 with the scale stored as unsigned e5m3."""

    group_size: int = 16
    is_dynamic: bool = False
    ch_axis: int = -1

    def to_quantization_spec(self) -> QTensorConfig:
        if self.group_size not in (16, 32):
            raise ValueError(f"group_size={self.group_size}: AmdFP4Spec supports only group_size=16 or 32")
        return FP4PerGroupSpec(
            group_size=self.group_size, scale_format="e5m3", is_dynamic=self.is_dynamic, ch_axis=self.ch_axis
        ).to_quantization_spec()


# ---------------------------------------------------------------------------------------------
# OCP microscaling: blocks of 32 sharing an e8m0 scale
# ---------------------------------------------------------------------------------------------
@dataclass
class _OCPMXSpec(QuantSpecBase):
    is_dynamic: bool = False
    ch_axis: int = -1
    scale_calculation_mode: str = "even"
    _dtype = Dtype.fp4

    def to_quantization_spec(self) -> QTensorConfig:
        return QTensorConfig(
            dtype=self._dtype,
            observer_cls="PerBlockMXObserver",
            is_dynamic=self.is_dynamic,
            qscheme=QSchemeType.per_group,
            ch_axis=self.ch_axis,
            group_size=32,
            round_method=RoundType.half_even,
            scale_format="e8m0",
            scale_calculation_mode=self.scale_calculation_mode,
            symmetric=True if self._dtype is Dtype.int8 else None,
        )


@dataclass
class OCP_MXFP4Spec(_OCPMXSpec):
    """OCP MXFP4: e2m1 elements, blocks of 32, e8m0 shared scale."""

    _dtype = Dtype.fp4


@dataclass
class OCP_MXFP6E3M2Spec(_OCPMXSpec):
    """OCP MXFP6 (e3m2 elements)."""

    _dtype = Dtype.fp6_e3m2


@dataclass
class OCP_MXFP6E2M3Spec(_OCPMXSpec):
    """OCP MXFP6 (e2m3 elements)."""

    _dtype = Dtype.fp6_e2m3


@dataclass
class OCP_MXFP8E4M3Spec(_OCPMXSpec):
    """OCP MXFP8 (e4m3 elements)."""

    _dtype = Dtype.fp8_e4m3


@dataclass
class OCP_MXINT8Spec(_OCPMXSpec):
    """OCP MXINT8: int8 elements with an implicit 2^-6 scale, e8m0 shared scale."""

    _dtype = Dtype.int8


# ---------------------------------------------------------------------------------------------
# shared-exponent block formats
# ---------------------------------------------------------------------------------------------
@dataclass
class _SharedExponentSpec(QuantSpecBase):
    is_dynamic: bool = False
    ch_axis: int = -1
    _dtype = Dtype.mx6
    _block = 16

    def to_quantization_spec(self) -> QTensorConfig:
        return QTensorConfig(
            dtype=self._dtype,
            observer_cls="PerBlockBFPObserver",
            is_dynamic=self.is_dynamic,
            qscheme=QSchemeType.per_group,
            ch_axis=self.ch_axis,
            group_size=self._block,
            round_method=RoundType.half_even,
            scale_type=ScaleType.pof2,
        )


@dataclass
class MX6Spec(_SharedExponentSpec):
    """MX6 (Rouhani et al. 2023): blocks of 16, 8-bit shared exponent, 1-bit micro-exponent per pair."""

    _dtype = Dtype.mx6
    _block = 16


@dataclass
class MX9Spec(_SharedExponentSpec):
    """MX9: as MX6 with 7 magnitude bits per element."""

    _dtype = Dtype.mx9
    _block = 16


@dataclass
class BFP16Spec(_SharedExponentSpec):
    """Block floating point: blocks of 8 share an exponent, 8-bit signed mantissas."""

    _dtype = Dtype.bfp16
    _block = 8


# ---------------------------------------------------------------------------------------------
# two-stage formats
# ---------------------------------------------------------------------------------------------
SpecLike = Union[QTensorConfig, QuantSpecBase]


def _as_spec(value: SpecLike, what: str) -> QTensorConfig:
    spec = value.to_quantization_spec() if isinstance(value, QuantSpecBase) else value
    if not isinstance(spec, QTensorConfig):
        raise TypeError(f"{what} must be a QTensorConfig or a spec helper, got {type(value).__name__}")
    return spec


@dataclass
class ProgressiveSpec(QuantSpecBase):
    """Quantize with ``first_stage``, then re-quantize the result with ``second_stage`` (e.g. int4_fp8)."""

    first_stage: SpecLike
    second_stage: SpecLike

    def to_quantization_spec(self) -> list[QTensorConfig]:
        first = _as_spec(self.first_stage, "first_stage")
        second = _as_spec(self.second_stage, "second_stage")
        if second.is_scale_quant:
            raise ValueError("ProgressiveSpec: second_stage must not have is_scale_quant=True (use ScaleQuantSpec)")
        return [first, second]


@dataclass
class ScaleQuantSpec(QuantSpecBase):
    """``first_stage`` quantizes the tensor; ``second_stage`` quantizes first_stage's scales (e.g. nvfp4)."""

    first_stage: SpecLike
    second_stage: SpecLike

    def to_quantization_spec(self) -> list[QTensorConfig]:
        first = _as_spec(self.first_stage, "first_stage")
        second = _as_spec(self.second_stage, "second_stage")
        if second.qscheme is not QSchemeType.per_tensor:
            raise ValueError("ScaleQuantSpec: second_stage must be per_tensor (one global scale for the scales)")
        return [first, second.with_changes(is_scale_quant=True)]
