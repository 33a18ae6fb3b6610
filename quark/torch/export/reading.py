"""Import of an export folder (``quant_method: "quark"`` or ``"awq"``) and the quantized placeholders
loaders fill.

- :func:`map_to_quark` (``quark.torch.export.api._map_to_quark``): replaces a model's linears by
  uninitialised quantized layers holding the checkpoint's tensors (what transformers' quark
  integration calls before it loads the weights, and what :func:`import_model_from_safetensors` uses).
- :func:`import_model_from_safetensors`: the quantized model back, from config.json alone or onto a
  given float model of the same architecture; its outputs equal the exported model's.

Checkpoint names are mapped back to module state names by :mod:`.checkpoint_keys`. Quantized fused MoE
experts are stored per expert (:mod:`.checkpoint_tensors`, :mod:`.experts`) and stacked back into the
fused module on import: :func:`import_model_from_safetensors` stacks them before loading, and
transformers' ``from_pretrained`` loads them into the placeholders :func:`map_to_quark` builds for it
(the model class's converters merge the per-expert codes into the fused parameter, the scales stay
per expert; the module stacks them on ``eval()``: :func:`.experts.attach_checkpoint_slots`).

The placeholder builders and :func:`load_state` are public for :mod:`.params`; :func:`build_model` and
:func:`read_config_json` for :mod:`.file2file`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from quark.torch.quantization.config.config import QConfig, QLayerConfig
from quark.torch.quantization.fused_experts import QuantFusedExperts, find_fused_experts, projection_configs
from quark.torch.quantization.layouts import WeightLayout, activation_placeholders
from quark.torch.quantization.modules import QuantLinear
from quark.torch.quantization.online_rotation import restore_online_rotations

from .awq import AWQ_NAMES, from_awq
from .checkpoint_keys import PROB_QUANTIZER, SOFTMAX_QUANTIZER, to_module_state
from .checkpoint_tensors import tied_keys
from .config.config import WEIGHT_FORMATS, JsonExporterConfig
from .experts import (
    attach_checkpoint_slots,
    expert_parts,
    fused_state_from_checkpoint,
    merged_projections,
    placeholder_projection,
)
from .main_export.quant_config_parser import QuantConfigParser
from .safetensors_io import CheckpointError, load_tensors

__all__ = [
    "import_model_from_safetensors",
    "map_to_quark",
    "read_config_json",
    "build_model",
    "load_state",
    "placeholder_linear",
    "placeholder_experts",
    "enable_prob_quantization",
]


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


def placeholder_linear(model: nn.Module, name: str, module: nn.Linear, cfg: QLayerConfig, qconfig: QConfig,
                       layout: str, pack_method: str) -> None:
    """Replace linear ``name`` (``module``) of ``model`` by an uninitialised quantized layer with config
    ``cfg`` holding the tensors of ``layout`` (``real_quantized``: frozen, packed with ``pack_method``;
    ``fake_quantized``: float weight and qparams), in the linear's dtype and on its device; a KV-cache
    layer of ``qconfig`` gets its ``min_kv_scale``."""
    dtype, device = _linear_dtype_device(module)
    is_kv = qconfig.kv_cache_config(name) is not None
    q = QuantLinear.placeholder(
        module.in_features, module.out_features, module.bias is not None, cfg, dtype=dtype, device=device,
        min_kv_scale=qconfig.min_kv_scale if is_kv else 0.0, layout=layout, pack_method=pack_method,
    )
    _set_module(model, name, q)


def _attention_modules(model: nn.Module, layers: list[tuple[str, QLayerConfig]]) -> list[nn.Module]:
    """Parents of the layers whose outputs are quantized (q/k/v of an fp8-attention config)."""
    parents: dict[str, nn.Module] = {}
    for name, cfg in layers:
        if cfg.output_tensors is not None and "." in name:
            parent = name.rpartition(".")[0]
            parents[parent] = model.get_submodule(parent)
    return list(parents.values())


def enable_prob_quantization(model: nn.Module, layers: list[tuple[str, QLayerConfig]], qconfig: QConfig) -> None:
    """fp8 attention on a loaded model: each attention module (the parent of a layer of ``layers``,
    ``(name, config)`` pairs, whose output is quantized) gets its softmax quantizer, registered as
    ``prob_output_quantizer`` (the checkpoint's ``prob_output_scale`` lands there). Runs before the
    linears are replaced (the attention set-up places quantizers on the device of their parameters)."""
    from quark.torch.quantization.attention import enable_softmax_quantization

    attention = _attention_modules(model, layers)
    if not attention:
        raise ValueError("the config quantizes attention (softmax_quant_spec) but no q/k/v layer has a quantized output")
    enable_softmax_quantization(model, attention, qconfig.softmax_quant_spec)
    for attn in attention:
        sq = attn._modules.pop(SOFTMAX_QUANTIZER)
        for key, t in activation_placeholders(sq.spec, 1, next(attn.parameters()).device).items():
            setattr(sq, key, t)
        setattr(attn, PROB_QUANTIZER, sq)
        # the attention function reads ``softmax_quantizer``: keep it as a plain attribute, not a second
        # registration (that would put the same scale into the state dict twice)
        object.__setattr__(attn, SOFTMAX_QUANTIZER, sq)


def placeholder_experts(model: nn.Module, quant_config: QConfig, layouts: dict[str, str], pack_method: str,
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


def map_to_quark(
    model: nn.Module,
    quant_config: QConfig,
    pack_method: str = "reorder",
    custom_mode: str = "quark",
    weight_format: str | None = None,
    expert_slots: bool = True,
) -> nn.Module:
    """Replace the model's linears by uninitialised quantized layers holding exactly the tensors of an
    export with ``quant_config`` (shapes, dtypes, names), on each linear's device (``meta`` included).

    transformers' quark integration calls this (as ``quark.torch.export.api._map_to_quark``) before it
    loads a checkpoint (``pack_method`` from the ``export`` block); the checkpoint's ``weight_scale`` ...
    land in ``weight_quantizer.scale`` ... ``weight_format`` defaults to the one recorded in
    ``model.config.quantization_config``.

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
        enable_prob_quantization(model, [(n, c) for n, _, c in todo], quant_config)
    for name, module, cfg in todo:
        placeholder_linear(model, name, module, cfg, quant_config, weight_format, pack_method)
    placeholder_experts(model, quant_config, {name: weight_format for name, _, _ in find_fused_experts(model)},
                        pack_method, slots=expert_slots)
    restore_online_rotations(model, quant_config)
    model._quark_qconfig = quant_config
    return model


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------
def read_config_json(folder: Path, what: str) -> dict[str, Any]:
    """``folder``'s config.json; :class:`~.safetensors_io.CheckpointError` naming it when it is missing
    (``what``: what the folder was expected to be, for the message) or not valid JSON."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not {what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _read_config(model_dir: Path) -> dict[str, Any]:
    data = read_config_json(model_dir, "an exported model folder")
    if "quantization_config" not in data:
        raise CheckpointError(f"{model_dir / 'config.json'}: has no quantization_config (not a quantized export)")
    return data


def build_model(model_dir: Path) -> nn.Module:
    """The float model of ``model_dir``'s config.json (without its ``quantization_config``), uninitialised,
    in the config's dtype: the class named in ``architectures`` when transformers has it, else
    ``AutoModelForCausalLM``'s. Built on the current default device (``with torch.device("meta")``: no
    memory)."""
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


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Copy ``state`` (module state names) into ``model``'s tensors; every tensor of the model must be
    given (a tied weight through the key it is tied to) and nothing else, with the model's shapes:
    :class:`~.safetensors_io.CheckpointError` naming ``where`` otherwise."""
    expected = model.state_dict(keep_vars=True)
    tied = tied_keys(model)
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
    load_state(model, to_module_state(tensors), where)
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
    placeholder_experts(model, qconfig, {name: "real_quantized" for name, _ in experts}, "reorder")
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
        model = build_model(model_dir)
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        model = _import_awq(model, qc, tensors, model_dir)
    elif method == "quark":
        qconfig = QConfig.from_dict(qc)
        export = JsonExporterConfig(**(qc.get("export") or {}))
        map_to_quark(model, qconfig, pack_method=export.pack_method, weight_format=export.weight_format,
                     expert_slots=False)
        tensors = fused_state_from_checkpoint(model, tensors, export.weight_format, export.pack_method, model_dir)
        load_state(model, to_module_state(tensors), model_dir)
    else:
        raise CheckpointError(f"{model_dir}: quant_method={qc.get('quant_method')!r}; supported: 'quark', 'awq'")
    return model.eval()
