"""Architecture coverage: every registered template quantizes, exports and reloads a tiny model.

For each model type of :meth:`LLMTemplate.list_available` whose classes transformers ships, a tiny
random model (:mod:`quark.torch.testing.tiny_models`: 2 decoder blocks, hidden size 64, 4 experts) is
quantized once per column with the template's config, exported with :func:`export_safetensors`,
imported back with ``import_model_from_safetensors(None, folder)`` (the architecture built from
config.json) and loaded with transformers' own ``from_pretrained`` (the class named in config.json
``architectures``; transformers' quark integration calls :func:`quark.torch.export.api._map_to_quark`),
and the logits of each compared with the quantized model's. Columns:

* ``builds``: the model builds and runs, the calibration batches call every decoder block (a block
  the model skips keeps uncalibrated static activation quantizers), and each of the template's layer
  patterns (Q, gate/up, exclusions) matches a module; for remote-code types the names are checked
  against the listing ``quark/torch/testing/data/remote_code_module_names.json`` instead (nothing is built, every
  other column is n/a).
* ``int4`` (``int4_wo_32``), ``fp8+kv`` (``fp8`` + ``kv_cache_scheme="fp8"``, whose K/V patterns
  must put an output quantizer on some layer), ``mxfp4``, ``awq`` / ``gptq`` / ``gptaq`` / ``qronos``
  (``int4_wo_32``), ``smoothquant`` / ``autosmoothquant`` (``int8``) and ``rotation`` (``int4_wo_32``
  with ``["rotation", "gptq"]``) with the template's default algorithm configs (n/a where the template
  has none), calibrated on :data:`N_BATCHES` random token batches (:func:`batches`; with the
  multimodal inputs of :data:`INPUT_BUILDERS` for a model whose forward takes them: Mllama's
  cross-attention blocks run only on images). A cell fails on an exception
  (its first line is the reason), on non-finite logits, when nothing was quantized, when a scaling
  pair / GPTQ entry of the algorithm matches no module, or when fused 3-D expert weights stay float
  (transformers-5 MoE blocks of a class :mod:`quark.torch.quantization.fused_experts` has no layout for).
* ``export`` / ``reimport`` / ``transformers``: over the columns that quantized, every export succeeds /
  every reimported model / every model loaded by ``getattr(transformers, architectures[0]).from_pretrained``
  gives the same logits on the same batches (equal, or max abs diff / max abs logit < :data:`RTOL`).

A pattern that matches no module is a failure, not a skip. Counts are taken over every layout
known for the type (each tiny variant, built on the meta device, and remote listings) and recorded
per pattern (:func:`pattern_counts`); the quantized model's own count is in the cell details.

``bench/coverage.py`` runs this for every type and writes ``bench/results/coverage.json`` and
``docs/architectures.md``; ``tests/test_coverage.py`` runs a few types.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import re
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quark.torch.quantization.config.algo_configs import ScalingPair, _ScalingConfig
from quark.torch.quantization.config.template import LLMTemplate

from .tiny_models import (
    CASES,
    Layout,
    build_model,
    case_name,
    fused_expert_params,
    listed_layouts,
    model_layout,
    module_kind,
    remote_listing,
)

logger = logging.getLogger(__name__)

COLUMNS = ("builds", "int4", "fp8+kv", "mxfp4", "awq", "gptq", "gptaq", "qronos", "smoothquant",
           "autosmoothquant", "rotation", "export", "reimport", "transformers")
#: quantization columns: column -> (scheme, extra ``get_config`` keywords)
QUANT_COLUMNS: dict[str, tuple[str, dict[str, Any]]] = {
    "int4": ("int4_wo_32", {}),
    "fp8+kv": ("fp8", {"kv_cache_scheme": "fp8"}),
    "mxfp4": ("mxfp4", {}),
    "awq": ("int4_wo_32", {"algorithm": "awq"}),
    "gptq": ("int4_wo_32", {"algorithm": "gptq"}),
    "gptaq": ("int4_wo_32", {"algorithm": "gptaq"}),
    "qronos": ("int4_wo_32", {"algorithm": "qronos"}),
    "smoothquant": ("int8", {"algorithm": "smoothquant"}),
    "autosmoothquant": ("int8", {"algorithm": "autosmoothquant"}),
    # rotation, then the solver that corrects the 4-bit weights of the rotated model (the recommended use)
    "rotation": ("int4_wo_32", {"algorithm": ["rotation", "gptq"]}),
}
#: algorithms whose template patterns (scaling pairs, layer groups) are counted per column
ALGORITHM_COLUMNS = ("awq", "gptq", "gptaq", "qronos", "smoothquant", "autosmoothquant")
#: the CI subset (``--quick``, ``tests/test_coverage.py``): dense, MoE, multimodal (text-only and with
#: images for cross-attention blocks), MLA
QUICK_TYPES = ("llama", "qwen2", "qwen3_moe", "mixtral", "gemma3", "mllama", "deepseek_v3")
#: reimported vs quantized logits: max |diff| / max |logit| below this (or equal)
RTOL = 1e-3
N_BATCHES = 2
SEQ_LEN = 16
#: token ids of the calibration / comparison batches (every tiny config has vocab_size 128)
VOCAB = 128

PASS, FAIL, NA = "pass", "fail", "n/a"

#: diagnosis of the failures seen so far: a substring of the cell reason -> the cause
KNOWN_CAUSES = {
    "fused experts not quantized": (
        "a fused-experts module (transformers-5 3-D expert parameters) whose class no layout describes "
        "(`quark.torch.quantization.fused_experts`: transformers' experts interface or `CLASS_LAYOUTS`) stays "
        "in float."
    ),
    "no decoder block of": (
        "the template lists a scaling pair per model variant (DeepSeek-V2 with q-LoRA vs V2-Lite without; "
        "MiniMax-M2 native fused experts vs remote per-expert linears); the scaling algorithms' `check_pairs` "
        "raises on a pair that applies to no block of the model at hand, so the default config fails on "
        "every variant."
    ),
    "the calibration batches never call decoder blocks": (
        "the model skips some decoder blocks on the harness's batches (Mllama's cross-attention blocks "
        "without images) and no entry of `INPUT_BUILDERS` (`quark/torch/testing/coverage.py`) gives the inputs "
        "they need for this forward signature."
    ),
    "cannot export: static activation quantizer": (
        "decoder blocks the calibration batches never call (see the builds column): `ModelQuantizer` "
        "quantizes their weights from the weights and skips the algorithms there, but cannot calibrate their "
        "static activation quantizers (fp8 / int8 inputs, K/V outputs), so `export_safetensors` refuses the "
        "model rather than write a checkpoint without their scales. Calibrating with inputs that reach the "
        "blocks, or excluding their layers, gives a complete model."
    ),
}


def cause_of(reason: str) -> str:
    return next((cause for key, cause in KNOWN_CAUSES.items() if key in reason), "")


@dataclass
class Cell:
    status: str
    #: why the cell is not a pass (empty for a pass)
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: a caveat that does not change the status (rendered as a footnote)
    note: str = ""

    def text(self) -> str:
        return self.status if not self.reason else f"{self.status}: {self.reason}"


def exc_reason(exc: BaseException) -> str:
    """The first line of an exception, with its type."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _traceback() -> str:
    """The last frames of the current exception, with the checkout and site-packages prefixes cut."""
    text = traceback.format_exc(limit=-4)
    # the folder holding the ``quark`` package (quark/torch/testing/coverage.py): the checkout or site-packages
    root = str(Path(__file__).resolve().parents[3]) + "/"
    text = text.replace(root, "")
    return re.sub(r'"[^"]*/site-packages/', '"', text)


# -- calibration / comparison inputs --------------------------------------------------------------
@dataclass(frozen=True)
class InputBuilder:
    """The multimodal inputs of the batches of every model whose ``forward`` takes all of ``params``
    (what some decoder blocks need to be called at all: Mllama's cross-attention blocks run only on
    image states). ``build(config, input_ids, generator)`` returns the batch's extra entries, with
    shapes read from the model's config, and may write special tokens (the image token) into
    ``input_ids`` in place."""

    name: str
    params: tuple[str, ...]
    build: Callable[[Any, torch.Tensor, torch.Generator], dict[str, torch.Tensor]]


def _image_size(vision: Any) -> tuple[int, int]:
    size = vision.image_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def tiled_images(config: Any, input_ids: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One image per sample, cut into tiles, as cross-attention vision models take it (Llama 3.2 Vision,
    ``modeling_mllama.py``): an aspect ratio drawn from ``vision_config.supported_aspect_ratios``
    (``rows x cols`` tiles of ``image_size``), ``pixel_values`` ``[batch, 1, max_num_tiles, num_channels,
    H, W]`` (random on the image's tiles, zero on the padding tiles), ``aspect_ratio_ids`` ``[batch, 1]``
    (1 + the ratio's index; 0 is padding), ``aspect_ratio_mask`` ``[batch, 1, max_num_tiles]`` and
    ``cross_attention_mask`` ``[batch, seq, 1, max_num_tiles]`` (1 on the image's tiles, for every token
    from the image token on); the image token (``config.image_token_id``) first, where the processor
    puts it."""
    vision = config.vision_config
    tiles, channels = vision.max_num_tiles, vision.num_channels
    h, w = _image_size(vision)
    ratios = [i for i, (r, c) in enumerate(vision.supported_aspect_ratios) if r * c <= tiles]
    ratio = ratios[int(torch.randint(len(ratios), (1,), generator=g))]
    rows, cols = vision.supported_aspect_ratios[ratio]
    used = rows * cols
    batch, seq = input_ids.shape
    input_ids[:, 0] = config.image_token_id
    pixel_values = torch.zeros(batch, 1, tiles, channels, h, w)
    pixel_values[:, :, :used] = torch.randn(batch, 1, used, channels, h, w, generator=g)
    tile_mask = torch.zeros(batch, 1, tiles, dtype=torch.long)
    tile_mask[..., :used] = 1
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": torch.full((batch, 1), ratio + 1, dtype=torch.long),
        "aspect_ratio_mask": tile_mask,
        "cross_attention_mask": tile_mask[:, None].expand(batch, seq, 1, tiles).clone(),
    }


#: multimodal inputs, by the forward parameters they fill (the first builder whose parameters a model's
#: forward takes all of applies; other models get text only, which calls all their decoder blocks:
#: the ``builds`` column checks it)
INPUT_BUILDERS: tuple[InputBuilder, ...] = (
    InputBuilder(
        "tiled images with a cross-attention mask",
        ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"),
        tiled_images,
    ),
)


def input_builder(model: nn.Module) -> InputBuilder | None:
    """The :data:`INPUT_BUILDERS` entry whose parameters ``model.forward`` takes, or None (text only)."""
    params = inspect.signature(model.forward).parameters
    return next((b for b in INPUT_BUILDERS if all(p in params for p in b.params)), None)


def batches(n: int = N_BATCHES, seq: int = SEQ_LEN, seed: int = 1, model: nn.Module | None = None
            ) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of ``seq`` random tokens; for a ``model`` with an :func:`input_builder`, with its
    multimodal inputs (built from ``model.config``). Without a model: text only."""
    g = torch.Generator().manual_seed(seed)
    builder = None if model is None else input_builder(model)
    out = []
    for _ in range(n):
        batch = {"input_ids": torch.randint(1, VOCAB, (1, seq), generator=g)}
        if builder is not None:
            batch.update(builder.build(model.config, batch["input_ids"], g))
            rows = model.get_input_embeddings().num_embeddings
            if int(batch["input_ids"].max()) >= rows:
                raise ValueError(f"{builder.name}: token id {int(batch['input_ids'].max())} is outside the "
                                 f"{rows}-row input embedding of {type(model).__name__} (set the config's token id)")
        out.append(batch)
    return out


def describe_batch(batch: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """The shape of each entry of a batch."""
    return {k: list(v.shape) for k, v in batch.items()}


def uncalled_blocks(model: nn.Module, path: str | None, data: list[Any]) -> tuple[str, int, list[int]]:
    """``(path, number of blocks, blocks the model never calls on data)`` for the decoder stack at ``path``
    (or the guessed one), from the block driver's capture pass (the blocks' inputs are recorded, no
    block does work but one of each class, once)."""
    from quark.torch.quantization.driver import capture_block_inputs, find_decoder_layers

    found = find_decoder_layers(model, path)
    if found is None:
        raise ValueError(f"no decoder stack found in {type(model).__name__}")
    path, layers = found
    return path, len(layers), capture_block_inputs(model, layers, data, progress=False).skipped


#: model class -> why its own forward could not be used (the logits came from ``.language_model``)
FORWARD_FALLBACKS: dict[str, str] = {}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a batch of :func:`batches`. A multimodal model whose own forward fails on text
    (transformers 5.24's ``Llama4ForConditionalGeneration`` cannot build its output) is read
    through its ``language_model`` (the same text path); :data:`FORWARD_FALLBACKS` records it."""
    with torch.no_grad():
        try:
            out = model(**batch, use_cache=False)
        except Exception as exc:
            inner = getattr(model, "language_model", None)
            if not isinstance(inner, nn.Module) or getattr(inner, "get_output_embeddings", lambda: None)() is None:
                raise
            FORWARD_FALLBACKS[type(model).__name__] = exc_reason(exc)
            out = inner(**batch, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if torch.equal(a, b):
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# -- pattern matching -----------------------------------------------------------------------------
def _as_list(value: Any) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _match(names: Any, pattern: str) -> list[str]:
    return [n for n in names if n and fnmatch.fnmatchcase(n, pattern)]


def _match_rel(block: dict[str, str], pattern: str) -> list[str]:
    return [""] if pattern == "" else _match(block, pattern)


def _applies(block: dict[str, str], p: ScalingPair) -> bool:
    return len(_match_rel(block, p.prev_op)) == 1 and all(_match_rel(block, e) for e in p.layers)


def pair_label(p: ScalingPair) -> str:
    return f"{p.prev_op} -> {', '.join(p.layers)}"


def decoder_path(template: LLMTemplate) -> str | None:
    for name in ("gptq", "awq", "smoothquant"):
        cfg = template.algorithm_configs.get(name)
        if cfg is not None and cfg.model_decoder_layers:
            return cfg.model_decoder_layers
    return None


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def pattern_counts(template: LLMTemplate, layouts: list[Layout]) -> list[dict[str, Any]]:
    """Per template pattern, how many modules it matches in each layout.

    Each row: ``role``, ``pattern``, ``column``, ``total`` and ``counts`` (one per layout, in order).
    Roles: ``kv`` / ``q`` / ``gate_up`` (linears or fused-expert parameters outside the exclusions),
    ``exclude`` (any module), ``<algo> pair`` (decoder blocks the scaling pair applies to: its
    ``prev_op`` matches exactly one module and each of its layers at least one),
    ``<algo> prev_op`` (blocks where the pair's ``prev_op`` exists), ``gptq entry`` (layers an entry
    of the GPTQ groups matches, over all blocks). ``column``: the coverage column a zero fails.
    """
    rows: list[dict[str, Any]] = []

    def add(role: str, pattern: str, column: str, counts: dict[str, int]) -> None:
        # counts: one per layout, in the order of ``layouts`` (the row's "layouts")
        rows.append({"role": role, "pattern": pattern, "column": column, "total": sum(counts.values()),
                     "counts": list(counts.values())})

    excluded = {lo.name: {n for p in template.exclude_layers_name for n in _match(lo.modules, p)} for lo in layouts}
    for role, key, column in (("kv", "kv_layers_name", "fp8+kv"), ("q", "q_layer_name", "builds"),
                              ("gate_up", "gate_up_layers_name", "builds")):
        for p in _as_list(getattr(template, key)):
            counts = {}
            for lo in layouts:
                targets = {n for n, k in lo.modules.items() if k == "Linear"} | lo.fused
                counts[lo.name] = len(set(_match(targets, p)) - excluded[lo.name])
            add(role, p, column, counts)
    for p in template.exclude_layers_name:
        add("exclude", p, "builds", {lo.name: len(_match(lo.modules, p)) for lo in layouts})
        if p == "lm_head" and rows[-1]["total"] == 0:
            # every template carries the lm_head exclusion; a model whose head has another name
            # (chatglm's transformer.output_layer) is covered when another pattern excludes it
            heads = sorted({h for lo in layouts for h in lo.lm_heads})
            others = [q for q in template.exclude_layers_name if q != p]
            if heads and all(any(_match([h], q) for q in others) for h in heads):
                rows[-1]["note"] = f"the LM head is {', '.join(heads)}, excluded by another pattern"
    for algo in ALGORITHM_COLUMNS:
        cfg = template.algorithm_configs.get(algo)
        if cfg is None:
            continue
        if isinstance(cfg, _ScalingConfig):
            for p in cfg.scaling_layers:
                add(f"{algo} pair", pair_label(p), algo,
                    {lo.name: sum(_applies(b, p) for b in lo.blocks) for lo in layouts})
                add(f"{algo} prev_op", p.prev_op, algo,
                    {lo.name: sum(len(_match_rel(b, p.prev_op)) == 1 for b in lo.blocks) for lo in layouts})
        elif hasattr(cfg, "inside_layer_modules"):
            for group in cfg.inside_layer_modules:
                for entry in group:
                    add(f"{algo} entry", entry, algo,
                        {lo.name: sum(len(_match_rel(b, entry)) for b in lo.blocks) for lo in layouts})
    return rows


def zero_patterns(rows: list[dict[str, Any]], column: str) -> list[str]:
    """The patterns of ``column`` that match no module (rows with a ``note`` are explained zeros)."""
    return [f"{r['role']} {r['pattern']!r}" for r in rows
            if r["column"] == column and r["total"] == 0 and not r.get("note")]


def _head_problems(template: LLMTemplate, layouts: list[Layout]) -> list[str]:
    """The LM head must be excluded in every layout."""
    out = []
    for lo in layouts:
        excluded = {n for p in template.exclude_layers_name for n in _match(lo.modules, p)}
        if not lo.lm_heads or not lo.lm_heads <= excluded:
            out.append(f"LM head {sorted(lo.lm_heads) or '?'} not excluded in {lo.name}")
    return out


# -- one model type -------------------------------------------------------------------------------
def _layouts(model_type: str, template: LLMTemplate, model: nn.Module | None, listing: dict[str, Any]
             ) -> list[Layout]:
    from quark.torch.quantization.driver import find_decoder_layers

    path = decoder_path(template)
    out: list[Layout] = []
    for i, case in enumerate(CASES.get(model_type, [])):
        m = model if i == 0 and model is not None else build_model(model_type, i, device="meta")
        try:
            out.append(model_layout(m, path or find_decoder_layers(m)[0], case_name(case)))
        except (AttributeError, TypeError) as exc:  # the template's decoder path is not in this class
            logger.warning("%s: %s", model_type, exc)
            head = m.get_output_embeddings()
            out.append(Layout(case_name(case), path or "", {n: module_kind(x) for n, x in m.named_modules() if n},
                              set(fused_expert_params(m)), [], {n for n, x in m.named_modules() if x is head}, m))
    return out + listed_layouts(listing.get(model_type, {}))


def _block_relative(name: str) -> str:
    """``model.layers.3.mlp.experts.down_proj`` -> ``mlp.experts.down_proj`` (after the block index)."""
    parts = name.split(".")
    i = next((i for i, p in enumerate(parts) if p.isdigit()), -1)
    return ".".join(parts[i + 1:])


def _fused_details(model: nn.Module) -> dict[str, Any]:
    """How much of the model the quantized fused experts hold (frozen ones hold stored codes)."""
    from quark.torch.quantization.fused_experts import fused_experts_modules

    projections = [fp for _, m in fused_experts_modules(model) for _, fp in m.quantized_projections()]
    return {
        "fused_expert_projections": len(projections),
        "fused_expert_numel": sum(fp.num_experts * fp.out_features * fp.in_features for fp in projections),
        "linear_numel": sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)),
    }


def _fused_reason(model: nn.Module) -> str | None:
    """The fused 3-D expert weights left in float (a failure unless the config excludes them)."""
    from quark.torch.quantization.fused_experts import quantized_fused_params

    done = quantized_fused_params(model)
    fused = {n: p for n, p in fused_expert_params(model).items() if n not in done}
    if not fused:
        return None
    kinds = sorted({_block_relative(n) for n in fused})
    return f"fused experts not quantized: {len(fused)} params ({', '.join(kinds)})"


def missing_defaults(template: LLMTemplate, column: str) -> list[str]:
    """The algorithms of a quantization column the template has no default config for (the column is
    n/a for it)."""
    algos = QUANT_COLUMNS[column][1].get("algorithm") or []
    return [a for a in ([algos] if isinstance(algos, str) else algos) if template.algorithm_configs.get(a) is None]


def _quant_cell(model_type: str, column: str, template: LLMTemplate, data: list[dict[str, torch.Tensor]],
                patterns: list[dict[str, Any]], workdir: Path, load_transformers: bool = True
                ) -> tuple[Cell, dict[str, Any]]:
    """Quantize, export, reimport, load with transformers one column; returns the column's cell and the
    export / reimport / transformers results (``{"export": Cell | None, "reimport": Cell | None,
    "transformers": Cell | None}``; None = not attempted: the transformers load only with
    ``load_transformers``, about a third of the table's time)."""
    from quark.torch.export.api import export_safetensors, import_model_from_safetensors
    from quark.torch.quantization.api import ModelQuantizer
    from quark.torch.quantization.modules import quantized_linears

    scheme, kwargs = QUANT_COLUMNS[column]
    io: dict[str, Any] = {"export": None, "reimport": None, "transformers": None}
    missing = missing_defaults(template, column)
    if missing:
        return Cell(NA, f"no template default for {missing[0]}"), io
    t0 = time.perf_counter()
    details: dict[str, Any] = {"scheme": scheme, **{k: v for k, v in kwargs.items()}}
    problems: list[str] = []
    note = ""
    try:
        model = build_model(model_type)
        config = template.get_config(scheme, **kwargs)
        ModelQuantizer(config).quantize_model(model, data, progress=False)
        layers = quantized_linears(model)
        details["quantized_linears"] = len(layers)
        if column == "fp8+kv":
            kv = [n for n, q in layers if q.output_quantizer is not None and config.kv_cache_config(n) is not None]
            details["kv_quantized"] = len(kv)
            if not kv:
                problems.append(f"no K/V output quantizer: {template.kv_layers_name} match no quantized layer")
            if any(n.endswith("kv_a_proj_with_mqa") for n, _ in model.named_modules()):
                note = ("MLA: the fp8 K/V scales are on kv_b_proj's output (the expanded K/V transformers caches); "
                        "MLA serving engines cache the latent (kv_a_proj_with_mqa -> kv_a_layernorm), which gets no scale")
        ref = [logits(model, b) for b in data]
    except Exception as exc:  # one column never stops the run
        details["traceback"] = _traceback()
        details["seconds"] = round(time.perf_counter() - t0, 3)
        return Cell(FAIL, exc_reason(exc), details), io
    if not layers:
        problems.append("no layer was quantized")
    if not all(torch.isfinite(r).all() for r in ref):
        problems.append("non-finite logits after quantization")
    zeros = zero_patterns(patterns, column)
    if zeros:
        problems.append(f"matches 0 modules: {', '.join(zeros)}")
    fused = _fused_reason(model)
    if fused is not None:
        problems.append(fused)
    details.update(_fused_details(model))

    # export + reimport
    folder = workdir / f"{model_type}-{column.replace('+', '_')}"
    try:
        export_safetensors(model, folder, overwrite=True)
        io["export"] = Cell(PASS)
    except Exception as exc:
        io["export"] = Cell(FAIL, exc_reason(exc), {"traceback": _traceback()})
    if io["export"].status == PASS:
        try:
            back = import_model_from_safetensors(None, folder)
            diffs = [rel_diff(logits(back, b), r) for b, r in zip(data, ref)]
            worst = max(diffs)
            io["reimport"] = Cell(PASS if worst < RTOL else FAIL,
                                  "" if worst < RTOL else f"logits differ: rel diff {worst:.3g}",
                                  {"rel_diff": worst, "class": type(back).__name__})
        except Exception as exc:
            io["reimport"] = Cell(FAIL, exc_reason(exc), {"traceback": _traceback()})
        if load_transformers:
            io["transformers"] = _transformers_cell(folder, data, ref)
    details["seconds"] = round(time.perf_counter() - t0, 3)
    return Cell(FAIL if problems else PASS, "; ".join(problems), details, note), io


def _transformers_cell(folder: Path, data: list[dict[str, torch.Tensor]], ref: list[torch.Tensor]) -> Cell:
    """Load an export with transformers' ``from_pretrained`` (the class of config.json ``architectures``)
    and compare its logits on ``data`` with ``ref``. The details record the loader's missing / unexpected /
    mismatched keys (the logits decide the status)."""
    import json

    import transformers

    try:
        arch = json.loads((folder / "config.json").read_text())["architectures"][0]
        cls = getattr(transformers, arch)
        loaded, info = cls.from_pretrained(folder, output_loading_info=True)
        diffs = [rel_diff(logits(loaded, b), r) for b, r in zip(data, ref)]
        worst = max(diffs)
        keys = {k: sorted(map(str, v))[:5] for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        return Cell(PASS if worst < RTOL else FAIL, "" if worst < RTOL else f"logits differ: rel diff {worst:.3g}",
                    {"rel_diff": worst, "class": type(loaded).__name__, **keys})
    except Exception as exc:
        return Cell(FAIL, exc_reason(exc), {"traceback": _traceback()})


def _aggregate(results: dict[str, Cell | None], what: str) -> Cell:
    tried = {c: r for c, r in results.items() if r is not None}
    if not tried:
        return Cell(NA, f"nothing to {what}: no column quantized")
    failed = {c: r for c, r in tried.items() if r.status != PASS}
    details = {c: asdict(r) for c, r in tried.items()}
    if not failed:
        return Cell(PASS, "", details)
    # one reason per distinct cause, naming the columns it hit
    causes: dict[str, list[str]] = {}
    for c, r in failed.items():
        causes.setdefault(r.reason, []).append(c)
    reason = "; ".join(f"{', '.join(cols)}: {why}" for why, cols in causes.items())
    return Cell(FAIL, reason, details)


def run_type(model_type: str, columns: tuple[str, ...] = COLUMNS, listing: dict[str, Any] | None = None,
             workdir: str | Path | None = None) -> dict[str, Any]:
    """One row of the coverage table: ``{"model_type", "kind", "class", "cells", "layouts", "patterns",
    "seconds"}`` (``cells``: column -> :class:`Cell` as a dict; ``patterns``: :func:`pattern_counts`).

    Never raises for a failure of the model type: every problem lands in a cell."""
    t0 = time.perf_counter()
    listing = remote_listing() if listing is None else listing
    template = LLMTemplate.get(model_type)
    row: dict[str, Any] = {"model_type": model_type, "cells": {}, "layouts": [], "patterns": []}
    cells: dict[str, Cell] = {}
    if model_type not in CASES:
        row["kind"] = "remote"
        row["class"] = ", ".join(listing.get(model_type, {}).get("layouts", {})) or "-"
        reason = "remote code (not shipped by transformers)"
        try:
            layouts = listed_layouts(listing.get(model_type, {}))
            if not layouts:
                raise ValueError("no layout in quark/torch/testing/data/remote_code_module_names.json")
            row["layouts"] = [lo.name for lo in layouts]
            row["patterns"] = pattern_counts(template, layouts)
            zeros = [f"{r['role']} {r['pattern']!r}" for r in row["patterns"] if r["total"] == 0 and not r.get("note")]
            problems = _head_problems(template, layouts)
            if zeros:
                problems.append(f"matches 0 modules in the listing: {', '.join(zeros)}")
            cells["builds"] = Cell(FAIL if problems else PASS, "; ".join(problems), {},
                                   "remote code: nothing is built; the template's names are checked against the "
                                   "module listing quark/torch/testing/data/remote_code_module_names.json")
        except Exception as exc:
            cells["builds"] = Cell(FAIL, exc_reason(exc))
        for c in COLUMNS[1:]:
            cells[c] = Cell(NA, reason)
    else:
        row["kind"] = "native"
        row["class"] = CASES[model_type][0].cls
        built = False
        data: list[dict[str, torch.Tensor]] = []
        try:
            model = build_model(model_type)
            data = batches(model=model)
            ref = logits(model, data[0])
            built = True  # the quantization columns run even when a pattern check below fails
            layouts = _layouts(model_type, template, model, listing)
            row["layouts"] = [lo.name for lo in layouts]
            row["patterns"] = pattern_counts(template, layouts)
            problems = _head_problems(template, layouts)
            path = decoder_path(template)
            details: dict[str, Any] = {"inputs": describe_batch(data[0])}
            if path and not isinstance(_submodule(model, path), nn.ModuleList):
                problems.insert(0, f"the decoder path {path!r} is no nn.ModuleList of {type(model).__name__}")
            else:
                stack, n_blocks, skipped = uncalled_blocks(model, path, data)
                details.update(blocks=n_blocks, uncalled_blocks=skipped)
                if skipped:
                    problems.append(f"the calibration batches never call decoder blocks {skipped} of {stack!r} "
                                    f"({', '.join(data[0])}): the model skips them")
            if not torch.isfinite(ref).all():
                problems.append("non-finite logits")
            zeros = zero_patterns(row["patterns"], "builds")
            if zeros:
                problems.append(f"matches 0 modules: {', '.join(zeros)}")
            notes = []
            builder = input_builder(model)
            if builder is not None:
                shapes = ", ".join(f"{k} {v}" for k, v in details["inputs"].items())
                notes.append(f"calibrated and compared on {builder.name}: {shapes}")
            if type(model).__name__ in FORWARD_FALLBACKS:
                notes.append(f"{type(model).__name__}.forward fails in transformers "
                             f"({FORWARD_FALLBACKS[type(model).__name__]}): logits read through .language_model")
            cells["builds"] = Cell(FAIL if problems else PASS, "; ".join(problems), details, "; ".join(notes))
        except Exception as exc:
            cells["builds"] = Cell(FAIL, exc_reason(exc), {"traceback": _traceback()})
        exports: dict[str, Cell | None] = {}
        reimports: dict[str, Cell | None] = {}
        loads: dict[str, Cell | None] = {}
        with tempfile.TemporaryDirectory(prefix="quark-coverage-", dir=workdir) as tmp:
            for column in QUANT_COLUMNS:
                if column not in columns:
                    continue
                if not built:
                    cells[column] = Cell(NA, "not run: the model does not build")
                    continue
                cells[column], io = _quant_cell(model_type, column, template, data, row["patterns"], Path(tmp),
                                               "transformers" in columns)
                exports[column], reimports[column], loads[column] = io["export"], io["reimport"], io["transformers"]
        if "export" in columns:
            cells["export"] = _aggregate(exports, "export")
        if "reimport" in columns:
            cells["reimport"] = _aggregate(reimports, "reimport")
        if "transformers" in columns:
            cells["transformers"] = _aggregate(loads, "load with transformers")
    row["cells"] = {c: asdict(cells[c]) for c in COLUMNS if c in cells}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def cell(row: dict[str, Any], column: str) -> Cell:
    return Cell(**row["cells"][column])


# -- rendering ------------------------------------------------------------------------------------
def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """``docs/architectures.md``: the table, the column totals, the notes, the per-pattern match
    counts and the time per model type."""
    rows = sorted(rows, key=lambda r: r["model_type"])
    run = meta.get("full_run") or {}
    when = (f"full run {run.get('date', '?')}: {run.get('wall_seconds', '?')} s wall time on "
            f"{run.get('threads', '?')} thread(s)") if run else (
        f"run {meta.get('date', '?')}: {meta.get('wall_seconds', '?')} s wall time for {len(rows)} types")
    out = [
        "# Architecture coverage",
        "",
        "Generated by `python bench/coverage.py --write-docs` (do not edit by hand; the data is in",
        "`bench/results/coverage.json`, the harness in `quark/torch/testing/coverage.py`, the CI subset in",
        "`tests/test_coverage.py`). For every model type of `LLMTemplate.list_available()` a tiny random model",
        "(2 decoder blocks, hidden size 64, 4 experts, tiny vision tower; `quark/torch/testing/tiny_models.py`)",
        "is quantized with the template's config, exported with `export_safetensors`, imported back with",
        "`import_model_from_safetensors(None, folder)` and loaded with transformers' `from_pretrained` (the",
        "class named in config.json `architectures`), and the logits of each compared with the quantized",
        f"model's (equal, or max |diff| / max |logit| < {RTOL:g}).",
        "",
        "* **builds**: the model builds and runs; the calibration batches call every decoder block; the",
        "  template's Q, gate/up and exclusion patterns each match a module and the LM head is excluded.",
        "* **int4** `int4_wo_32`; **fp8+kv** `fp8` + `kv_cache_scheme=\"fp8\"` (the K/V patterns must put an",
        "  output quantizer on some layer); **mxfp4**; **awq**, **gptq**, **gptaq**, **qronos** (`int4_wo_32`),",
        "  **smoothquant**, **autosmoothquant** (`int8`) and **rotation** (`int4_wo_32` with `[\"rotation\",",
        "  \"gptq\"]`) with the template's default algorithm configs (n/a where the template has none: its module",
        "  docstring says why, e.g. LayerNorm, post-norms or image features for rotation); calibration on",
        f"  {N_BATCHES} random batches of {SEQ_LEN} tokens, with random images for a model whose forward takes the inputs of an",
        "  `INPUT_BUILDERS` entry (the builds cell's note gives the shapes; the same batches give the logits",
        "  compared). A quantization cell fails on an exception (its first line is the reason), when a",
        "  pattern or scaling pair it uses matches no module, or when fused 3-D expert weights stay float.",
        "* **export** / **reimport** / **transformers**: over the columns that quantized; the reason names the",
        "  columns it hit. **reimport** loads with quark's `import_model_from_safetensors`, **transformers** with",
        "  `getattr(transformers, architectures[0]).from_pretrained(folder)` (transformers' quark integration,",
        "  which calls `quark.torch.export.api._map_to_quark`); both compare on the same batches.",
        "* Remote-code types (transformers does not ship them) are checked by name against",
        "  `quark/torch/testing/data/remote_code_module_names.json` only; their other columns are n/a.",
        "",
        f"torch {meta.get('torch', '?')}, transformers {meta.get('transformers', '?')}; {when}.",
        "",
    ]
    notes: dict[str, int] = {}

    def show(c: Cell) -> str:
        text = c.text()
        if c.note:
            text += f" [{notes.setdefault(c.note, len(notes) + 1)}]"
        return _md(text)

    out += ["| model type | class | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [show(Cell(**r["cells"][c])) if c in r["cells"] else "-" for c in COLUMNS]
        out.append(f"| `{r['model_type']}` | {_md(r['class'])} | " + " | ".join(cells) + " |")
    totals = []
    for c in COLUMNS:
        st = [r["cells"][c]["status"] for r in rows if c in r["cells"]]
        totals.append(f"{st.count(PASS)} / {st.count(FAIL)} / {st.count(NA)}")
    out += ["", "Totals (pass / fail / n/a):", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
            "| " + " | ".join(totals) + " |", ""]
    if notes:
        out += ["Notes:", ""] + [f"{i}. {_md(text)}" for text, i in notes.items()] + [""]
    out += [
        "## Pattern match counts",
        "",
        "Modules each template pattern matches, summed over the layouts of the type (every tiny variant, and",
        "the remote listing where there is one): K/V, Q and gate/up count linears (or fused expert parameters)",
        "outside the exclusions; exclusions count any module; a scaling pair counts the decoder blocks it",
        "applies to; a GPTQ entry the layers it matches over all blocks. **0** fails the column named next",
        "to it (the `lm_head` exclusion every template carries is exempt where the head has another name",
        "and another pattern excludes it: marked *0, head excluded*).",
        "",
        "| model type | kv | q | gate_up | exclude | awq / smoothquant pairs (blocks) | gptq entries |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def fmt(role: str, _r: dict[str, Any] = r) -> str:
            items = [p for p in _r["patterns"] if p["role"] == role]
            return "<br>".join(f"`{_md(p['pattern'])}` {_count(p)}" for p in items) or "-"

        pairs = fmt("awq pair")
        sq = [(p["pattern"], p["total"]) for p in r["patterns"] if p["role"] == "smoothquant pair"]
        aw = [(p["pattern"], p["total"]) for p in r["patterns"] if p["role"] == "awq pair"]
        if sq != aw:
            pairs += "<br>smoothquant: " + fmt("smoothquant pair")
        out.append(
            f"| `{r['model_type']}` | {fmt('kv')} | {fmt('q')} | {fmt('gate_up')} | {fmt('exclude')} | "
            f"{pairs} | {fmt('gptq entry')} |"
        )
    out += ["## Failures by cause", ""]
    groups: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        for c in COLUMNS:
            data = r["cells"].get(c)
            if data and data["status"] == FAIL:
                key = next((k for k in KNOWN_CAUSES if k in data["reason"]), data["reason"])
                groups.setdefault(key, {}).setdefault(r["model_type"], []).append(c)
    out += ["| reason | cause | cells |", "|---|---|---|"] if groups else ["None: every cell passes or is n/a."]
    for key, where in sorted(groups.items(), key=lambda kv: -sum(map(len, kv[1].values()))):
        n = sum(map(len, where.values()))
        listed = ", ".join(
            f"`{t}` ({'all quantization columns' if cols == list(QUANT_COLUMNS) else ', '.join(cols)})"
            for t, cols in where.items()
        )
        out.append(f"| {_md(key)} | {_md(cause_of(key)) or '?'} | {n} cells: {_md(listed)} |")
    out += ["", "## Time per model type", "", "| model type | seconds |", "|---|---|"]
    out += [f"| `{r['model_type']}` | {r['seconds']} |" for r in rows]
    return "\n".join(out) + "\n"


def _count(p: dict[str, Any]) -> str:
    if p["total"]:
        return str(p["total"])
    return "*0, head excluded*" if p.get("note") else f"**0** ({p['column']})"
