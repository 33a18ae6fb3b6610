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
    """The first sequence's first :data:`PROBE_TOKENS` tokens of a text batch: a ``[batch, seq]``
    token tensor (or a list / tuple holding one), or a dict whose tensors are all shaped like its
    ``input_ids`` (other values kept); any other batch unchanged (images, custom inputs)."""
    def text(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point()

    if text(batch):
        return batch[:1, :PROBE_TOKENS]
    if isinstance(batch, (list, tuple)) and len(batch) == 1 and text(batch[0]):
        return type(batch)([batch[0][:1, :PROBE_TOKENS]])
    if not isinstance(batch, dict) or not text(batch.get("input_ids")):
        return batch
    shape = batch["input_ids"].shape
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if not all(v.dim() >= 2 and v.shape[:2] == shape for v in tensors):
        return batch
    return {k: v[:1, :PROBE_TOKENS] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def float_logits(model: nn.Module, batch: Any, required: bool = False) -> torch.Tensor | None:
    """The float model's logits (float32, on the CPU; of a batch that could not be sliced, the first
    sequence's last :data:`PROBE_TOKENS` positions) on ``batch``. When the forward fails: None (a
    multimodal model whose own forward cannot run on text: the check is skipped), or with
    ``required`` (the forward ran before the transform) the error, naming the transform's effect."""
    try:
        with torch.no_grad(), quantizers_off(model):
            out = call_model(model, _no_cache(model, batch), module_device(model))
    except Exception as exc:  # noqa: BLE001 - before the transform any failure only means "cannot check"
        if required:
            raise RuntimeError(f"the model's forward ran before the transform and fails after it: {exc}") from exc
        logger.info("float check skipped: the model's forward failed on a calibration batch (%s)", exc)
        return None
    value = getattr(out, "logits", None)
    if value is None:
        value = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(value, torch.Tensor):
        if required:
            raise RuntimeError(f"the model's forward returned logits before the transform and a {type(value).__name__} after it")
        return None
    if value.dim() == 3:
        value = value[:1, -PROBE_TOKENS:]
    return value.detach().float().cpu()


def tolerances(model: nn.Module) -> tuple[float, float]:
    """``(warn, refuse)`` bounds of the relative logit change. Float32 weights, rounded after a float64
    transform, move logits by ~1e-6: both 1e-3. Half-precision weights are rounded again after the
    rotation, and folding the norms into them changes which weights the rounding hits: SmolLM2 in
    bfloat16 moved by 0.02-0.07 with correct roles (0.012 for bfloat16 against float32 alone), so
    there a change above 0.05 only warns and the check refuses above 0.3 (a missing role moves
    logits by order 1)."""
    half = any(p.is_floating_point() and p.dtype not in (torch.float32, torch.float64) for p in model.parameters())
    return (5e-2, 0.3) if half else (1e-3, 1e-3)


def check_unchanged(before: torch.Tensor | None, after: torch.Tensor | None, bounds: tuple[float, float],
                    what: str) -> float | None:
    """Raise when ``after`` differs from ``before`` by more than ``bounds[1]`` (relative), warn above
    ``bounds[0]``; returns the difference (None when there is nothing to compare)."""
    if before is None or after is None:
        return None
    warn, refuse = bounds
    if before.shape != after.shape:
        raise ValueError(f"{what} changed the shape of the model's logits: {tuple(before.shape)} -> {tuple(after.shape)}")
    diff = float((after - before).norm() / before.norm().clamp_min(1e-30))
    if not diff <= refuse:  # (NaN fails too)
        raise ValueError(
            f"{what} changed the float model's function: its logits on a calibration batch moved by {diff:.3g} "
            f"(relative; at most {refuse:g} expected). The roles of its config miss a module that reads or writes the "
            "residual stream, or a norm that does not commute with it (e.g. a post-norm on an attention output). "
            "The model was changed in place: reload it before trying again."
        )
    if diff > warn:
        logger.warning("%s moved the float model's logits by %.3g (relative) on a calibration batch: more than the "
                       "%g a float32 model shows, within what half-precision rounding of the transformed weights "
                       "gives; compare the quantized model's accuracy with and without it", what, diff, warn)
    else:
        logger.info("%s kept the float model: logits moved by %.2g (relative) on a calibration batch", what, diff)
    return diff
