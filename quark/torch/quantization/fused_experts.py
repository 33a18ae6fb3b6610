"""Fused MoE experts: per-expert quantization of transformers-5 3-D expert weights, kept fused.

transformers 5 stores the routed experts of most MoE blocks in one module holding 3-D parameters
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``, some transposed, GPT-OSS with
biases, DBRX flattened to ``[E*I, H]``). Such a module is quantized in place (its class is swapped
for a subclass, :class:`QuantFusedExperts`; names and parameters stay where they are):

* every fused parameter (a *projection*) gets a :class:`FusedProjection` under
  ``<experts>.fused_quant.<projection>`` holding the quantizers; each expert's matrix, viewed as a
  2-D ``[out, in]`` linear weight, is quantized exactly as a ``QuantLinear`` weight of that shape
  (min-max qparams per expert: the qparams have a leading expert dim, e.g. ``[E]`` for per-tensor fp8,
  ``[E, out, in / g]`` for int4 per group);
* static activation quantizers hold one set of qparams per expert (``input_quantizer.scale [E]``),
  calibrated only on the tokens routed to that expert; an expert that receives no calibration
  token gets the qparams of the observed expert with the largest scale (logged);
* the forward fake-quantizes the weights (cached until they change) and, without activation
  quantizers, runs the class's own forward on them (any ``experts_implementation``); with activation
  quantizers (or rotation's online R4 on the experts' down inputs) it runs a per-expert loop
  (:meth:`QuantFusedExperts._expert_loop`) mirroring transformers' eager experts forward with each
  expert's quantizers applied;
* ``freeze`` stores every expert's weight in the export layout (:mod:`quark.torch.quantization.layouts`),
  stacked over the experts (``stored_weight [E, ...]``, ``stored_scale [E, ...]``), and drops the
  float parameter; the forward dequantizes them (outputs equal the fake-quantized ones).

Which classes: those using transformers' experts interface (``@use_experts_implementation``: the
attributes ``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm`` describe them), and
the classes of :data:`CLASS_LAYOUTS` (data: where each expert matrix lives and how the class routes).
Routers and shared experts are not touched here (routers are excluded by the templates, shared
experts are ``nn.Linear`` layers quantized like a dense MLP).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from quark.torch.utils.linear import linear

from .config.config import QLayerConfig, TensorSpec
from .layouts import WeightLayout
from .observers import Observer
from .tensor_quantize import QParams, compute_qparams, dequantize, fake_quantize, quantize
from .tensor_quantizer import TensorQuantizer

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_LAYOUTS",
    "ExpertsLayout",
    "FusedProjection",
    "Projection",
    "QuantFusedExperts",
    "experts_layout",
    "find_fused_experts",
    "fused_experts_modules",
    "quantized_fused_params",
]

#: role of a projection in the expert MLP
ROLES = ("gate_up", "gate", "up", "down")
#: the tensors a frozen projection stores per expert (keys of ``WeightLayout.store``)
STORED = ("weight", "scale", "zero_point", "scale_2", "zero_point_2")


# ---------------------------------------------------------------------------------------------
# layouts: where each expert's matrix lives
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    """One fused parameter of an experts module.

    ``path`` is relative to the experts module (``"gate_up_proj"``, ``"mlp.w1"``). The parameter is
    ``[E, a, b]`` or ``[E * a, b]`` (experts stacked along its rows); each expert's ``[a, b]`` slice is
    that expert's ``[out, in]`` matrix, or ``[in, out]`` when ``transposed``.
    """

    path: str
    role: str
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"projection role {self.role!r}; allowed: {', '.join(ROLES)}")

    @property
    def alias(self) -> str:
        """The key of the projection's quantizers under ``fused_quant`` (no dots)."""
        return self.path.replace(".", "_")

    @property
    def leaf(self) -> str:
        return self.path.rpartition(".")[2]


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts class holds and runs its experts.

    ``routing``: ``"topk"`` -- ``forward(hidden [T, H] (or [B, S, H]), top_k_index [T, k],
    top_k_weights [T, k])``, each expert runs on the tokens routed to it; ``"dense"`` --
    ``forward(hidden [E * T, H])`` where block ``e`` holds the tokens already scaled by their routing
    weight for expert ``e`` (zero rows: tokens not routed there), every expert runs on its block.
    ``act``: attribute path of the activation (used when the class has no ``_apply_gate``).
    ``bias_suffix``: projection ``p`` has a bias parameter ``p + bias_suffix`` (``[E, out]``).
    """

    projections: tuple[Projection, ...]
    routing: str = "topk"
    act: str = "act_fn"
    bias_suffix: str | None = None
    post_norm: str | None = None

    def projection(self, role: str) -> Projection | None:
        return next((p for p in self.projections if p.role == role), None)


#: experts classes outside transformers' experts interface: where each expert's matrix lives
CLASS_LAYOUTS: dict[str, ExpertsLayout] = {
    # ffn.experts.mlp.{w1, v1, w2} [E * I, H]: w1 (gate) and v1 (up) are [out, in] per expert, w2 (down)
    # is used as ``h @ w2_e`` ([in, out]); topk routing, activation mlp.activation_fn
    "DbrxExperts": ExpertsLayout(
        (Projection("mlp.w1", "gate"), Projection("mlp.v1", "up"), Projection("mlp.w2", "down", True)),
        act="mlp.activation_fn",
    ),
    # gate_up_proj [E, H, 2I] and down_proj [E, I, H] ([in, out] per expert), run with bmm on
    # [E, T, H] blocks of router-scaled tokens
    "Llama4TextExperts": ExpertsLayout(
        (Projection("gate_up_proj", "gate_up", True), Projection("down_proj", "down", True)), routing="dense"
    ),
}

_INTERFACE_ATTRS = ("has_gate", "has_bias", "is_transposed", "num_experts")


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of an experts module, or None when ``module`` holds no fused experts this knows."""
    if isinstance(module, QuantFusedExperts):
        return module.fused_layout
    known = CLASS_LAYOUTS.get(type(module).__name__)
    if known is not None:
        return known
    if not all(hasattr(module, a) for a in _INTERFACE_ATTRS):
        return None
    # transformers' experts interface (integrations/moe.py: use_experts_implementation)
    first = "gate_up_proj" if module.has_gate else "up_proj"
    if not isinstance(getattr(module, first, None), torch.Tensor) or not isinstance(
        getattr(module, "down_proj", None), torch.Tensor
    ):
        return None
    t = bool(module.is_transposed)
    return ExpertsLayout(
        (Projection(first, "gate_up" if module.has_gate else "up", t), Projection("down_proj", "down", t)),
        bias_suffix="_bias" if module.has_bias else None,
        post_norm="post_expert_norm" if getattr(module, "has_post_expert_norm", False) else None,
    )


def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, leaf = path.rpartition(".")
    return (module.get_submodule(head) if head else module), leaf


def expert_view(w: torch.Tensor, num_experts: int, transposed: bool) -> torch.Tensor:
    """``[E, out, in]`` view of a fused parameter (a transposed view when stored ``[in, out]``)."""
    v = w if w.dim() == 3 else w.reshape(num_experts, -1, w.shape[-1])
    return v.transpose(1, 2) if transposed else v


def module_view(w_eoi: torch.Tensor, shape: tuple[int, ...], transposed: bool) -> torch.Tensor:
    """Inverse of :func:`expert_view`: the parameter's own shape and orientation, contiguous."""
    v = w_eoi.transpose(1, 2) if transposed else w_eoi
    return v.reshape(shape).contiguous()


def _expert_matrix(w: torch.Tensor, num_experts: int, e: int) -> torch.Tensor:
    """Expert ``e``'s slice of a fused parameter in the parameter's orientation."""
    return (w if w.dim() == 3 else w.reshape(num_experts, -1, w.shape[-1]))[e]


# ---------------------------------------------------------------------------------------------
# qparams with a leading expert dim
# ---------------------------------------------------------------------------------------------
def _map_qparams(qp: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor of a QParams / list of QParams (None entries and fields kept)."""
    if qp is None:
        return None
    if isinstance(qp, list):
        return [_map_qparams(q, fn) for q in qp]
    return QParams(None if qp.scale is None else fn(qp.scale), None if qp.zero_point is None else fn(qp.zero_point))


def stack_qparams(per_expert: list[Any]) -> Any:
    """Per-expert qparams (same structure each) -> one structure whose tensors have a leading expert dim."""
    first = per_expert[0]
    if first is None:
        return None
    if isinstance(first, list):
        return [stack_qparams([q[i] for q in per_expert]) for i in range(len(first))]
    return QParams(
        None if first.scale is None else torch.stack([q.scale for q in per_expert]),
        None if first.zero_point is None else torch.stack([q.zero_point for q in per_expert]),
    )


def expert_qparams(qp: Any, e: int) -> Any:
    """Expert ``e``'s qparams out of stacked ones."""
    return _map_qparams(qp, lambda t: t[e])


def slice_rows(qp: Any, rows: slice) -> Any:
    """The qparams of rows ``rows`` (output channels) of a 2-D weight: scalar (per-tensor) qparams are
    shared, the others are indexed along their first dim (per channel / per group / MX block)."""
    return _map_qparams(qp, lambda t: t if t.dim() == 0 else t[rows])


def cat_rows(parts: list[Any]) -> Any:
    """Inverse of :func:`slice_rows` over consecutive row blocks (shared scalars must be equal)."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, list):
        return [cat_rows([p[i] for p in parts]) for i in range(len(first))]

    def join(ts: list[torch.Tensor]) -> torch.Tensor:
        if ts[0].dim() == 0:
            if any(not torch.equal(t, ts[0]) for t in ts[1:]):
                raise ValueError("the parts of one expert matrix disagree on a per-tensor qparam")
            return ts[0]
        return torch.cat(ts, dim=0)

    return QParams(
        None if first.scale is None else join([p.scale for p in parts]),
        None if first.zero_point is None else join([p.zero_point for p in parts]),
    )


def _largest_scale(qp: Any) -> float:
    stages = qp if isinstance(qp, list) else [qp]
    values = [float(s.scale.float().max()) for s in stages if s is not None and s.scale is not None]
    return max(values) if values else 0.0


class ExpertsWeightQuantizer(TensorQuantizer):
    """The weights of all experts of one projection, viewed ``[E, out, in]``: each expert's matrix is
    quantized as a 2-D weight (its own min-max qparams, stacked: ``scale [E, ...]``)."""

    def __init__(self, spec: TensorSpec, num_experts: int) -> None:
        super().__init__(spec)
        self.num_experts = int(num_experts)

    def _make_observer(self) -> Observer | None:  # weights never observe: qparams come from the weights
        return None

    def expert_qparams(self, e: int) -> Any:
        return expert_qparams(self.qparams(), e)

    def calibrate_from(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.set_qparams(stack_qparams([compute_qparams(x[e], self.spec) for e in range(x.shape[0])]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "quantize":
            return x
        if not self.is_dynamic and not self.has_qparams:
            self.calibrate_from(x)
        out = torch.empty_like(x)
        for e in range(x.shape[0]):
            out[e] = fake_quantize(x[e], self.spec, None if self.is_dynamic else self.expert_qparams(e))
        return out


class ExpertsActQuantizer(TensorQuantizer):
    """An activation of one projection, per expert: ``forward(x, expert)``. Static qparams are one set
    per expert (``scale [E, ...]``), observed on the tokens routed to that expert only."""

    def __init__(self, spec: TensorSpec, num_experts: int, min_scale: float = 0.0) -> None:
        super().__init__(spec, min_scale=min_scale)
        self.num_experts = int(num_experts)
        self._expert_observers: list[Observer | None] | None = None
        #: experts that got no calibration token (their qparams were borrowed); set by finalize
        self.unobserved: list[int] = []

    def expert_qparams(self, e: int) -> Any:
        return expert_qparams(self.qparams(), e)

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:  # type: ignore[override]
        if self.mode == "off":
            return x
        if expert is None and not self.is_dynamic:
            raise ValueError("a static per-expert activation quantizer needs the expert index: forward(x, expert)")
        if self.mode == "observe":
            if self.observer is not None and x.numel():
                if self._expert_observers is None:
                    self._expert_observers = [None] * self.num_experts
                obs = self._expert_observers[expert]
                if obs is None:
                    obs = self._expert_observers[expert] = self._make_observer()
                obs.update(x)
            return x
        if self.is_dynamic:
            return fake_quantize(x, self.spec, None)
        if not self.has_qparams:
            raise RuntimeError(self.uncalibrated_message())
        return fake_quantize(x, self.spec, self.expert_qparams(expert))

    def finalize(self) -> None:
        if self.observer is None:
            return
        observers = self._expert_observers or [None] * self.num_experts
        per = [None if o is None or not o.has_data else self._observed_qparams(o) for o in observers]
        seen = [q for q in per if q is not None]
        if not seen:
            raise RuntimeError(
                "no calibration token reached any expert of this fused-experts layer: its static activation "
                "scales cannot be calibrated (give more calibration data)"
            )
        self.unobserved = [e for e, q in enumerate(per) if q is None]
        if self.unobserved:
            fallback = max(seen, key=_largest_scale)
            per = [fallback if q is None else q for q in per]
        self.set_qparams(stack_qparams(per))
        self._expert_observers = None

    def reset_observer(self) -> None:
        super().reset_observer()
        self._expert_observers = None


# ---------------------------------------------------------------------------------------------
# one projection's quantization state
# ---------------------------------------------------------------------------------------------
class FusedProjection(nn.Module):
    """Quantizers (and, frozen, the stored weight) of one fused parameter of an experts module."""

    def __init__(self, proj: Projection, layer_config: QLayerConfig, num_experts: int, out_features: int,
                 in_features: int, param_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = proj
        self.layer_config = layer_config
        self.num_experts = int(num_experts)
        self.out_features = int(out_features)
        self.in_features = int(in_features)
        self.param_shape = tuple(param_shape)
        self.weight_dtype = dtype
        e = self.num_experts
        self.input_quantizer = ExpertsActQuantizer(layer_config.input_tensors, e) if layer_config.input_tensors else None
        self.weight_quantizer = ExpertsWeightQuantizer(layer_config.weight, e) if layer_config.weight else None
        self.output_quantizer = (
            ExpertsActQuantizer(layer_config.output_tensors, e) if layer_config.output_tensors else None
        )
        for name in STORED:
            self.register_buffer(f"stored_{name}", None)
        self.frozen = False
        self.weight_layout: Any = None
        self._cache: tuple[int, int, torch.Tensor] | None = None
        #: (version, data_ptr) of the weight the qparams were computed from
        self._qparams_of: tuple[int, int] | None = None
        #: qparams loaded with the weight (an import): not recomputed from it unless forced
        self.weight_qparams_fixed = False

    @property
    def has_activation_quantizers(self) -> bool:
        return self.input_quantizer is not None or self.output_quantizer is not None

    def activations_active(self) -> bool:
        return any(q is not None and q.mode != "off" for q in (self.input_quantizer, self.output_quantizer))

    # -- weight ------------------------------------------------------------------------------------
    def view(self, w: torch.Tensor) -> torch.Tensor:
        return expert_view(w, self.num_experts, self.proj.transposed)

    def update_weight_qparams(self, w: torch.Tensor | None, force: bool = False) -> None:
        wq = self.weight_quantizer
        if wq is None or self.frozen or w is None or wq.is_dynamic:
            return
        if self.weight_qparams_fixed and wq.has_qparams and not force:
            return
        key = (w._version, w.data_ptr())
        if force or not wq.has_qparams or self._qparams_of != key:
            with torch.no_grad():
                wq.calibrate_from(self.view(w))
            self._qparams_of = key
            self.weight_qparams_fixed = False
            self._cache = None

    def set_weight_qparams(self, qparams: Any) -> None:
        """Store weight qparams an algorithm computed (stacked over the experts, as
        :func:`stack_qparams` gives them): later :meth:`update_weight_qparams` calls keep them (see
        ``QuantLinear.set_weight_qparams``)."""
        if self.weight_quantizer is None or self.frozen:
            raise RuntimeError("set_weight_qparams needs a weight quantizer on a non-frozen projection")
        self.weight_quantizer.set_qparams(qparams)
        self.weight_qparams_fixed = True
        self._cache = None

    def effective_weight(self, w: torch.Tensor | None) -> torch.Tensor:
        """The weight as the forward uses it, in the parameter's own shape and orientation."""
        if self.frozen:
            return self.dequantized_weight()
        wq = self.weight_quantizer
        if wq is None or wq.mode != "quantize":
            return w
        self.update_weight_qparams(w)
        key = (w._version, w.data_ptr())
        if self._cache is None or self._cache[:2] != key:
            with torch.no_grad():
                fq = wq(self.view(w.detach()))
            self._cache = (*key, module_view(fq, self.param_shape, self.proj.transposed))
        return self._cache[2]

    def drop_cache(self) -> None:
        self._cache = None

    def stored(self, e: int | None = None) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, f"stored_{name}") for name in STORED}
        return {k: (v if e is None else v[e]) for k, v in out.items() if v is not None}

    def expert_codes(self, w: torch.Tensor | None, e: int) -> tuple[torch.Tensor, Any]:
        """Element codes ``[out, in]`` and natural qparams of expert ``e``'s matrix (frozen or not)."""
        if self.frozen:
            return self.weight_layout.load(self.stored(e))
        self.update_weight_qparams(w)
        wq = self.weight_quantizer
        qp = wq.expert_qparams(e)
        return quantize(self.view(w.detach())[e], wq.spec, qp), qp

    def dequantized_weight(self) -> torch.Tensor:
        spec = self.weight_quantizer.spec
        out = torch.empty(
            (self.num_experts, self.out_features, self.in_features), dtype=self.weight_dtype,
            device=self.stored_weight.device,
        )
        for e in range(self.num_experts):
            codes, qp = self.weight_layout.load(self.stored(e))
            out[e] = dequantize(codes, spec, qp, self.weight_dtype)
        return module_view(out, self.param_shape, self.proj.transposed)

    def freeze(self, w: torch.Tensor, pack_method: str = "reorder") -> None:
        wq = self.weight_quantizer
        if self.frozen or wq is None:
            return
        self.update_weight_qparams(w)
        layout = WeightLayout(wq.spec, pack_method=pack_method)
        view = self.view(w.detach())
        per = []
        for e in range(self.num_experts):
            qp = wq.expert_qparams(e)
            per.append(layout.store(quantize(view[e], wq.spec, qp), qp))
        self.hold_stored({k: torch.stack([p[k] for p in per]) for k in per[0]}, layout, w.dtype)

    def hold_stored(self, stored: dict[str, torch.Tensor], layout: Any, dtype: torch.dtype) -> None:
        for name in STORED:
            setattr(self, f"stored_{name}", stored.get(name))
        wq = self.weight_quantizer
        for name in ("scale", "zero_point", "scale_2", "zero_point_2"):
            setattr(wq, name, None)
        self.weight_layout = layout
        self.weight_dtype = dtype
        self.frozen = True
        self._cache = None

    # -- activations -------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, w: torch.Tensor, e: int, bias: torch.Tensor | None) -> torch.Tensor:
        """Expert ``e`` of this projection on ``x`` (``w``: the effective fused weight)."""
        if self.input_quantizer is not None:
            x = self.input_quantizer(x, e)
        we = _expert_matrix(w, self.num_experts, e)
        y = x @ we if self.proj.transposed else linear(x, we)
        if bias is not None:
            y = y + bias[e]
        if self.output_quantizer is not None:
            y = self.output_quantizer(y, e)
        return y

    def activation_qparams(self, e: int) -> dict[str, Any]:
        """Static qparams of expert ``e``'s activations: role ('input' / 'output') -> qparams."""
        out = {}
        for role in ("input", "output"):
            tq = getattr(self, f"{role}_quantizer")
            if tq is not None and not tq.is_dynamic and tq.has_qparams:
                out[role] = tq.expert_qparams(e)
        return out

    def extra_repr(self) -> str:
        return (f"{self.proj.path}: {self.num_experts} x [{self.out_features}, {self.in_features}]"
                + (", frozen" if self.frozen else ""))


# ---------------------------------------------------------------------------------------------
# the experts module
# ---------------------------------------------------------------------------------------------
_CLASSES: dict[type, type] = {}


def _quant_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Quant{base.__name__}", (QuantFusedExperts, base), {"__module__": __name__})
    return _CLASSES[base]


class QuantFusedExperts(nn.Module):
    """Mixin of a quantized experts module: the original class with quantized fused weights.

    Built by :meth:`wrap` (never instantiated directly): the module keeps its class's behaviour,
    parameters and names; ``fused_quant`` holds one :class:`FusedProjection` per quantized parameter.
    """

    fused_layout: ExpertsLayout
    fused_quant: nn.ModuleDict

    @classmethod
    def wrap(cls, module: nn.Module, layout: ExpertsLayout, configs: dict[str, QLayerConfig]) -> QuantFusedExperts:
        """Quantize ``module`` in place: ``configs`` maps projection paths to their layer configs
        (projections not listed stay float)."""
        if isinstance(module, QuantFusedExperts):
            raise ValueError(f"{type(module).__name__} is already quantized")
        num = int(module.num_experts)
        quant = nn.ModuleDict()
        for proj in layout.projections:
            cfg = configs.get(proj.path)
            if cfg is None:
                continue
            owner, leaf = _owner(module, proj.path)
            w = getattr(owner, leaf)
            view = expert_view(w, num, proj.transposed)
            fp = FusedProjection(proj, cfg, num, view.shape[1], view.shape[2], tuple(w.shape), w.dtype)
            fp.to(w.device)
            quant[proj.alias] = fp
        module.__class__ = _quant_class(type(module))
        module.fused_layout = layout
        module.fused_quant = quant
        module._forward_signature = None
        return module

    # -- structure ---------------------------------------------------------------------------------
    def quantized_projections(self) -> list[tuple[Projection, FusedProjection]]:
        return [(p, self.fused_quant[p.alias]) for p in self.fused_layout.projections if p.alias in self.fused_quant]

    def float_weight(self, proj: Projection) -> torch.Tensor | None:
        """The float parameter of a projection (None once frozen: it is dropped)."""
        owner, leaf = _owner(self, proj.path)
        return owner._parameters.get(leaf)

    def bias(self, proj: Projection) -> torch.Tensor | None:
        if self.fused_layout.bias_suffix is None:
            return None
        owner, leaf = _owner(self, proj.path)
        return getattr(owner, leaf + self.fused_layout.bias_suffix, None)

    # -- quantization steps ------------------------------------------------------------------------
    def update_weight_qparams(self, force: bool = False) -> None:
        for proj, fp in self.quantized_projections():
            fp.update_weight_qparams(self.float_weight(proj), force=force)

    def drop_weight_caches(self) -> None:
        for _, fp in self.quantized_projections():
            fp.drop_cache()

    def freeze(self, pack_method: str = "reorder") -> None:
        """Replace the float weights by their stored per-expert codes and scales (stacked)."""
        for proj, fp in self.quantized_projections():
            w = self.float_weight(proj)
            if fp.frozen or fp.weight_quantizer is None or w is None:
                continue
            fp.freeze(w, pack_method)
            owner, leaf = _owner(self, proj.path)
            del owner._parameters[leaf]

    @property
    def frozen(self) -> bool:
        return any(fp.frozen for _, fp in self.quantized_projections())

    # -- forward -----------------------------------------------------------------------------------
    def _weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for proj in self.fused_layout.projections:
            w = self.float_weight(proj)
            if proj.alias in self.fused_quant:
                w = self.fused_quant[proj.alias].effective_weight(w)
            out[proj.path] = w
        return out

    @contextlib.contextmanager
    def _swapped(self, weights: dict[str, torch.Tensor]) -> Iterator[None]:
        """The class's forward reads ``self.<param>``: an instance attribute shadows the parameter."""
        placed = []
        try:
            for path, w in weights.items():
                owner, leaf = _owner(self, path)
                owner.__dict__[leaf] = w
                placed.append((owner, leaf))
            yield
        finally:
            for owner, leaf in placed:
                owner.__dict__.pop(leaf, None)

    def finish_loading(self) -> bool:
        """Build the stacked state from the per-expert tensors transformers' ``from_pretrained`` loaded
        (:func:`quark.torch.export.experts.attach_checkpoint_slots`, which leaves the function doing it
        under ``_checkpoint_slots["adopt"]``); False when there is nothing to do."""
        slots = self.__dict__.get("_checkpoint_slots")
        if slots is None:
            return False
        return slots["adopt"](self)

    def train(self, mode: bool = True) -> QuantFusedExperts:
        self.finish_loading()  # from_pretrained ends with model.eval(): the loaded tensors are in place then
        return super().train(mode)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_checkpoint_slots") is not None and not self.finish_loading():
            raise RuntimeError(
                f"{type(self).__name__}: its checkpoint tensors are not loaded yet (load the model with "
                "transformers' from_pretrained or quark.torch.import_model_from_safetensors)"
            )
        weights = self._weights()
        if self.__dict__.get("online_rotation") is not None or any(
            fp.activations_active() for _, fp in self.quantized_projections()
        ):  # the class's own forward has no place for them
            return self._expert_loop(weights, *args, **kwargs)
        with self._swapped(weights):
            return super().forward(*args, **kwargs)

    def input_quantizer(self) -> ExpertsActQuantizer | None:
        """The input quantizer of the projections reading the module's input (gate/up), or None."""
        return next((fp.input_quantizer for proj, fp in self.quantized_projections()
                     if proj.role != "down" and fp.input_quantizer is not None), None)

    def map_hidden(self, args: tuple, kwargs: dict, fn: Any) -> tuple[tuple, dict]:
        """The forward's arguments with its first one (the hidden states, or dense routing's rows)
        replaced by ``fn`` of it, wherever it was passed."""
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        self._arguments(args, kwargs)  # resolves the class signature
        name = list(self._forward_signature.parameters)[1]
        return args, {**kwargs, name: fn(kwargs[name])}

    def _arguments(self, args: tuple, kwargs: dict) -> list[Any]:
        """The class forward's arguments in order (the names differ between classes)."""
        sig = self._forward_signature
        if sig is None:
            base = next(c for c in type(self).__mro__[1:] if c is not QuantFusedExperts and "forward" in c.__dict__)
            sig = self._forward_signature = inspect.signature(base.forward)
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())[1:]

    def _run(self, role: str, x: torch.Tensor, e: int, weights: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Projection ``role`` of expert ``e`` on ``x`` with its quantizers (None: the class has none)."""
        proj = self.fused_layout.projection(role)
        if proj is None:
            return None
        bias = self.bias(proj)
        if proj.alias in self.fused_quant:
            return self.fused_quant[proj.alias].apply(x, weights[proj.path], e, bias)
        we = _expert_matrix(weights[proj.path], int(self.num_experts), e)
        y = x @ we if proj.transposed else linear(x, we)
        return y if bias is None else y + bias[e]

    def expert_hidden(self, x: torch.Tensor, e: int, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Expert ``e``'s down-projection input on tokens ``x``: up (and gate) with their quantizers,
        then the activation (``weights``: :meth:`_weights`, the effective fused weights)."""
        weights = self._weights() if weights is None else weights
        lay = self.fused_layout
        act = operator.attrgetter(lay.act)(self) if hasattr(self, lay.act.split(".")[0]) else None
        gate_up = self._run("gate_up", x, e, weights)
        if gate_up is not None:
            apply_gate = getattr(self, "_apply_gate", None)
            if apply_gate is not None:
                return apply_gate(gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            return act(gate) * up
        gate, up = self._run("gate", x, e, weights), self._run("up", x, e, weights)
        return act(up) if gate is None else act(gate) * up

    def down_input(self, x: torch.Tensor, e: int, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """What expert ``e``'s down projection receives: :meth:`expert_hidden`, rotated when an
        online rotation (rotation's R4, ``online_rotation``) is attached to the module."""
        h = self.expert_hidden(x, e, weights)
        rot = self.__dict__.get("online_rotation")
        return h if rot is None else rot(h)

    def _mlp(self, x: torch.Tensor, e: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Expert ``e`` on tokens ``x``: up (and gate), activation, (R4's rotation,) down, each with its
        quantizers."""
        y = self._run("down", self.down_input(x, e, weights), e, weights)
        if self.fused_layout.post_norm is not None:
            y = getattr(self, self.fused_layout.post_norm)(y)
        return y

    def routed_tokens(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """What each expert receives from one call of the forward (same arguments): the token rows
        ``x [N, hidden]`` and, per expert, the indices of its rows in ``x`` (empty: no token). With
        top-k routing ``x`` is the hidden states and an expert's rows are the tokens routed to it
        (once, whatever their rank); with dense routing the router-scaled rows of each expert's
        block that are not zero."""
        num = int(self.num_experts)
        if self.fused_layout.routing == "dense":
            (hidden,) = self._arguments(args, kwargs)[:1]
            blocks = hidden.reshape(num, -1, hidden.shape[-1])
            kept = [blocks[e][blocks[e].abs().amax(dim=-1) > 0] for e in range(num)]
            ends = list(itertools.accumulate(k.shape[0] for k in kept))
            rows = [torch.arange(end - k.shape[0], end, device=hidden.device) for k, end in zip(kept, ends)]
            return torch.cat(kept), rows
        hidden, top_k_index = self._arguments(args, kwargs)[:2]
        x = hidden.reshape(-1, hidden.shape[-1])
        index = top_k_index.reshape(x.shape[0], -1)
        return x, [(index == e).any(dim=-1).nonzero()[:, 0] for e in range(num)]

    def _expert_loop(self, weights: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The experts forward with per-expert activation quantization (transformers' eager experts
        loop: each expert on the tokens routed to it, weighted, summed)."""
        num = int(self.num_experts)
        if self.fused_layout.routing == "dense":
            (hidden,) = self._arguments(args, kwargs)[:1]
            blocks = hidden.reshape(num, -1, hidden.shape[-1])
            outs = []
            for e in range(num):
                x = blocks[e]
                # rows of zeros are tokens not routed to this expert: observers must not see them
                with self._routed_rows(x):
                    outs.append(self._mlp(x, e, weights))
            return torch.stack(outs).reshape(-1, outs[0].shape[-1])
        hidden, top_k_index, top_k_weights = self._arguments(args, kwargs)[:3]
        shape = hidden.shape
        hidden = hidden.reshape(-1, shape[-1])
        final = torch.zeros_like(hidden)
        with torch.no_grad():
            mask = F.one_hot(top_k_index.reshape(hidden.shape[0], -1), num_classes=num + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e >= num:  # expert-parallel sentinel
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            y = self._mlp(hidden[token_idx], e, weights)
            y = y * top_k_weights.reshape(hidden.shape[0], -1)[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, y.to(final.dtype))
        return final.reshape(shape)

    @contextlib.contextmanager
    def _routed_rows(self, x: torch.Tensor) -> Iterator[None]:
        """Observers of the first projection(s) see only the nonzero rows of a dense block."""
        observing = [
            fp.input_quantizer for _, fp in self.quantized_projections()
            if fp.input_quantizer is not None and fp.input_quantizer.mode == "observe"
        ]
        if not observing:
            yield
            return
        keep = x.abs().amax(dim=-1) > 0
        originals = [(q, q.forward) for q in observing]

        def make(q: ExpertsActQuantizer, fwd: Any) -> Any:
            def forward(inp: torch.Tensor, expert: int | None = None) -> torch.Tensor:
                if inp.shape[:-1] == keep.shape:
                    fwd(inp[keep], expert)
                    return inp
                return fwd(inp, expert)
            return forward

        try:
            for q, fwd in originals:
                q.forward = make(q, fwd)
            yield
        finally:
            for q, _ in originals:
                del q.forward

    def extra_repr(self) -> str:
        names = ", ".join(p.path for p, _ in self.quantized_projections())
        return f"quantized experts: {names}" + (", frozen" if self.frozen else "")


# ---------------------------------------------------------------------------------------------
# finding them
# ---------------------------------------------------------------------------------------------
def _looks_fused(name: str, module: nn.Module) -> bool:
    """A module named like an experts container holding >= 2-D parameters itself (an unknown layout)."""
    last = name.rpartition(".")[2]
    return last.endswith("experts") and not last.startswith("shared") and any(
        p.dim() >= 2 for p in module.parameters(recurse=False)
    )


def find_fused_experts(model: nn.Module) -> list[tuple[str, nn.Module, ExpertsLayout]]:
    """``(name, module, layout)`` of every fused-experts module this knows (quantized ones included);
    fused-looking modules of unknown classes are logged (they stay float)."""
    found: list[tuple[str, nn.Module, ExpertsLayout]] = []
    unknown: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(n + ".") for n, _, _ in found):
            continue
        layout = experts_layout(module)
        if layout is not None:
            found.append((name, module, layout))
        elif _looks_fused(name, module):
            unknown.append(f"{name} ({type(module).__name__})")
    if unknown:
        logger.warning(
            "fused experts of unknown layout stay in float: %s (add the class to "
            "quark.torch.quantization.fused_experts.CLASS_LAYOUTS)", ", ".join(unknown[:3])
        )
    return found


def projection_shape(module: nn.Module, proj: Projection) -> tuple[int, int]:
    """``(out_features, in_features)`` of each expert's matrix of a projection."""
    w = module.get_parameter(proj.path)
    view = expert_view(w, int(module.num_experts), proj.transposed)
    return int(view.shape[1]), int(view.shape[2])


def projection_configs(qconfig: Any, name: str, module: nn.Module, layout: ExpertsLayout) -> dict[str, QLayerConfig]:
    """Projection path -> its layer config: each fused parameter resolves like a linear layer named
    ``<experts>.<path>`` (``model.layers.0.mlp.experts.gate_up_proj``); excluded / empty ones are left out."""
    out = {}
    for proj in layout.projections:
        cfg = qconfig.resolve(f"{name}.{proj.path}", nn.Linear)
        if cfg is not None and not cfg.is_empty:
            out[proj.path] = cfg
    return out


def fused_experts_modules(model: nn.Module) -> list[tuple[str, QuantFusedExperts]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantFusedExperts)]
    for _, m in found:
        m.finish_loading()  # a module loaded by from_pretrained and not run or eval()-ed yet
    return found


def quantized_fused_params(model: nn.Module) -> set[str]:
    """Full names of the fused expert parameters (and their biases) whose weights are quantized."""
    out = set()
    for name, m in fused_experts_modules(model):
        for proj, fp in m.quantized_projections():
            if fp.weight_quantizer is None:
                continue
            out.add(f"{name}.{proj.path}")
            if m.fused_layout.bias_suffix:
                out.add(f"{name}.{proj.path}{m.fused_layout.bias_suffix}")
    return out
