"""Quantization algorithms, one module per algorithm.

An algorithm works on one decoder block at a time: ``apply(block, inputs, index, config)`` where
``inputs`` are the block's cached calibration inputs (:class:`~quark.torch.quantization.driver.BlockInputs`).
It knows nothing of model classes; where to act comes from its config (template data).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: name -> apply(block, inputs, index, config, context) ; filled by the algorithm modules
ALGORITHMS: dict[str, Callable[..., Any]] = {}


def get_algorithm(name: str) -> Callable[..., Any]:
    if name not in ALGORITHMS:
        raise NotImplementedError(
            f"algorithm {name!r} is configured but not implemented in this version of quark "
            f"(implemented: {', '.join(ALGORITHMS) or 'none'}); remove it from algorithm=/algo_config"
        )
    return ALGORITHMS[name]
