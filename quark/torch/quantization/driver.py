"""The per-block driver: owns how layers and activations move through memory.

Decoder-only LLMs are a stack of identical blocks. Instead of calibrating the whole model at once,
the driver

1. captures, for every calibration batch, the hidden states entering the first block and the
   keyword arguments (masks, position embeddings ...) every block receives, with one cheap pass in
   which the blocks are replaced by the identity;
2. then processes one block at a time: moves it to the compute device, hands it and its cached
   inputs to a callback (calibration, algorithms), runs it to produce the next block's inputs, and
   moves it back.

Peak memory is therefore the resident model plus one block and the calibration activations of one
block. What is computed on a block is the callback's business; this module knows nothing about
quantization.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from quark.torch.utils.memory import release_free_memory


class _StopForward(Exception):
    pass


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the missing path."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"module path {path!r} does not exist in {type(model).__name__}") from None


def find_decoder_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of decoder blocks: at ``path`` when given, else the longest ModuleList
    whose items all have the same class (the repeated block). ``None`` when the model has none."""
    if path:
        layers = get_submodule(model, path)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{path!r} is a {type(layers).__name__}, not the nn.ModuleList of decoder blocks")
        return path, layers
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    return best


def move_to(obj: Any, device: torch.device | str | None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device`` (None: leave as is)."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def call_model(model: nn.Module, batch: Any, device: torch.device | str | None = None) -> Any:
    """Run one calibration batch: ``model(**batch)`` for dicts, else ``model(batch)``."""
    batch = move_to(batch, device)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


@dataclass
class BlockInputs:
    """Calibration inputs of one block: per batch, the hidden states and the other call arguments."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    #: per batch, per block index: (extra positional args, keyword args)
    extras: list[list[tuple[tuple, dict]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)


@contextlib.contextmanager
def _identity_blocks(layers: nn.ModuleList, record: Callable[[int, tuple, dict], None]) -> Iterator[None]:
    """Replace each block's forward by the identity on its first argument, recording its arguments;
    the last block stops the model's forward."""
    originals = []
    last = len(layers) - 1

    def make(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            record(i, (hidden, *args[1:]), kwargs)
            if i == last:
                raise _StopForward
            return hidden

        return forward

    for i, block in enumerate(layers):
        originals.append(block.__dict__.get("forward"))  # an instance-level forward (hooks) or None
        block.forward = make(i)
    try:
        yield
    finally:
        for block, fwd in zip(layers, originals):
            if fwd is None:
                del block.forward
            else:
                block.forward = fwd


def capture_block_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    dataloader: Iterable[Any],
    device: torch.device | str | None = None,
    progress: bool = True,
) -> BlockInputs:
    """Run each batch up to the first block and record every block's call arguments.

    The blocks do no work during this pass, so it costs an embedding lookup and mask creation.
    """
    inputs = BlockInputs()
    current: dict[int, tuple[tuple, dict]] = {}

    def record(i: int, args: tuple, kwargs: dict) -> None:
        if i == 0:
            inputs.hidden.append(args[0].detach())
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "past_key_value")}
        kwargs["use_cache"] = False if "use_cache" in kwargs else kwargs.get("use_cache", None)
        if kwargs["use_cache"] is None:
            del kwargs["use_cache"]
        current[i] = (args[1:], kwargs)

    with torch.no_grad(), _identity_blocks(layers, record):
        for batch in tqdm(list(dataloader), desc="capture block inputs", disable=not progress, leave=False):
            current = {}
            try:
                call_model(model, _no_cache(model, batch), device)
            except _StopForward:
                pass
            inputs.extras.append([current[i] for i in range(len(layers))])
    return inputs


def _no_cache(model: nn.Module, batch: Any) -> Any:
    """Ask transformers models not to build a KV cache during calibration."""
    if isinstance(batch, dict) and getattr(getattr(model, "config", None), "use_cache", None) is not None:
        return {**batch, "use_cache": False}
    return batch


def run_block(block: nn.Module, inputs: BlockInputs, index: int, hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Run block ``index`` on every cached batch; returns its output hidden states."""
    hidden = inputs.hidden if hidden is None else hidden
    device = module_device(block)
    outs = []
    with torch.no_grad():
        for h, extras in zip(hidden, inputs.extras):
            args, kwargs = move_to(extras[index], device)
            outs.append(_first_tensor(block(move_to(h, device), *args, **kwargs)).detach())
    return outs


def module_device(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


def for_each_block(
    layers: nn.ModuleList,
    inputs: BlockInputs,
    process: Callable[[int, nn.Module, BlockInputs], None],
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "quantize blocks",
) -> list[torch.Tensor]:
    """Drive the block loop: for each block, move it to ``device``, let ``process`` work on it with
    its inputs, run it to produce the next block's inputs, then move it back where it was.

    ``inputs.hidden`` is replaced as the loop advances; returns the last block's outputs.
    """
    for i in tqdm(range(len(layers)), desc=desc, disable=not progress):
        block = layers[i]
        home = module_device(block)
        if device is not None:
            block.to(device)
        process(i, block, inputs)
        inputs.hidden = run_block(block, inputs, i)
        if device is not None and home is not None:
            block.to(home)
        release_free_memory()  # the block's freed activations: keep RSS flat across blocks
    return inputs.hidden
