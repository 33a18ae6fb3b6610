"""Quantized modules: ``QuantLinear`` holds a linear layer's quantizers, fake-quantized or frozen.

- fake-quantized (after ``quantize_model``): the float weight stays; forward fake-quantizes the
  input, the weight (cached inside :func:`weight_caching`, until the weight or its qparams change) and
  the output;
- frozen (after ``ModelQuantizer.freeze``): the float weight is replaced by exactly the tensors
  export writes (:mod:`quark.torch.quantization.layouts`: element codes packed where the format packs --
  int4 in int32 words, transposed ``[K, N/8]`` for per-group int4, fp4 two per byte, fp6 four per
  three bytes, fp8 as ``float8_e4m3fn`` -- and the scales in their storage format); forward
  dequantizes on the fly, so the weight memory is the quantized size and the outputs equal the
  fake-quantized model's.

Checkpoint names map to module attributes by a fixed rename (the one transformers' quark loader
applies): ``weight_scale`` <-> ``weight_quantizer.scale``, ``input_zero_point`` <->
``input_quantizer.zero_point`` ...; second-stage tensors (``weight_scale_2``, ``input_scale_2``) are
not renamed by that loader, so a frozen or loaded module holds them as its own buffers
(``self.input_scale_2``) and hands them to its quantizers before each forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from quark.torch.utils.linear import linear

from .config.config import QLayerConfig
from .layouts import WeightLayout, activation_placeholders
from .tensor_quantize import QParams, compute_qparams, dequantize, quantize
from .tensor_quantizer import TensorQuantizer

#: >0 while :func:`weight_caching` is entered
_caching = 0


@contextlib.contextmanager
def weight_caching() -> Iterator[None]:
    """While entered, a fake-quantized ``QuantLinear`` keeps its fake-quantized weight between
    forwards (until the weight or its qparams change), outside autograd. The calibration loop runs
    each block's passes (32 batches, several passes) inside it and drops a block's copies when the
    block is done; elsewhere (evaluation of the fake-quantized model) the weight is fake-quantized at
    each forward, so no second copy of every weight stays in memory."""
    global _caching
    _caching += 1
    try:
        yield
    finally:
        _caching -= 1


#: quantizer roles of a QuantLinear, in checkpoint order
ROLES = ("weight", "input", "output")
_STAGE2 = ("scale_2", "zero_point_2")


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
        #: weight qparams set by an algorithm (set_weight_qparams): not recomputed from the weight
        self.weight_qparams_fixed = False
        self._stage2_owned = False
        self._wq_cache: tuple[tuple, torch.Tensor] | None = None

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
    def update_weight_qparams(self, force: bool = False) -> None:
        """(Re)compute the static weight qparams from the current weight (min-max), unless an
        algorithm fixed them with :meth:`set_weight_qparams` (``force=True`` recomputes anyway)."""
        if self.weight_quantizer is not None and not self.frozen and (force or not self.weight_qparams_fixed):
            self.weight_quantizer.calibrate_from(self.weight)
            self.weight_qparams_fixed = False
            self._wq_cache = None

    def set_weight_qparams(self, qparams: QParams | list[QParams | None]) -> None:
        """Store weight qparams an algorithm computed (GPTQ's per-group grids): later
        :meth:`update_weight_qparams` calls keep them, so the fake-quantized weight stays the one the
        algorithm chose (min-max qparams of its result can differ, e.g. an int4 group whose largest
        code is -8)."""
        if self.weight_quantizer is None or self.frozen:
            raise RuntimeError("set_weight_qparams needs a weight quantizer on a non-frozen layer")
        self.weight_quantizer.set_qparams(qparams)
        self.weight_qparams_fixed = True
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
        if not _caching or (torch.is_grad_enabled() and self.weight.requires_grad):
            self._wq_cache = None
            return wq(self.weight)
        # the cache holds while neither the weight nor the quantizer's qparams change (in place or replaced)
        key = tuple((t.data_ptr(), t._version) if t is not None else None
                    for t in (self.weight, wq.scale, wq.zero_point, wq.scale_2, wq.zero_point_2))
        if self._wq_cache is None or self._wq_cache[0] != key:
            self._wq_cache = (key, wq(self.weight.detach()))
        return self._wq_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_second_stage()
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = linear(x, self.quantized_weight(), self.bias)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y

    # -- frozen / loaded state ------------------------------------------------------------------------
    def freeze(self, pack_method: str = "reorder") -> None:
        """Replace the float weight by its stored tensors (the export layout) and keep the scales.

        ``pack_method`` orders the nibbles of int4 words (``reorder``: AutoAWQ order, ``order``).
        The frozen outputs are bit-identical to the fake-quantized ones.
        """
        wq = self.weight_quantizer
        if self.frozen or wq is None:
            return
        if not wq.has_qparams:
            self.update_weight_qparams()
        layout = WeightLayout(wq.spec, pack_method=pack_method)
        qparams = wq.qparams()
        stored = layout.store(quantize(self.weight.detach(), wq.spec, qparams), qparams)
        self._hold_stored_weight(layout, stored, self.weight.dtype)

    def _hold_stored_weight(self, layout: WeightLayout, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        del self.weight
        self.register_buffer("weight", stored["weight"])
        wq = self.weight_quantizer
        wq.scale, wq.zero_point = stored.get("scale"), stored.get("zero_point")
        self._own_second_stage()
        self.weight_scale_2, self.weight_zero_point_2 = stored.get("scale_2"), stored.get("zero_point_2")
        self.weight_layout = layout
        self.weight_dtype = dtype
        self.frozen = True
        self._wq_cache = None

    def _own_second_stage(self) -> None:
        """Hold every quantizer's second-stage qparams as this module's ``<role>_scale_2`` /
        ``<role>_zero_point_2`` buffers (the checkpoint names); the quantizers' own copies become
        non-persistent and are refreshed from these before use (:meth:`_sync_second_stage`)."""
        if self._stage2_owned:
            return
        for role in ROLES:
            tq = getattr(self, f"{role}_quantizer")
            for name in _STAGE2:
                value = None if tq is None else getattr(tq, name)
                if tq is not None:
                    tq.register_buffer(name, None, persistent=False)
                self.register_buffer(f"{role}_{name}", value)
        self._stage2_owned = True

    def _sync_second_stage(self) -> None:
        if not self._stage2_owned:
            return
        for role in ROLES if not self.frozen else ROLES[1:]:
            tq = getattr(self, f"{role}_quantizer")
            if tq is not None:
                for name in _STAGE2:
                    setattr(tq, name, getattr(self, f"{role}_{name}"))

    def stored_weight(self) -> dict[str, torch.Tensor]:
        """The frozen weight's stored tensors (keys of ``WeightLayout``: weight, scale, zero_point ...)."""
        if not self.frozen:
            raise RuntimeError("stored_weight() needs a frozen layer (ModelQuantizer.freeze)")
        wq = self.weight_quantizer
        items = {
            "weight": self.weight,
            "scale": wq.scale,
            "zero_point": wq.zero_point,
            "scale_2": self.weight_scale_2,
            "zero_point_2": self.weight_zero_point_2,
        }
        return {k: v for k, v in items.items() if v is not None}

    def weight_codes_and_qparams(self) -> tuple[torch.Tensor, QParams | list[QParams]]:
        """Element codes and natural-shape qparams of the weight, frozen or not (for exporters)."""
        if self.frozen:
            return self.weight_layout.load(self.stored_weight())
        self._sync_second_stage()
        wq = self.weight_quantizer
        if not wq.has_qparams:
            self.update_weight_qparams()
        qparams = wq.qparams()
        return quantize(self.weight.detach(), wq.spec, qparams), qparams

    def _dequantized_weight(self) -> torch.Tensor:
        codes, qparams = self.weight_layout.load(self.stored_weight())
        return dequantize(codes, self.weight_quantizer.spec, qparams, self.weight_dtype)

    @classmethod
    def placeholder(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        layer_config: QLayerConfig,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        min_kv_scale: float = 0.0,
        layout: str = "real_quantized",
        pack_method: str = "reorder",
    ) -> QuantLinear:
        """An uninitialised layer with the stored tensors of an export, ready to be filled by a loader
        (``load_state_dict`` or transformers): ``layout="real_quantized"`` is frozen (the checkpoint
        layout), ``"fake_quantized"`` holds a float weight and natural-shape qparams."""
        with torch.device("meta"):
            q = cls(in_features, out_features, bias, layer_config, dtype=dtype, min_kv_scale=min_kv_scale)
        if bias:
            q.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        for role, features in (("input", in_features), ("output", out_features)):
            tq = getattr(q, f"{role}_quantizer")
            if tq is not None:
                tq.to(device)
                for name, t in activation_placeholders(tq.spec, features, device).items():
                    setattr(tq, name, t)
        wq = q.weight_quantizer
        if wq is None:
            q.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
            return q
        wq.to(device)
        if layout == "real_quantized":
            wlayout = WeightLayout(wq.spec, pack_method=pack_method)
            q._hold_stored_weight(wlayout, wlayout.placeholders(out_features, in_features, device), dtype)
            return q
        if layout != "fake_quantized":
            raise ValueError(f"layout={layout!r}; allowed: real_quantized, fake_quantized")
        q.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        qps = compute_qparams(torch.empty(out_features, in_features, device="meta"), wq.spec)
        for i, qp in enumerate(qps if isinstance(qps, list) else [qps]):
            suffix = "" if i == 0 else "_2"
            for name, t in (("scale", qp.scale), ("zero_point", qp.zero_point)):
                if t is not None:
                    setattr(wq, name + suffix, torch.empty(t.shape, dtype=t.dtype, device=device))
        q._own_second_stage()
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + (", frozen" if self.frozen else "")


def quantized_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
