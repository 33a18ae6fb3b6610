"""Quantized modules: ``QuantLinear`` holds a linear layer's quantizers, fake-quantized or frozen.

- fake-quantized (after ``quantize_model``): the float weight stays; forward fake-quantizes the
  input, the weight (cached until the weight changes) and the output;
- frozen (after ``ModelQuantizer.freeze``): the float weight is replaced by the element codes,
  packed where the format packs (int4 in int32 words, fp4 two per byte, fp6 four per three bytes),
  plus the scales; forward dequantizes on the fly, so the weight memory is the quantized size and
  the outputs equal the fake-quantized model's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config.config import QLayerConfig, QTensorConfig
from .numerics.packing import pack, unpack
from .tensor_quantize import dequantize, quantize
from .tensor_quantizer import TensorQuantizer


def _code_stage(spec: QTensorConfig | list[QTensorConfig]) -> QTensorConfig:
    """The stage whose element codes are stored (progressive: the last; scale-quant: the first)."""
    if isinstance(spec, list):
        return spec[0] if spec[1].is_scale_quant else spec[1]
    return spec


class QuantLinear(nn.Linear):
    """``nn.Linear`` with ``input_quantizer``, ``weight_quantizer``, ``output_quantizer`` (each None
    when that tensor stays in float)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        layer_config: QLayerConfig,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        min_kv_scale: float = 0.0,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.layer_config = layer_config
        self.input_quantizer = TensorQuantizer(layer_config.input_tensors) if layer_config.input_tensors else None
        self.weight_quantizer = TensorQuantizer(layer_config.weight) if layer_config.weight else None
        self.output_quantizer = (
            TensorQuantizer(layer_config.output_tensors, min_scale=min_kv_scale) if layer_config.output_tensors else None
        )
        self.frozen = False
        self._wq_cache: tuple[int, int, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, layer_config: QLayerConfig, min_kv_scale: float = 0.0) -> QuantLinear:
        """Wrap ``linear`` without copying its weight (the Parameter is shared)."""
        with torch.device("meta"):
            q = cls(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                layer_config,
                min_kv_scale=min_kv_scale,
            )
        q.weight = linear.weight
        q.bias = linear.bias
        for tq in (q.input_quantizer, q.weight_quantizer, q.output_quantizer):
            if tq is not None:
                tq.to(linear.weight.device)
        return q

    # -- weight ------------------------------------------------------------------------------------
    def update_weight_qparams(self) -> None:
        """(Re)compute the static weight qparams from the current weight."""
        if self.weight_quantizer is not None and not self.frozen:
            self.weight_quantizer.calibrate_from(self.weight)
            self._wq_cache = None

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward uses it: dequantized codes (frozen) or fake-quantized float."""
        if self.frozen:
            return self._dequantized_weight()
        wq = self.weight_quantizer
        if wq is None or wq.mode != "quantize":
            return self.weight
        if not wq.is_dynamic and not wq.has_qparams:
            self.update_weight_qparams()
        key = (self.weight._version, self.weight.data_ptr())
        if self._wq_cache is None or self._wq_cache[:2] != key or self.weight.requires_grad:
            self._wq_cache = (*key, wq(self.weight.detach() if not self.weight.requires_grad else self.weight))
        return self._wq_cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = F.linear(x, self.quantized_weight(), self.bias)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y

    # -- freezing ------------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Replace the float weight by its stored codes (packed) and keep the scales."""
        wq = self.weight_quantizer
        if self.frozen or wq is None:
            return
        if not wq.has_qparams:
            self.update_weight_qparams()
        dtype = self.weight.dtype
        codes = quantize(self.weight.detach(), wq.spec, wq.qparams())
        stage = _code_stage(wq.spec)
        try:
            stored = pack(codes, stage.dtype)
        except ValueError:  # formats without a packed layout (mx6/mx9/bfp16 mantissas) keep their codes
            stored = codes
        del self.weight
        self.register_buffer("weight", stored)
        self.weight_dtype = dtype
        self.frozen = True
        self._wq_cache = None

    def _dequantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        stage = _code_stage(wq.spec)
        try:
            codes = unpack(self.weight, stage.dtype)
        except ValueError:
            codes = self.weight
        return dequantize(codes, wq.spec, wq.qparams(), self.weight_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", frozen" if self.frozen else "")


def quantized_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
