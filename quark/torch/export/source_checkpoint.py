"""A float Hugging Face checkpoint read one module at a time (the streamed flow's input).

:class:`SourceCheckpoint` opens a checkpoint folder (config.json plus ``model.safetensors`` or sharded
files with ``model.safetensors.index.json``), checks it before anything is computed or written, builds
the model's skeleton (parameters on the ``meta`` device, no memory; buffers computed as the model's
``__init__`` computes them) and loads the tensors of one module (the embeddings, one decoder block ...)
into it on demand, memory-mapped, shard by shard.

The mapping from checkpoint names to the model's parameters is transformers' own: the model class's
weight-conversion mapping (renamings, per-expert tensors merged into fused MoE parameters) applied by
transformers' loader to the tensors of that module only, so a module loads exactly the values
``from_pretrained`` gives it. Pickle checkpoints (``pytorch_model.bin``) are refused, never unpickled.

:meth:`SourceCheckpoint.digest` hashes the data of the tensors that load one module: the streamed flow's
resume record identifies its source by content with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .reading import read_config_json
from .safetensors_io import INDEX_NAME, SINGLE_NAME, CheckpointError, read_index

__all__ = ["SourceCheckpoint"]

logger = logging.getLogger(__name__)

_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def _mapping(model: nn.Module) -> list[Any]:
    """transformers' weight conversions of ``model``'s class (empty for older transformers)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # pragma: no cover - transformers < 5
        return []
    return list(get_model_conversion_mapping(model, None, None) or [])


class SourceCheckpoint:
    """A float safetensors checkpoint folder, loaded module by module into a meta skeleton.

    >>> src = SourceCheckpoint("Llama-3-8B")            # checks the folder, reads no tensor data
    >>> model = src.skeleton()                           # parameters on meta
    >>> src.load(model, ["model.layers.0"], "cuda")      # block 0's float weights, as from_pretrained
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder (give a Hugging Face checkpoint folder)")
        self.config = read_config_json(self.folder, "a Hugging Face checkpoint folder")
        if self.config.get("quantization_config"):
            method = (self.config["quantization_config"] or {}).get("quant_method", "?")
            raise ValueError(f"{self.folder / 'config.json'}: the checkpoint is already quantized "
                             f"(quant_method={method!r}); the streamed flow quantizes a float checkpoint")
        has_safetensors = (self.folder / INDEX_NAME).is_file() or (self.folder / SINGLE_NAME).is_file() \
            or any(self.folder.glob("*.safetensors"))
        if not has_safetensors:
            pickles = [p for p in _PICKLES if (self.folder / p).exists()] + [p.name for p in self.folder.glob("*.bin")]
            if pickles:
                raise CheckpointError(
                    f"{self.folder}: holds pickle weights only ({sorted(set(pickles))[0]}), which quark never unpickles "
                    "(loading a pickle can run arbitrary code); convert the checkpoint to safetensors first, e.g. "
                    "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir) in a trusted environment")
            raise CheckpointError(f"{self.folder}: no safetensors weights ({INDEX_NAME} or {SINGLE_NAME})")
        self.weight_map, _ = read_index(self.folder)  # names every missing shard
        self._shapes = self._read_headers()
        self._targets: dict[str, str] | None = None
        self._model: nn.Module | None = None

    # -- checks ------------------------------------------------------------------------------------
    def _read_headers(self) -> dict[str, tuple[int, ...]]:
        """Every shard opens and holds the tensors the index gives it (headers only)."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        shapes: dict[str, tuple[int, ...]] = {}
        for shard, names in sorted(by_shard.items()):
            path = self.folder / shard
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
                    lacking = [n for n in names if n not in keys]
                    if lacking:
                        raise CheckpointError(f"{path}: tensors listed in {INDEX_NAME} are missing: {lacking[:5]}")
                    for n in names:
                        shapes[n] = tuple(f.get_slice(n).get_shape())
                size = path.stat().st_size
            except CheckpointError:
                raise
            except Exception as exc:  # safetensors' own error type: bad header, truncated file
                raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})") from None
            if size <= 8:
                raise CheckpointError(f"{path}: truncated")
        return shapes

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of checkpoint tensor ``key`` (from the header)."""
        return self._shapes[key]

    @property
    def model(self) -> nn.Module | None:
        """The skeleton :meth:`skeleton` built last."""
        return self._model

    # -- the model ---------------------------------------------------------------------------------
    def skeleton(self) -> nn.Module:
        """The model of config.json with every parameter on ``meta`` (no memory) and its buffers
        computed as usual (rotary frequencies ...), in the config's dtype."""
        from accelerate import init_empty_weights

        from .reading import build_model

        with init_empty_weights(include_buffers=False):
            model = build_model(self.folder)
        model.eval()
        self._model = model
        return model

    def _key_targets(self, model: nn.Module) -> dict[str, str]:
        """Checkpoint name -> the model state name it loads (through renamings and converters)."""
        if self._targets is not None and self._model is model:
            return self._targets
        expected = model.state_dict(keep_vars=True)
        targets: dict[str, str] = {}
        try:
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError:  # pragma: no cover - transformers < 5
            targets = {k: k for k in self.weight_map}
        else:
            mapping = _mapping(model)
            renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
            converters = [m for m in mapping if isinstance(m, WeightConverter)]
            prefix = getattr(model, "base_model_prefix", None)
            for key in self.weight_map:
                target, _ = rename_source_key(key, renamings, converters, prefix, expected)
                if target not in expected and key in expected:
                    target = key
                targets[key] = target
        self._targets, self._model = targets, model
        return targets

    def keys_for(self, model: nn.Module, prefixes: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
        """Checkpoint names whose tensors load the state under ``prefixes`` (module paths; ``""`` is the
        whole model) and not under ``exclude``."""
        prefixes, exclude = list(prefixes), list(exclude)

        def under(name: str, paths: list[str]) -> bool:
            return any(p == "" or name == p or name.startswith(p + ".") for p in paths)

        return [k for k, t in self._key_targets(model).items() if under(t, prefixes) and not under(t, exclude)]

    @contextlib.contextmanager
    def _open(self, keys: Iterable[str]) -> Iterator[dict[str, Any]]:
        """The shards holding ``keys``, memory-mapped while entered."""
        from safetensors import safe_open

        handles: dict[str, Any] = {}
        try:
            for shard in sorted({self.weight_map[k] for k in keys}):
                handles[shard] = safe_open(str(self.folder / shard), framework="pt", device="cpu")
            yield handles
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)

    def close(self) -> None:
        """Nothing stays open between calls (kept for callers that close a source)."""

    def load(self, model: nn.Module, prefixes: Iterable[str], device: torch.device | str | None,
             exclude: Iterable[str] = ()) -> None:
        """Load the float tensors of the modules at ``prefixes`` (but those under ``exclude``) into
        ``model`` on ``device``, with transformers' loader (its renamings and converters, the dtypes of
        the skeleton); their other buffers move to ``device``. :class:`CheckpointError` naming a
        parameter the checkpoint does not give."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        prefixes, exclude = list(prefixes), list(exclude)
        device = torch.device(device) if device is not None else torch.device("cpu")
        keys = self.keys_for(model, prefixes, exclude)
        config = LoadStateDictConfig(device_map={"": device}, weight_mapping=_mapping(model), dtype=None)
        if keys:
            with self._open(keys) as handles:  # unmapped after the call: the pages read leave the RSS
                state = {k: handles[self.weight_map[k]].get_slice(k) for k in keys}
                info, _ = convert_and_load_state_dict_in_model(model, state, config)
                del state
            if info.mismatched_keys:
                name, got, want = sorted(info.mismatched_keys)[0]
                raise CheckpointError(f"{self.folder}: {name} has shape {tuple(got)} in the checkpoint, the model "
                                      f"built from config.json expects {tuple(want)}")
        tied = _tied(model)
        for prefix in prefixes:
            module = model.get_submodule(prefix) if prefix else model
            for name, p in list(module.named_parameters(recurse=True, remove_duplicate=False)):
                full = f"{prefix}.{name}" if prefix else name
                if any(full == e or full.startswith(e + ".") for e in exclude):
                    continue
                if p.device.type == "meta" and full not in tied:
                    raise CheckpointError(f"{self.folder}: no tensor for the model's {full} in the checkpoint")
            for sub in module.modules():
                for bname, b in list(sub._buffers.items()):
                    if b is not None and b.device.type != "meta" and b.device != device:
                        sub._buffers[bname] = b.to(device)

    def digest(self, model: nn.Module, prefixes: Iterable[str], exclude: Iterable[str] = ()) -> str:
        """sha256 over the names, dtypes, shapes and data of the checkpoint tensors that load
        ``prefixes`` (reads them: about a second per GB)."""
        h = hashlib.sha256()
        keys = sorted(self.keys_for(model, prefixes, exclude))
        with self._open(keys) as handles:
            for key in keys:
                t = handles[self.weight_map[key]].get_tensor(key)
                h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\0".encode())
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del t
        return h.hexdigest()


def _tied(model: nn.Module) -> set[str]:
    """Parameter names tied to another parameter (transformers' ``all_tied_weights_keys`` targets), and
    the sources: the checkpoint may hold either."""
    keys = getattr(model, "all_tied_weights_keys", None) or {}
    return set(keys) | set(keys.values()) if isinstance(keys, dict) else set()
