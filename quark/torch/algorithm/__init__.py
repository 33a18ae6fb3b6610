"""Quantization algorithms, one module per algorithm (``quark/torch/algorithm/<name>.py``).

An algorithm works on one decoder block at a time and knows nothing of model classes: where to act
comes from its config (template data, layer names relative to the block). The quantizer's block
loop (``quark.torch.quantization.api``) calls, for every configured algorithm in order:

1. ``prepare_model(model, config)`` once, before calibration inputs are captured (model-level
   transforms such as rotation that must also change embeddings / lm_head);
2. ``apply(ctx, config)`` for each block, with the block on the compute device, its weights still
   float, its weight quantizers ready and activation quantizers not yet calibrated.

After the algorithms, the loop recomputes the block's weight qparams from the (possibly changed)
weights, calibrates static activation quantizers, and runs the block to produce the next block's
inputs, inside every algorithm's ``output_pass(ctx, config)`` context (GPTQ replays the attention
outputs it already computed with the final weights).

Each algorithm module defines ``ALGORITHM = <BlockAlgorithm subclass>()``; :func:`get_algorithm`
imports it on first use.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from quark.torch.quantization.config.algo_configs import AlgoConfig
from quark.torch.quantization.driver import BlockInputs, run_block
from quark.torch.quantization.modules import QuantLinear
from quark.torch.quantization.tensor_quantizer import TensorQuantizer

#: algorithm name -> module implementing it
MODULES = {
    "awq": "awq",
    "gptq": "gptq",
    "gptaq": "gptaq",
    "smoothquant": "smoothquant",
    "autosmoothquant": "autosmoothquant",
    "qronos": "qronos",
    "rotation": "rotation",
}


@dataclass
class BlockContext:
    """What an algorithm gets for one block."""

    block: nn.Module
    index: int
    #: the block's calibration inputs as the quantized model produces them (quantized stream)
    inputs: BlockInputs
    #: the same inputs as the float model produces them (only when an algorithm asks for it)
    float_hidden: list[torch.Tensor] | None = None
    #: an algorithm's own state between its calls for this block (``apply`` -> ``output_pass``)
    scratch: dict = field(default_factory=dict)

    def run(self, hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run the block on the cached inputs (``hidden`` replaces the hidden states)."""
        return run_block(self.block, self.inputs, self.index, hidden)

    def linears(self, patterns: list[str] | None = None) -> dict[str, QuantLinear]:
        """The block's quantized linears by relative name, optionally filtered by fnmatch patterns."""
        out = {}
        for name, m in self.block.named_modules():
            if isinstance(m, QuantLinear) and (
                patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)
            ):
                out[name] = m
        return out

    def module(self, name: str) -> nn.Module:
        try:
            return self.block.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"block {self.index} has no module {name!r}: check the algorithm config's layer names "
                "(they are relative to one decoder block)"
            ) from None


class BlockAlgorithm:
    """Base class of the algorithms."""

    name: str = ""
    #: whether ``apply`` needs ``ctx.float_hidden`` (the float model's inputs to this block)
    needs_float_stream: bool = False
    #: whether ``apply`` corrects each layer's weight error against its calibration inputs (a
    #: GPTQ-style solver) rather than rounding to nearest
    corrects_weight_error: bool = False
    #: whether the algorithm also acts on fused MoE experts (3-D expert parameters), not only on
    #: ``nn.Linear`` layers
    acts_on_fused_experts: bool = False
    #: whether ``prepare_model`` must leave the float model's function unchanged (checked by the
    #: quantizer on a calibration batch, :mod:`.float_check`)
    keeps_float_function: bool = False

    def prepare_model(self, model: nn.Module, config: AlgoConfig) -> None:
        """Model-level transform run once before calibration (default: nothing)."""

    def float_pass(self, ctx: BlockContext, config: AlgoConfig) -> contextlib.AbstractContextManager:
        """Context manager entered around the loop's float-stream pass over this block (run, when
        some algorithm ``needs_float_stream``, before any ``apply`` on the block, quantizers off, on
        ``ctx.float_hidden``): lets an algorithm record float activations with hooks instead of
        running the block again. Default: nothing."""
        return contextlib.nullcontext()

    def output_pass(self, ctx: BlockContext, config: AlgoConfig) -> contextlib.AbstractContextManager:
        """Context manager entered around the loop's pass that runs the finished block (after every
        ``apply`` and the calibration of static activation quantizers) to produce the next block's
        inputs: lets an algorithm replay outputs it computed for the same inputs and the same final
        weights instead of computing them again. It must check that nothing changed since (the
        result has to be exactly that of running the block). Default: nothing."""
        return contextlib.nullcontext()

    def apply(self, ctx: BlockContext, config: AlgoConfig) -> None:
        """Change the block's weights (and nothing about its float function unless the algorithm
        quantizes): default nothing."""


def get_algorithm(name: str) -> BlockAlgorithm:
    """The algorithm registered under ``name`` (its module is imported on first use)."""
    if name not in MODULES:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(MODULES)}")
    try:
        module = importlib.import_module(f"{__name__}.{MODULES[name]}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{MODULES[name]}":
            raise
        raise NotImplementedError(
            f"algorithm {name!r} is not implemented in this version of quark; remove it from algorithm=..."
        ) from None
    return module.ALGORITHM


def match_modules(root: nn.Module, pattern: str) -> dict[str, nn.Module]:
    """Submodules of ``root`` named by ``pattern``, by name: an fnmatch pattern (it holds one of
    ``*?[``) is matched against every submodule name, anything else is one exact path. Empty when
    nothing matches."""
    if any(c in pattern for c in "*?["):
        return {n: m for n, m in root.named_modules() if fnmatch.fnmatchcase(n, pattern)}
    try:
        return {pattern: root.get_submodule(pattern)}
    except AttributeError:
        return {}


@contextlib.contextmanager
def switched_off(quantizers: Iterable[TensorQuantizer]) -> Iterator[None]:
    """Context manager: ``quantizers`` are the identity (mode ``off``) while entered; their modes
    are restored on exit."""
    saved = [(q, q.mode) for q in quantizers]
    for q, _ in saved:
        q.mode = "off"
    try:
        yield
    finally:
        for q, mode in saved:
            q.mode = mode


def quantizers_off(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Context manager: every TensorQuantizer under ``module`` is the identity (the float function)."""
    return switched_off(q for q in module.modules() if isinstance(q, TensorQuantizer))
