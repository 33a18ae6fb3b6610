"""Check that a model-level transform kept the float model's function (rotation must).

A rotation config names the modules that read and write the residual stream; one it misses (a
post-norm on an attention output, a layer reading the stream that the roles do not list) leaves a
model that computes something else, which no later step would notice. The quantizer therefore runs
the float model (quantizers off) on a slice of the first calibration batch before and after
:meth:`~quark.torch.algorithm.BlockAlgorithm.prepare_model` and compares the logits.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from quark.torch.quantization.driver import _no_cache, call_model, module_device

from . import quantizers_off

logger = logging.getLogger(__name__)

#: tokens of the probe (the first sequence of the first calibration batch, text inputs only)
PROBE_TOKENS = 32


def probe_batch(batch: Any) -> Any:
    """The first sequence's first :data:`PROBE_TOKENS` tokens of a text batch (every tensor of the
    dict shaped like ``input_ids``); any other batch unchanged (images, custom inputs)."""
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
        return batch
    ids = batch["input_ids"]
    if ids.dim() != 2 or not all(isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape[:2] for v in batch.values()):
        return batch
    return {k: v[:1, :PROBE_TOKENS] for k, v in batch.items()}


def float_logits(model: nn.Module, batch: Any) -> torch.Tensor | None:
    """The float model's logits (float32) on ``batch``, or None when its forward fails on it (a
    multimodal model whose own forward cannot run on text: the check is skipped)."""
    try:
        with torch.no_grad(), quantizers_off(model):
            out = call_model(model, _no_cache(model, batch), module_device(model))
    except Exception as exc:  # noqa: BLE001 - any failure only means "cannot check"
        logger.info("float check skipped: the model's forward failed on a calibration batch (%s)", exc)
        return None
    value = getattr(out, "logits", None)
    if value is None:
        value = out[0] if isinstance(out, (tuple, list)) else out
    return value.detach().float() if isinstance(value, torch.Tensor) else None


def tolerance(model: nn.Module) -> float:
    """Relative logit change allowed: float32 weights rounded after a float64 transform move logits by
    ~1e-6; half-precision weights by up to a few 1e-3 (a wrong role moves them by 1e-1 or more)."""
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def check_unchanged(before: torch.Tensor | None, after: torch.Tensor | None, tol: float, what: str) -> float | None:
    """Raise when ``after`` differs from ``before`` by more than ``tol`` (relative); returns the
    difference (None when either is missing)."""
    if before is None or after is None:
        return None
    if before.shape != after.shape:
        raise ValueError(f"{what} changed the shape of the model's logits: {tuple(before.shape)} -> {tuple(after.shape)}")
    diff = float((after - before).norm() / before.norm().clamp_min(1e-30))
    if not diff <= tol:  # (NaN fails too)
        raise ValueError(
            f"{what} changed the float model's function: its logits on a calibration batch moved by {diff:.3g} "
            f"(relative; at most {tol:g} expected). The roles of its config miss a module that reads or writes the "
            "residual stream, or a norm that does not commute with it (e.g. a post-norm on an attention output). "
            "The model was changed in place: reload it before trying again."
        )
    logger.info("%s kept the float model: logits moved by %.2g (relative) on a calibration batch", what, diff)
    return diff
