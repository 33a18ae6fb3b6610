"""``TensorQuantizer``: one tensor's spec + observer + qparams, as an ``nn.Module``.

Modes:

- ``"observe"``: record calibration statistics, return the input unchanged (activations are
  observed in float inside the block being calibrated);
- ``"quantize"``: fake-quantize with the stored qparams (static) or qparams computed from each
  input (dynamic);
- ``"off"``: identity (:func:`switched_off` / :func:`quantizers_off` for a while, e.g. a float pass).

Qparams live in buffers so they follow ``.to(device)`` and land in ``state_dict``:
``scale`` / ``zero_point`` for the (first) stage, ``scale_2`` / ``zero_point_2`` for the second stage
of a two-stage spec. Those are the names export writes (``weight_scale``, ``weight_scale_2`` ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from .config.config import QTensorConfig, TensorSpec
from .observers import Observer, PerTensorMinMaxObserver, make_observer
from .tensor_quantize import QParams, compute_qparams, fake_quantize, scale_quant_global_scale

MODES = ("observe", "quantize", "off")


def _stages(spec: TensorSpec) -> list[QTensorConfig]:
    return list(spec) if isinstance(spec, list) else [spec]


class TensorQuantizer(nn.Module):
    """Quantizes one tensor according to ``spec`` (a ``QTensorConfig`` or a two-stage list)."""

    def __init__(self, spec: TensorSpec, min_scale: float = 0.0) -> None:
        super().__init__()
        if spec is None:
            raise ValueError("TensorQuantizer needs a spec")
        self.spec = spec
        self.stages = _stages(spec)
        self.min_scale = float(min_scale)
        self.mode = "quantize"
        #: why a static quantizer has no qparams after calibration (its block was never run), for the
        #: error raised when it is used; None: not calibrated yet
        self.uncalibrated_reason: str | None = None
        for name in ("scale", "zero_point", "scale_2", "zero_point_2"):
            self.register_buffer(name, None)
        self.observer: Observer | None = self._make_observer()

    # -- what kind of quantizer ------------------------------------------------------------------
    @property
    def is_scale_quant(self) -> bool:
        return len(self.stages) == 2 and self.stages[1].is_scale_quant

    @property
    def is_dynamic(self) -> bool:
        """Fully dynamic: nothing to calibrate."""
        return all(bool(s.is_dynamic) for s in self.stages)

    @property
    def needs_calibration(self) -> bool:
        return self.observer is not None

    def _make_observer(self) -> Observer | None:
        if self.is_dynamic:
            return None
        if self.is_scale_quant:
            first, second = self.stages
            # a static global scale over dynamic block scales: observe the tensor's range
            return PerTensorMinMaxObserver(second) if first.is_dynamic else make_observer(first)
        return make_observer(self.stages[0])

    @property
    def has_qparams(self) -> bool:
        return self.scale is not None or self.scale_2 is not None

    # -- qparams ---------------------------------------------------------------------------------
    def qparams(self) -> QParams | list[QParams | None] | None:
        """Stored qparams in the shape ``tensor_quantize`` expects (None entries: dynamic)."""
        if self.is_dynamic:
            return None
        if len(self.stages) == 1:
            return QParams(self.scale, self.zero_point)
        first = None if self.scale is None else QParams(self.scale, self.zero_point)
        second = None if self.scale_2 is None else QParams(self.scale_2, self.zero_point_2)
        return [first, second]

    def set_qparams(self, qp: QParams | list[QParams | None]) -> None:
        stages = qp if isinstance(qp, list) else [qp]
        for i, stage in enumerate(stages):
            suffix = "" if i == 0 else "_2"
            if stage is None:
                continue
            scale = stage.scale
            if scale is not None and self.min_scale > 0:
                scale = scale.clamp(min=self.min_scale)
            setattr(self, "scale" + suffix, scale)
            setattr(self, "zero_point" + suffix, stage.zero_point)

    def calibrate_from(self, x: torch.Tensor) -> None:
        """Static qparams straight from a tensor (weights: no data needed)."""
        qp = compute_qparams(x.detach(), self.spec)
        if self.is_scale_quant and self.stages[0].is_dynamic:
            qp = [None, qp[1]]
        self.set_qparams(qp)

    def finalize(self) -> None:
        """Turn what the observer saw into qparams."""
        if self.observer is None:
            return
        self.set_qparams(self._observed_qparams(self.observer))

    def _observed_qparams(self, observer: Observer) -> QParams | list[QParams | None]:
        """The qparams of what ``observer`` (an observer of this quantizer's spec) saw."""
        if self.is_scale_quant and self.stages[0].is_dynamic:
            lo, hi = observer.range()
            amax = torch.maximum(lo.abs(), hi.abs())
            return [None, QParams(scale_quant_global_scale(amax, self.stages))]
        if len(self.stages) == 2:
            return compute_qparams(observer.representative(), self.spec)
        return observer.qparams()

    def reset_observer(self) -> None:
        self.observer = self._make_observer()

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            if self.observer is not None:
                self.observer.update(x)
            return x
        if not self.is_dynamic and not self.has_qparams:
            raise RuntimeError(self.uncalibrated_message())
        return fake_quantize(x, self.spec, self.qparams())

    def uncalibrated_message(self) -> str:
        """The error of using this static quantizer without qparams."""
        why = self.uncalibrated_reason or "run ModelQuantizer.quantize_model with a dataloader"
        return f"static quantizer used before calibration: {why}"

    def extra_repr(self) -> str:
        desc = "+".join(s.dtype.value for s in self.stages)
        return f"{desc}, {'dynamic' if self.is_dynamic else 'static'}, mode={self.mode}"


def set_mode(module: nn.Module, mode: str, roles: tuple[str, ...] | None = None) -> None:
    """Set the mode of every TensorQuantizer under ``module`` (optionally only some roles)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    for name, m in module.named_modules():
        if isinstance(m, TensorQuantizer) and (roles is None or name.rsplit(".", 1)[-1] in roles):
            m.mode = mode


@contextlib.contextmanager
def switched_off(quantizers: Iterable[TensorQuantizer]) -> Iterator[None]:
    """Context manager: ``quantizers`` are the identity (mode ``off``) while entered; their modes
    are restored on exit."""
    saved = [(q, q.mode) for q in quantizers]
    for q, _ in saved:
        q.mode = "off"
    try:
        yield
    finally:
        for q, mode in saved:
            q.mode = mode


def quantizers_off(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Context manager: every TensorQuantizer under ``module`` is the identity (the float function)."""
    return switched_off(q for q in module.modules() if isinstance(q, TensorQuantizer))
