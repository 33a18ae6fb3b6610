"""Named quantization schemes: each is a :class:`QLayerConfig` built from the spec helpers.

A scheme is a composition of formats (weight spec, activation spec), never a code path of its
own. :func:`builtin_schemes` returns the registry the templates start from.
"""

from __future__ import annotations

import copy

from .config import QLayerConfig, QTensorConfig
from .specs import (
    AmdFP4Spec,
    BFP16Spec,
    FP4PerGroupSpec,
    FP8E4M3PerChannelSpec,
    FP8E4M3PerTensorSpec,
    Int4PerChannelSpec,
    Int4PerGroupSpec,
    Int8PerTensorSpec,
    MX6Spec,
    MX9Spec,
    OCP_MXFP4Spec,
    OCP_MXFP6E2M3Spec,
    OCP_MXFP6E3M2Spec,
    ProgressiveSpec,
    ScaleQuantSpec,
    Uint4PerChannelSpec,
    Uint4PerGroupSpec,
)
from .type import Dtype, QSchemeType, RoundType, ScaleType

__all__ = [
    "QuantizationScheme",
    "Int4WeightOnlyScheme",
    "Int4WeightAndActivationScheme",
    "Int4WeightOnlyPerChannelScheme",
    "Uint4WeightOnlyScheme",
    "Uint4WeightOnlyPerChannelScheme",
    "Int8Scheme",
    "FP8Scheme",
    "PTPCFP8Scheme",
    "MXFP4Scheme",
    "MXFP4WeightOnlyScheme",
    "MXFP6E3M2Scheme",
    "MXFP6E2M3Scheme",
    "MXFP4_MXFP6E2M3Scheme",
    "MXFP4_FP8Scheme",
    "AmdFP4Scheme",
    "FP4Block16ScaleE4M3Scheme",
    "AmdFP4GlobalScaleScheme",
    "INT4_FP8Scheme",
    "MX6Scheme",
    "MX9Scheme",
    "BFP16Scheme",
    "QuantizationSchemeCollection",
    "builtin_schemes",
]


class QuantizationScheme:
    """Abstract base class for quantization schemes: a named recipe holding one ``QLayerConfig``."""

    def __init__(self, config: QLayerConfig) -> None:
        if not isinstance(config, QLayerConfig):
            raise TypeError(f"config must be a QLayerConfig, got {type(config).__name__}")
        self._config = config

    @property
    def config(self) -> QLayerConfig:
        """A copy of the scheme's layer config (callers may edit it freely)."""
        return copy.deepcopy(self._config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._config!r})"


def _fp8_tensor(dynamic: bool) -> QTensorConfig:
    return FP8E4M3PerTensorSpec(is_dynamic=dynamic).to_quantization_spec()


class Int4WeightOnlyScheme(QuantizationScheme):
    """INT4 weight-only: symmetric, per group of ``group_size`` along the input dim, static min-max."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size
        super().__init__(QLayerConfig(weight=Int4PerGroupSpec(group_size=group_size).to_quantization_spec()))


class Int4WeightAndActivationScheme(QuantizationScheme):
    """INT4 weights per group and INT4 input activations per group (dynamic)."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size
        super().__init__(
            QLayerConfig(
                weight=Int4PerGroupSpec(group_size=group_size).to_quantization_spec(),
                input_tensors=Int4PerGroupSpec(group_size=group_size, is_dynamic=True).to_quantization_spec(),
            )
        )


class Int4WeightOnlyPerChannelScheme(QuantizationScheme):
    """INT4 weight-only, symmetric, one scale per output channel."""

    def __init__(self) -> None:
        super().__init__(QLayerConfig(weight=Int4PerChannelSpec(ch_axis=0).to_quantization_spec()))


class Uint4WeightOnlyScheme(QuantizationScheme):
    """UINT4 weight-only: asymmetric with an int32 zero point, per group of ``group_size``."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size
        super().__init__(QLayerConfig(weight=Uint4PerGroupSpec(group_size=group_size).to_quantization_spec()))


class Uint4WeightOnlyPerChannelScheme(QuantizationScheme):
    """UINT4 weight-only, asymmetric, one scale and zero point per output channel."""

    def __init__(self) -> None:
        super().__init__(QLayerConfig(weight=Uint4PerChannelSpec(ch_axis=0).to_quantization_spec()))


class Int8Scheme(QuantizationScheme):
    """INT8 symmetric per-tensor weights and static (calibrated) per-tensor input activations."""

    def __init__(self) -> None:
        spec = Int8PerTensorSpec(observer_method="min_max", symmetric=True, scale_type="float", round_method="half_even")
        super().__init__(
            QLayerConfig(weight=spec.to_quantization_spec(), input_tensors=spec.to_quantization_spec())
        )


class FP8Scheme(QuantizationScheme):
    """FP8 e4m3 per-tensor weights and static per-tensor input activations (scale = amax / 448)."""

    def __init__(self) -> None:
        super().__init__(QLayerConfig(weight=_fp8_tensor(False), input_tensors=_fp8_tensor(False)))


class PTPCFP8Scheme(QuantizationScheme):
    """FP8 per output channel (static) weights, FP8 per token (dynamic) input activations."""

    def __init__(self) -> None:
        super().__init__(
            QLayerConfig(
                weight=FP8E4M3PerChannelSpec(ch_axis=0).to_quantization_spec(),
                input_tensors=FP8E4M3PerChannelSpec(ch_axis=0, is_dynamic=True).to_quantization_spec(),
            )
        )


class _WeightActScheme(QuantizationScheme):
    """Weight spec static, input spec dynamic (or as given): the MX-family pattern."""

    def __init__(self, weight: QTensorConfig | list, input_tensors: QTensorConfig | list | None) -> None:
        super().__init__(QLayerConfig(weight=weight, input_tensors=input_tensors))


class MXFP4Scheme(_WeightActScheme):
    """OCP MXFP4 weights and dynamic MXFP4 input activations."""

    def __init__(self) -> None:
        super().__init__(
            OCP_MXFP4Spec().to_quantization_spec(), OCP_MXFP4Spec(is_dynamic=True).to_quantization_spec()
        )


class MXFP4WeightOnlyScheme(_WeightActScheme):
    """Weight-only MXFP4 (e.g. the gpt-oss source format)."""

    def __init__(self) -> None:
        super().__init__(OCP_MXFP4Spec().to_quantization_spec(), None)


class MXFP6E3M2Scheme(_WeightActScheme):
    """OCP MXFP6 e3m2 weights and dynamic input activations."""

    def __init__(self) -> None:
        super().__init__(
            OCP_MXFP6E3M2Spec().to_quantization_spec(), OCP_MXFP6E3M2Spec(is_dynamic=True).to_quantization_spec()
        )


class MXFP6E2M3Scheme(_WeightActScheme):
    """OCP MXFP6 e2m3 weights and dynamic input activations."""

    def __init__(self) -> None:
        super().__init__(
            OCP_MXFP6E2M3Spec().to_quantization_spec(), OCP_MXFP6E2M3Spec(is_dynamic=True).to_quantization_spec()
        )


class MXFP4_MXFP6E2M3Scheme(_WeightActScheme):
    """MXFP4 weights and dynamic MXFP6 e2m3 input activations."""

    def __init__(self) -> None:
        super().__init__(
            OCP_MXFP4Spec().to_quantization_spec(), OCP_MXFP6E2M3Spec(is_dynamic=True).to_quantization_spec()
        )


class MXFP4_FP8Scheme(_WeightActScheme):
    """MXFP4 weights and static per-tensor FP8 input activations."""

    def __init__(self) -> None:
        super().__init__(OCP_MXFP4Spec().to_quantization_spec(), _fp8_tensor(False))


class AmdFP4Scheme(_WeightActScheme):
    """AMD fp4 (e2m1, unsigned e5m3 group scales); supports only group_size=16 or group_size=32."""

    def __init__(self, group_size: int = 16) -> None:
        if group_size not in (16, 32):
            raise ValueError(f"group_size={group_size}: AmdFP4Scheme supports only group_size=16 or 32")
        self.group_size = group_size
        super().__init__(
            AmdFP4Spec(group_size=group_size).to_quantization_spec(),
            AmdFP4Spec(group_size=group_size, is_dynamic=True).to_quantization_spec(),
        )


def _fp4_two_stage(group_size: int, second: QTensorConfig, dynamic: bool) -> list[QTensorConfig]:
    first = FP4PerGroupSpec(group_size=group_size, scale_format="float32", is_dynamic=dynamic)
    return ScaleQuantSpec(first, second).to_quantization_spec()


class FP4Block16ScaleE4M3Scheme(_WeightActScheme):
    """NVFP4: fp4 per group of 16 whose scales are fp8 e4m3 against an fp32 per-tensor global scale.

    Two stages: the weight (static) and the activation block scales (dynamic) are fp4 g16; the second
    stage quantizes those block scales to fp8 e4m3 per tensor, static for both (the global scale).
    """

    def __init__(self) -> None:
        super().__init__(
            _fp4_two_stage(16, _fp8_tensor(False), dynamic=False),
            _fp4_two_stage(16, _fp8_tensor(False), dynamic=True),
        )


def _ue5m3_tensor() -> QTensorConfig:
    return QTensorConfig(
        dtype=Dtype.fp8_e5m3,
        observer_cls="PerTensorMinMaxObserver",
        is_dynamic=False,
        qscheme=QSchemeType.per_tensor,
        round_method=RoundType.half_even,
        scale_type=ScaleType.float32,
    )


class AmdFP4GlobalScaleScheme(_WeightActScheme):
    """As NVFP4 with the second stage in unsigned e5m3: fp4 per group with an e5m3-quantized scale."""

    def __init__(self, group_size: int) -> None:
        if group_size not in (16, 32):
            raise ValueError(f"group_size={group_size}: AmdFP4GlobalScaleScheme supports only 16 or 32")
        self.group_size = group_size
        super().__init__(
            _fp4_two_stage(group_size, _ue5m3_tensor(), dynamic=False),
            _fp4_two_stage(group_size, _ue5m3_tensor(), dynamic=True),
        )


class INT4_FP8Scheme(_WeightActScheme):
    """INT4 weights (progressive: fp8 e4m3 per tensor, then int4 per channel, half-even) and dynamic fp8
    per-tensor activations ("W4A8")."""

    def __init__(self) -> None:
        int4 = Int4PerChannelSpec(ch_axis=0, symmetric=True, round_method="half_even", scale_type="float32")
        fp8_stage = FP8E4M3PerTensorSpec(scale_type="float32")
        super().__init__(
            ProgressiveSpec(fp8_stage, int4).to_quantization_spec(),
            FP8E4M3PerTensorSpec(is_dynamic=True, scale_type="float32").to_quantization_spec(),
        )


class MX6Scheme(_WeightActScheme):
    """MX6 (shared microexponents) weights and dynamic input activations."""

    def __init__(self) -> None:
        super().__init__(MX6Spec().to_quantization_spec(), MX6Spec(is_dynamic=True).to_quantization_spec())


class MX9Scheme(_WeightActScheme):
    """MX9 weights and dynamic input activations."""

    def __init__(self) -> None:
        super().__init__(MX9Spec().to_quantization_spec(), MX9Spec(is_dynamic=True).to_quantization_spec())


class BFP16Scheme(_WeightActScheme):
    """BFP16 (blocks of 8, shared exponent, 8-bit mantissas) weights and dynamic input activations."""

    def __init__(self) -> None:
        super().__init__(BFP16Spec().to_quantization_spec(), BFP16Spec(is_dynamic=True).to_quantization_spec())


class QuantizationSchemeCollection:
    """Collection for quantization schemes: a name -> :class:`QuantizationScheme` registry."""

    def __init__(self) -> None:
        self._schemes: dict[str, QuantizationScheme] = {}

    def register_scheme(self, scheme_name: str, scheme: QuantizationScheme) -> None:
        """Register (or replace) a quantization scheme."""
        if not isinstance(scheme_name, str) or not scheme_name:
            raise ValueError(f"scheme_name={scheme_name!r} must be a non-empty string")
        if isinstance(scheme, QLayerConfig):
            scheme = QuantizationScheme(scheme)
        if not isinstance(scheme, QuantizationScheme):
            raise TypeError(f"scheme must be a QuantizationScheme or QLayerConfig, got {type(scheme).__name__}")
        self._schemes[scheme_name] = scheme

    def unregister_scheme(self, scheme_name: str) -> None:
        """Remove a scheme; unknown names raise a ValueError listing the registered ones."""
        self._check(scheme_name)
        del self._schemes[scheme_name]

    def get_scheme(self, scheme_name: str) -> QuantizationScheme:
        """Get a quantization scheme by name (ValueError naming the valid ones when unknown)."""
        self._check(scheme_name)
        return self._schemes[scheme_name]

    def list_schemes(self) -> list[str]:
        return list(self._schemes)

    def __contains__(self, scheme_name: object) -> bool:
        return scheme_name in self._schemes

    def _check(self, scheme_name: str) -> None:
        if scheme_name not in self._schemes:
            raise ValueError(f"unknown quantization scheme {scheme_name!r}; available: {', '.join(self._schemes)}")


def builtin_schemes() -> QuantizationSchemeCollection:
    """A fresh collection holding every built-in scheme."""
    c = QuantizationSchemeCollection()
    c.register_scheme("fp8", FP8Scheme())
    c.register_scheme("ptpc_fp8", PTPCFP8Scheme())
    for g in (32, 64, 128):
        c.register_scheme(f"int4_wo_{g}", Int4WeightOnlyScheme(g))
    c.register_scheme("int4_wo_per_channel", Int4WeightOnlyPerChannelScheme())
    for g in (32, 64, 128):
        c.register_scheme(f"uint4_wo_{g}", Uint4WeightOnlyScheme(g))
    c.register_scheme("uint4_wo_per_channel", Uint4WeightOnlyPerChannelScheme())
    c.register_scheme("int8", Int8Scheme())
    c.register_scheme("mxfp4", MXFP4Scheme())
    c.register_scheme("mxfp6_e3m2", MXFP6E3M2Scheme())
    c.register_scheme("mxfp6_e2m3", MXFP6E2M3Scheme())
    c.register_scheme("mx6", MX6Scheme())
    c.register_scheme("bfp16", BFP16Scheme())
    c.register_scheme("int4_fp8", INT4_FP8Scheme())
    # beyond the 17 documented in the template note
    c.register_scheme("int4_wa_64", Int4WeightAndActivationScheme(64))
    c.register_scheme("mxfp4_weight_only", MXFP4WeightOnlyScheme())
    c.register_scheme("mxfp4_fp8", MXFP4_FP8Scheme())
    c.register_scheme("mxfp4_mxfp6_e2m3", MXFP4_MXFP6E2M3Scheme())
    c.register_scheme("amdfp4", AmdFP4Scheme(16))
    c.register_scheme("amdfp4_g32", AmdFP4Scheme(32))
    c.register_scheme("amdfp4_global16", AmdFP4GlobalScaleScheme(16))
    c.register_scheme("amdfp4_global32", AmdFP4GlobalScaleScheme(32))
    c.register_scheme("mx9", MX9Scheme())
    nvfp4 = FP4Block16ScaleE4M3Scheme()
    c.register_scheme("nvfp4", nvfp4)
    c.register_scheme("fp4_block16_scale_e4m3", nvfp4)
    return c
