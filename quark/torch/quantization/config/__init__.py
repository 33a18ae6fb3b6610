"""The quantization config layer: enums, specs, QConfig, algorithm configs and LLM templates."""

from .algo_configs import (
    AlgoConfig,
    AutoSmoothQuantConfig,
    AWQConfig,
    GPTAQConfig,
    GPTQConfig,
    QronosConfig,
    RotationConfig,
    ScalingPair,
    SmoothQuantConfig,
)
from .config import Config, QConfig, QLayerConfig, QTensorConfig, QuantizationConfig, QuantizationSpec

__all__ = [
    "AlgoConfig",
    "AutoSmoothQuantConfig",
    "AWQConfig",
    "GPTAQConfig",
    "GPTQConfig",
    "QronosConfig",
    "RotationConfig",
    "ScalingPair",
    "SmoothQuantConfig",
    "Config",
    "QConfig",
    "QLayerConfig",
    "QTensorConfig",
    "QuantizationConfig",
    "QuantizationSpec",
]
