"""Preparing a model for quantization: its ``nn.Linear`` layers swapped for :class:`.modules.QuantLinear`
as a :class:`~.config.config.QConfig` resolves them.

:func:`swap_linears` is the one layer resolution (exclude > layer pattern > layer type > global) shared by
``ModelQuantizer.quantize_model`` and file-to-file quantization (``quark.torch.export.file2file``, which
applies it to a model built on the ``meta`` device).
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from .config.config import QConfig, QLayerConfig, first_stage
from .config.type import QSchemeType
from .modules import QuantLinear

__all__ = ["check_layer_shapes", "swap_linears"]

logger = logging.getLogger(__name__)


def check_layer_shapes(name: str, linear: Any, cfg: QLayerConfig) -> None:
    """Group sizes must divide the dimension they group: fail before any work is done. ``linear``: anything
    with ``in_features`` and ``out_features``."""
    for role, spec, dim, dim_name in (
        ("weight", cfg.weight, linear.in_features, "in_features"),
        ("input_tensors", cfg.input_tensors, linear.in_features, "in_features"),
        ("output_tensors", cfg.output_tensors, linear.out_features, "out_features"),
    ):
        s = first_stage(spec)
        if s is not None and s.qscheme is QSchemeType.per_group and s.group_size and dim % s.group_size:
            raise ValueError(
                f"layer {name!r}: {role} group_size={s.group_size} does not divide {dim_name}={dim}; "
                "choose a group size that divides it or exclude the layer (exclude_layers=[...])"
            )


def swap_linears(model: nn.Module, config: QConfig) -> int:
    """Replace, in place, every ``nn.Linear`` of ``model`` that ``config`` quantizes by a fake-quantized
    :class:`.modules.QuantLinear` around the same weight (KV-cache layers get ``config.min_kv_scale``);
    layers already quantized, excluded or with an empty config stay. Returns the number swapped.

    The config of each layer is ``config.resolve(name, type)``: exclude > layer pattern > layer type >
    global. Group sizes that do not divide their dimension raise ``ValueError`` before any layer is
    swapped.
    """
    todo: list[tuple[str, nn.Linear, QLayerConfig]] = []
    excluded = 0
    for name, module in model.named_modules():
        if type(module) is not nn.Linear and not (isinstance(module, nn.Linear) and not isinstance(module, QuantLinear)):
            continue
        layer_cfg = config.resolve(name, type(module))
        if layer_cfg is None:
            excluded += 1
            continue
        if layer_cfg.is_empty:
            continue
        check_layer_shapes(name, module, layer_cfg)
        todo.append((name, module, layer_cfg))
    for name, module, layer_cfg in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        is_kv = config.kv_cache_config(name) is not None
        setattr(parent, child, QuantLinear.from_linear(module, layer_cfg, config.min_kv_scale if is_kv else 0.0))
    if not todo:
        logger.warning("no layer was quantized: no nn.Linear matched the config (%d excluded)", excluded)
    else:
        logger.info("quantizing %d linear layers (%d excluded)", len(todo), excluded)
    return len(todo)
