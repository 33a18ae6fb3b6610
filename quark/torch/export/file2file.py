"""File-to-file quantization (``QuantFlow.file2file``): a float Hugging Face checkpoint in, a quark
safetensors export out, without ever building the model.

:func:`direct_quantize_checkpoint` (``ModelQuantizer.direct_quantize_checkpoint`` calls it) reads the
input checkpoint one shard at a time (``safetensors.safe_open``, memory-mapped, tensor by tensor) and
writes one output shard per input shard, so memory stays near one input shard + one output shard,
whatever the model size.  It handles weight-only and fully dynamic activation schemes: their
quantization parameters come from the weights alone.  Static activation scales (``fp8``, ``int8``,
``nvfp4``'s global input scale, fp8 KV cache / attention) and algorithms (GPTQ, AWQ ...) need
calibration data, so they are refused (use ``ModelQuantizer.quantize_model`` + ``export_safetensors``).

What it writes is exactly what ``quantize_model(model)`` (no data) + ``export_safetensors(model, dst,
weight_format="real_quantized", pack_method=...)`` writes for the model loaded in the checkpoint's
dtype: same tensor names, same bits, same ``quantization_config``.  That is by construction:

- which tensors are quantized linear weights: the model is built from config.json on the ``meta``
  device (:func:`.reading.build_model`) and its linears are swapped exactly as ``quantize_model``
  swaps them (:func:`quark.torch.quantization.prepare.swap_linears`: exclude > layer pattern > layer
  type > global);
- each quantized linear is a ``QuantLinear`` built around the checkpoint's weight (in its stored
  dtype, on ``device``) whose tensors come from the exporter's own
  :func:`.checkpoint_tensors.layer_tensors`; config.json comes from the exporter's
  :func:`.writing.quark_quantization_config` and :func:`.writing.write_config_files`;
- tied weights (``tie_word_embeddings``) follow the exporter: a tensor that is not part of a
  quantized layer is written once, under its first state-dict name; a quantized layer whose weight
  is tied (a quantized ``lm_head``) gets its own quantized tensors.

Checkpoint tensors the model does not know (not in its state dict) are copied unchanged, with a
warning.  Output shards follow input shards (``max_shard_size`` splits them further).

Atomic and resumable: everything is written into ``<dst>.partial/``; after each finished shard a
``progress.json`` there records it (input shard name + fingerprint, output files with size and
sha256) under a hash of the run's settings.  Rerun with the same arguments after a crash, finished
shards are kept (their files are checked to exist with the recorded size) and the rest is done; with
other settings the partial folder is started over.  The finished folder is renamed into place at the
end.  Input errors (missing config.json, no safetensors, a truncated shard) raise
:class:`~.safetensors_io.CheckpointError` naming the file before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from quark.torch.quantization.config.config import QConfig
from quark.torch.quantization.layouts import NoServingLayoutError
from quark.torch.quantization.modules import QuantLinear, quantized_linears
from quark.torch.quantization.prepare import swap_linears

from .checkpoint_tensors import layer_of, layer_tensors
from .config.config import PACK_METHODS
from .reading import build_model, read_config_json
from .safetensors_io import INDEX_NAME, CheckpointError, parse_size, read_index, write_shards
from .writing import check_real_quantized, quark_quantization_config, quark_version, write_config_files

__all__ = ["direct_quantize_checkpoint", "OutputExistsError", "write_record_folder", "files_present", "save_progress",
           "publish"]

logger = logging.getLogger(__name__)

#: bump when the partial-folder layout or the conversion changes (invalidates old partial folders)
_FORMAT = "quark-file2file/1"
PROGRESS_NAME = "progress.json"
_SHARDS_DIR = ".shards"
#: copied from the input folder when present (besides config.json, which is rewritten)
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_NO_LIMIT = 1 << 62


class OutputExistsError(FileExistsError, ValueError):
    """The output folder exists and is not empty (pass ``overwrite=True``)."""


# ---------------------------------------------------------------------------------------------
# the plan: what happens to each input tensor
# ---------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    src: Path
    weight_map: dict[str, str]  # input tensor -> input shard
    shards: list[str]  # input shards, in order
    layers: dict[str, QuantLinear]  # quantized linears of the meta model (configs, shapes)
    #: input tensor -> what to write for it: ("layer", layer name) / ("copy", output name)
    actions: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    #: quantized layer -> the input tensor holding its bias
    bias_source: dict[str, str] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    pack_method: str = "reorder"
    limit: int = _NO_LIMIT


def _static_activation(config: QConfig, layers: dict[str, QuantLinear]) -> str | None:
    """Why the config needs calibration data, or None."""
    if config.algo_config:
        names = ", ".join(a.name for a in config.algo_config)
        return f"the config runs algorithm(s) {names}"
    if config.softmax_quant_spec is not None and not config.softmax_quant_spec.is_dynamic:
        return "attention softmax quantization (softmax_quant_spec) is static"
    for name, q in layers.items():
        for role in ("input_tensors", "output_tensors"):
            spec = getattr(q.layer_config, role)
            stages = spec if isinstance(spec, list) else [spec]
            for i, s in enumerate(stages):
                if s is not None and not s.is_dynamic:
                    where = f"{role}" + (f" (stage {i + 1})" if len(stages) > 1 else "")
                    kv = " (fp8 KV cache)" if role == "output_tensors" and config.kv_cache_config(name) else ""
                    return (
                        f"layer {name!r}: {where}{kv} is static {s.dtype.value} "
                        f"{s.qscheme.value if s.qscheme else ''} quantization (is_dynamic=False)"
                    )
    return None


def _refuse_fused_experts(config: QConfig, meta_model: nn.Module) -> None:
    """Fused MoE experts (3-D expert parameters) are quantized by ``quantize_model`` only."""
    from quark.torch.quantization.fused_experts import find_fused_experts, projection_configs

    for name, module, layout in find_fused_experts(meta_model):
        if projection_configs(config, name, module, layout):
            raise NotImplementedError(
                f"direct_quantize_checkpoint does not quantize fused MoE experts ({name} ...): use "
                "ModelQuantizer.quantize_model + export_safetensors, or exclude them (e.g. exclude_layers=['*mlp.experts.*'])"
            )


def _calibration_message(reason: str) -> str:
    return (
        f"direct_quantize_checkpoint quantizes from the weights alone, but {reason}: that needs calibration "
        "data. Use ModelQuantizer.quantize_model(model, dataloader) and export_safetensors, or a weight-only "
        "/ dynamic-activation scheme"
    )


def _make_plan(src: Path, meta_model: nn.Module, weight_map: dict[str, str]) -> _Plan:
    layers = dict(quantized_linears(meta_model))
    present = set(weight_map)
    groups: dict[int, list[str]] = {}
    for key, t in meta_model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(key)
    plan = _Plan(src, weight_map, sorted(set(weight_map.values())), layers)
    known: set[str] = set()
    missing: list[str] = []
    for members in groups.values():
        known.update(members)
        quantized_weights, biases, plain = [], [], []
        for key in members:
            owner = layer_of(key, layers)
            if owner is None:
                plain.append(key)
            elif key == f"{owner}.weight":
                quantized_weights.append(owner)
            elif key == f"{owner}.bias":
                biases.append(owner)
        source = next((k for k in members if k in present), None)
        if source is None:
            if quantized_weights or biases:
                what = f"the weight of quantized layer {quantized_weights[0]!r}" if quantized_weights else (
                    f"the bias of quantized layer {biases[0]!r}")
                raise CheckpointError(f"{src}: no tensor {' / '.join(members)} ({what}) in the checkpoint")
            missing.extend(members)
            continue
        actions = [("layer", owner) for owner in quantized_weights]
        if plain:
            actions.append(("copy", plain[0]))
        plan.actions[source] = actions
        for owner in biases:
            plan.bias_source[owner] = source
    # non-persistent buffers (rotary ``inv_freq`` in old checkpoints): transformers ignores them on load
    # and export does not write them
    dropped = sorted(present & ({n for n, _ in meta_model.named_buffers()} - known))
    if dropped:
        logger.info("not writing %d non-persistent buffer(s) found in the checkpoint: %s%s",
                    len(dropped), dropped[:3], " ..." if len(dropped) > 3 else "")
    unknown = sorted(present - known - set(dropped))
    for key in unknown:  # not part of the model transformers builds: kept as they are
        plan.actions[key] = [("copy", key)]
    if unknown:
        logger.warning("%d checkpoint tensor(s) are not in the %s built from config.json; copied unchanged: %s%s",
                       len(unknown), type(meta_model).__name__, unknown[:5], " ..." if len(unknown) > 5 else "")
    if missing:
        logger.warning("%d tensor(s) of the model are not in the checkpoint (not written): %s%s",
                       len(missing), missing[:5], " ..." if len(missing) > 5 else "")
    if not plan.actions:
        raise CheckpointError(f"{src}: the checkpoint holds no tensors")
    return plan


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _read_source_config(src: Path) -> dict[str, Any]:
    data = read_config_json(src, "a Hugging Face checkpoint folder")
    if data.get("quantization_config"):
        method = (data["quantization_config"] or {}).get("quant_method", "?")
        raise ValueError(f"{src / 'config.json'}: the checkpoint is already quantized (quant_method={method!r}); "
                         "file-to-file quantization needs a float checkpoint")
    return data


def _fingerprint(path: Path) -> str:
    """sha256 of the shard's name, size and safetensors header (cheap: the data is not read)."""
    h = hashlib.sha256()
    h.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            h.update(f.read(min(int.from_bytes(head, "little"), 1 << 28)))
    return h.hexdigest()


def _check_shards(plan: _Plan) -> None:
    """Every input shard opens (complete header and data), holds what the index says, and every
    quantized weight has the layer's shape: all before anything is written."""
    from safetensors import safe_open

    by_shard: dict[str, list[str]] = {}
    for name, shard in plan.weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    weights = {f"{n}.weight": q for n, q in plan.layers.items()}
    for shard in plan.shards:
        path = plan.src / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                lacking = [n for n in by_shard[shard] if n not in keys]
                if lacking:
                    raise CheckpointError(f"{path}: tensors listed in {INDEX_NAME} are missing: {lacking[:5]}")
                for key in by_shard[shard]:
                    for kind, target in plan.actions.get(key, []):
                        if kind != "layer":
                            continue
                        q = weights[f"{target}.weight"]
                        shape = tuple(f.get_slice(key).get_shape())
                        if shape != (q.out_features, q.in_features):
                            raise CheckpointError(f"{path}: {key} has shape {shape}, the model's layer {target!r} "
                                                  f"expects {(q.out_features, q.in_features)}")
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors' own error type: bad header, truncated file
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})") from None


# ---------------------------------------------------------------------------------------------
# one shard
# ---------------------------------------------------------------------------------------------
def _quantized_layer(plan: _Plan, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of layer ``name`` (what ``export_safetensors`` writes for it), from its weight
    in the checkpoint's dtype: a QuantLinear around it, calibrated as ``quantize_model`` does."""
    meta_q = plan.layers[name]
    with torch.device("meta"):
        linear = nn.Linear(meta_q.in_features, meta_q.out_features, bias=bias is not None)
    linear.weight = nn.Parameter(weight.to(plan.device), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(plan.device), requires_grad=False)
    oq = meta_q.output_quantizer
    q = QuantLinear.from_linear(linear, meta_q.layer_config, oq.min_scale if oq is not None else 0.0)
    q.update_weight_qparams()
    return {f"{name}.{k}": v for k, v in layer_tensors(q, "real_quantized", plan.pack_method, name).items()}


def _shard_tensors(plan: _Plan, shard: str, bar: Any):
    """``(name, tensor)`` pairs of the output for input ``shard``, one input tensor at a time."""
    from safetensors import safe_open

    path = plan.src / shard
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})") from None
    with f:
        for key in [k for k in f.keys() if k in plan.actions and plan.weight_map.get(k) == shard]:
            tensor = f.get_tensor(key)
            for kind, target in plan.actions[key]:
                if kind == "copy":
                    yield target, tensor
                    continue
                bias = None
                if target in plan.bias_source:
                    bkey = plan.bias_source[target]
                    bshard = plan.weight_map[bkey]
                    if bshard == shard:
                        bias = f.get_tensor(bkey)
                    else:
                        with safe_open(str(plan.src / bshard), framework="pt", device="cpu") as g:
                            bias = g.get_tensor(bkey)
                with torch.no_grad():
                    out = _quantized_layer(plan, target, tensor, bias)
                yield from out.items()
                del out, bias
            if bar is not None:
                bar.update(tensor.numel() * tensor.element_size())
            del tensor


def _convert_shard(plan: _Plan, shard: str, folder: Path, bar: Any = None) -> dict[str, Any]:
    """Write the output of input ``shard`` into ``folder`` (one or more safetensors files); returns its
    progress record: ``files`` (name -> size, sha256), ``weight_map``, ``total_size``."""
    return write_record_folder(_shard_tensors(plan, shard, bar), folder, plan.limit)


def write_record_folder(tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, limit: int) -> dict[str, Any]:
    """Write ``tensors`` into a fresh ``folder`` (files of at most ``limit`` bytes, no index); returns
    the progress record of a resumable run: ``files`` (name -> size, sha256), ``weight_map``,
    ``total_size`` (what :func:`files_present` checks and :func:`publish` assembles)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with torch.no_grad():
        index = write_shards(tensors, folder, limit)
    (folder / INDEX_NAME).unlink()
    digests = index["metadata"]["sha256"]
    return {
        "files": {name: {"size": (folder / name).stat().st_size, "sha256": digests[name]} for name in sorted(digests)},
        "weight_map": index["weight_map"],
        "total_size": index["metadata"]["total_size"],
    }


def files_present(folder: Path, record: dict[str, Any]) -> bool:
    """Every file of a :func:`write_record_folder` record is in ``folder`` with its recorded size."""
    return all((folder / name).is_file() and (folder / name).stat().st_size == info["size"]
               for name, info in record["files"].items())


def publish(partial: Path, dst: Path, records: list[tuple[Path, dict[str, Any]]], src: Path,
            write_config: Callable[[Path], None], leftovers: Iterable[str]) -> int:
    """Finish a resumable run's ``partial`` folder: the recorded files (``(folder, record)`` pairs, in
    order) renamed ``model-0000j-of-0000n.safetensors``, the index with their sha256, config.json
    (``write_config(partial)``), the tokenizer files copied from ``src``, the ``leftovers`` (paths in
    ``partial``) removed, then the folder renamed to ``dst``, replacing an old one only then. Returns
    the number of files."""
    files = [(folder, name, record) for folder, record in records for name in record["files"]]
    n = len(files)
    weight_map: dict[str, str] = {}
    digests: dict[str, str] = {}
    for j, (folder, name, record) in enumerate(files, start=1):
        final = f"model-{j:05d}-of-{n:05d}.safetensors"
        os.replace(folder / name, partial / final)
        digests[final] = record["files"][name]["sha256"]
        weight_map.update({tensor: final for tensor, file in record["weight_map"].items() if file == name})
    index = {"metadata": {"total_size": sum(r["total_size"] for _, r in records), "sha256": digests},
             "weight_map": dict(sorted(weight_map.items()))}
    (partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    write_config(partial)
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, partial / name)
    for leftover in leftovers:
        path = partial / leftover
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        dst.rename(old)
    partial.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return n


# ---------------------------------------------------------------------------------------------
# progress (resume)
# ---------------------------------------------------------------------------------------------
def _run_hash(config: QConfig, source_config: dict[str, Any], plan: _Plan) -> str:
    data = {
        "format": _FORMAT,
        "version": quark_version(),
        "qconfig": config.to_dict(),
        "pack_method": plan.pack_method,
        "limit": plan.limit,
        "source_config": source_config,
        "shards": plan.shards,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _load_progress(partial: Path, run_hash: str) -> dict[str, Any]:
    """The finished shards recorded in ``partial`` for this run, or a fresh (emptied) partial folder."""
    fresh = {"format": _FORMAT, "run_hash": run_hash, "shards": {}}
    if not partial.exists():
        partial.mkdir(parents=True)
        return fresh
    try:
        progress = json.loads((partial / PROGRESS_NAME).read_text())
        same = progress.get("format") == _FORMAT and progress.get("run_hash") == run_hash
    except (OSError, json.JSONDecodeError, AttributeError):
        progress, same = None, False
    if not same:
        why = "no usable progress record" if progress is None else "it was started with other settings"
        logger.warning("%s: starting over (%s)", partial, why)
        shutil.rmtree(partial)
        partial.mkdir(parents=True)
        return fresh
    return progress


def save_progress(partial: Path, progress: dict[str, Any]) -> None:
    """Write ``partial``'s progress record atomically (a temporary file renamed over it)."""
    tmp = partial / f".{PROGRESS_NAME}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(progress, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, partial / PROGRESS_NAME)


def _finished(record: dict[str, Any] | None, fingerprint: str, folder: Path) -> bool:
    return bool(record) and record.get("fingerprint") == fingerprint and files_present(folder, record)


# ---------------------------------------------------------------------------------------------
# the function
# ---------------------------------------------------------------------------------------------
def _partial_dir(dst: Path) -> Path:
    return dst.with_name(dst.name + ".partial")


def direct_quantize_checkpoint(
    config: QConfig,
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    pack_method: str = "reorder",
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Quantize the float checkpoint in ``src_dir`` into a quark export in ``dst_dir``, shard by shard.

    Args:
        config: a weight-only or fully dynamic ``QConfig`` (static activation specs and algorithms
            need calibration data: ``ValueError``, use ``quantize_model`` + ``export_safetensors``).
        src_dir: a Hugging Face folder: config.json and ``model.safetensors`` or sharded
            ``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json``.
        dst_dir: the output folder; an existing non-empty folder is an error (:class:`OutputExistsError`,
            a ``ValueError``) unless ``overwrite``.
        device: where weights are quantized (default cpu; other tensors are copied on the cpu).
        pack_method: int4 nibble order, ``"reorder"`` (AutoAWQ) or ``"order"``.
        max_shard_size: split an input shard's output into files of at most this size (bytes or
            ``"5GB"``); default: one output file per input shard.
        overwrite: replace an existing ``dst_dir`` (only at the end, when everything succeeded).
        progress: show a tqdm bar (bytes of input read).

    Returns ``dst_dir``.  Its tensors and ``quantization_config`` equal those of ``quantize_model``
    (no data) + ``export_safetensors(weight_format="real_quantized", pack_method=...)`` on the model
    loaded in the checkpoint's dtype.  Interrupted, a rerun with the same arguments resumes from
    ``<dst_dir>.partial``.
    """
    if not isinstance(config, QConfig):
        raise TypeError(f"config must be a QConfig, got {type(config).__name__}")
    if pack_method not in PACK_METHODS:
        raise ValueError(f"pack_method={pack_method!r}; allowed: {', '.join(PACK_METHODS)}")
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.exists() and not dst.is_dir():
        raise OutputExistsError(f"{dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise OutputExistsError(f"{dst} exists and is not empty; pass overwrite=True to replace it")
    if src.resolve() == dst.resolve():
        raise ValueError(f"dst_dir is the source folder {src}: write the quantized checkpoint elsewhere")
    early = _static_activation(config, {})  # algorithms, static attention: refused before reading anything
    if early is not None:
        raise ValueError(_calibration_message(early))
    limit = _NO_LIMIT if max_shard_size is None else parse_size(max_shard_size)
    device = torch.device(device) if device is not None else torch.device("cpu")

    # -- what to do (no tensor data read yet) ------------------------------------------------------
    source_config = _read_source_config(src)
    weight_map, _ = read_index(src)
    with torch.device("meta"):
        meta_model = build_model(src)
    swap_linears(meta_model, config)  # the in-memory quantizer's layer resolution
    _refuse_fused_experts(config, meta_model)
    layers = dict(quantized_linears(meta_model))
    reason = _static_activation(config, layers)
    if reason is not None:
        raise ValueError(_calibration_message(reason))
    try:
        check_real_quantized(meta_model)
    except NoServingLayoutError as exc:
        raise NoServingLayoutError(f"direct_quantize_checkpoint writes real-quantized weights only: {exc}") from None
    plan = _make_plan(src, meta_model, weight_map)
    plan.device, plan.pack_method, plan.limit = device, pack_method, limit
    _check_shards(plan)

    # -- shards ------------------------------------------------------------------------------------
    partial = _partial_dir(dst)
    run_hash = _run_hash(config, source_config, plan)
    state = _load_progress(partial, run_hash)
    save_progress(partial, state)
    done = 0
    sizes = {s: (src / s).stat().st_size for s in plan.shards}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="file2file", disable=not progress) as bar:
        for i, shard in enumerate(plan.shards, start=1):
            folder = partial / _SHARDS_DIR / f"{i:05d}"
            fingerprint = _fingerprint(src / shard)
            bar.set_description(f"file2file shard {i}/{len(plan.shards)}")
            if _finished(state["shards"].get(shard), fingerprint, folder):
                done += 1
                bar.update(sizes[shard])
                continue
            start = bar.n
            record = _convert_shard(plan, shard, folder, bar)
            bar.update(start + sizes[shard] - bar.n)
            record["fingerprint"] = fingerprint
            state["shards"][shard] = record
            save_progress(partial, state)
    if done:
        logger.info("resumed %s: %d of %d shard(s) were already done", partial, done, len(plan.shards))

    # -- finish: final names, index, config, rename into place ------------------------------------
    records = [(partial / _SHARDS_DIR / f"{i:05d}", state["shards"][shard]) for i, shard in enumerate(plan.shards, start=1)]
    quantization_config = quark_quantization_config(config, "real_quantized", pack_method)
    n = publish(partial, dst, records, src, lambda folder: write_config_files(meta_model, folder, quantization_config, None),
                [_SHARDS_DIR, PROGRESS_NAME])
    logger.info("quantized %s -> %s (%d shard(s), %d quantized layers)", src, dst, n, len(plan.layers))
    return dst
