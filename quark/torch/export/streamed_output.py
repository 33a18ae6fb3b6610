"""The streamed flow's output folder: one decoder block's exported tensors at a time, resumable.

:class:`StreamedOutput` writes into ``<dst>.partial/``: each finished block's tensors (the export's
own names and layouts, :func:`.writing.plan_export`) in ``.blocks/<index>/``, the part of the model
outside the decoder stack in ``.rest/``, and after each block a ``progress.json`` record (the block's
files with size and sha256, the sha256 of the source tensors it was computed from) plus the next
block's inputs (``inputs.pt``, tensors only, loaded with ``weights_only=True``). :meth:`finish` names
the files ``model-0000j-of-0000n.safetensors``, writes the index, config.json and the tokenizer files
copied from the source, and renames the folder into place (replacing an old ``dst`` only then).

The record sits under a hash of the run (:func:`run_hash`: QConfig, export settings, the calibration
tokens, the source's config.json, index and resident tensor data, the device type, the versions). A
rerun with the same hash resumes after the last block whose inputs were recorded, once every block
before it is checked (its files present with their size, its source tensors' data unchanged);
anything else starts over, with a warning saying why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .file2file import OutputExistsError, files_present, publish, save_progress, write_record_folder
from .source_checkpoint import SourceCheckpoint
from .writing import ExportPlan, check_calibrated, quark_version, write_config_files

__all__ = ["StreamedOutput", "run_hash", "check_destination", "PROGRESS_NAME", "INPUTS_NAME"]

logger = logging.getLogger(__name__)

#: bump when the partial-folder layout or the flow changes (invalidates old partial folders)
FORMAT = "quark-streamed/1"
PROGRESS_NAME = "progress.json"
INPUTS_NAME = "inputs.pt"
_BLOCKS_DIR = ".blocks"
_REST_DIR = ".rest"


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """``dst`` may be written: not ``src``, not inside it, not containing it, not a file, and empty
    unless ``overwrite`` (:class:`~.file2file.OutputExistsError`). Checked before anything is read."""
    s, d = src.resolve(), dst.resolve()
    if s == d:
        raise ValueError(f"dst_dir {dst} is the source folder: write the quantized checkpoint elsewhere")
    if s in d.parents:
        raise ValueError(f"dst_dir {dst} is inside the source folder {src}: write the quantized checkpoint elsewhere")
    if d in s.parents:
        raise ValueError(f"dst_dir {dst} contains the source folder {src} (replacing it would delete the source): "
                         "write the quantized checkpoint elsewhere")
    if dst.exists() and not dst.is_dir():
        raise OutputExistsError(f"{dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise OutputExistsError(f"{dst} exists and is not empty; pass overwrite=True to replace it")


def _hash_obj(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"K{k}".encode())
            _hash_obj(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for o in obj:
            _hash_obj(h, o)
    else:
        h.update(f"V{obj!r}".encode())


def run_hash(qconfig: dict[str, Any], settings: dict[str, Any], batches: Any, source: SourceCheckpoint,
             model: nn.Module, stack: str, device: torch.device) -> str:
    """What a resumed run must share with the run it continues: the QConfig (as a dict), the export
    ``settings``, the calibration ``batches`` (their tensors' data), the source's config.json, index
    (names, shapes) and the data of the tensors outside the decoder ``stack``, the device type and the
    quark / torch versions. The blocks' own source tensors are checked block by block on resume."""
    h = hashlib.sha256()
    h.update(json.dumps({
        "format": FORMAT, "version": quark_version(), "torch": torch.__version__, "qconfig": qconfig,
        "settings": settings, "device": device.type, "source_config": source.config,
        "index": sorted((k, list(source.shape(k))) for k in source.weight_map),
    }, sort_keys=True, default=str).encode())
    _hash_obj(h, batches)
    h.update(source.digest(model, [""], exclude=[stack]).encode())
    return h.hexdigest()


class StreamedOutput:
    """The partial output folder of one streamed run (see the module docstring)."""

    def __init__(self, dst: Path, source: SourceCheckpoint, plan: ExportPlan, run_hash: str, limit: int) -> None:
        self.dst, self.source, self.plan, self.limit = dst, source, plan, limit
        self.partial = dst.with_name(dst.name + ".partial")
        self.progress = self._load_progress(run_hash)
        self._save_progress()

    # -- progress ----------------------------------------------------------------------------------
    def _load_progress(self, run_hash: str) -> dict[str, Any]:
        fresh = {"format": FORMAT, "run_hash": run_hash, "blocks": {}, "next": None}
        if self.partial.exists():
            try:
                progress = json.loads((self.partial / PROGRESS_NAME).read_text())
                if progress.get("format") == FORMAT and progress.get("run_hash") == run_hash:
                    return progress
                why = "it was started with other settings, calibration data or source weights"
            except (OSError, json.JSONDecodeError, AttributeError):
                why = "no usable progress record"
            logger.warning("%s: starting over (%s)", self.partial, why)
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        return fresh

    def _save_progress(self) -> None:
        save_progress(self.partial, self.progress)

    def _restart(self, why: str) -> None:
        logger.warning("%s: starting over (%s)", self.partial, why)
        self.progress["blocks"], self.progress["next"] = {}, None
        shutil.rmtree(self.partial / _BLOCKS_DIR, ignore_errors=True)
        (self.partial / INPUTS_NAME).unlink(missing_ok=True)
        self._save_progress()

    # -- blocks ------------------------------------------------------------------------------------
    def write_block(self, index: int, prefix: str, block: nn.Module) -> None:
        """Write finished block ``index`` (module path ``prefix``) and record it."""
        check_calibrated(block)
        folder = self.partial / _BLOCKS_DIR / f"{index:05d}"
        record = write_record_folder(self.plan.tensors(lambda key: _under(key, prefix)), folder, self.limit)
        record["prefix"] = prefix
        record["source"] = self.source.digest(self.source.model, [prefix])
        self.progress["blocks"][str(index)] = record
        self._save_progress()

    def save_inputs(self, index: int, payload: dict[str, Any]) -> None:
        """Record block ``index``'s inputs (the run resumes here if it stops before the next record)."""
        tmp = self.partial / f".{INPUTS_NAME}.{uuid.uuid4().hex[:8]}"
        torch.save({"index": index, **_to_cpu(payload)}, tmp)
        os.replace(tmp, self.partial / INPUTS_NAME)
        self.progress["next"] = index
        self._save_progress()

    def resume_inputs(self, model: nn.Module, done_before: Callable[[int], list[str]]
                      ) -> tuple[int, dict[str, Any]] | None:
        """``(block index, recorded inputs)`` to resume at, after checking the blocks before it
        (``done_before(index)``: their module paths); None: start from the first block."""
        nxt = self.progress.get("next")
        if nxt is None or not (self.partial / INPUTS_NAME).is_file():
            return None
        records = {r.get("prefix"): (int(i), r) for i, r in self.progress["blocks"].items()}
        for prefix in done_before(nxt):
            if prefix not in records:
                return self._restart(f"no record of {prefix}")
            i, record = records[prefix]
            if not files_present(self.partial / _BLOCKS_DIR / f"{i:05d}", record):
                return self._restart(f"the files of {prefix} are missing or truncated")
            if record.get("source") != self.source.digest(model, [prefix]):
                return self._restart(f"the source tensors of {prefix} changed since they were quantized")
        saved = torch.load(self.partial / INPUTS_NAME, map_location="cpu", weights_only=True)
        if saved.get("index") != nxt:
            return self._restart("the recorded inputs belong to another block")
        logger.info("resuming %s at block %d", self.partial, nxt)
        return nxt, saved

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, model: nn.Module, stack: str, n_blocks: int) -> Path:
        """Write the part of ``model`` outside ``stack``, the index, config.json and the tokenizer
        files, and rename the folder into place; returns ``dst``."""
        check_calibrated(model, skip=stack)
        rest = write_record_folder(self.plan.tensors(lambda key: not _under(key, stack)), self.partial / _REST_DIR,
                             self.limit)
        records = [(self.partial / _REST_DIR, rest)]
        for i in range(n_blocks):
            record = self.progress["blocks"].get(str(i))
            if record is None:  # pragma: no cover - a driver bug
                raise RuntimeError(f"block {i} of {stack} was not written")
            records.append((self.partial / _BLOCKS_DIR / f"{i:05d}", record))
        publish(self.partial, self.dst, records, self.source.folder,
                lambda folder: write_config_files(model, folder, self.plan.quantization_config, None),
                [_BLOCKS_DIR, _REST_DIR, PROGRESS_NAME, INPUTS_NAME])
        return self.dst


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    return obj
