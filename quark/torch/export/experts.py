"""Checkpoint names and tensors of quantized fused experts (:mod:`quark.torch.quantization.fused_experts`).

On disk every expert is a linear layer of its own, as in the original Hugging Face checkpoints and
as vLLM's fused-MoE loaders read them (``FusedMoE.make_expert_params_mapping``: ``experts.{e}.<proj>.``
-> ``experts.w13_`` / ``experts.w2_``)::

    <experts>.<e>.<proj>.weight          stored codes of expert e's [out, in] matrix (FORMATS.md section 4)
    <experts>.<e>.<proj>.weight_scale    its scales (and weight_zero_point, weight_scale_2 ...)
    <experts>.<e>.<proj>.input_scale     its static input scale (output_scale ...), when calibrated

``<proj>`` comes from transformers' own loader for the model class (its checkpoint conversion
mapping, :func:`transformers.conversion_mapping.get_model_conversion_mapping`): where a
``WeightConverter`` builds the fused parameter from per-expert ``experts.*.<name>.weight`` tensors
(``MergeModulelist(dim=0)`` [+ ``Concatenate(dim=1)`` for gate + up]), the export uses those names and
splits a fused gate/up matrix into its gate and up rows: ``gate_proj`` / ``up_proj`` / ``down_proj``
(Qwen-MoE, DeepSeek, GLM-MoE ...) or ``w1`` / ``w3`` / ``w2`` (Mixtral, MiniMax, DeepSeek-V4).
Classes whose original checkpoints are fused (GPT-OSS, Llama 4, DBRX, Granite-MoE, Qwen3-VL-MoE)
get the parameter's own name per expert (``experts.<e>.gate_up_proj.weight``, DBRX
``experts.<e>.w1.weight``), always ``[out, in]``. Per-tensor qparams of a split matrix (fp8 weight
scales) are written to both halves; biases (GPT-OSS) stay fused under their own names.

:func:`fused_checkpoint_tensors` writes them, :func:`fused_state_from_checkpoint` turns them back into
the fused module's state (stacked over the experts) for ``import_model_from_safetensors``.

transformers' ``from_pretrained`` (its quark quantizer renames ``weight_scale`` -> ``weight_quantizer.scale``
...; the model class's ``WeightConverter`` merges the per-expert ``.weight`` tensors, and only those, into
the fused parameter) loads the same files into the placeholders of :func:`attach_checkpoint_slots`:
merged codes under the fused parameter's name, every other per-expert tensor under its own name; the
module then builds its stacked state from them (:func:`adopt_checkpoint_slots`, on ``eval()``), so
both loaders end with the same module and the same outputs. No separate "fused" export layout is needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from quark.torch.quantization.fused_experts import (
    STORED,
    Projection,
    QuantFusedExperts,
    cat_rows,
    module_view,
    slice_rows,
    stack_qparams,
)
from quark.torch.quantization.layouts import WeightLayout, activation_placeholders, qparam_tensors
from quark.torch.quantization.moe import expert_matrix
from quark.torch.quantization.tensor_quantize import QParams, dequantize, fake_quantize

from .checkpoint_keys import to_checkpoint_key, to_module_key
from .safetensors_io import CheckpointError

#: on-disk parts of one expert matrix: (name, rows of the [out, in] matrix; None = all)
Parts = list[tuple[str, slice | None]]

_PER_EXPERT = re.compile(r"experts\.\*\.([A-Za-z0-9_]+)\.weight$")
_QPARAM_NAMES = ("scale", "zero_point")


def _unescape(pattern: str) -> str:
    return pattern.replace("\\", "")


def _converters(model: nn.Module) -> list[Any]:
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    if not isinstance(model, PreTrainedModel):
        return []
    try:
        transforms = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # an unusual model: fall back to the parameters' own names
        return []
    return [t for t in transforms if isinstance(t, WeightConverter)]


def _parts_from_converter(conv: Any, full: str, out_features: int) -> Parts | None:
    """The per-expert names a transformers ``WeightConverter`` merges into parameter ``full``."""
    targets = [_unescape(t).lstrip(".") for t in conv.target_patterns]
    if len(targets) != 1 or not full.endswith(targets[0]):
        return None
    scope = getattr(conv, "scope_prefix", None)
    if scope and f"{scope}." not in full and not full.startswith(scope):
        return None
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in conv.operations]
    names = []
    for src in conv.source_patterns:
        m = _PER_EXPERT.search(_unescape(src))
        if m is None:
            return None
        names.append(m.group(1))
    if ops == [("MergeModulelist", 0)] and len(names) == 1:
        return [(names[0], None)]
    if ops == [("MergeModulelist", 0), ("Concatenate", 1)] and len(names) >= 2 and out_features % len(names) == 0:
        step = out_features // len(names)
        return [(n, slice(i * step, (i + 1) * step)) for i, n in enumerate(names)]
    return None


def expert_parts(model: nn.Module) -> dict[tuple[str, str], Parts]:
    """``(experts module name, projection path)`` -> the on-disk parts of each expert's matrix, for
    every quantized projection of ``model``."""
    return {key: parts for key, (parts, _) in _expert_parts(model).items()}


def merged_projections(model: nn.Module) -> dict[tuple[str, str], Parts]:
    """The entries of :func:`expert_parts` whose per-expert ``.weight`` tensors transformers' loader merges
    back into the fused parameter (a ``WeightConverter`` of the model class names them)."""
    return {key: parts for key, (parts, merged) in _expert_parts(model).items() if merged}


def _expert_parts(model: nn.Module) -> dict[tuple[str, str], tuple[Parts, bool]]:
    from quark.torch.quantization.fused_experts import fused_experts_modules

    modules = fused_experts_modules(model)
    if not modules:
        return {}
    converters = _converters(model)
    out: dict[tuple[str, str], tuple[Parts, bool]] = {}
    for name, m in modules:
        for proj, fp in m.quantized_projections():
            full = f"{name}.{proj.path}"
            parts = None
            if not proj.transposed:  # the converters' Concatenate(dim=1) splits [E, out, in] along out
                for conv in converters:
                    parts = _parts_from_converter(conv, full, fp.out_features)
                    if parts is not None:
                        break
            out[(name, proj.path)] = (parts, True) if parts else ([(proj.leaf, None)], False)
    return out


def owned_keys(model: nn.Module) -> dict[str, str]:
    """State-dict key -> the fused-experts module whose per-expert export covers it."""
    from quark.torch.quantization.fused_experts import fused_experts_modules

    owned: dict[str, str] = {}
    for name, m in fused_experts_modules(model):
        for key in m.state_dict(keep_vars=True):
            if key.startswith("fused_quant."):
                owned[f"{name}.{key}"] = name
        for proj, _ in m.quantized_projections():
            owned[f"{name}.{proj.path}"] = name
    return owned


def expert_parts_codes(name: str, module: QuantFusedExperts, parts: dict[tuple[str, str], Parts]
                       ) -> Iterator[tuple[str, Projection, Any, int, slice | None, torch.Tensor | None, Any]]:
    """Every checkpoint part of every expert of ``module``'s quantized projections, in checkpoint order:
    ``(prefix, proj, quantizers, e, rows, codes, qparams)``. ``prefix`` is ``<name>.<e>.<checkpoint name>``,
    ``quantizers`` the projection's (``weight_quantizer``, ``activation_qparams`` ...), ``rows`` the
    part's rows of the expert's ``[out, in]`` matrix (None: all of them), ``codes`` / ``qparams`` that
    part's weight codes and qparams (None for a projection without weight quantization). Both the
    ``quark`` and the ``awq`` export layouts are written from it."""
    for proj, fp in module.quantized_projections():
        w = module.float_weight(proj)
        for e in range(fp.num_experts):
            codes, qparams = fp.expert_codes(w, e) if fp.weight_quantizer is not None else (None, None)
            for ckpt, rows in parts[(name, proj.path)]:
                if codes is not None and rows is not None:
                    yield f"{name}.{e}.{ckpt}", proj, fp, e, rows, codes[rows], slice_rows(qparams, rows)
                else:
                    yield f"{name}.{e}.{ckpt}", proj, fp, e, rows, codes, qparams


def fused_checkpoint_tensors(name: str, module: QuantFusedExperts, parts: dict[tuple[str, str], Parts],
                             weight_format: str, pack_method: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The per-expert checkpoint tensors of one quantized experts module (``real_quantized``: the
    serving layout; ``fake_quantized``: dequantized weights plus natural qparams)."""
    targets: dict[int, WeightLayout] = {}
    for prefix, _proj, fp, e, rows, codes, qparams in expert_parts_codes(name, module, parts):
        wq = fp.weight_quantizer
        if wq is None:
            matrix = expert_matrix(module, fp, e)
            yield f"{prefix}.weight", (matrix if rows is None else matrix[rows]).detach()
        elif weight_format == "real_quantized":
            target = targets.setdefault(id(fp), WeightLayout(wq.spec, pack_method=pack_method))
            for key, value in target.store(codes, qparams).items():
                yield f"{prefix}.{'weight' if key == 'weight' else 'weight_' + key}", value
        else:
            dense = dequantize(codes, wq.spec, qparams, fp.weight_dtype)
            if not torch.equal(fake_quantize(dense, wq.spec, qparams), dense):
                raise ValueError(
                    f"weight_format='fake_quantized': the dequantized weight of {prefix} is not reproduced "
                    "by quantizing it again with its scales; export it with weight_format='real_quantized'"
                )
            yield f"{prefix}.weight", dense
            yield from qparam_tensors(f"{prefix}.weight", qparams).items()
        for role, qp in fp.activation_qparams(e).items():
            yield from qparam_tensors(f"{prefix}.{role}", qp).items()


def _group_by_head(tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    heads: dict[str, list[str]] = {}
    for key in tensors:
        heads.setdefault(key.rpartition(".")[0], []).append(key)
    return heads


def _qparams_from(part: dict[str, torch.Tensor], role: str, stages: int) -> Any:
    qps = []
    for i in range(stages):
        suffix = "" if i == 0 else "_2"
        scale, zp = part.get(f"{role}_scale{suffix}"), part.get(f"{role}_zero_point{suffix}")
        qps.append(None if scale is None and zp is None else QParams(scale, zp))
    return qps[0] if stages == 1 else qps


def fused_state_from_checkpoint(model: nn.Module, tensors: dict[str, torch.Tensor], weight_format: str,
                                pack_method: str, where: Any = "") -> dict[str, torch.Tensor]:
    """Replace, in ``tensors`` (checkpoint name -> tensor), the per-expert tensors of every quantized
    experts module of ``model`` by that module's state tensors (stacked over the experts); returns
    ``tensors``. ``model`` holds the placeholders (:func:`placeholder_projection`)."""
    from quark.torch.quantization.fused_experts import fused_experts_modules

    modules = fused_experts_modules(model)
    if not modules:
        return tensors
    parts_of = expert_parts(model)
    heads = _group_by_head(tensors)
    for name, m in modules:
        _module_state(name, m, {p.path: parts_of[(name, p.path)] for p, _ in m.quantized_projections()},
                      tensors, heads, weight_format, pack_method, where)
    return tensors


def _module_state(name: str, m: QuantFusedExperts, parts_of: dict[str, Parts], tensors: dict[str, torch.Tensor],
                  heads: dict[str, list[str]], weight_format: str, pack_method: str, where: Any) -> None:
    """One experts module of :func:`fused_state_from_checkpoint` (``name`` ``""``: keys relative to it)."""
    pre = f"{name}." if name else ""

    def take(head: str, fused: str) -> dict[str, torch.Tensor]:
        keys = heads.pop(head, None)
        if keys is None:
            if fused in tensors:
                raise CheckpointError(
                    f"{where}: {fused} is stored fused and in float (an export written before quark quantized fused "
                    "experts), but the config quantizes it: re-export the model"
                )
            raise CheckpointError(f"{where}: missing the tensors of expert layer {head}")
        return {k.rpartition(".")[2]: tensors.pop(k) for k in keys}

    for proj, fp in m.quantized_projections():
        wq = fp.weight_quantizer
        layout = WeightLayout(wq.spec, pack_method=pack_method) if wq is not None else None
        nstages = len(wq.spec) if wq is not None and isinstance(wq.spec, list) else 1
        stored: list[dict[str, torch.Tensor]] = []
        weights: list[torch.Tensor] = []
        wqp: list[Any] = []
        acts: dict[str, list[Any]] = {}
        for e in range(fp.num_experts):
            pieces = [(take(f"{pre}{e}.{ckpt}", f"{pre}{proj.path}"), rows) for ckpt, rows in parts_of[proj.path]]
            for role in ("input", "output"):
                tq = getattr(fp, f"{role}_quantizer")
                if tq is not None and not tq.is_dynamic:
                    n = len(tq.spec) if isinstance(tq.spec, list) else 1
                    acts.setdefault(role, []).append(_qparams_from(pieces[0][0], role, n))
            if wq is None:
                weights.append(torch.cat([p["weight"] for p, _ in pieces]))
            elif weight_format == "real_quantized":
                loaded = [layout.load(_stored_of(p)) for p, _ in pieces]
                codes = torch.cat([c for c, _ in loaded]) if len(loaded) > 1 else loaded[0][0]
                qp = cat_rows([q for _, q in loaded]) if len(loaded) > 1 else loaded[0][1]
                stored.append(layout.store(codes, qp))
            else:
                weights.append(torch.cat([p["weight"] for p, _ in pieces]))
                qps = [_qparams_from(p, "weight", nstages) for p, _ in pieces]
                wqp.append(cat_rows(qps) if len(qps) > 1 else qps[0])
        state = f"{pre}fused_quant.{proj.alias}"
        if stored:
            for key in stored[0]:
                tensors[f"{state}.stored_{key}"] = torch.stack([s[key] for s in stored])
        if weights:
            tensors[f"{pre}{proj.path}"] = module_view(torch.stack(weights), fp.param_shape, proj.transposed)
        if wqp:
            tensors.update(qparam_tensors(f"{state}.weight_quantizer", stack_qparams(wqp), sep="."))
        for role, per in acts.items():
            tensors.update(qparam_tensors(f"{state}.{role}_quantizer", stack_qparams(per), sep="."))


def _stored_of(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint suffixes (``weight``, ``weight_scale`` ...) -> ``WeightLayout`` keys (``weight``, ``scale`` ...)."""
    out = {}
    for key in STORED:
        name = key if key == "weight" else f"weight_{key}"
        if name in part:
            out[key] = part[name]
    return out


def placeholder_projection(module: QuantFusedExperts, proj: Projection, layout: str, pack_method: str) -> None:
    """Uninitialised state of one quantized projection as a loader fills it: ``real_quantized`` (frozen:
    stacked stored tensors, the float parameter dropped) or ``fake_quantized`` (float parameter and
    natural qparams); static activation qparams either way."""
    fp = module.fused_quant[proj.alias]
    w = module.float_weight(proj)
    device = w.device
    e = fp.num_experts
    for role, features in (("input", fp.in_features), ("output", fp.out_features)):
        tq = getattr(fp, f"{role}_quantizer")
        if tq is not None:
            for key, t in activation_placeholders(tq.spec, features, device).items():
                setattr(tq, key, torch.empty((e, *t.shape), dtype=t.dtype, device=device))
    wq = fp.weight_quantizer
    if wq is None:
        return
    if layout == "real_quantized":
        wl = WeightLayout(wq.spec, pack_method=pack_method)
        shapes = wl.placeholders(fp.out_features, fp.in_features, device)
        fp.hold_stored({k: torch.empty((e, *t.shape), dtype=t.dtype, device=device) for k, t in shapes.items()},
                       wl, w.dtype)
        owner, _, leaf = proj.path.rpartition(".")
        del (module.get_submodule(owner) if owner else module)._parameters[leaf]
        return
    if layout != "fake_quantized":
        raise ValueError(f"layout={layout!r}; allowed: real_quantized, fake_quantized")
    from quark.torch.quantization.tensor_quantize import compute_qparams

    qps = compute_qparams(torch.empty(fp.out_features, fp.in_features, device="meta"), wq.spec)
    for i, qp in enumerate(qps if isinstance(qps, list) else [qps]):
        suffix = "" if i == 0 else "_2"
        for field in _QPARAM_NAMES:
            t = getattr(qp, field)
            if t is not None:
                setattr(wq, field + suffix, torch.empty((e, *t.shape), dtype=t.dtype, device=device))
    fp.weight_qparams_fixed = True  # loaded qparams are kept, not recomputed from the weight


# ---------------------------------------------------------------------------------------------
# transformers' from_pretrained: the checkpoint's per-expert tensors, held where its loader puts them
# ---------------------------------------------------------------------------------------------
class CheckpointSlots(nn.Module):
    """Tensors of a per-expert checkpoint held under their checkpoint names (``<e>.<proj>.weight_quantizer.scale``
    ...) until :func:`adopt_checkpoint_slots` turns them into the experts module's own state."""


def checkpoint_placeholders(module: QuantFusedExperts, parts_of: dict[str, Parts], weight_format: str,
                            pack_method: str, device: Any) -> dict[str, torch.Tensor]:
    """Checkpoint name relative to the experts module (``<e>.<proj>.weight_scale`` ...) -> an uninitialised
    tensor of its shape and dtype: exactly the tensors :func:`fused_checkpoint_tensors` writes."""
    from quark.torch.quantization.tensor_quantize import compute_qparams

    out: dict[str, torch.Tensor] = {}
    for proj, fp in module.quantized_projections():
        wq = fp.weight_quantizer
        layout = WeightLayout(wq.spec, pack_method=pack_method) if wq is not None else None
        acts: dict[str, torch.Tensor] = {}
        for role, features in (("input", fp.in_features), ("output", fp.out_features)):
            tq = getattr(fp, f"{role}_quantizer")
            if tq is not None:
                for key, t in activation_placeholders(tq.spec, features, "meta").items():
                    acts[f"{role}_{key}"] = t
        for ckpt, rows in parts_of[proj.path]:
            n = fp.out_features if rows is None else rows.stop - rows.start
            shaped: dict[str, torch.Tensor] = {}
            if wq is None or weight_format != "real_quantized":
                shaped["weight"] = torch.empty(n, fp.in_features, dtype=fp.weight_dtype, device="meta")
            if wq is not None and weight_format == "real_quantized":
                for key, t in layout.placeholders(n, fp.in_features, "meta").items():
                    shaped["weight" if key == "weight" else f"weight_{key}"] = t
            elif wq is not None:
                qps = compute_qparams(torch.empty(n, fp.in_features, device="meta"), wq.spec)
                shaped.update(qparam_tensors("weight", qps))
            shaped.update(acts)
            for e in range(fp.num_experts):
                for key, t in shaped.items():
                    out[f"{e}.{ckpt}.{key}"] = torch.empty(t.shape, dtype=t.dtype, device=device)
    return out


def attach_checkpoint_slots(module: QuantFusedExperts, parts_of: dict[str, Parts], merged: set[str],
                            weight_format: str, pack_method: str) -> None:
    """Make a placeholder experts module (:func:`placeholder_projection`) load transformers' way.

    transformers' ``from_pretrained`` renames the checkpoint's ``weight_scale`` ... to ``weight_quantizer.scale``
    ... (its quark quantizer), merges the per-expert ``.weight`` tensors of the projections in ``merged`` into
    the fused parameter (the model class's ``WeightConverter``: experts stacked, gate and up concatenated along
    the rows) and sets every other tensor by name. So the module holds: the merged codes under the fused
    parameter's name (real_quantized: a buffer of the stored dtype, ``[E, rows, ...]``; fake_quantized: the
    float parameter itself), and every other per-expert tensor in :class:`CheckpointSlots` children named
    ``0`` ... ``E-1``; its stacked state (``fused_quant...``) is empty until :func:`adopt_checkpoint_slots`
    (run by the module's ``train()`` / ``eval()`` -- ``from_pretrained`` ends with ``model.eval()`` -- and by its
    forward) builds it from them exactly as ``import_model_from_safetensors`` does.
    """
    device = next((t.device for t in (*module.parameters(), *module.buffers())), None)
    slots = checkpoint_placeholders(module, parts_of, weight_format, pack_method, "meta")
    for proj, fp in module.quantized_projections():
        owner, leaf = _submodule(module, proj.path)
        if proj.path not in merged:
            # its per-expert tensors (codes or float weights) go to the slots; an empty stand-in keeps the name
            # (the class's _init_weights reads it) out of the state transformers fills
            owner._parameters.pop(leaf, None)
            owner.register_buffer(leaf, torch.empty(0, dtype=fp.weight_dtype, device=device), persistent=False)
            continue
        names = [ckpt for ckpt, _ in parts_of[proj.path]]
        codes = [slots.pop(f"{e}.{ckpt}.weight") for e in range(fp.num_experts) for ckpt in names]
        if fp.weight_quantizer is not None and weight_format == "real_quantized":
            rows = sum(c.shape[0] for c in codes[: len(names)])
            owner.register_buffer(leaf, torch.empty((fp.num_experts, rows, *codes[0].shape[1:]),
                                                    dtype=codes[0].dtype, device=device))
    # the stacked state is built from the slots: transformers must not see it (it would be "missing")
    for sub in module.fused_quant.modules():
        for key in list(sub._buffers):
            sub._buffers[key] = None
    for key, t in slots.items():
        head, _, leaf = to_module_key(key).rpartition(".")
        owner = module
        for part in head.split("."):
            child = owner._modules.get(part)
            if child is None:
                child = CheckpointSlots()
                owner.add_module(part, child)
            owner = child
        owner.register_buffer(leaf, torch.empty(t.shape, dtype=t.dtype, device=device))
    # the module calls "adopt" (QuantFusedExperts.finish_loading): quantization/ does not import export/
    module._checkpoint_slots = {"parts": dict(parts_of), "merged": set(merged), "weight_format": weight_format,
                                "pack_method": pack_method, "adopt": adopt_checkpoint_slots}


def _submodule(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, leaf = path.rpartition(".")
    return (module.get_submodule(head) if head else module), leaf


def adopt_checkpoint_slots(module: QuantFusedExperts) -> bool:
    """Turn the tensors transformers loaded into :func:`attach_checkpoint_slots`' slots into the module's
    stacked state and drop the slots; False (nothing done) when there are none or they are not loaded yet
    (still on the ``meta`` device)."""
    info = module.__dict__.get("_checkpoint_slots")
    if info is None:
        return False
    num = int(module.num_experts)
    tensors: dict[str, torch.Tensor] = {}
    for e in range(num):
        child = module._modules.get(str(e))
        if isinstance(child, CheckpointSlots):
            for key, t in child.state_dict(prefix=f"{e}.", keep_vars=True).items():
                tensors[to_checkpoint_key(key)] = t
    held = []  # buffers under the fused parameters' names: the merged codes, or empty stand-ins
    for proj, _ in module.quantized_projections():
        owner, leaf = _submodule(module, proj.path)
        if leaf in owner._buffers:
            held.append((owner, leaf))
        if proj.path not in info["merged"]:
            continue
        t = owner._buffers.get(leaf) if leaf in owner._buffers else owner._parameters.get(leaf)
        names = [ckpt for ckpt, _ in info["parts"][proj.path]]
        view = t.detach() if t.dim() == 3 else t.detach().reshape(num, -1, t.shape[-1])
        if view.shape[1] % len(names):
            raise CheckpointError(f"{proj.path}: {tuple(t.shape)} does not split into {len(names)} equal parts")
        for e in range(num):
            for ckpt, chunk in zip(names, view[e].chunk(len(names), dim=0)):
                tensors[f"{e}.{ckpt}.weight"] = chunk
    if any(t.is_meta for t in tensors.values()):
        return False
    _module_state("", module, info["parts"], tensors, _group_by_head(tensors), info["weight_format"],
                  info["pack_method"], type(module).__name__)
    for e in range(num):
        if isinstance(module._modules.get(str(e)), CheckpointSlots):
            del module._modules[str(e)]
    for owner, leaf in held:
        del owner._buffers[leaf]
        owner._non_persistent_buffers_set.discard(leaf)
    params = {proj.path for proj, _ in module.quantized_projections()}
    with torch.no_grad():
        for key, value in tensors.items():
            owner, leaf = _submodule(module, key)
            old = owner._parameters.get(leaf)
            if old is not None or key in params:  # a fused float weight (fake_quantized, or not quantized)
                grad = old.requires_grad if old is not None else value.is_floating_point()
                owner._parameters[leaf] = nn.Parameter(value.detach(), requires_grad=grad)
            else:
                setattr(owner, leaf, value.detach())
    del module.__dict__["_checkpoint_slots"]
    module.drop_weight_caches()
    return True
