"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323), per decoder block.

For every layer group of ``inside_layer_modules`` in order ("true sequential"): run the block on its
cached calibration inputs (the quantized stream) with the earlier groups already quantized, collect
through forward pre-hooks the Hessian ``H = 2/N X^T X`` of each distinct layer input (q/k/v share
one, so do gate/up), and quantize each layer column by column, spreading each column's rounding
error over the columns not yet quantized (:mod:`.hessian_solver`): damping ``damp_percent *
mean(diag H)``, act-order ``desc_act`` (columns by decreasing ``diag H``), ``static_groups``,
lazy batches of ``block_size`` columns. Layers that share an input and a weight spec are solved as
one stacked matrix (GPTQ treats rows independently, so this is exact and saves work).

Each block pass stops as soon as every layer of the group has received its input, so collecting
q/k/v's inputs costs a norm, o_proj's the attention, and so on.

Fused MoE experts (3-D expert parameters, not ``nn.Linear`` layers) come after the block's linear
groups, expert by expert on the tokens routed to each: this driver records what each experts module
receives (:class:`~quark.torch.quantization.moe.RoutedTokens`, on the pass that stops at them) and
hands every module to the expert stage (:func:`~.gptq_experts.quantize_experts`).

After the solver a layer's weight holds the fake-quantized result ``Q`` and its weight quantizer
the solver's qparams, fixed with :meth:`QuantLinear.set_weight_qparams`: ``fake_quantize(Q)`` with
those qparams is ``Q`` exactly, whereas min-max qparams recomputed from ``Q`` need not be (an int4
group whose largest code is -8 would get scale ``8s/7``), so the quantizer loop keeps them.

The Hessian uses each layer's input as it arrives (before the layer's own input quantizer, if any);
activation quantizers that are static and not yet calibrated are off while collecting. GPTAQ and
Qronos (:mod:`.gptaq`, :mod:`.qronos`) reuse this module's orchestration with other statistics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from quark.torch.quantization.config.algo_configs import GPTQConfig
from quark.torch.quantization.driver import forwards_replaced, module_device, move_to
from quark.torch.quantization.fused_experts import ExpertsWeightQuantizer, QuantFusedExperts
from quark.torch.quantization.modules import QuantLinear
from quark.torch.quantization.moe import RoutedTokens, block_fused_experts, has_static_weights
from quark.torch.quantization.tensor_quantizer import TensorQuantizer

from . import BlockAlgorithm, BlockContext, precision, quantizers_off, register_algorithm, switched_off
from .gptq_experts import quantize_experts
from .hessian_solver import Gram, quantize_weight

logger = logging.getLogger(__name__)


class _TailRecord(NamedTuple):
    """One recorded call of a tail submodule: enough to replay it by running only its last layer."""

    module_args: tuple  # (args, kwargs) the submodule was called with
    layer_args: tuple  # (args, kwargs) its last layer was called with
    output: tuple | None  # the submodule's output tuple without the layer's output (None: the output is it)
    position: int | None  # where the layer's output sits in that tuple (None: the output is it)


class _Stop(Exception):
    """Raised by a pre-hook once every hooked layer has its input: the rest of the block is skipped."""


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A layer's input: the first argument of its call (a linear's ``input``, fused experts' hidden states)."""
    if args:
        return args[0]
    return kwargs["input"] if "input" in kwargs else next(iter(kwargs.values()))


def layer_groups(ctx: BlockContext, groups: list[list[str]]) -> list[dict[str, QuantLinear]]:
    """The block's weight-quantized linears per group of patterns, in order; a layer belongs to the
    first group that matches it, empty groups are dropped. No groups: one group of every layer."""
    out: list[dict[str, QuantLinear]] = []
    taken: set[str] = set()
    for patterns in groups or [["*"]]:
        found = {n: m for n, m in ctx.linears(patterns).items() if m.weight_quantizer is not None and n not in taken}
        taken.update(found)
        if found:
            out.append(found)
    return out


def _activation_quantizers(block: nn.Module) -> list[TensorQuantizer]:
    """The block's quantizers other than its linears' and fused experts' weight quantizers."""
    weight_quantizers = {id(m.weight_quantizer) for m in block.modules() if isinstance(m, QuantLinear)}
    return [q for q in block.modules() if isinstance(q, TensorQuantizer) and id(q) not in weight_quantizers
            and not isinstance(q, ExpertsWeightQuantizer)]


def _solved_unit(m: nn.Module) -> bool:
    """A module whose weights the GPTQ family changes: a weight-quantized linear, or fused experts."""
    if isinstance(m, QuantLinear):
        return m.weight_quantizer is not None
    return has_static_weights(m)


def _uncalibrated_static(block: nn.Module) -> list[TensorQuantizer]:
    """The block's static activation quantizers without qparams yet."""
    return [q for q in _activation_quantizers(block) if not q.is_dynamic and not q.has_qparams]


def uncalibrated_off(block: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Static activation quantizers without qparams yet are the identity (they are calibrated after
    the algorithms); weight quantizers and dynamic quantizers stay as they are."""
    return switched_off(_uncalibrated_static(block))


def _tensors_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    return a is b or a == b


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    return out


def _versions(out: Any) -> tuple[int, ...] | None:
    """The version counters of the tensors in ``out`` (a tensor or a tuple of them and other values):
    an in-place change of one, through any view of its storage, changes them. None for other outputs
    and for inference-mode tensors, which have none."""
    if isinstance(out, torch.Tensor):
        tensors = [out]
    elif type(out) is tuple and not any(isinstance(o, (tuple, list, dict)) for o in out):
        tensors = [o for o in out if isinstance(o, torch.Tensor)]
    else:
        return None
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:
        return None


class BlockRunner:
    """Runs one block on its cached batches for an algorithm that quantizes layer groups in order.

    * :meth:`inputs` stops each batch's forward as soon as every wanted layer has its input; when
      the wanted layers all read one tensor (q/k/v, gate/up: seen on the first batch), later batches
      stop at the first of them (nothing between it and the last one is computed: gate's product
      and its activation);
    * submodules whose quantized linears are all final (:meth:`finalize`) replay the output they
      produced for the same batch and the same inputs (checked with ``torch.equal``) in a later pass
      instead of computing it again: with q/k/v/o final, the MLP's passes skip the attention (the
      output is kept as is with its version counters: one changed in place since is computed again);
    * a pass collecting the input of a single layer whose enclosing submodule returns that layer's
      output as is, with every other linear of the submodule final (o_proj in the attention,
      down_proj in the MLP), runs the submodule to its end (the layer outputs zeros) and keeps the
      layer's input and the submodule's output; once the layer is final, the next pass (or the
      loop's output pass, :meth:`replay`) replays the submodule by running only that layer on the
      kept input. A layer wider in than out (down_proj) is only kept while its inputs over all
      batches fit in :attr:`TAIL_BUDGET_BYTES`.
    """

    #: most bytes of kept inputs of a layer that widens (in_features > out_features)
    TAIL_BUDGET_BYTES = 1 << 30

    def __init__(self, ctx: BlockContext) -> None:
        self.ctx = ctx
        self.final: set[int] = set()
        self._cache: dict[str, dict[tuple[int, int], tuple[Any, Any]]] = {}
        #: submodule name -> the units (linears, fused experts) under it, itself included
        self._linears = {
            name: {id(q) for q in m.modules() if _solved_unit(q)} for name, m in ctx.block.named_modules() if name
        }
        self._batch = 0
        self._calls: dict[str, int] = {}
        #: submodule name -> (batch, call) -> what replaying its tail layer needs
        self._tails: dict[str, dict[tuple[int, int], _TailRecord]] = {}
        self._tail_layer: dict[str, nn.Module] = {}

    def finalize(self, layers: list[nn.Module]) -> None:
        """These layers will not change any more in this block."""
        self.final.update(id(m) for m in layers)

    def _memo(self, name: str, module: nn.Module, store: bool) -> Any:
        original = module.forward
        cache = self._cache.setdefault(name, {})

        def forward(*args: Any, **kwargs: Any) -> Any:
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            key = (self._batch, call)
            hit = cache.get(key) if store else cache.pop(key, None)  # no later pass: free it as it is used
            if hit is not None and _tensors_equal(hit[0], (args, kwargs)):
                inputs, kept, versions = hit
                if versions is None:  # kept as a copy: hand out another one if it is kept further
                    return kept if not store else _clone(kept)
                if _versions(kept) == versions:  # nobody changed it in place since
                    return kept
            tail = self._tails.get(name, {}).pop(key, None)
            if tail is not None and _tensors_equal(tail.module_args, (args, kwargs)):
                layer_args, layer_kwargs = tail.layer_args
                y = self._tail_layer[name](*layer_args, **layer_kwargs)
                at = tail.position
                out = y if at is None else (*tail.output[:at], y, *tail.output[at + 1:])
            else:
                out = original(*args, **kwargs)
            if store:
                # the output itself, with its version counters: a consumer that changes it in place
                # makes the next pass recompute instead of replaying (a copy where there are none)
                versions = _versions(out)
                cache[key] = ((args, kwargs), out if versions is not None else _clone(out), versions)
            return out

        return forward

    @contextlib.contextmanager
    def _memoized(self, store: bool, recording: str | None = None) -> Iterator[None]:
        """Memoize (``store``) or replay the outermost submodules whose linears are all final. Not
        their descendants: the outer module replays, so theirs would never be read (q/k/v's outputs,
        or gate/up's, [tokens, intermediate] each, held to the block's end for nothing); nor those
        inside the submodule whose tail is ``recording`` in this pass, which replays from the tail."""
        patched, names = [], []
        for name, module in self.ctx.block.named_modules():  # parents before their children
            ids = self._linears.get(name)
            if not (ids and ids <= self.final and (store or self._cache.get(name) or self._tails.get(name))):
                continue
            if any(name.startswith(outer + ".") for outer in names + ([recording] if recording else [])):
                continue
            names.append(name)
            patched.append((module, self._memo(name, module, store)))
        with forwards_replaced(patched):
            yield

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """While entered, runs of the whole block on the cached batches, in order (the loop's output
        pass), replay the memoized outputs of final submodules (each checked against its inputs)."""
        count = {"batch": -1}

        def next_batch(_m: nn.Module, _args: tuple) -> None:
            count["batch"] += 1
            self._batch, self._calls = count["batch"], {}

        handle = self.ctx.block.register_forward_pre_hook(next_batch)
        try:
            with self._memoized(store=False):
                yield
        finally:
            handle.remove()

    def _tail(self, layers: dict[str, nn.Module]) -> str | None:
        """The innermost submodule enclosing the single layer of ``layers`` whose other quantized
        linears are all final and that has some (None: no such module, or the kept inputs of a
        widening layer would not fit the budget)."""
        if len(layers) != 1:
            return None
        (lname, layer), = layers.items()
        if layer.in_features > layer.out_features:
            tokens = sum(h.numel() // h.shape[-1] for h in self.ctx.inputs.hidden)
            if tokens * layer.in_features * layer.weight.element_size() > self.TAIL_BUDGET_BYTES:
                return None
        parts = lname.split(".")
        for k in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:k])
            others = self._linears.get(name, set()) - {id(layer)}
            if others:
                return name if others <= self.final else None
        return None

    @contextlib.contextmanager
    def _recording_tail(self, name: str, layer: nn.Module) -> Iterator[None]:
        """Record the tail submodule ``name`` around ``layer`` per batch (see the class doc); the
        submodule's return ends the block pass."""
        module = self.ctx.block.get_submodule(name)
        self._tail_layer[name] = layer
        records = self._tails.setdefault(name, {})
        state: dict[str, Any] = {}

        def before(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            state["calls"] = state.get("calls", 0) + 1
            state["args"] = (args, kwargs)

        def layer_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:  # prepended: before other pre-hooks
            state["layer_calls"] = state.get("layer_calls", 0) + 1
            state["layer_args"] = (args, kwargs)

        def layer_out(_m: nn.Module, _args: tuple, out: Any) -> None:
            state["y"] = out

        def zeros(x: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:  # replaced at replay
            return x.new_zeros(*x.shape[:-1], layer.out_features)

        def after(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
            y = state.get("y")
            if out is y:
                where = None
            else:
                # a plain tuple only: the replay rebuilds it (a named tuple or a ModelOutput is not replayed)
                where = next((i for i, o in enumerate(out) if o is y), -1) if type(out) is tuple else -1
            if state.get("layer_calls") == 1 and state["calls"] == 1 and where != -1:
                kept = None if where is None else (*out[:where], None, *out[where + 1:])  # not the zeros
                records[(self._batch, 0)] = _TailRecord(state["args"], state["layer_args"], kept, where)
            raise _Stop

        def reset(_m: nn.Module, _args: tuple) -> None:
            state.clear()

        handles = [
            self.ctx.block.register_forward_pre_hook(reset),
            module.register_forward_pre_hook(before, with_kwargs=True),
            layer.register_forward_pre_hook(layer_in, with_kwargs=True, prepend=True),
            layer.register_forward_hook(layer_out),
            module.register_forward_hook(after, with_kwargs=True),
        ]
        try:
            with forwards_replaced([(layer, zeros)]):
                yield
        finally:
            for h in handles:
                h.remove()

    def inputs(
        self, layers: dict[str, nn.Module], hidden: list[torch.Tensor] | None = None, last: bool = False,
        arguments: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Per batch, ``{name: input}`` of ``layers`` (layers fed the same tensor get the same
        object). ``hidden`` replaces the cached hidden states (the float stream); ``last``: no later
        pass will come (not even a :meth:`replay`), so nothing new is memoized; ``arguments``: each
        layer's whole call ``(args, kwargs)`` instead of its first input (fused experts' routing)."""
        ctx = self.ctx
        memo = hidden is None
        hidden = ctx.inputs.hidden if hidden is None else hidden
        device = module_device(ctx.block)
        seen: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                if state["skip"]:  # all read one tensor (batch 0 showed it): the first call has it
                    x = _layer_input(args, kwargs)
                    seen.update((n, x) for n in layers)
                    raise _Stop
                if name not in seen:
                    seen[name] = (args, kwargs) if arguments else _layer_input(args, kwargs)
                if len(seen) == len(layers) and tail is None:
                    raise _Stop

            return pre

        tail = self._tail(layers) if memo and not last and not arguments else None
        handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
        memoized = self._memoized(store=not last, recording=tail) if memo else contextlib.nullcontext()
        recording = self._recording_tail(tail, *layers.values()) if tail else contextlib.nullcontext()
        state = {"skip": False}
        try:
            with torch.no_grad(), memoized, recording:
                for b, (h, extras) in enumerate(zip(hidden, ctx.inputs.extras)):
                    if b == 1:  # parallel layers (one shared input): none feeds another, skip their work
                        state["skip"] = len(layers) > 1 and len({id(x) for x in seen.values()}) == 1
                    seen = {}
                    self._batch, self._calls = b, {}
                    args, kwargs = move_to(extras[ctx.index], device)
                    try:
                        ctx.block(move_to(h, device), *args, **kwargs)
                    except _Stop:
                        pass
                    missing = set(layers) - set(seen)
                    if missing:
                        raise RuntimeError(
                            f"block {ctx.index}: layers {sorted(missing)} were not called by the block's forward"
                        )
                    yield seen
        finally:
            for handle in handles:
                handle.remove()


def shared_inputs(inputs: dict[str, torch.Tensor], group: dict[str, QuantLinear]) -> list[list[str]]:
    """Layers of ``group`` fed the same tensor and quantized with the same weight spec (solved as one
    stacked matrix)."""
    stacks: dict[tuple[int, str], list[str]] = {}
    for name, layer in group.items():
        key = (id(inputs[name]), repr(layer.weight_quantizer.spec))
        stacks.setdefault(key, []).append(name)
    return list(stacks.values())


def _stacked_output(outputs: dict[str, torch.Tensor], layers: list[QuantLinear], names: list[str]
                    ) -> torch.Tensor | None:
    """The stack's recorded float outputs without their biases, concatenated along features (float32);
    None unless every layer of the stack has one."""
    if not all(n in outputs for n in names):
        return None
    parts = []
    for name, layer in zip(names, layers):
        y = outputs[name].float()
        parts.append(y if layer.bias is None else y - layer.bias.float())
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def cross_term_dtype(config: GPTQConfig, layers: dict[str, QuantLinear]) -> torch.dtype | None:
    """The reduced precision that ``config.cross_term_dtype`` (GPTAQ, Qronos; float32 where the
    config has none) picks for these layers' weights (:func:`.precision.resolve`); None: float32,
    or no layers."""
    layer = next(iter(layers.values()), None)
    if layer is None:
        return None
    return precision.resolve(getattr(config, "cross_term_dtype", "float32"), layer.weight.device, layer.weight.dtype)


def _signature(block: nn.Module) -> list[tuple[int, int]]:
    """Changes whenever a parameter of ``block`` is replaced or modified in place."""
    return [(p.data_ptr(), p._version) for p in block.parameters()]


def _activation_state(block: nn.Module) -> list[tuple[int, str, bool]]:
    """Changes when an activation quantizer of ``block`` is switched or calibrated (a static one
    without qparams is off during the algorithm's passes and quantizes after calibration)."""
    return [(id(q), q.mode, q.has_qparams) for q in _activation_quantizers(block)]


class GPTQ(BlockAlgorithm):
    """GPTQ on each layer group of the block, in order (see the module docstring)."""

    config_class = GPTQConfig
    corrects_weight_error = True  # and so do GPTAQ and Qronos, its subclasses
    acts_on_fused_experts = True  # expert by expert, with the algorithm's own statistics and solver (.gptq_experts)

    # -- hooks for the variants ------------------------------------------------------------------
    def new_stats(self, cross_dtype: torch.dtype | None = None) -> dict[str, Gram]:
        """Accumulators of one stack of layers sharing an input (``cross_dtype``: the precision of the
        cross terms' products, :mod:`.precision`)."""
        return {"H": Gram()}

    def accumulate(self, stats: dict[str, Any], x_quant: torch.Tensor, x_float: torch.Tensor | None,
                   y_float: torch.Tensor | None = None) -> None:
        """Add one batch of a stack's input on the quantized stream (``x_quant``), on the float stream
        (``x_float``, for variants that need it) and the stack's float outputs without bias (``y_float``,
        only where :meth:`float_output_layers` asked for them)."""
        stats["H"].add_batch(x_quant)

    def solve_stack(self, weight: torch.Tensor, stats: dict[str, Gram], spec: Any, splits: list[int],
                    config: GPTQConfig, zero_dead: bool = True):
        """Quantize the stacked weight; returns a :class:`~.hessian_solver.Solution` (``zero_dead``:
        see :func:`~.hessian_solver.quantize_weight`)."""
        return quantize_weight(
            weight, [stats["H"].take()], spec,  # handed over: the solver frees it as soon as it can
            damp_percent=config.damp_percent,
            block_size=config.block_size,
            desc_act=config.desc_act,
            static_groups=config.static_groups,
            row_splits=splits,
            clip_steps=config.clip_search_steps,
            clip_min=config.clip_search_min,
            residual=self.residual(stats, config),
            zero_dead=zero_dead,
        )

    def residual(self, stats: dict[str, Gram], config: GPTQConfig):
        """The extra update term of :func:`~.hessian_solver.quantize_weight` (None: plain GPTQ)."""
        return None

    def float_output_layers(self, layers: dict[str, QuantLinear], config: GPTQConfig) -> set[str]:
        """Layers whose float outputs the float pass also records (default none)."""
        return set()

    # -- the block -------------------------------------------------------------------------------
    def float_pass(self, ctx: BlockContext, config: GPTQConfig) -> contextlib.AbstractContextManager:
        """Record every grouped layer's float input during the loop's float-stream pass (only for the
        variants that need the float stream)."""
        if not self.needs_float_stream:
            return contextlib.nullcontext()
        return self._record_float(ctx, config)

    @contextlib.contextmanager
    def _record_float(self, ctx: BlockContext, config: GPTQConfig) -> Iterator[None]:
        layers = {n: m for g in layer_groups(ctx, config.inside_layer_modules) for n, m in g.items()}
        with_outputs = self.float_output_layers(layers, config)
        layers.update(block_fused_experts(ctx.block, static_weights=True))  # (their hidden states)
        batches: list[dict[str, torch.Tensor]] = []
        outputs: list[dict[str, torch.Tensor]] = []

        def on_block(_m: nn.Module, _args: tuple) -> None:
            batches.append({})
            outputs.append({})

        def hook(name: str):
            def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                batches[-1].setdefault(name, _layer_input(args, kwargs))

            return pre

        def out_hook(name: str):
            def post(_m: nn.Module, _args: tuple, out: Any) -> None:
                outputs[-1].setdefault(name, out)

            return post

        handles = [ctx.block.register_forward_pre_hook(on_block)]
        handles += [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
        handles += [layers[n].register_forward_hook(out_hook(n)) for n in with_outputs]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self._float = (ctx.block, _signature(ctx.block), batches, outputs)

    def float_inputs(self, ctx: BlockContext, layers: dict[str, QuantLinear]
                     ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
        """Per batch, every layer's input in the float model, and the outputs of the layers of
        :meth:`float_output_layers`: recorded during the loop's float pass when the block has not
        changed since, else inputs only, from a float pass of our own (quantizers off,
        ``ctx.float_hidden``)."""
        recorded, self._float = getattr(self, "_float", None), None
        if recorded is not None and recorded[0] is ctx.block and recorded[1] == _signature(ctx.block) and \
                len(recorded[2]) == len(ctx.inputs) and all(set(layers) <= set(b) for b in recorded[2]):
            return recorded[2], recorded[3]
        if ctx.float_hidden is None:
            raise RuntimeError(f"{self.name} needs the float stream (needs_float_stream=True)")
        with quantizers_off(ctx.block):
            inputs = list(BlockRunner(ctx).inputs(layers, ctx.float_hidden))
        return inputs, [{} for _ in inputs]

    def apply(self, ctx: BlockContext, config: GPTQConfig) -> None:
        groups = layer_groups(ctx, config.inside_layer_modules)
        all_layers = {n: m for g in groups for n, m in g.items()}
        experts = block_fused_experts(ctx.block, static_weights=True)
        floats, float_outs = (self.float_inputs(ctx, {**all_layers, **experts}) if self.needs_float_stream
                              else (None, None))
        runner = BlockRunner(ctx)
        cross_dtype = cross_term_dtype(config, all_layers)
        # the output pass can replay what the last pass records unless static activation
        # quantizers (off during these passes) are calibrated in between
        replayable = not _uncalibrated_static(ctx.block)
        for i, group in enumerate(groups):
            stacks: list[list[str]] | None = None
            stats: list[dict[str, Gram]] = []
            last = i == len(groups) - 1 and not experts and not replayable
            with uncalibrated_off(ctx.block):
                for b, inputs in enumerate(runner.inputs(group, last=last)):
                    if stacks is None:
                        stacks = shared_inputs(inputs, group)
                        stats = [self.new_stats(cross_dtype) for _ in stacks]
                    for names, st in zip(stacks, stats):
                        xf = None if floats is None else floats[b][names[0]]
                        yf = None if float_outs is None else _stacked_output(float_outs[b], [group[n] for n in names],
                                                                             names)
                        self.accumulate(st, inputs[names[0]], xf, yf)
                    if floats is not None:  # this group's float inputs and outputs are used up
                        for name in group:
                            floats[b].pop(name, None)
                            float_outs[b].pop(name, None)
            for names, st in zip(stacks or [], stats):
                self._quantize_stack(ctx, [group[n] for n in names], names, st, config)
            runner.finalize(list(group.values()))
        if experts:
            self._quantize_experts(ctx, runner, experts, floats, config, last=not replayable)
        ctx.scratch[self.name] = (runner, _signature(ctx.block), _activation_state(ctx.block))

    def _quantize_experts(self, ctx: BlockContext, runner: BlockRunner, experts: dict[str, QuantFusedExperts],
                          floats: list[dict[str, torch.Tensor]] | None, config: GPTQConfig, last: bool) -> None:
        """After the linears: every fused-experts module of the block, expert by expert
        (:mod:`.gptq_experts`), from what one pass of the block routes to them (``floats``: per batch,
        the float stream's inputs, the experts modules' hidden states among them)."""
        records = {name: RoutedTokens(m) for name, m in experts.items()}
        with uncalibrated_off(ctx.block):
            for b, calls in enumerate(runner.inputs(experts, last=last, arguments=True)):
                for name, (args, kwargs) in calls.items():
                    records[name].add_call(args, kwargs, None if floats is None else floats[b].pop(name))
            for name, record in records.items():
                unrouted = quantize_experts(record, self, config)
                if unrouted:
                    logger.info("%s block %d: %s: experts %s received no calibration token and keep "
                                "round-to-nearest weights", self.name, ctx.index, name, unrouted)
        runner.finalize(list(experts.values()))

    def output_pass(self, ctx: BlockContext, config: GPTQConfig) -> contextlib.AbstractContextManager:
        """Replay the attention outputs memoized during the last groups' passes (same inputs, same
        final weights) when no parameter and no activation quantizer changed since :meth:`apply`."""
        runner, signature, activations = ctx.scratch.pop(self.name, (None, None, None))
        if runner is None or signature != _signature(ctx.block) or activations != _activation_state(ctx.block):
            return contextlib.nullcontext()
        return runner.replay()

    def _quantize_stack(self, ctx: BlockContext, layers: list[QuantLinear], names: list[str],
                        stats: dict[str, Gram], config: GPTQConfig) -> None:
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in layers], 0)
            splits = [m.out_features for m in layers]
            sol = self.solve_stack(weight, stats, layers[0].weight_quantizer.spec, splits, config)
            for m, q, qp in zip(layers, sol.Q.split(splits, 0), sol.qparams):
                m.weight.copy_(q.to(m.weight.dtype))
                m.set_weight_qparams(qp)
        logger.debug("%s block %d: quantized %s", self.name, ctx.index, ", ".join(names))


ALGORITHM = register_algorithm(GPTQ())
