"""The tensors a checkpoint holds for a model: one walk over its state dict, two layouts.

:func:`iter_checkpoint_tensors` is the only walk: state-dict order, tied (shared) tensors once, a
quantized linear and a quantized fused-experts module each emitted once, as a whole, by a callback.
The layouts differ only in those two callbacks:

- ``quark`` (:func:`quark_tensors`): a layer's tensors under its name (:func:`layer_tensors`:
  ``<layer>.weight``, ``<layer>.weight_scale``, ``<layer>.input_scale`` ..., the stored layouts of
  :mod:`quark.torch.quantization.layouts`); quantized fused MoE experts per expert
  (``<experts>.<e>.<proj>.weight`` / ``weight_scale`` / ``input_scale``, the names of :mod:`.experts`),
  which vLLM's fused-MoE loaders, :func:`~.reading.import_model_from_safetensors` and transformers'
  ``from_pretrained`` all read. In ``params`` (:func:`~.params.save_params`) the experts modules'
  own state is written as it is.
- ``awq`` (:func:`awq_tensors`): ``<layer>.qweight`` / ``qzeros`` / ``scales`` (:mod:`.awq`), fused
  experts per expert under their original checkpoint names.

Every other tensor is written under its checkpoint name (:mod:`.checkpoint_keys`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from quark.torch.quantization.fused_experts import QuantFusedExperts, fused_experts_modules
from quark.torch.quantization.layouts import NoServingLayoutError, WeightLayout, qparam_tensors
from quark.torch.quantization.modules import ROLES, QuantLinear, quantized_linears
from quark.torch.quantization.tensor_quantize import fake_quantize

from .awq import to_awq
from .checkpoint_keys import to_checkpoint_key
from .experts import (
    expert_parts,
    expert_parts_codes,
    fused_checkpoint_tensors,
    merged_projections,
    owned_keys,
)

__all__ = [
    "LayerTensors",
    "ExpertsTensors",
    "iter_checkpoint_tensors",
    "quark_tensors",
    "awq_tensors",
    "layer_tensors",
    "layer_of",
    "tensor_identity",
    "tied_keys",
]

#: ``(layer name, layer)`` -> its checkpoint ``(name, tensor)`` pairs
LayerTensors = Callable[[str, QuantLinear], Iterable[tuple[str, torch.Tensor]]]
#: ``(module name, module)`` -> its checkpoint ``(name, tensor)`` pairs
ExpertsTensors = Callable[[str, QuantFusedExperts], Iterable[tuple[str, torch.Tensor]]]


# ---------------------------------------------------------------------------------------------
# the walk
# ---------------------------------------------------------------------------------------------
def tensor_identity(t: torch.Tensor) -> tuple | None:
    """What makes two state-dict entries the same tensor (tied weights); None for an empty tensor."""
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None


def tied_keys(model: nn.Module) -> dict[str, str]:
    """state-dict key -> the first key holding the same tensor (tied weights)."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        ident = tensor_identity(t)
        if ident is None:
            continue
        if ident in first:
            tied[key] = first[ident]
        else:
            first[ident] = key
    return tied


def layer_of(key: str, layers: dict[str, QuantLinear]) -> str | None:
    """The quantized layer (a key of ``layers``) a state-dict key belongs to (its own tensors or its
    quantizers'), or None."""
    module = key.rpartition(".")[0]
    if module in layers:
        return module
    parent, _, child = module.rpartition(".")
    if parent in layers and child.endswith("_quantizer"):
        return parent
    return None


def iter_checkpoint_tensors(
    model: nn.Module, layer: LayerTensors, experts: ExpertsTensors | None = None,
    select: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint ``(name, tensor)`` pairs of ``model`` in state-dict order.

    At the first state-dict key of a quantized linear (its parameters or its quantizers') comes
    ``layer(name, module)``, at the first key a quantized fused-experts module's per-expert export
    covers (:func:`.experts.owned_keys`) ``experts(name, module)``; their other keys are skipped. With
    ``experts=None`` those modules' state is written as it is. Every other tensor is written once
    under its checkpoint name (:func:`.checkpoint_keys.to_checkpoint_key`): a tied weight
    (``lm_head`` = ``embed_tokens``) under its first state-dict name, as transformers does; a
    quantized layer whose weight is tied still gets its own tensors.

    ``select`` (a state-dict key -> bool) restricts the walk to part of the model (the streamed flow
    writes one decoder block at a time, the other parts of the model still on ``meta``); the names
    and the tied-weight rule are those of the whole model's walk.
    """
    layers = dict(quantized_linears(model))
    modules = dict(fused_experts_modules(model)) if experts is not None else {}
    owned = owned_keys(model) if modules else {}
    done: set[str] = set()
    seen: set[tuple] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if select is not None and not select(key):
            continue
        if key in owned:
            name = owned[key]
            if name not in done:
                done.add(name)
                yield from experts(name, modules[name])
            continue
        owner = layer_of(key, layers)
        if owner is not None:
            if owner not in done:
                done.add(owner)
                yield from layer(owner, layers[owner])
            continue
        ident = tensor_identity(tensor)
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen.add(ident)
        yield to_checkpoint_key(key), tensor.detach()


# ---------------------------------------------------------------------------------------------
# the quark layout
# ---------------------------------------------------------------------------------------------
def _activation_tensors(q: QuantLinear) -> dict[str, torch.Tensor]:
    q._sync_second_stage()
    out: dict[str, torch.Tensor] = {}
    for role in ROLES[1:]:
        tq = getattr(q, f"{role}_quantizer")
        if tq is None:
            continue
        for name in ("scale", "zero_point", "scale_2", "zero_point_2"):
            value = getattr(tq, name)
            if value is not None:
                out[f"{role}_{name}"] = value
    return out


def layer_tensors(q: QuantLinear, weight_format: str, pack_method: str, name: str = "") -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one quantized linear, by suffix (``weight``, ``weight_scale``,
    ``input_scale`` ...; the checkpoint names are ``<layer>.<suffix>``).

    ``weight_format``: ``real_quantized`` (the serving layout packed with ``pack_method``;
    :class:`~quark.torch.quantization.layouts.NoServingLayoutError` when the format has none),
    ``fake_quantized`` (the weight as the forward uses it, dequantized, plus natural qparams) or
    ``params`` (the layer's own state: its stored layout when frozen, its float weight when not).
    ``name`` only names the layer in errors. A fake-quantized layer gives exactly what ``freeze``
    would store, a frozen one what it holds (re-packed when ``pack_method`` differs).
    """
    wq = q.weight_quantizer
    out: dict[str, torch.Tensor] = {}
    if wq is None:
        out["weight"] = q.weight
    elif weight_format == "real_quantized" or (weight_format == "params" and q.frozen):
        if q.frozen and weight_format == "params":
            stored = q.stored_weight()
        else:
            target = WeightLayout(wq.spec, pack_method=pack_method)
            if not target.serving:
                raise NoServingLayoutError("no serving layout")
            stored = q.weight_layout.relayout(q.stored_weight(), target) if q.frozen else target.store(
                *q.weight_codes_and_qparams()
            )
        for key, value in stored.items():
            out["weight" if key == "weight" else f"weight_{key}"] = value
    else:
        codes, qparams = q.weight_codes_and_qparams()
        if weight_format == "fake_quantized":
            weight = q.quantized_weight().detach()
            # the re-imported layer fake-quantizes this weight again with these qparams: it must be a
            # fixed point (true for one-stage and scale-quant formats; checked, since a progressive
            # weight's first stage may re-round values of its second stage's grid)
            if not torch.equal(fake_quantize(weight, wq.spec, qparams), weight):
                raise ValueError(
                    f"weight_format='fake_quantized': the dequantized weight of layer {name!r} is not "
                    "reproduced by quantizing it again with its scales; export it with weight_format='real_quantized'"
                )
            out["weight"] = weight
        else:  # params of a fake-quantized layer: the float weight itself
            out["weight"] = q.weight.detach()
        out.update(qparam_tensors("weight", qparams))
    if q.bias is not None:
        out["bias"] = q.bias.detach()
    out.update(_activation_tensors(q))
    return out


def quark_tensors(model: nn.Module, weight_format: str, pack_method: str,
                  select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``quark`` layout: :func:`iter_checkpoint_tensors` with :func:`layer_tensors` per quantized
    linear and :func:`.experts.fused_checkpoint_tensors` per quantized fused-experts module (in
    ``params`` the experts modules' own state)."""

    def layer(name: str, q: QuantLinear) -> Iterator[tuple[str, torch.Tensor]]:
        for suffix, value in layer_tensors(q, weight_format, pack_method, name).items():
            yield f"{name}.{suffix}", value

    per_expert = weight_format != "params"
    parts = expert_parts(model) if per_expert else {}

    def experts(name: str, module: QuantFusedExperts) -> Iterator[tuple[str, torch.Tensor]]:
        return fused_checkpoint_tensors(name, module, parts, weight_format, pack_method)

    yield from iter_checkpoint_tensors(model, layer, experts if per_expert else None, select)


# ---------------------------------------------------------------------------------------------
# the AWQ layout
# ---------------------------------------------------------------------------------------------
def _awq_layer(name: str, q: QuantLinear) -> Iterator[tuple[str, torch.Tensor]]:
    codes, qparams = q.weight_codes_and_qparams()
    dtype = q.weight_dtype if q.frozen else q.weight.dtype
    for key, value in to_awq(codes, qparams, q.weight_quantizer.spec, dtype).items():
        yield f"{name}.{key}", value
    if q.bias is not None:
        yield f"{name}.bias", q.bias.detach()


def _awq_experts(name: str, module: QuantFusedExperts, parts: dict[tuple[str, str], Any]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every expert's AWQ tensors, ``<name>.<e>.<checkpoint name>.{qweight, qzeros, scales}``."""
    for prefix, _, fp, _, _, codes, qparams in expert_parts_codes(name, module, parts):
        for key, value in to_awq(codes, qparams, fp.weight_quantizer.spec, fp.weight_dtype).items():
            yield f"{prefix}.{key}", value


def awq_tensors(model: nn.Module, select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``awq`` layout (a model :func:`~.writing.export_safetensors` checked for it): AWQ tensors
    per quantized linear and per expert of each quantized fused-experts module, under the per-expert
    names transformers' loader merges (:func:`.experts.merged_projections`)."""
    parts = merged_projections(model)
    yield from iter_checkpoint_tensors(model, _awq_layer, lambda name, module: _awq_experts(name, module, parts),
                                       select)
