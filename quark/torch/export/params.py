"""A model's quantized state as it is, in one json + one safetensors file.

:func:`save_params` / :func:`load_params`: frozen or fake-quantized, layer by layer, restored exactly
(nothing is converted: frozen layers keep their stored layout, fake-quantized layers their float
weight and qparams, fused experts their own stacked state). The tensors are those of
:func:`.checkpoint_tensors.quark_tensors` in ``params`` format, under checkpoint names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from quark.torch.quantization.config.config import QConfig
from quark.torch.quantization.fused_experts import QuantFusedExperts, fused_experts_modules
from quark.torch.quantization.modules import quantized_linears

from .checkpoint_keys import to_module_state
from .checkpoint_tensors import quark_tensors
from .reading import enable_prob_quantization, load_state, placeholder_experts, placeholder_linear
from .safetensors_io import CheckpointError
from .writing import model_qconfig, quark_version

__all__ = ["save_params", "load_params", "PARAMS_FORMAT"]

#: the ``format`` of a params json
PARAMS_FORMAT = "quark-params"


def save_params(model: nn.Module, export_dir: str | os.PathLike, model_type: str = "model",
                overwrite: bool = False) -> tuple[Path, Path]:
    """Save a quantized model's state as ``<model_type>.json`` + ``<model_type>.safetensors`` in ``export_dir``.

    Unlike :func:`~.writing.export_safetensors` nothing is converted: frozen layers keep their stored
    layout, fake-quantized layers their float weight and qparams, so :func:`load_params` restores the
    model exactly as it was (e.g. to export it later in another format). Returns the two paths.
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
        "version": quark_version(),
        "quantization_config": model_qconfig(model).to_dict(),
        "layers": layers,
        "fused_experts": {
            name: {"frozen": m.frozen,
                   "pack_method": next((fp.weight_layout.pack_method for _, fp in m.quantized_projections()
                                        if fp.frozen), "reorder")}
            for name, m in fused_experts_modules(model)
        },
    }
    tensors = {}
    for name, t in quark_tensors(model, "params", "reorder"):
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
        enable_prob_quantization(model, [(n, c) for n, c in layers if c], qconfig)
    for name, info in meta["layers"].items():
        module = model.get_submodule(name)
        cfg = qconfig.resolve(name, nn.Linear)
        if cfg is None:
            raise CheckpointError(f"{json_path}: layer {name} is quantized but its config excludes it")
        placeholder_linear(model, name, module, cfg, qconfig,
                           "real_quantized" if info["frozen"] else "fake_quantized", info["pack_method"])
    for name, info in (meta.get("fused_experts") or {}).items():
        placeholder_experts(model, qconfig, {name: "real_quantized" if info["frozen"] else "fake_quantized"},
                            info["pack_method"])
    missing = [n for n in meta.get("fused_experts") or {} if not isinstance(model.get_submodule(n), QuantFusedExperts)]
    if missing:
        raise CheckpointError(f"{json_path}: fused experts {missing[:3]} are quantized but the model has no such module")
    model._quark_qconfig = qconfig
    load_state(model, to_module_state(tensors), st_path)
    return model
