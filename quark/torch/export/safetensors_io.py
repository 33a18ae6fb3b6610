"""Sharded safetensors folders: atomic writing and checked reading.

Layout (as transformers writes it): ``model-0000N-of-0000M.safetensors`` shards (always with an
index, even for one shard) and ``model.safetensors.index.json`` holding ``weight_map`` (tensor name
-> shard) and ``metadata``: ``total_size`` in bytes and, ours only, ``sha256`` per shard, which
:func:`load_tensors` checks so a corrupt shard is reported by name instead of loading garbage.

Writing is atomic: everything goes into a temporary sibling folder that is renamed into place at
the end (:func:`atomic_directory`); on any error the temporary folder is removed and an existing
output is left untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "INDEX_NAME",
    "CheckpointError",
    "atomic_directory",
    "parse_size",
    "write_shards",
    "read_index",
    "load_tensors",
]

#: transformers' ``save_pretrained`` default
DEFAULT_MAX_SHARD_SIZE = "50GB"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file, or a file is truncated, corrupt or inconsistent."""


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or ``"50GB"`` (powers of 10) / ``"5GiB"`` (powers of 2) as transformers."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} must be positive")
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size={size!r}: give bytes or a size like '50GB', '500MB', '5GiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@contextlib.contextmanager
def atomic_directory(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``output_dir`` when the block succeeds.

    Raises ``FileExistsError`` before anything is written when ``output_dir`` is a non-empty folder
    and ``overwrite`` is False (an empty folder is fine), or when it is a file.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> dict:
    """Write ``(name, tensor)`` pairs (in order) as shards of at most ``max_shard_size`` bytes (a tensor
    larger than that gets a shard of its own) plus the index; returns the index. Tensors are copied to
    CPU shard by shard, so at most one shard is held in memory."""
    from safetensors.torch import save_file

    folder = Path(folder)
    limit = parse_size(max_shard_size)
    weight_map: dict[str, str] = {}
    shard_files: list[Path] = []
    current: dict[str, torch.Tensor] = {}
    storages: set[int] = set()  # storages already in the current shard
    current_size = 0
    total = 0

    def flush() -> None:
        nonlocal current, current_size
        storages.clear()
        if not current:
            return
        path = folder / f"model-{len(shard_files) + 1:05d}.partial"
        save_file(current, str(path), metadata={"format": "pt"})
        shard_files.append(path)
        for name in current:
            weight_map[name] = path.name
        current, current_size = {}, 0

    for name, tensor in tensors:
        if name in weight_map or name in current:
            raise ValueError(f"tensor name {name!r} is written twice")
        t = tensor.detach().to("cpu").contiguous()
        size = _nbytes(t)
        if current and current_size + size > limit:
            flush()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share memory or view part of a larger buffer: copy those
        if storage.nbytes() != size or storage.data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        current[name] = t
        current_size += size
        total += size
    flush()
    n = len(shard_files)
    renames: dict[str, str] = {}
    digests: dict[str, str] = {}
    for i, path in enumerate(shard_files, start=1):
        final = folder / f"model-{i:05d}-of-{n:05d}.safetensors"
        path.rename(final)
        renames[path.name] = final.name
        digests[final.name] = _sha256(final)
    index = {
        "metadata": {"total_size": total, "sha256": digests},
        "weight_map": {k: renames[v] for k, v in sorted(weight_map.items())},
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return index


def read_index(folder: str | os.PathLike) -> tuple[dict[str, str], dict]:
    """``(weight_map, metadata)`` of a checkpoint folder (sharded with an index, or one model.safetensors)."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from None
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"{folder / shard}: shard listed in {INDEX_NAME} is missing")
        return weight_map, dict(index.get("metadata") or {})
    single = folder / SINGLE_NAME
    if single.is_file():
        return {name: SINGLE_NAME for name in _keys(single)}, {}
    raise CheckpointError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME} found")


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error type for bad headers / truncation
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})") from None


def load_tensors(folder: str | os.PathLike, device: torch.device | str = "cpu", verify: bool = True
                 ) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, checked: every indexed tensor is present in its shard and,
    with ``verify``, every shard matches the sha256 recorded at export (when there is one)."""
    from safetensors import safe_open

    folder = Path(folder)
    weight_map, metadata = read_index(folder)
    digests = metadata.get("sha256") or {}
    by_file: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_file.setdefault(shard, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for shard, names in by_file.items():
        path = folder / shard
        if verify and shard in digests and _sha256(path) != digests[shard]:
            raise CheckpointError(f"{path}: checksum mismatch (the shard is corrupt or was modified after export)")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                present = set(f.keys())
                missing = [n for n in names if n not in present]
                if missing:
                    raise CheckpointError(f"{path}: tensors listed in the index are missing: {missing[:5]}")
                for name in names:
                    out[name] = f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})") from None
    return out
