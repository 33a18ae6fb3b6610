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

Registration: an algorithm is declared once on each side of the layer boundary. Its config class
(``quark.torch.quantization.config.algo_configs``, decorated with ``@register_algo_config``) holds its
``name``; its plugin module here, ``quark/torch/algorithm/<name>.py``, defines a
:class:`BlockAlgorithm` subclass with ``config_class = <that config class>`` and registers the one
instance: ``ALGORITHM = register_algorithm(<the class>())``. Every list of algorithms derives from
those two registries (``ALGO_CONFIG_CLASSES``, :func:`registered_algorithms`, the template's
``SUPPORTED_ALGORITHMS``). :func:`get_algorithm` imports a plugin on first use.

Shared by the plugins: :class:`BlockContext`, :func:`match_modules`, and :func:`quantizers_off` /
:func:`switched_off` (defined with the quantizer modes in ``quark.torch.quantization.tensor_quantizer``,
re-exported here). Some modules register no algorithm and hold pieces several plugins share (the
imports go from the plugins to them): the scaling sites and the SmoothQuant / AWQ scale formulas
(:mod:`.scaling`, which builds on rotation's :class:`~.rotation.StreamModule`), the scales inside fused
MoE experts (:mod:`.expert_scaling`) and the GPTQ family's expert stage (:mod:`.gptq_experts`). What
fused experts receive and the iteration over them (routing capture, one expert at a time) come from
``quark.torch.quantization.moe``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn as nn

from quark.torch.quantization.config.algo_configs import ALGO_CONFIG_CLASSES, AlgoConfig
from quark.torch.quantization.driver import BlockInputs, run_block
from quark.torch.quantization.modules import QuantLinear
from quark.torch.quantization.tensor_quantizer import quantizers_off as quantizers_off  # re-exported
from quark.torch.quantization.tensor_quantizer import switched_off as switched_off  # re-exported

#: algorithm name -> its implementation, filled by :func:`register_algorithm` as plugins are imported
_IMPLEMENTATIONS: dict[str, BlockAlgorithm] = {}


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

    #: the config class (a registered ``AlgoConfig`` subclass) this algorithm implements; its ``name``
    #: is the algorithm's name
    config_class: ClassVar[type[AlgoConfig] | None] = None
    #: the algorithm's name (set from ``config_class``)
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config_class = cls.__dict__.get("config_class")
        if config_class is not None:
            if not (isinstance(config_class, type) and issubclass(config_class, AlgoConfig)):
                raise TypeError(f"{cls.__name__}.config_class={config_class!r}: expected the AlgoConfig subclass "
                                "the algorithm implements")
            cls.name = config_class.name

    def prepare_model(self, model: nn.Module, config: AlgoConfig) -> None:
        """Model-level transform run once before calibration (default: nothing)."""

    def prepare_model_streamed(self, model: nn.Module, config: AlgoConfig) -> Callable[[int, nn.Module], None]:
        """prepare_model for a model whose decoder blocks are not loaded yet (their parameters on meta):
        does every change prepare_model makes outside the decoder blocks and every structural change
        (modules added or replaced, on meta inside the blocks), and returns prepare_block(index, block),
        which makes prepare_model's weight changes to decoder block `index` once its float weights are loaded.
        Default: prepare_model(model, config) and a prepare_block that does nothing (right for algorithms
        whose prepare_model changes no block weights)."""
        self.prepare_model(model, config)
        return lambda index, block: None

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


_Algorithm = TypeVar("_Algorithm", bound=BlockAlgorithm)


def register_algorithm(algorithm: _Algorithm) -> _Algorithm:
    """Register ``algorithm`` (an instance) as the implementation of the algorithm its class's
    ``config_class`` names, and return it: a plugin module ends with
    ``ALGORITHM = register_algorithm(MyAlgorithm())``."""
    cls = type(algorithm)
    if not isinstance(algorithm, BlockAlgorithm):
        raise TypeError(f"register_algorithm: {cls.__name__} is not a BlockAlgorithm")
    config_class = cls.config_class
    if config_class is None:
        raise TypeError(f"register_algorithm: {cls.__name__} declares no config_class (the AlgoConfig subclass "
                        "it implements)")
    name = config_class.name
    if ALGO_CONFIG_CLASSES.get(name) is not config_class:
        raise ValueError(f"register_algorithm: {cls.__name__}.config_class={config_class.__name__} is not a "
                         "registered algorithm config; decorate it with @register_algo_config "
                         "(quark.torch.quantization.config.algo_configs)")
    known = _IMPLEMENTATIONS.get(name)
    if known is not None and (type(known).__module__, type(known).__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"register_algorithm: algorithm {name!r} of {cls.__module__}.{cls.__qualname__} is "
                         f"already implemented by {type(known).__module__}.{type(known).__qualname__}")
    _IMPLEMENTATIONS[name] = algorithm  # a reloaded plugin module replaces its own implementation
    return algorithm


def load_plugins() -> None:
    """Import every module of this package (each plugin registers its algorithm when imported)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def registered_algorithms() -> dict[str, BlockAlgorithm]:
    """Every implemented algorithm by name, in the order of ``ALGO_CONFIG_CLASSES`` (imports all plugins)."""
    load_plugins()
    return {n: _IMPLEMENTATIONS[n] for n in [*ALGO_CONFIG_CLASSES, *_IMPLEMENTATIONS] if n in _IMPLEMENTATIONS}


def get_algorithm(name: str) -> BlockAlgorithm:
    """The algorithm registered under ``name`` (its plugin module is imported on first use)."""
    if name not in _IMPLEMENTATIONS:
        if name not in ALGO_CONFIG_CLASSES:
            raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(ALGO_CONFIG_CLASSES)}")
        module = f"{__name__}.{name}"  # the plugin module is named after its algorithm
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
        if name not in _IMPLEMENTATIONS:
            load_plugins()  # a plugin under another name
        if name not in _IMPLEMENTATIONS:
            raise NotImplementedError(
                f"algorithm {name!r} is not implemented in this version of quark; remove it from algorithm=..."
            )
    return _IMPLEMENTATIONS[name]


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
