"""GGUF export (llama.cpp's single-file format) of llama-family models, written with the ``gguf`` package.

Weight formats map onto GGML block types of 32 input features each (ggml's own layout):

==========================================  =========  ====================================================
our weight spec                              GGML type  one block of 32 (bytes)
==========================================  =========  ====================================================
int4, symmetric (per group of 32k, channel)  Q4_0       fp16 ``d``; 16 bytes of nibbles ``code + 8``
uint4, asymmetric (same granularities)       Q4_1       fp16 ``d``, fp16 ``m``; 16 bytes of nibbles ``code``
int8, symmetric (group of 32k, channel,      Q8_0       fp16 ``d``; 32 int8 codes
tensor)
MXFP4 (fp4 e2m1, e8m0 scale per 32)          MXFP4      e8m0 byte; 16 bytes of fp4 e2m1 nibbles
==========================================  =========  ====================================================

Within a block byte ``i`` holds element ``i`` in its low nibble and element ``i + 16`` in its high
nibble. GGML dequantizes ``Q4_0`` as ``d * (nibble - 8)``, ``Q4_1`` as ``d * nibble + m``, ``Q8_0`` as
``d * code`` and ``MXFP4`` as ``2^(e - 127) * e2m1(nibble)`` (its table holds doubled values and a
halved scale: the same numbers). So the file holds our codes unchanged and our scales as fp16; the
weights read back equal ours exactly when every scale (and, for Q4_1, ``m = -zero_point * scale``) is
representable in fp16: always for MXFP4, for int formats when the weight spec uses
``scale_type=float16`` (or the model is fp16). Otherwise the export rounds them to fp16, logs the
largest resulting weight change, and with ``strict=True`` refuses instead.

Unquantized tensors (embeddings, norms, excluded layers) are written in their own dtype (norms and
other 1-D tensors as F32, as llama.cpp does). A tied ``lm_head`` is not written (llama.cpp and
transformers use ``token_embd`` for both). Activation, KV-cache and attention quantization have no GGUF
form: the file holds the weights only, and a log line says so.

Per-architecture facts (the GGUF architecture name, whether llama.cpp's converter permutes the q/k rows
for its rotary layout) are the data in :data:`GGUF_ARCHITECTURES`; tensor names come from the ``gguf``
package's own HF -> GGUF name map.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from quark.torch.quantization.config.config import first_stage
from quark.torch.quantization.config.type import Dtype, QSchemeType, ScaleType
from quark.torch.quantization.modules import quantized_linears
from quark.torch.quantization.online_rotation import online_rotated_layers
from quark.torch.quantization.tensor_quantize import QParams, dequantize

from .checkpoint_tensors import tied_keys

__all__ = ["export_gguf", "GGUF_ARCHITECTURES", "GgufArchitecture", "GGUFExportError"]

logger = logging.getLogger(__name__)

BLOCK = 32  # elements per block of every GGML type written here


class GGUFExportError(ValueError):
    """The model (or one of its layers) has no GGUF form; nothing was written."""


@dataclass(frozen=True)
class GgufArchitecture:
    """How a transformers ``model_type`` is written: GGUF architecture name and whether the q/k
    projection rows are permuted into llama.cpp's interleaved rotary layout (its converter does this
    for the llama family; transformers' GGUF loader undoes it)."""

    arch: str
    permute_qk: bool


#: transformers model_type -> GGUF architecture (the llama family, which transformers loads back)
GGUF_ARCHITECTURES: dict[str, GgufArchitecture] = {
    "llama": GgufArchitecture("llama", permute_qk=True),
    "mistral": GgufArchitecture("llama", permute_qk=True),
    "qwen2": GgufArchitecture("qwen2", permute_qk=False),
    "qwen3": GgufArchitecture("qwen3", permute_qk=False),
}

#: GGUF hyper-parameter writer method -> HF config attribute
_HPARAMS = (
    ("add_context_length", "max_position_embeddings"),
    ("add_embedding_length", "hidden_size"),
    ("add_block_count", "num_hidden_layers"),
    ("add_feed_forward_length", "intermediate_size"),
    ("add_head_count", "num_attention_heads"),
    ("add_head_count_kv", "num_key_value_heads"),
    ("add_layer_norm_rms_eps", "rms_norm_eps"),
    ("add_vocab_size", "vocab_size"),
)


# ---------------------------------------------------------------------------------------------
# weight spec -> GGML type
# ---------------------------------------------------------------------------------------------
def _qtype_name(spec: Any) -> str | None:
    """The GGML type name a weight spec is written as, or None (with the reason in the caller)."""
    if isinstance(spec, (list, tuple)):
        return None  # two-stage formats (nvfp4, int4-fp8 ...): no GGML type carries both scales
    s = first_stage(spec)
    if s.is_dynamic:
        return None
    granular = (
        (s.qscheme is QSchemeType.per_group and s.group_size and s.group_size % BLOCK == 0)
        or (s.qscheme is QSchemeType.per_channel and s.ch_axis in (0, None))
        or s.qscheme is QSchemeType.per_tensor
    )
    if s.dtype is Dtype.fp4 and s.scale_type is ScaleType.float8_e8m0fnu and s.group_size == BLOCK:
        return "MXFP4"
    if not granular:
        return None
    if s.dtype is Dtype.int4 and s.symmetric:
        return "Q4_0"
    if s.dtype is Dtype.uint4 and not s.symmetric:
        return "Q4_1"
    if s.dtype is Dtype.int8 and s.symmetric:
        return "Q8_0"
    return None


SUPPORTED = (
    "int4 symmetric -> Q4_0, uint4 asymmetric -> Q4_1, int8 symmetric -> Q8_0 (per group of a multiple of 32, "
    "per output channel or per tensor), MXFP4 -> MXFP4"
)


def _per_block(t: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
    """Natural-shape qparams (scalar, ``[rows]``/``[rows, 1]`` or ``[rows, groups]``) -> one value per
    block of 32: ``[rows, cols / 32]``."""
    if t is None:
        return None
    blocks = cols // BLOCK
    if t.numel() == 1:
        return t.reshape(1, 1).expand(rows, blocks)
    t = t.reshape(rows, -1)
    return t.repeat_interleave(blocks // t.shape[1], dim=1)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[rows, blocks, 32]`` 4-bit codes -> ``[rows, blocks, 16]`` bytes (element i low, i + 16 high)."""
    codes = codes.to(torch.uint8)
    return codes[..., :16] | (codes[..., 16:] << 4)


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(*t.shape, 2)


@dataclass
class _Encoded:
    qtype: str
    data: torch.Tensor  # uint8 [rows, blocks * bytes per block]
    dequantized: torch.Tensor  # float32 [rows, cols]: what GGML reads back


def _encode(codes: torch.Tensor, qparams: QParams, qtype: str) -> _Encoded:
    """Our codes + natural qparams -> GGML blocks, and the weight GGML dequantizes them to."""
    rows, cols = codes.shape
    blocks = cols // BLOCK
    c = codes.reshape(rows, blocks, BLOCK)
    scale = _per_block(qparams.scale, rows, cols).float()
    if qtype == "MXFP4":
        exponent = torch.log2(scale).round()
        if not torch.equal(torch.exp2(exponent), scale):
            raise GGUFExportError("MXFP4 scales must be powers of two")
        e = (exponent + 127).clamp(0, 254).to(torch.uint8)
        data = torch.cat([e[..., None], _nibbles(c)], dim=-1)
        values = _e2m1_values(codes.device)[c.to(torch.int64)]
        deq = values * torch.exp2(exponent)[..., None]
        return _Encoded(qtype, data.reshape(rows, -1), deq.reshape(rows, cols))
    d = scale.to(torch.float16)
    if qtype == "Q4_0":
        data = torch.cat([_fp16_bytes(d), _nibbles(c.to(torch.int16) + 8)], dim=-1)
        deq = d.float()[..., None] * c.float()
    elif qtype == "Q8_0":
        data = torch.cat([_fp16_bytes(d), c.to(torch.int8).view(torch.uint8)], dim=-1)
        deq = d.float()[..., None] * c.float()
    elif qtype == "Q4_1":
        zp = _per_block(qparams.zero_point, rows, cols)
        zp = torch.zeros_like(scale) if zp is None else zp.float()
        m = (-zp * scale).to(torch.float16)
        data = torch.cat([_fp16_bytes(d), _fp16_bytes(m), _nibbles(c)], dim=-1)
        deq = d.float()[..., None] * c.float() + m.float()[..., None]
    else:  # pragma: no cover - _qtype_name only returns the types above
        raise GGUFExportError(f"unknown GGML type {qtype}")
    return _Encoded(qtype, data.reshape(rows, -1), deq.reshape(rows, cols))


def _e2m1_values(device: torch.device) -> torch.Tensor:
    """The 16 fp4 e2m1 values by code (OCP MX: sign bit 3, 2 exponent bits, 1 mantissa bit)."""
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], device=device)
    return torch.cat([mags, -mags])


# ---------------------------------------------------------------------------------------------
# q/k row permutation (llama.cpp's rotary layout)
# ---------------------------------------------------------------------------------------------
def _permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half row order -> llama.cpp's interleaved order, per head (rows only: every GGML
    block lies within one row, so the permutation moves whole encoded rows)."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


# ---------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------
def _rope_theta(config: Any) -> float | None:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None) or {}
        theta = params.get("rope_theta") if isinstance(params, dict) else None
    return None if theta is None else float(theta)


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _write_hparams(writer: Any, config: Any) -> None:
    for method, attr in _HPARAMS:
        value = getattr(config, attr, None)
        if value is not None:
            getattr(writer, method)(value)
    theta = _rope_theta(config)
    if theta is not None:
        writer.add_rope_freq_base(theta)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _copy_gguf_tokenizer(writer: Any, source: Path) -> None:
    """Every ``tokenizer.*`` key of another GGUF file (the one the model was loaded from)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype is gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def _write_hf_tokenizer(writer: Any, folder: Path) -> None:
    """A byte-level BPE tokenizer (``tokenizer.json``) as GGUF's ``gpt2`` tokenizer model."""
    from gguf.vocab import BpeVocab, SpecialVocab

    try:
        vocab = BpeVocab(folder)
    except Exception as exc:  # noqa: BLE001 - the gguf package raises plain errors for other kinds
        raise GGUFExportError(
            f"tokenizer_path={str(folder)!r}: only byte-level BPE tokenizers (tokenizer.json) or a .gguf file "
            f"to copy the tokenizer from are supported ({exc})"
        ) from None
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        types.append(int(ttype))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _tokenizer_source(model: nn.Module, tokenizer_path: str | os.PathLike | None) -> Path | None:
    if tokenizer_path is not None:
        path = Path(tokenizer_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"tokenizer_path={str(path)!r} does not exist")
        return path
    source = getattr(model, "_quark_source_gguf", None)
    return Path(source) if source else None


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------
def _float_tensor(t: torch.Tensor) -> tuple[np.ndarray, Any]:
    import gguf

    t = t.detach().cpu()
    if t.dim() <= 1 or t.dtype == torch.float32 or t.dtype == torch.float64:
        return t.float().numpy(), None
    if t.dtype == torch.float16:
        return t.numpy(), None
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16
    return t.float().numpy(), None


def _plan(model: nn.Module, arch: GgufArchitecture, strict: bool) -> tuple[list[tuple[str, np.ndarray, Any]], str]:
    """Every tensor to write ``(gguf name, array, raw dtype)``; checks everything before any file exists."""
    import gguf

    config = model.config
    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.arch), None)
    if arch_enum is None:
        raise GGUFExportError(f"the installed gguf package does not know the {arch.arch!r} architecture")
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    layers = dict(quantized_linears(model))
    tied = set(tied_keys(model))  # written once, under the first name
    heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads or config.num_attention_heads}

    refused: list[str] = []
    out: list[tuple[str, np.ndarray, Any]] = []
    worst = (0.0, "")
    counts: dict[str, int] = {}
    done: set[str] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        module, _, leaf = key.rpartition(".")
        owner = module if module in layers else module.rpartition(".")[0] if module.rpartition(".")[0] in layers else None
        if owner is not None and owner != module:
            continue  # a quantizer's buffer: the layer's qparams, written with its weight
        if key in tied:
            continue
        gname = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            refused.append(f"{key}: no GGUF tensor name for it in the {arch.arch!r} name map")
            continue
        role = "q" if gname.endswith(("attn_q.weight", "attn_q.bias")) else \
            "k" if gname.endswith(("attn_k.weight", "attn_k.bias")) else None
        layer = layers.get(owner) if owner is not None else None
        if layer is not None and leaf == "weight" and layer.weight_quantizer is not None and owner not in done:
            done.add(owner)
            spec = layer.weight_quantizer.spec
            qtype = _qtype_name(spec)
            if qtype is None:
                refused.append(f"{owner}: weight spec {_describe(spec)} has no GGML type")
                continue
            codes, qparams = layer.weight_codes_and_qparams()
            enc = _encode(codes, qparams, qtype)
            ours = dequantize(codes, spec, qparams, torch.float32)
            diff = (enc.dequantized - ours).abs().max().item()
            if diff > worst[0]:
                worst = (diff, owner)
            data, deq = enc.data, enc.dequantized
            if arch.permute_qk and role is not None:
                data = _permute_rows(data, heads[role])
            out.append((gname, data.cpu().numpy(), getattr(gguf.GGMLQuantizationType, qtype)))
            counts[qtype] = counts.get(qtype, 0) + 1
            del deq
            continue
        t = tensor.detach()
        if arch.permute_qk and role is not None:
            t = _permute_rows(t, heads[role])
        arr, raw = _float_tensor(t)
        out.append((gname, arr, raw))
    if refused:
        raise GGUFExportError(
            f"{len(refused)} tensors cannot be written as GGUF (nothing was written):\n  "
            + "\n  ".join(refused[:12]) + (f"\n  ... and {len(refused) - 12} more" if len(refused) > 12 else "")
            + f"\nSupported weight formats: {SUPPORTED}"
        )
    if worst[0] > 0:
        message = (
            f"GGUF stores scales as fp16: the largest weight change from rounding them is {worst[0]:.3g} "
            f"(layer {worst[1]}); quantize with scale_type=float16 (or an fp16 model) for an exact file"
        )
        if strict:
            raise GGUFExportError(message + " (strict=True)")
        logger.warning(message)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no quantized layers"
    return out, summary


def _describe(spec: Any) -> str:
    stages = spec if isinstance(spec, (list, tuple)) else [spec]
    parts = []
    for s in stages:
        bits = [s.dtype.value, s.qscheme.value if s.qscheme else "", f"g{s.group_size}" if s.group_size else "",
                "sym" if s.symmetric else "asym" if s.symmetric is False else "", "dynamic" if s.is_dynamic else ""]
        parts.append(" ".join(b for b in bits if b))
    return " + ".join(parts)


def _has_activation_quant(model: nn.Module) -> bool:
    return any(m.input_quantizer is not None or m.output_quantizer is not None for _, m in quantized_linears(model))


# ---------------------------------------------------------------------------------------------
# public
# ---------------------------------------------------------------------------------------------
def export_gguf(
    model: nn.Module,
    output_dir: str | os.PathLike,
    model_type: str | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    *,
    file_name: str | None = None,
    overwrite: bool = False,
    strict: bool = False,
) -> Path:
    """Write ``model`` (fake-quantized or frozen, or plain float) as one GGUF file.

    Args:
        model: a transformers causal LM of the llama family (:data:`GGUF_ARCHITECTURES`).
        output_dir: folder to write into (created if missing).
        model_type: the transformers model type (default: ``model.config.model_type``).
        tokenizer_path: where the tokenizer comes from: a ``.gguf`` file (its ``tokenizer.*`` keys are
            copied) or a Hugging Face folder with a byte-level BPE ``tokenizer.json``. Default: the GGUF
            file the model was loaded from (``load_model_and_tokenizer`` records it); with neither, the
            file has no tokenizer (llama.cpp then needs one from elsewhere).
        file_name: default ``<name_or_path stem>-<types>.gguf``, e.g. ``model-Q4_0.gguf``.
        overwrite: replace an existing file of that name.
        strict: refuse (instead of warning) when fp16 scales change any weight.

    Returns:
        The path of the written file. Writing is atomic (a temporary file renamed into place); any
        refusal happens before a byte is written.
    """
    import gguf

    mtype = model_type or getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in GGUF_ARCHITECTURES:
        raise GGUFExportError(
            f"model_type={mtype!r} has no GGUF export; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    arch = GGUF_ARCHITECTURES[mtype]
    rotated = online_rotated_layers(model)
    if rotated:
        raise GGUFExportError(
            f"{rotated[0]} (and {len(rotated) - 1} more) rotate their input online (rotation r4); GGUF cannot "
            "record it and llama.cpp would compute wrong outputs: quantize without r4, or export safetensors"
        )
    tok_source = _tokenizer_source(model, tokenizer_path)
    with torch.no_grad():
        tensors, summary = _plan(model, arch, strict)
    if _has_activation_quant(model):
        logger.warning("GGUF has no activation, KV-cache or attention quantization: only the weights are written")

    out_dir = Path(output_dir).expanduser()
    types = sorted({str(getattr(raw, "name", "F32")) for _, _, raw in tensors if raw is not None} - {"BF16"})
    name = file_name or f"model-{'-'.join(types) or 'F32'}.gguf"
    target = out_dir / name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        writer = gguf.GGUFWriter(str(tmp), arch.arch)
        writer.add_name(str(getattr(model.config, "_name_or_path", "") or mtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_hparams(writer, model.config)
        if tok_source is not None:
            if tok_source.is_file() and tok_source.suffix.lower() == ".gguf":
                _copy_gguf_tokenizer(writer, tok_source)
            else:
                _write_hf_tokenizer(writer, tok_source if tok_source.is_dir() else tok_source.parent)
        for gname, arr, raw in tensors:
            writer.add_tensor(gname, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s)", target, summary)
    return target
