"""Export to Hugging Face safetensors (``quant_method: "quark"`` or the AutoAWQ layout) and import back.

- :func:`export_safetensors`: config.json (with ``quantization_config``), generation config,
  tokenizer files and sharded safetensors, written atomically.  The model may be fake-quantized
  (after ``ModelQuantizer.quantize_model``) or frozen (after ``ModelQuantizer.freeze``); export does
  not change it: for a fake-quantized layer the stored tensors are computed from its weight and
  qparams exactly as ``freeze`` would, for a frozen layer they are what it holds (re-packed only
  when ``pack_method`` differs from the one it was frozen with).
- :func:`_map_to_quark`: replaces a model's linears by uninitialised quantized layers holding the
  checkpoint's tensors (what transformers' quark integration calls before it loads the weights, and
  what :func:`import_model_from_safetensors` uses).
- :func:`import_model_from_safetensors`: the quantized model back, from config.json alone or onto a
  given float model of the same architecture; its outputs equal the exported model's.
- :func:`save_params` / :func:`load_params`: a model's quantized state (frozen or fake-quantized,
  layer by layer) in one json + one safetensors file, restored exactly.

Checkpoint names are a fixed rename of the module state (transformers' quark loader applies the
inverse): ``<layer>.weight_quantizer.scale`` <-> ``<layer>.weight_scale`` (same for ``zero_point`` and
the ``input`` / ``output`` / ``bias`` quantizers), ``<attn>.prob_output_quantizer.scale`` <->
``<attn>.prob_output_scale`` (fp8 attention); second-stage tensors keep their name
(``weight_scale_2``, ``input_scale_2``).  Tensor layouts:
:mod:`quark.torch.quantization.layouts` and :mod:`.awq`.

Quantized fused MoE experts (:mod:`quark.torch.quantization.fused_experts`) are written per expert
(``<experts>.<e>.<proj>.weight`` / ``weight_scale`` / ``input_scale``, the names of :mod:`.experts`) and
stacked back into the fused module on import. One layout serves every loader: vLLM's fused-MoE loaders read
these names, :func:`import_model_from_safetensors` stacks them before loading, and transformers'
``from_pretrained`` loads them into the placeholders :func:`_map_to_quark` builds for it (the model
class's converters merge the per-expert codes into the fused parameter, the scales stay per expert;
the module stacks them on ``eval()``: :func:`.experts.attach_checkpoint_slots`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from quark.torch.quantization.config.config import QConfig, QLayerConfig
from quark.torch.quantization.fused_experts import (
    QuantFusedExperts,
    find_fused_experts,
    fused_experts_modules,
    projection_configs,
)
from quark.torch.quantization.layouts import (
    NoServingLayoutError,
    WeightLayout,
    activation_placeholders,
    qparam_tensors,
)
from quark.torch.quantization.modules import ROLES, QuantLinear, quantized_linears
from quark.torch.quantization.online_rotation import online_rotated_layers, restore_online_rotations
from quark.torch.quantization.tensor_quantize import fake_quantize
from quark.torch.quantization.tensor_quantizer import TensorQuantizer

from .awq import AWQ_NAMES, awq_config, awq_unsupported_reason, from_awq, to_awq
from .checkpoint_keys import (
    _SOFTMAX_QUANTIZER,
    PROB_QUANTIZER,
    _to_checkpoint_key,
    _to_module_key,
)
from .config.config import PACK_METHODS, WEIGHT_FORMATS, JsonExporterConfig
from .experts import (
    attach_checkpoint_slots,
    expert_parts,
    expert_parts_codes,
    fused_checkpoint_tensors,
    fused_state_from_checkpoint,
    merged_projections,
    owned_keys,
    placeholder_projection,
)
from .main_export.quant_config_parser import QuantConfigParser
from .safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointError,
    atomic_directory,
    load_tensors,
    write_shards,
)

__all__ = [
    "export_safetensors",
    "import_model_from_safetensors",
    "save_params",
    "load_params",
    "CheckpointError",
]

logger = logging.getLogger(__name__)

QUANT_MODE = "eager_mode"
CUSTOM_MODES = ("quark", "awq")


def _version() -> str:
    import quark

    return getattr(quark, "__version__", "0.12.0")


def _model_qconfig(model: nn.Module) -> QConfig:
    """The QConfig a model was quantized (or loaded) with; derived from its layers when it has none."""
    cfg = getattr(model, "_quark_qconfig", None)
    if isinstance(cfg, QConfig):
        return cfg
    hf = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(getattr(hf, "quant_config", None), QConfig):
        return hf.quant_config
    layers = quantized_linears(model)
    if not layers:
        raise ValueError("the model has no quantized layers: quantize it with ModelQuantizer.quantize_model first")
    counts = collections.Counter(json.dumps(q.layer_config.to_dict(), sort_keys=True) for _, q in layers)
    common = QLayerConfig.from_dict(json.loads(counts.most_common(1)[0][0]))
    per_layer = {name: q.layer_config for name, q in layers if q.layer_config != common}
    quantized = {name for name, _ in layers}
    exclude = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    return QConfig(global_quant_config=common, layer_quant_config=per_layer, exclude=exclude)


# ---------------------------------------------------------------------------------------------
# the tensors of one layer
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


def _layer_tensors(q: QuantLinear, weight_format: str, pack_method: str, name: str = "") -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one layer (suffixes: ``weight``, ``weight_scale``, ``input_scale`` ...).

    ``weight_format``: ``real_quantized`` (the serving layout), ``fake_quantized`` (the weight as the
    forward uses it, dequantized, plus natural qparams) or ``params`` (the layer's own state: its
    stored layout when frozen, its float weight when not).
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


def _owner(key: str, layers: dict[str, QuantLinear]) -> str | None:
    """The quantized layer a state-dict key belongs to (its own tensors or its quantizers')."""
    module = key.rpartition(".")[0]
    if module in layers:
        return module
    parent, _, child = module.rpartition(".")
    if parent in layers and child.endswith("_quantizer"):
        return parent
    return None


def _iter_model_tensors(model: nn.Module, weight_format: str, pack_method: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint ``(name, tensor)`` pairs in state-dict order; tied (shared) tensors once. Quantized
    fused experts are written per expert (:mod:`.experts`), except in ``params`` (the module state)."""
    layers = dict(quantized_linears(model))
    experts = dict(fused_experts_modules(model)) if weight_format != "params" else {}
    owned = owned_keys(model) if experts else {}
    parts = expert_parts(model) if experts else {}
    done: set[str] = set()
    seen: set[tuple] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in owned:
            name = owned[key]
            if name not in done:
                done.add(name)
                yield from fused_checkpoint_tensors(name, experts[name], parts, weight_format, pack_method)
            continue
        owner = _owner(key, layers)
        if owner is not None:
            if owner in done:
                continue
            done.add(owner)
            for suffix, value in _layer_tensors(layers[owner], weight_format, pack_method, owner).items():
                yield f"{owner}.{suffix}", value
            continue
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()) if tensor.numel() else None
        if ident is not None and ident in seen:
            continue  # a tied weight (lm_head = embed_tokens): written once, as transformers does
        if ident is not None:
            seen.add(ident)
        yield _to_checkpoint_key(key), tensor.detach()


# ---------------------------------------------------------------------------------------------
# checks before anything is written
# ---------------------------------------------------------------------------------------------
def _check_calibrated(model: nn.Module) -> None:
    """Every static activation quantizer has its qparams: the checkpoint would lack them otherwise (and
    quark's own import refuses a checkpoint with missing tensors)."""
    for _, q in quantized_linears(model):
        q._sync_second_stage()  # second-stage qparams held by the layer (nvfp4's global scales)
    missing = [(name, q) for name, q in model.named_modules()
               if isinstance(q, TensorQuantizer) and q.needs_calibration and not q.has_qparams
               and not name.endswith("weight_quantizer")]
    if missing:
        name, q = missing[0]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(
            f"cannot export: static activation quantizer {name}{more} has no qparams; "
            + (q.uncalibrated_reason or "quantize the model with ModelQuantizer.quantize_model and a dataloader")
        )


def _check_real_quantized(model: nn.Module) -> None:
    quantizers = [(name, q.weight_quantizer) for name, q in quantized_linears(model)]
    quantizers += [(f"{name}.{proj.path}", fp.weight_quantizer)
                   for name, m in fused_experts_modules(model) for proj, fp in m.quantized_projections()]
    bad = [(name, wq.spec) for name, wq in quantizers if wq is not None and not WeightLayout(wq.spec).serving]
    if bad:
        stages = bad[0][1] if isinstance(bad[0][1], list) else [bad[0][1]]
        formats = "+".join(s.dtype.value for s in stages)
        names = ", ".join(n for n, _ in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NoServingLayoutError(
            f"{formats} weights have no real-quantized serving format (layers {names}): export them with "
            "weight_format='fake_quantized' (dequantized weights plus scales), which quark re-imports exactly"
        )


def _check_awq(model: nn.Module) -> tuple[Any, list[str]]:
    """The single weight spec of an AWQ export and the names of the linears left in float. Fused MoE
    experts are written per expert under their original checkpoint names (``experts.<e>.gate_proj.qweight``
    ...), as AutoAWQ MoE checkpoints hold them; classes whose original checkpoints keep the experts
    fused (GPT-OSS, Llama 4 ...) have no such names and are refused."""
    layers = quantized_linears(model)
    experts = fused_experts_modules(model)
    if not layers and not experts:
        raise ValueError("custom_mode='awq': the model has no quantized layers")
    units = [(name, q.weight_quantizer, q.input_quantizer is not None or q.output_quantizer is not None,
              [q.out_features]) for name, q in layers]
    merged = merged_projections(model) if experts else {}
    for name, m in experts:
        quantized = {p.path for p, _ in m.quantized_projections()}
        floats = [p.path for p in m.fused_layout.projections if p.path not in quantized]
        if floats:
            raise ValueError(f"custom_mode='awq' cannot export {name}: its {floats[0]} is not quantized (AWQ MoE "
                             "checkpoints quantize every expert projection); use custom_mode='quark'")
        for proj, fp in m.quantized_projections():
            parts = merged.get((name, proj.path))
            if parts is None:
                original = next(c for c in type(m).__mro__[1:] if c is not QuantFusedExperts).__name__
                raise ValueError(
                    f"custom_mode='awq' cannot export {name}.{proj.path}: {original}'s original checkpoints keep "
                    "the experts fused, so AWQ loaders have no per-expert names for them; use custom_mode='quark'")
            rows = [fp.out_features if r is None else r.stop - r.start for _, r in parts]
            units.append((f"{name}.{proj.path}", fp.weight_quantizer, fp.has_activation_quantizers, rows))
    spec = None
    for name, wq, activations, outs in units:
        reason = "the layer has no weight quantization" if wq is None else awq_unsupported_reason(wq.spec, activations)
        if reason is None and spec is not None and wq.spec != spec:
            reason = "AWQ checkpoints hold one weight format for every layer; this layer differs from the others"
        if reason is not None:
            raise ValueError(f"custom_mode='awq' cannot export layer {name!r}: {reason}")
        spec = wq.spec
        if any(n % 8 for n in outs):
            raise ValueError(f"custom_mode='awq': layer {name!r} has out_features={outs}, not multiples of 8")
    quantized = {n for n, _ in layers}
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    return spec, left


def _awq_expert_tensors(name: str, module: QuantFusedExperts, parts: dict[tuple[str, str], Any]
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every expert's AWQ tensors, ``<name>.<e>.<checkpoint name>.{qweight, qzeros, scales}``."""
    for prefix, _, fp, _, _, codes, qparams in expert_parts_codes(name, module, parts):
        for key, value in to_awq(codes, qparams, fp.weight_quantizer.spec, fp.weight_dtype).items():
            yield f"{prefix}.{key}", value


def _iter_awq_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    layers = dict(quantized_linears(model))
    experts = dict(fused_experts_modules(model))
    owned = owned_keys(model) if experts else {}
    parts = merged_projections(model) if experts else {}
    done: set[str] = set()
    seen: set[tuple] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in owned:
            if owned[key] not in done:
                done.add(owned[key])
                yield from _awq_expert_tensors(owned[key], experts[owned[key]], parts)
            continue
        owner = _owner(key, layers)
        if owner is not None:
            if owner in done:
                continue
            done.add(owner)
            q = layers[owner]
            codes, qparams = q.weight_codes_and_qparams()
            dtype = q.weight_dtype if q.frozen else q.weight.dtype
            for name, value in to_awq(codes, qparams, q.weight_quantizer.spec, dtype).items():
                yield f"{owner}.{name}", value
            if q.bias is not None:
                yield f"{owner}.bias", q.bias.detach()
            continue
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()) if tensor.numel() else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen.add(ident)
        yield key, tensor.detach()


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def _quark_quantization_config(qconfig: QConfig, weight_format: str, pack_method: str) -> dict[str, Any]:
    export = JsonExporterConfig(
        weight_format=weight_format,
        pack_method=pack_method,
        kv_cache_group=list(qconfig.kv_cache_quant_config),
        min_kv_scale=qconfig.min_kv_scale,
        weight_merge_groups=None,
    )
    return {
        **qconfig.to_dict(),
        "quant_method": "quark",
        "quant_mode": QUANT_MODE,
        "version": _version(),
        "export": export.to_dict(),
    }


def _write_config_files(model: nn.Module, folder: Path, quantization_config: dict[str, Any], tokenizer: Any) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        data = config.to_dict()
        data.pop("quantization_config", None)
        # the class exported (as save_pretrained records it): the import builds this class, not the one
        # AutoModelForCausalLM picks (a text-only class, or none, for multimodal configs)
        data["architectures"] = [type(model).__name__]
        data["quantization_config"] = quantization_config
        (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    else:
        (folder / "config.json").write_text(json.dumps({"quantization_config": quantization_config}, indent=2) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def export_safetensors(
    model: nn.Module,
    output_dir: str | os.PathLike,
    custom_mode: str = "quark",
    weight_format: str = "real_quantized",
    pack_method: str = "reorder",
    overwrite: bool = False,
    tokenizer: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a quantized model as a Hugging Face safetensors folder; returns the folder.

    Args:
        model: a model after ``ModelQuantizer.quantize_model`` (fake-quantized) or ``freeze``; it is
            not modified.
        output_dir: the folder to write; an existing non-empty folder is an error unless ``overwrite``.
        custom_mode: ``"quark"`` (``quant_method: "quark"``, FORMATS.md section 4) or ``"awq"``
            (int4/uint4 weight-only in the AutoAWQ layout, ``quant_method: "awq"``).
        weight_format: ``"real_quantized"`` (stored codes and scales) or ``"fake_quantized"``
            (dequantized weights and the scales: the only choice for mx6 / mx9 / bfp16).
        pack_method: int4 nibble order, ``"reorder"`` (AutoAWQ) or ``"order"``.
        tokenizer: saved next to the model when given.
        max_shard_size: bytes per safetensors shard (``"50GB"`` like transformers).

    Writing is atomic (a temporary folder renamed into place): a refused layer or any error leaves no
    output behind and an existing output untouched.
    """
    if custom_mode not in CUSTOM_MODES:
        raise ValueError(f"custom_mode={custom_mode!r}; allowed: {', '.join(CUSTOM_MODES)}")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format={weight_format!r}; allowed: {', '.join(WEIGHT_FORMATS)}")
    if pack_method not in PACK_METHODS:
        raise ValueError(f"pack_method={pack_method!r}; allowed: {', '.join(PACK_METHODS)}")
    rotated = online_rotated_layers(model)
    if rotated and custom_mode == "awq":
        raise ValueError(f"custom_mode='awq': {rotated[0]} (and {len(rotated) - 1} more) rotate their input online "
                         "(rotation r4), which the AWQ layout cannot record; export with custom_mode='quark'")
    if rotated:
        logger.warning("%d layers (e.g. %s) rotate their input online (rotation r4): the config records it and "
                       "quark's import and transformers' quark loader re-apply it; runtimes that ignore "
                       "algo_config (vLLM) would compute wrong outputs", len(rotated), rotated[0])
    _check_calibrated(model)
    if custom_mode == "awq":
        if weight_format != "real_quantized" or pack_method != "reorder":
            raise ValueError("custom_mode='awq' writes real-quantized weights packed in the AutoAWQ order only")
        spec, left = _check_awq(model)
        quantization_config = awq_config(spec, left)
        tensors = _iter_awq_tensors(model)
    else:
        qconfig = _model_qconfig(model)
        if weight_format == "real_quantized":
            _check_real_quantized(model)
        quantization_config = _quark_quantization_config(qconfig, weight_format, pack_method)
        tensors = _iter_model_tensors(model, weight_format, pack_method)
    with torch.no_grad(), atomic_directory(output_dir, overwrite=overwrite) as tmp:
        _write_config_files(model, tmp, quantization_config, tokenizer)
        write_shards(tensors, tmp, max_shard_size)
    logger.info("exported %s (%s, %s) to %s", type(model).__name__, custom_mode, weight_format, output_dir)
    return Path(output_dir)


# ---------------------------------------------------------------------------------------------
# building quantized layers before loading
# ---------------------------------------------------------------------------------------------
def _weight_format_of(model: nn.Module) -> str | None:
    """The export's weight_format, read from the model's config (transformers keeps it there)."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(qc, dict):
        return (qc.get("export") or {}).get("weight_format")
    export = getattr(qc, "json_export_config", None)
    return getattr(export, "weight_format", None)


def _linear_dtype_device(module: nn.Linear) -> tuple[torch.dtype, torch.device]:
    dtype = getattr(module, "weight_dtype", None) or module.weight.dtype
    return dtype, module.weight.device


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _enable_prob_quantization(model: nn.Module, attention: list[nn.Module], qconfig: QConfig) -> None:
    """fp8 attention on a loaded model: each attention module's softmax quantizer, registered as
    ``prob_output_quantizer`` (the checkpoint's ``prob_output_scale`` lands there). Runs before the
    linears are replaced (the attention set-up places quantizers on the device of their parameters)."""
    from quark.torch.quantization.attention import enable_softmax_quantization

    if not attention:
        raise ValueError("the config quantizes attention (softmax_quant_spec) but no q/k/v layer has a quantized output")
    enable_softmax_quantization(model, attention, qconfig.softmax_quant_spec)
    for attn in attention:
        sq = attn._modules.pop(_SOFTMAX_QUANTIZER)
        for key, t in activation_placeholders(sq.spec, 1, next(attn.parameters()).device).items():
            setattr(sq, key, t)
        setattr(attn, PROB_QUANTIZER, sq)
        # the attention function reads ``softmax_quantizer``: keep it as a plain attribute, not a second
        # registration (that would put the same scale into the state dict twice)
        object.__setattr__(attn, _SOFTMAX_QUANTIZER, sq)


def _attention_modules(model: nn.Module, layers: list[tuple[str, QLayerConfig]]) -> list[nn.Module]:
    """Parents of the layers whose outputs are quantized (q/k/v of an fp8-attention config)."""
    parents: dict[str, nn.Module] = {}
    for name, cfg in layers:
        if cfg.output_tensors is not None and "." in name:
            parent = name.rpartition(".")[0]
            parents[parent] = model.get_submodule(parent)
    return list(parents.values())


def _map_to_quark(
    model: nn.Module,
    quant_config: QConfig,
    pack_method: str = "reorder",
    custom_mode: str = "quark",
    weight_format: str | None = None,
    expert_slots: bool = True,
) -> nn.Module:
    """Replace the model's linears by uninitialised quantized layers holding exactly the tensors of an
    export with ``quant_config`` (shapes, dtypes, names), on each linear's device (``meta`` included).

    transformers' quark integration calls this before it loads a checkpoint (``pack_method`` from
    the ``export`` block); the checkpoint's ``weight_scale`` ... land in ``weight_quantizer.scale`` ...
    ``weight_format`` defaults to the one recorded in ``model.config.quantization_config``.

    Quantized fused MoE experts: with ``expert_slots`` (what transformers gets) each experts module holds
    the per-expert checkpoint tensors where transformers' loader puts them (the model class's converters
    merge the per-expert codes into the fused parameter, every scale keeps its per-expert name) and builds
    its stacked state from them on ``eval()`` / its first forward
    (:func:`quark.torch.export.experts.attach_checkpoint_slots`); without, it holds the stacked state
    itself (``import_model_from_safetensors`` stacks the checkpoint's tensors before loading them).
    """
    if custom_mode == "awq":
        raise ValueError(
            "AWQ-layout checkpoints (qweight/qzeros/scales) are not quark-layout: load them with "
            "quark.torch.import_model_from_safetensors (or transformers' AWQ integration)"
        )
    if not isinstance(quant_config, QConfig):
        quant_config = QConfig.from_dict(quant_config)
    weight_format = weight_format or _weight_format_of(model) or "real_quantized"
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format={weight_format!r}; allowed: {', '.join(WEIGHT_FORMATS)}")
    todo = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        cfg = quant_config.resolve(name, nn.Linear if isinstance(module, QuantLinear) else type(module))
        if cfg is None or cfg.is_empty:
            continue
        todo.append((name, module, cfg))
    if quant_config.softmax_quant_spec is not None:
        _enable_prob_quantization(model, _attention_modules(model, [(n, c) for n, _, c in todo]), quant_config)
    for name, module, cfg in todo:
        dtype, device = _linear_dtype_device(module)
        is_kv = quant_config.kv_cache_config(name) is not None
        q = QuantLinear.placeholder(
            module.in_features, module.out_features, module.bias is not None, cfg, dtype=dtype, device=device,
            min_kv_scale=quant_config.min_kv_scale if is_kv else 0.0, layout=weight_format, pack_method=pack_method,
        )
        _set_module(model, name, q)
    _placeholder_experts(model, quant_config, {name: weight_format for name, _, _ in find_fused_experts(model)},
                         pack_method, slots=expert_slots)
    restore_online_rotations(model, quant_config)
    model._quark_qconfig = quant_config
    return model


def _placeholder_experts(model: nn.Module, quant_config: QConfig, layouts: dict[str, str], pack_method: str,
                         slots: bool = False) -> None:
    """Quantized fused-experts modules holding uninitialised tensors (``layouts``: module name ->
    ``real_quantized`` / ``fake_quantized``), as ``ModelQuantizer`` would build them for ``quant_config``;
    ``slots``: holding the per-expert checkpoint tensors instead (:func:`.experts.attach_checkpoint_slots`)."""
    built = []
    for name, module, layout in find_fused_experts(model):
        if name not in layouts or isinstance(module, QuantFusedExperts):
            continue
        configs = projection_configs(quant_config, name, module, layout)
        if not configs:
            continue
        QuantFusedExperts.wrap(module, layout, configs)
        for proj, _ in module.quantized_projections():
            placeholder_projection(module, proj, layouts[name], pack_method)
        built.append((name, module))
    if slots and built:
        parts = expert_parts(model)
        merged = merged_projections(model)
        for name, module in built:
            attach_checkpoint_slots(
                module, {p.path: parts[(name, p.path)] for p, _ in module.quantized_projections()},
                {p.path for p, _ in module.quantized_projections() if (name, p.path) in merged},
                layouts[name], pack_method)


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------
def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not an exported model folder)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if "quantization_config" not in data:
        raise CheckpointError(f"{path}: has no quantization_config (not a quantized export)")
    return data


def _build_model(model_dir: Path) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = getattr(config, "dtype", None) or torch.float32
    # the exported class (config.json "architectures"): for multimodal models AutoModelForCausalLM
    # builds a text-only class with other module names (mllama, qwen3_5_moe) or refuses the config
    architecture = next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    if cls is not None and isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls._from_config(config, dtype=dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """state-dict key -> the first key holding the same tensor (tied weights)."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if not t.numel():
            continue
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if ident in first:
            tied[key] = first[ident]
        else:
            first[ident] = key
    return tied


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict(keep_vars=True)
    tied = _tied_keys(model)
    unexpected = sorted(k for k in state if k not in expected)
    missing = sorted(k for k in expected if k not in state and not (k in tied and tied[k] in state))
    if unexpected or missing:
        raise CheckpointError(
            f"{where}: the checkpoint does not match the model built from its config: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        target = expected[key]
        if tuple(target.shape) != tuple(value.shape):
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)


def _import_awq(model: nn.Module, qc: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> nn.Module:
    qconfig = QuantConfigParser.from_awq_config(qc)
    spec = qconfig.global_quant_config.weight
    quantized = {k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")}
    for name, module in list(model.named_modules()):
        if name not in quantized:
            continue
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"{where}: {name}.qweight is not the weight of a linear layer")
        dtype, device = _linear_dtype_device(module)
        q = QuantLinear.placeholder(module.in_features, module.out_features, module.bias is not None,
                                    QLayerConfig(weight=spec), dtype=dtype, device=device)
        _awq_to_stored(tensors, name, spec, module.out_features, q.weight_layout, where)
        _set_module(model, name, q)
    tensors = _awq_experts_state(model, qconfig, quantized, tensors, where)
    missing = {n for n in quantized if not isinstance(model.get_submodule(n), QuantLinear)}
    if missing:
        raise CheckpointError(f"{where}: AWQ tensors for {sorted(missing)[:5]} have no matching linear layer")
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)]
    qconfig.exclude = sorted(set(qconfig.exclude) | set(left))
    model._quark_qconfig = qconfig
    _load_state(model, {_to_module_key(k): v for k, v in tensors.items()}, where)
    return model


def _awq_to_stored(tensors: dict[str, torch.Tensor], name: str, spec: Any, out_features: int, layout: WeightLayout,
                   where: Path, what: str = "layer") -> None:
    """Replace, in ``tensors``, the AWQ tensors of layer ``name`` by those of quark's stored layout
    (``<name>.weight``, ``<name>.weight_scale`` ...)."""
    layer = {n: tensors.pop(f"{name}.{n}") for n in AWQ_NAMES if f"{name}.{n}" in tensors}
    if len(layer) != len(AWQ_NAMES):
        raise CheckpointError(f"{where}: {what} {name} lacks some of {AWQ_NAMES}")
    for key, value in layout.store(*from_awq(layer, spec, out_features)).items():
        tensors[f"{name}.{'weight' if key == 'weight' else 'weight_' + key}"] = value


def _awq_experts_state(model: nn.Module, qconfig: QConfig, quantized: set[str], tensors: dict[str, torch.Tensor],
                       where: Path) -> dict[str, torch.Tensor]:
    """The fused experts of an AWQ checkpoint (per-expert ``qweight`` / ``qzeros`` / ``scales`` under the
    original checkpoint names): quantized placeholders, and ``tensors`` with their stacked state in place
    of the per-expert AWQ tensors (``quantized`` loses those names)."""
    experts = [(name, m) for name, m, _ in find_fused_experts(model)
               if any(k.startswith(f"{name}.") for k in quantized)]
    if not experts:
        return tensors
    _placeholder_experts(model, qconfig, {name: "real_quantized" for name, _ in experts}, "reorder")
    parts = expert_parts(model)
    spec = qconfig.global_quant_config.weight
    layout = WeightLayout(spec)
    for name, m in experts:
        for proj, fp in m.quantized_projections():
            for e in range(fp.num_experts):
                for ckpt, rows in parts[(name, proj.path)]:
                    head = f"{name}.{e}.{ckpt}"
                    out = fp.out_features if rows is None else rows.stop - rows.start
                    _awq_to_stored(tensors, head, spec, out, layout, where, "expert layer")
                    quantized.discard(head)
    return fused_state_from_checkpoint(model, tensors, "real_quantized", "reorder", where)


def import_model_from_safetensors(
    model: nn.Module | None, model_dir: str | os.PathLike, verify: bool = True
) -> nn.Module:
    """The quantized model of an export folder (``quant_method`` ``"quark"`` or ``"awq"``).

    With ``model=None`` the architecture is built from config.json (transformers'
    ``AutoModelForCausalLM.from_config``); otherwise ``model`` must be a float model of that
    architecture (its linears are replaced).  Every tensor is checked: a missing, truncated or corrupt
    shard, or a checkpoint that does not fit the architecture, raises :class:`CheckpointError` naming
    the file.  ``verify`` also checks the shards' sha256 recorded at export.  The result's outputs equal
    the exported model's (frozen layers hold the stored codes; fake-quantized exports come back
    fake-quantized).
    """
    model_dir = Path(model_dir)
    qc = _read_config(model_dir)["quantization_config"]
    tensors = load_tensors(model_dir, verify=verify)
    if model is None:
        model = _build_model(model_dir)
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        model = _import_awq(model, qc, tensors, model_dir)
    elif method == "quark":
        qconfig = QConfig.from_dict(qc)
        export = JsonExporterConfig(**(qc.get("export") or {}))
        _map_to_quark(model, qconfig, pack_method=export.pack_method, weight_format=export.weight_format,
                      expert_slots=False)
        tensors = fused_state_from_checkpoint(model, tensors, export.weight_format, export.pack_method, model_dir)
        _load_state(model, {_to_module_key(k): v for k, v in tensors.items()}, model_dir)
    else:
        raise CheckpointError(f"{model_dir}: quant_method={qc.get('quant_method')!r}; supported: 'quark', 'awq'")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# params: the quantized state of a model, as it is
# ---------------------------------------------------------------------------------------------
PARAMS_FORMAT = "quark-params"


def save_params(model: nn.Module, export_dir: str | os.PathLike, model_type: str = "model",
                overwrite: bool = False) -> tuple[Path, Path]:
    """Save a quantized model's state as ``<model_type>.json`` + ``<model_type>.safetensors`` in ``export_dir``.

    Unlike :func:`export_safetensors` nothing is converted: frozen layers keep their stored layout,
    fake-quantized layers their float weight and qparams, so :func:`load_params` restores the model
    exactly as it was (e.g. to export it later in another format). Returns the two paths.
    """
    from safetensors.torch import save_file

    out = Path(export_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, st_path = out / f"{model_type}.json", out / f"{model_type}.safetensors"
    if not overwrite and (json_path.exists() or st_path.exists()):
        raise FileExistsError(f"{json_path} or {st_path} exists; pass overwrite=True to replace them")
    layers = {
        name: {
            "frozen": q.frozen,
            "pack_method": q.weight_layout.pack_method if q.frozen else "reorder",
        }
        for name, q in quantized_linears(model)
    }
    meta = {
        "format": PARAMS_FORMAT,
        "version": _version(),
        "quantization_config": _model_qconfig(model).to_dict(),
        "layers": layers,
        "fused_experts": {
            name: {"frozen": m.frozen,
                   "pack_method": next((fp.weight_layout.pack_method for _, fp in m.quantized_projections()
                                        if fp.frozen), "reorder")}
            for name, m in fused_experts_modules(model)
        },
    }
    tensors = {}
    for name, t in _iter_model_tensors(model, "params", "reorder"):
        t = t.detach().to("cpu").contiguous()
        tensors[name] = t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
    tmp_json, tmp_st = json_path.with_suffix(".json.partial"), st_path.with_suffix(".safetensors.partial")
    try:
        save_file(tensors, str(tmp_st), metadata={"format": "pt"})
        tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
        tmp_st.replace(st_path)
        tmp_json.replace(json_path)
    finally:
        for p in (tmp_json, tmp_st):
            if p.exists():
                p.unlink()
    return json_path, st_path


def load_params(model: nn.Module, json_path: str | os.PathLike, safetensors_path: str | os.PathLike) -> nn.Module:
    """Restore onto a float ``model`` (same architecture) what :func:`save_params` saved."""
    from safetensors.torch import load_file

    json_path, st_path = Path(json_path), Path(safetensors_path)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{json_path}: cannot read quark params ({exc})") from None
    if meta.get("format") != PARAMS_FORMAT:
        raise CheckpointError(f"{json_path}: not a quark params file (format={meta.get('format')!r})")
    try:
        tensors = load_file(str(st_path))
    except Exception as exc:
        raise CheckpointError(f"{st_path}: not a readable safetensors file, truncated or corrupt ({exc})") from None
    qconfig = QConfig.from_dict(meta["quantization_config"])
    if qconfig.softmax_quant_spec is not None:
        layers = [(n, qconfig.resolve(n, nn.Linear)) for n in meta["layers"]]
        _enable_prob_quantization(model, _attention_modules(model, [(n, c) for n, c in layers if c]), qconfig)
    for name, info in meta["layers"].items():
        module = model.get_submodule(name)
        cfg = qconfig.resolve(name, nn.Linear)
        if cfg is None:
            raise CheckpointError(f"{json_path}: layer {name} is quantized but its config excludes it")
        dtype, device = _linear_dtype_device(module)
        is_kv = qconfig.kv_cache_config(name) is not None
        q = QuantLinear.placeholder(
            module.in_features, module.out_features, module.bias is not None, cfg, dtype=dtype, device=device,
            min_kv_scale=qconfig.min_kv_scale if is_kv else 0.0,
            layout="real_quantized" if info["frozen"] else "fake_quantized", pack_method=info["pack_method"],
        )
        _set_module(model, name, q)
    for name, info in (meta.get("fused_experts") or {}).items():
        _placeholder_experts(model, qconfig, {name: "real_quantized" if info["frozen"] else "fake_quantized"},
                             info["pack_method"])
    missing = [n for n in meta.get("fused_experts") or {} if not isinstance(model.get_submodule(n), QuantFusedExperts)]
    if missing:
        raise CheckpointError(f"{json_path}: fused experts {missing[:3]} are quantized but the model has no such module")
    model._quark_qconfig = qconfig
    _load_state(model, {_to_module_key(k): v for k, v in tensors.items()}, st_path)
    return model
