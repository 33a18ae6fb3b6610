"""Export to Hugging Face safetensors (``quant_method: "quark"`` or the AutoAWQ layout).

:func:`export_safetensors` writes config.json (with ``quantization_config``), the generation config,
tokenizer files and sharded safetensors, atomically.  The model may be fake-quantized (after
``ModelQuantizer.quantize_model``) or frozen (after ``ModelQuantizer.freeze``); export does not
change it: for a fake-quantized layer the stored tensors are computed from its weight and qparams
exactly as ``freeze`` would, for a frozen layer they are what it holds (re-packed only when
``pack_method`` differs from the one it was frozen with).  The tensors and their names are those of
:mod:`.checkpoint_tensors`; before anything is written the model is checked (calibrated static
activation scales, a serving layout for ``real_quantized``, an AWQ-compatible format for ``awq``).

The pieces ``direct_quantize_checkpoint`` (:mod:`.file2file`) shares with it are public here:
:func:`check_real_quantized`, :func:`quark_quantization_config`, :func:`write_config_files`,
:func:`quark_version`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from quark.torch.quantization.config.config import QConfig, QLayerConfig
from quark.torch.quantization.fused_experts import QuantFusedExperts, fused_experts_modules
from quark.torch.quantization.layouts import NoServingLayoutError, WeightLayout
from quark.torch.quantization.modules import quantized_linears
from quark.torch.quantization.online_rotation import online_rotated_layers
from quark.torch.quantization.tensor_quantizer import TensorQuantizer

from .awq import awq_config, awq_unsupported_reason
from .checkpoint_tensors import awq_tensors, quark_tensors
from .config.config import PACK_METHODS, WEIGHT_FORMATS, JsonExporterConfig
from .experts import merged_projections
from .safetensors_io import DEFAULT_MAX_SHARD_SIZE, atomic_directory, write_shards

__all__ = [
    "export_safetensors",
    "CUSTOM_MODES",
    "QUANT_MODE",
    "quark_version",
    "model_qconfig",
    "check_real_quantized",
    "quark_quantization_config",
    "write_config_files",
    "plan_export",
    "ExportPlan",
    "check_calibrated",
]

logger = logging.getLogger(__name__)

#: ``quant_mode`` of the quantization_config
QUANT_MODE = "eager_mode"
#: the layouts :func:`export_safetensors` writes
CUSTOM_MODES = ("quark", "awq")


def quark_version() -> str:
    """The ``version`` recorded in config.json and params files."""
    import quark

    return getattr(quark, "__version__", "0.12.0")


def model_qconfig(model: nn.Module) -> QConfig:
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
# checks before anything is written
# ---------------------------------------------------------------------------------------------
def check_calibrated(model: nn.Module, skip: str | None = None) -> None:
    """Every static activation quantizer has its qparams: the checkpoint would lack them otherwise (and
    quark's own import refuses a checkpoint with missing tensors). ``ValueError`` naming the first that
    has none. Modules under ``skip`` (a module path) are not looked at."""
    def kept(name: str) -> bool:
        return skip is None or not (name == skip or name.startswith(skip + "."))

    for name, q in quantized_linears(model):
        if kept(name):
            q._sync_second_stage()  # second-stage qparams held by the layer (nvfp4's global scales)
    missing = [(name, q) for name, q in model.named_modules()
               if isinstance(q, TensorQuantizer) and q.needs_calibration and not q.has_qparams
               and not name.endswith("weight_quantizer") and kept(name)]
    if missing:
        name, q = missing[0]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(
            f"cannot export: static activation quantizer {name}{more} has no qparams; "
            + (q.uncalibrated_reason or "quantize the model with ModelQuantizer.quantize_model and a dataloader")
        )


def check_real_quantized(model: nn.Module) -> None:
    """Every quantized weight of ``model`` (linears and fused experts) has a real-quantized serving
    layout; :class:`~quark.torch.quantization.layouts.NoServingLayoutError` naming the layers otherwise."""
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


# ---------------------------------------------------------------------------------------------
# config files
# ---------------------------------------------------------------------------------------------
def quark_quantization_config(qconfig: QConfig, weight_format: str, pack_method: str) -> dict[str, Any]:
    """The ``quantization_config`` of a ``quant_method: "quark"`` export of ``qconfig``: the QConfig's
    dict plus ``quant_method``, ``quant_mode``, ``version`` and the ``export`` block vLLM reads."""
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
        "version": quark_version(),
        "export": export.to_dict(),
    }


def write_config_files(model: nn.Module, folder: Path, quantization_config: dict[str, Any], tokenizer: Any) -> None:
    """Write into ``folder`` config.json (the model's config with ``quantization_config`` and, as
    ``architectures``, the model's class), the generation config when the model has one, and the
    tokenizer's files when one is given."""
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


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
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
    plan = plan_export(model, custom_mode, weight_format, pack_method)
    tensors = plan.tensors()
    with torch.no_grad(), atomic_directory(output_dir, overwrite=overwrite) as tmp:
        write_config_files(model, tmp, plan.quantization_config, tokenizer)
        write_shards(tensors, tmp, max_shard_size)
    logger.info("exported %s (%s, %s) to %s", type(model).__name__, custom_mode, weight_format, output_dir)
    return Path(output_dir)


@dataclass
class ExportPlan:
    """What an export writes, decided (and checked) before anything is written: the
    ``quantization_config`` of config.json and the walk producing the tensors."""

    quantization_config: dict[str, Any]
    _tensors: Callable[[Callable[[str], bool] | None], Iterator[tuple[str, torch.Tensor]]]

    def tensors(self, select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint ``(name, tensor)`` pairs, of the state-dict keys ``select`` keeps (all by default)."""
        return self._tensors(select)


def plan_export(model: nn.Module, custom_mode: str = "quark", weight_format: str = "real_quantized",
                pack_method: str = "reorder", check_calibration: bool = True) -> ExportPlan:
    """The checks of :func:`export_safetensors` and what it will write. ``check_calibration=False``
    leaves out the check that every static activation quantizer has qparams (the streamed flow plans
    its export before calibrating, and checks each block with :func:`check_calibrated` when it is done)."""
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
    if check_calibration:
        check_calibrated(model)
    if custom_mode == "awq":
        if weight_format != "real_quantized" or pack_method != "reorder":
            raise ValueError("custom_mode='awq' writes real-quantized weights packed in the AutoAWQ order only")
        spec, left = _check_awq(model)
        return ExportPlan(awq_config(spec, left), lambda select: awq_tensors(model, select))
    qconfig = model_qconfig(model)
    if weight_format == "real_quantized":
        check_real_quantized(model)
    return ExportPlan(quark_quantization_config(qconfig, weight_format, pack_method),
                      lambda select: quark_tensors(model, weight_format, pack_method, select))
