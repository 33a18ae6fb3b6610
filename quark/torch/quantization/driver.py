"""The per-block driver: owns how layers and activations move through memory.

Decoder-only LLMs are a stack of identical blocks. Instead of calibrating the whole model at once,
the driver

1. captures, for every calibration batch, the hidden states entering the first block and the
   keyword arguments (masks, position embeddings ...) every block receives, with one cheap pass in
   which the blocks are replaced by stand-ins that return their input hidden states;
2. then processes one block at a time: moves it to the compute device, hands it and its cached
   inputs to a callback (calibration, algorithms), runs it to produce the next block's inputs, and
   moves it back.

Two things the model's own block loop may do are carried over generically (no model classes here):

* **Blocks that return more than the hidden states, consumed by the next block** (GLM-MoE-DSA's
  ``(hidden_states, topk_indices)``, the indices passed on as ``prev_topk_indices``). The model loop
  unpacks what a block returns, so a stand-in must return the same structure: the first called
  block of each class runs for real once, on the first batch, to learn it (the caller decides in
  which state: ``ModelQuantizer`` turns the blocks' quantizers off for the capture), and stand-ins
  return that structure with their input hidden states first and, in place of the other tensors,
  fresh placeholder objects. An argument of the next block that *is* such a placeholder is
  recorded as a link (:attr:`BlockInputs.links`); the block loop then overwrites it, batch by batch,
  with what the previous block really returned. Only top-level tensors of an output tuple are
  linked; other extra outputs are passed on as the probe computed them.
* **Blocks the model does not call** (Mllama's cross-attention blocks on text-only inputs): they are
  recorded in :attr:`BlockInputs.skipped`; the block loop leaves them out and passes the hidden
  states on to the next called block, as the model does. What becomes of their quantizers is the
  caller's decision (``ModelQuantizer``: weights quantized from the weights, algorithms skipped,
  static activation quantizers left uncalibrated).

Peak memory is the resident model plus one block and the calibration activations of one
block. What is computed on a block is the callback's business; this module knows nothing about
quantization.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from quark.torch.utils.memory import BlockTrimmer


class _StopForward(Exception):
    pass


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the missing path."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"module path {path!r} does not exist in {type(model).__name__}") from None


def find_decoder_layers(
    model: nn.Module, path: str | None = None, prefer: Callable[[nn.ModuleList], bool] | None = None
) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of decoder blocks: at ``path`` when given, else a guess. ``None`` when
    the model has none.

    The guess considers the ``nn.ModuleList`` s of blocks (items with submodules, not bare layers)
    that do not sit inside another such list's items (a MoE block's list of experts is not the
    stack). The items may be of different classes (Mllama's text stack mixes self- and
    cross-attention blocks). Among them it takes those for which ``prefer`` holds when any does
    (``ModelQuantizer``: the lists holding quantized layers, so an excluded vision encoder is not
    picked), then the longest, the first one on a tie.
    """
    if path:
        layers = get_submodule(model, path)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{path!r} is a {type(layers).__name__}, not the nn.ModuleList of decoder blocks")
        return path, layers
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and len(module) > 0):
            continue
        if not all(any(True for _ in m.children()) for m in module):
            continue  # bare layers (a list of Linear / Embedding), not blocks
        if any(not outer or name.startswith(outer + ".") for outer, _ in candidates):
            continue  # inside a block of an enclosing stack (named_modules lists parents first)
        candidates.append((name, module))
    if prefer is not None and any(prefer(layers) for _, layers in candidates):
        candidates = [(n, layers) for n, layers in candidates if prefer(layers)]
    return max(candidates, key=lambda c: len(c[1]), default=None)


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


#: where an argument of a block call sits: ``("arg", i)`` (the i-th positional argument after the hidden
#: states) or ``("kwarg", name)``
ArgLoc = tuple[str, Any]


@dataclass
class BlockInputs:
    """Calibration inputs of one block: per batch, the hidden states and the other call arguments."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    #: per batch, per block index: (extra positional args, keyword args); ``None`` for a block the
    #: model did not call (see :attr:`skipped`)
    extras: list[list[tuple[tuple, dict] | None]] = field(default_factory=list)
    #: per block index: the arguments that carry an output of the block called before it, beyond the
    #: hidden states (argument location -> position in that block's output tuple); the block loop
    #: replaces them with the real outputs before the block is processed
    links: dict[int, dict[ArgLoc, int]] = field(default_factory=dict)
    #: the blocks the model did not call during capture (in no batch), in order
    skipped: list[int] = field(default_factory=list)
    #: where the hidden states the block loop carries are kept when they do not stay in memory
    spill: HiddenSpill | None = None
    #: block class -> an output a block of that class returned during capture (its structure)
    outputs: dict[type, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.hidden)

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the loop carries it: itself, or a copy on disk (:class:`HiddenSpill`)."""
        return self.spill.put(t) if self.spill is not None else t

    @property
    def called(self) -> list[int]:
        """Indices of the blocks the model calls, in order."""
        n = len(self.extras[0]) if self.extras else 0
        skipped = set(self.skipped)
        return [i for i in range(n) if i not in skipped]


class HiddenSpill:
    """Calibration hidden states kept in files instead of memory.

    :meth:`put` writes a tensor's bytes to a new file in ``folder`` and returns a CPU tensor mapped
    from that file (``torch.from_file``): the pages are the page cache's, which the kernel reads back
    on use and drops under memory pressure, so the carried activations of a long calibration set cost
    disk, not RAM. The file's name is removed at once; its space is freed when the last tensor
    mapping it is gone.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written = 0  # bytes, for reports

    def put(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        data = t.cpu().contiguous().reshape(-1).view(torch.uint8)
        path = self.folder / f"h-{uuid.uuid4().hex}.bin"
        data.numpy().tofile(path)
        try:
            mapped = torch.from_file(str(path), shared=False, size=data.numel(), dtype=torch.uint8)
        finally:
            path.unlink()
        self.written += data.numel()
        return mapped.view(t.dtype).reshape(t.shape)


def _placeholders(template: Any, hidden: torch.Tensor) -> Any:
    """What a stand-in returns: ``template`` (a real output of a block of the same class) with
    ``hidden`` first and, instead of each other tensor, a new tensor object on the same data (a
    placeholder whose identity tells which block produced it; links replace it later)."""
    if isinstance(template, torch.Tensor):
        return hidden
    if isinstance(template, (tuple, list)) and template:
        rest = [t.detach() if isinstance(t, torch.Tensor) else t for t in template[1:]]
        return type(template)([hidden, *rest])
    return hidden  # another structure (a ModelOutput): only its hidden states are carried


def _arguments(args: tuple, kwargs: dict) -> Iterator[tuple[ArgLoc, Any]]:
    for i, value in enumerate(args):
        yield ("arg", i), value
    for name, value in kwargs.items():
        yield ("kwarg", name), value


@contextlib.contextmanager
def _stand_in_blocks(
    layers: nn.ModuleList, record: Callable[[int, tuple, dict], None], returned: Callable[[int, Any], None],
    probe: Callable[[int, nn.Module], contextlib.AbstractContextManager],
    structure: dict[type, Any] | None = None,
) -> Iterator[None]:
    """Replace each block's forward by a stand-in that records its arguments and returns its input
    hidden states, in the structure the real block returns (learned by running the first called
    block of each class once for real); ``returned(i, output)`` sees what it returns. The last
    block stops the model's forward."""
    originals = [block.__dict__.get("forward") for block in layers]  # instance-level forwards (hooks) or None
    structure = {} if structure is None else structure  # block class -> a real output of it
    last = len(layers) - 1

    def make(i: int) -> Callable[..., Any]:
        block = layers[i]

        def forward(*args: Any, **kwargs: Any) -> Any:
            call_args, call_kwargs = args, dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            record(i, (hidden, *args[1:]), kwargs)
            if i == last:
                raise _StopForward
            cls = type(block)
            if cls not in structure:
                real = originals[i] or type(block).forward.__get__(block)
                with probe(i, block):
                    structure[cls] = real(*call_args, **call_kwargs)
            out = _placeholders(structure[cls], hidden)
            returned(i, out)
            return out

        return forward

    with forwards_replaced((block, make(i)) for i, block in enumerate(layers)):
        yield


@contextlib.contextmanager
def forwards_replaced(replacements: Iterable[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Each module's ``forward`` is the given function while entered (an instance attribute, which
    ``nn.Module.__call__`` runs with the module's hooks); on exit the module gets back the forward it
    had (its own instance-level one, or its class's). ``replacements`` is consumed one pair at a
    time, after the previous pair took effect."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for module, forward in replacements:
            saved.append((module, module.__dict__.get("forward")))
            module.forward = forward
        yield
    finally:
        for module, original in reversed(saved):
            if original is None:
                del module.forward
            else:
                module.forward = original


def capture_block_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    dataloader: Iterable[Any],
    device: torch.device | str | None = None,
    progress: bool = True,
    store: BlockStore | None = None,
    spill: HiddenSpill | None = None,
) -> BlockInputs:
    """Run each batch up to the last block and record every block's call arguments.

    The blocks do no work during this pass (but the first called block of each class, once, to
    learn what it returns: run the capture with quantizers off if they are not calibrated yet), so
    it costs an embedding lookup and mask creation per batch. Arguments of a block that are extra
    outputs of the block called before it are recorded in :attr:`BlockInputs.links`; blocks the
    model never calls in :attr:`BlockInputs.skipped` (a block called in some batches only is an
    error). A block run for real is made usable by ``store`` around that call (:meth:`BlockStore.visiting`;
    by default it stays where it is).
    """
    probe = store.visiting if store is not None else (lambda i, block: contextlib.nullcontext())
    inputs = BlockInputs(spill=spill)
    current: dict[int, tuple[tuple, dict]] = {}
    previous: dict[str, Any] = {}  # the stand-in output the model got last, and the block's index

    def record(i: int, args: tuple, kwargs: dict) -> None:
        if not current:  # the first block the model calls
            inputs.hidden.append(inputs.keep(args[0].detach()))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "past_key_value")}
        kwargs["use_cache"] = False if "use_cache" in kwargs else kwargs.get("use_cache", None)
        if kwargs["use_cache"] is None:
            del kwargs["use_cache"]
        out = previous.get("output")
        if isinstance(out, (tuple, list)):
            made = {id(t): pos for pos, t in enumerate(out) if pos > 0 and isinstance(t, torch.Tensor)}
            for loc, value in _arguments(args[1:], kwargs):
                if isinstance(value, torch.Tensor) and id(value) in made:
                    inputs.links.setdefault(i, {})[loc] = made[id(value)]
        current[i] = (args[1:], kwargs)

    def returned(i: int, output: Any) -> None:
        previous["output"] = output

    with torch.no_grad(), _stand_in_blocks(layers, record, returned, probe, inputs.outputs):
        for batch in tqdm(list(dataloader), desc="capture block inputs", disable=not progress, leave=False):
            current = {}
            previous.clear()
            try:
                call_model(model, _no_cache(model, batch), device)
            except _StopForward:
                pass
            if not current:
                raise ValueError(
                    f"the model called none of the {len(layers)} blocks given as its decoder layers during "
                    "calibration: point model_decoder_layers at the stack the calibration data runs through"
                )
            inputs.extras.append([current.get(i) for i in range(len(layers))])
    calls = [sum(e[i] is not None for e in inputs.extras) for i in range(len(layers))]
    partial = [i for i, n in enumerate(calls) if 0 < n < len(inputs.extras)]
    if partial:
        raise ValueError(
            f"blocks {partial} were called in some calibration batches only: the block driver needs each block "
            "called in every batch or in none (give batches of one kind, e.g. all with or all without images)"
        )
    inputs.skipped = [i for i, n in enumerate(calls) if n == 0]
    return inputs


def _no_cache(model: nn.Module, batch: Any) -> Any:
    """Ask transformers models not to build a KV cache during calibration."""
    if isinstance(batch, dict) and getattr(getattr(model, "config", None), "use_cache", None) is not None:
        return {**batch, "use_cache": False}
    return batch


def _run(block: nn.Module, inputs: BlockInputs, index: int, hidden: list[torch.Tensor], keep: set[int],
         carried: bool = False) -> tuple[list[torch.Tensor], list[dict[int, Any]]]:
    device = module_device(block)
    outs, kept = [], []
    with torch.no_grad():
        for h, extras in zip(hidden, inputs.extras):
            args, kwargs = move_to(extras[index], device)
            out = block(move_to(h, device), *args, **kwargs)
            first = _first_tensor(out).detach()
            outs.append(inputs.keep(first) if carried else first)
            if keep:
                if not isinstance(out, (tuple, list)) or len(out) <= max(keep):
                    raise TypeError(
                        f"block {index} returned a {type(out).__name__}, not the tuple of {max(keep) + 1}+ outputs "
                        "it returned when the calibration inputs were captured"
                    )
                kept.append({pos: out[pos].detach() if isinstance(out[pos], torch.Tensor) else out[pos] for pos in keep})
    return outs, kept


def run_block(block: nn.Module, inputs: BlockInputs, index: int, hidden: list[torch.Tensor] | None = None,
              carried: bool = False) -> list[torch.Tensor]:
    """Run block ``index`` on every cached batch; returns its output hidden states (``carried``: kept
    as the loop carries its hidden states, on disk when :attr:`BlockInputs.spill` is set)."""
    return _run(block, inputs, index, inputs.hidden if hidden is None else hidden, set(), carried)[0]


def _link(inputs: BlockInputs, index: int, outputs: list[dict[int, Any]]) -> None:
    """Put the outputs of the block called before block ``index`` where block ``index`` takes them."""
    for b, out in enumerate(outputs):
        args, kwargs = inputs.extras[b][index]
        args, kwargs = list(args), dict(kwargs)
        for (kind, key), pos in inputs.links[index].items():
            if kind == "arg":
                args[key] = out[pos]
            else:
                kwargs[key] = out[pos]
        inputs.extras[b][index] = (tuple(args), kwargs)


def module_device(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


class BlockStore:
    """Where the blocks live between their turns, and what becomes of a finished block.

    The default keeps every block where it is and, given a ``device``, moves the block being worked
    on there and back (``QuantFlow.per_block``). The streamed flow's store loads a block from disk in
    :meth:`enter` and writes and frees it in :meth:`leave`.
    """

    #: whether :meth:`enter` loads a block's weights (they are not in memory before): algorithms then
    #: prepare the model with ``prepare_model_streamed`` and the store applies their per-block part,
    #: :attr:`block_preparers`, to every block it loads
    loads_blocks: bool = False

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self._homes: dict[int, torch.device | None] = {}
        #: ``prepare_block(index, block)`` functions applied, in order, to each block once loaded
        self.block_preparers: list[Callable[[int, nn.Module], None]] = []

    def enter(self, index: int, block: nn.Module) -> None:
        """Make block ``index`` usable (its weights on the compute device)."""
        self._homes[index] = module_device(block)
        if self.device is not None:
            block.to(self.device)

    def leave(self, index: int, block: nn.Module, done: bool) -> None:
        """Block ``index`` is not needed any more for now; ``done``: it is finished (quantized and
        run), else it was only probed (the capture's one real call)."""
        home = self._homes.pop(index, None)
        if self.device is not None and home is not None:
            block.to(home)

    #: the float stream's hidden states entering the next block (set by the caller that keeps a float
    #: stream; read by :meth:`after_block` implementations that record the loop's state)
    float_hidden: Callable[[], list[torch.Tensor] | None] = staticmethod(lambda: None)

    def after_block(self, index: int, next_index: int, inputs: BlockInputs) -> None:
        """Block ``index`` is finished and left; ``inputs`` now hold block ``next_index``'s complete
        inputs (hidden states, linked extras; ``next_index`` is past the last block after it). A
        resumable store records them here."""

    def blocks_done(self) -> None:
        """Every block is finished; what lies outside the stack is calibrated next (a store that kept
        modules needed only then off memory loads them here)."""

    def resume_point(self, inputs: BlockInputs) -> tuple[int, list[torch.Tensor] | None] | None:
        """Where a resumed run starts: ``(block index, float-stream hidden states)``, with ``inputs``
        (hidden states, linked extras) set to that block's inputs; None: from the start (default)."""
        return None

    @contextlib.contextmanager
    def visiting(self, index: int, block: nn.Module, done: bool = False) -> Iterator[nn.Module]:
        """``enter`` ... ``leave`` around a ``with`` body."""
        self.enter(index, block)
        try:
            yield block
        finally:
            self.leave(index, block, done)


def for_each_block(
    layers: nn.ModuleList,
    inputs: BlockInputs,
    process: Callable[[int, nn.Module, BlockInputs], contextlib.AbstractContextManager | None],
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "quantize blocks",
    store: BlockStore | None = None,
    start: int = 0,
) -> list[torch.Tensor]:
    """Drive the block loop: for each block the model calls, make it usable (``store.enter``: by
    default, move it to ``device``), let ``process`` work on it with its inputs, run it to produce the
    next called block's inputs (hidden states and linked extra outputs, :attr:`BlockInputs.links`),
    then hand it back (``store.leave``: by default, move it back where it was). A context manager
    returned by ``process`` is entered around that run (an algorithm replaying work). The blocks of
    :attr:`BlockInputs.skipped` are not processed: the hidden states pass them by, as in the model.
    Called blocks before index ``start`` are taken as done (a resumed run: ``inputs`` already hold
    the inputs of the first block from ``start`` on).

    ``inputs.hidden`` is replaced as the loop advances; returns the last block's outputs.
    """
    store = store if store is not None else BlockStore(device)
    called = inputs.called
    todo = [(n, i) for n, i in enumerate(called) if i >= start]
    trimmer = BlockTrimmer()  # the blocks' freed activations: keep RSS flat across blocks
    for n, i in tqdm(todo, desc=desc, disable=not progress):
        block = layers[i]
        store.enter(i, block)
        around = process(i, block, inputs)
        nxt = called[n + 1] if n + 1 < len(called) else None
        keep = set(inputs.links.get(nxt, {}).values()) if nxt is not None else set()
        with around if around is not None else contextlib.nullcontext():
            inputs.hidden, extra = _run(block, inputs, i, inputs.hidden, keep, carried=True)
        if keep:
            _link(inputs, nxt, extra)
        store.leave(i, block, True)
        store.after_block(i, nxt if nxt is not None else i + 1, inputs)
        trimmer.after_block()
    return inputs.hidden


def run_after_blocks(model: nn.Module, layers: nn.ModuleList, inputs: BlockInputs, final: list[torch.Tensor],
                     batches: list[Any], device: torch.device | str | None = None) -> None:
    """Run the model on ``batches`` with its decoder blocks replaced by stand-ins: the last called block
    returns ``final`` (its real outputs, batch by batch, from the block loop), the others their input
    hidden states. What lies after the stack (final norm, lm_head) sees exactly what the whole model
    would give it, without the blocks' weights (the streamed flow calibrates quantizers there this way)."""
    called = inputs.called
    last = called[-1]
    batch = {"index": 0}

    def make(i: int) -> Callable[..., Any]:
        template = inputs.outputs.get(type(layers[i]))

        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            out = final[batch["index"]].to(hidden.device) if i == last else hidden
            return _placeholders(template, out) if template is not None else out

        return forward

    with torch.no_grad(), forwards_replaced((block, make(i)) for i, block in enumerate(layers)):
        for b, data in enumerate(batches):
            batch["index"] = b
            call_model(model, _no_cache(model, data), device)
