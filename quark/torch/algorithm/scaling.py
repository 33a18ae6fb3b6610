"""Shared pieces of the scaling algorithms (AWQ, SmoothQuant, AutoSmoothQuant).

A scaling site is a :class:`ScalingPair` of the template resolved in one decoder block: a previous
op ``prev`` whose output feeds exactly the linears ``layers``. For a positive per-input-channel
scale ``s``::

    x W^T = (x / s) (W diag(s))^T

so dividing ``prev``'s output by ``s`` (a norm's weight, or a previous linear's output rows) and
multiplying every layer's input columns by ``s`` leaves the float model unchanged while changing
what the quantizers see: activations ``x / s`` and weights ``W diag(s)``. The algorithms differ
only in how they choose ``s``; this module holds everything else:

- :func:`resolve_sites` / :func:`check_pairs`: a pair's modules in a block (skip rules, errors);
- :func:`capture`: one float pass of the block over its cached inputs, with forward hooks that
  record per-input-channel statistics of every site's activations and the samples a search
  evaluates candidates on;
- :class:`ScaleEvaluator`: the output error of a site (its ``inspect`` module, or its single
  layer) with the site's layers quantized as if a candidate scale were folded in;
- :func:`fold`: fold a scale into ``prev`` and the layers;
- the candidate scales the algorithms share with their per-expert ``up -> down`` rules
  (:mod:`.expert_scaling`): SmoothQuant's :func:`smooth_scale` / :func:`smooth_candidate` (also
  AutoSmoothQuant's candidates) and AWQ's :func:`awq_candidates`.

The algorithm plugins (:mod:`.smoothquant`, :mod:`.awq`, :mod:`.autosmoothquant`) and
:mod:`.expert_scaling` import this module; it imports none of them.

Searches evaluate every candidate on the block's data, so their cost is (grid points) x (tokens).
They use a subset of the calibration data: whole sequences (evenly spaced batches, about
:data:`SEARCH_TOKENS` tokens) for an ``inspect`` module, which may mix tokens (attention), and
evenly strided tokens from every batch for a single linear layer. The statistics the searching
algorithms scale by come from about :data:`STATS_TOKENS` tokens (evenly spaced whole batches);
SmoothQuant, which does not search, uses every token.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from quark.torch.quantization.config.algo_configs import ScalingPair, _ScalingConfig
from quark.torch.quantization.config.config import first_stage
from quark.torch.quantization.config.type import QSchemeType
from quark.torch.quantization.driver import BlockInputs, find_decoder_layers, run_block
from quark.torch.quantization.fused_experts import QuantFusedExperts
from quark.torch.quantization.online_rotation import online_rotation
from quark.torch.quantization.tensor_quantize import compute_qparams, fake_quantize
from quark.torch.quantization.tensor_quantizer import TensorQuantizer
from quark.torch.utils.linear import linear

from . import BlockContext, match_modules, precision, quantizers_off
from .rotation import StreamModule

logger = logging.getLogger(__name__)
#: sites whose search fell back from autocast (logged at INFO once, then per block at DEBUG)
_AUTOCAST_FALLBACKS: set[str] = set()

#: calibration tokens a scale search evaluates each candidate on (see the module doc)
SEARCH_TOKENS = 2048
#: calibration tokens the statistics of the searching algorithms come from (None: all)
STATS_TOKENS: int | None = 8192
#: tokens of each linear's input kept for per-layer work (single-layer searches, AWQ clipping)
LAYER_SAMPLE_TOKENS = 4096
#: losses a search may minimise (``AutoSmoothQuantConfig.compute_scale_loss``)
LOSSES = ("mse", "mae", "rmse")


# ---------------------------------------------------------------------------------------------
# sites
# ---------------------------------------------------------------------------------------------
@dataclass
class Site:
    """A scaling pair resolved in one block."""

    pair: ScalingPair
    prev: nn.Module
    #: every linear the pair's ``layers`` patterns match, by name relative to the block
    layers: dict[str, nn.Linear]
    #: the module whose output error a search measures; None: the layers themselves
    inspect: nn.Module | None

    @property
    def in_features(self) -> int:
        return _reader_width(*next(iter(self.layers.items())))

    @property
    def linear_only(self) -> bool:
        """Whether every layer is an ``nn.Linear`` (else: routers or fused experts, see
        :func:`_match_linears`)."""
        return all(isinstance(m, nn.Linear) for m in self.layers.values())

    def describe(self) -> str:
        return f"{self.pair.prev_op} -> {', '.join(self.layers)}"


def _find(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def _match_linears(block: nn.Module, pattern: str) -> dict[str, nn.Module]:
    """The modules ``pattern`` matches in ``block``: linear layers, routers holding a ``[n, in]``
    weight and fused MoE experts modules (their gate/up matrices read the input)."""
    found = match_modules(block, pattern)
    for n, m in found.items():
        if isinstance(m, nn.Linear):
            continue
        try:
            StreamModule(m, n, writes=False)
        except ValueError as exc:
            raise TypeError(f"scaling pair layer {n!r} is a {type(m).__name__}: a scaling pair may list linear "
                            f"layers, routers with an [n, in] weight and fused MoE experts modules ({exc})") from None
    return found


def _reader_width(name: str, module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    widths = StreamModule(module, name, writes=False).features()
    if len(widths) != 1:
        raise ValueError(f"scaling pair layer {name!r}: its matrices take different input widths {sorted(widths)}")
    return widths.pop()


def _reader_matrices(name: str, module: nn.Module) -> list[torch.Tensor]:
    """Views of a router's ``[n, in]`` weight or of every expert's gate/up ``[E, out, in]`` matrices
    (:class:`~.rotation.StreamModule`): scaling them in place scales the module's weights."""
    return StreamModule(module, name, writes=False).matrices()


def _reader_specs(module: nn.Module) -> list[Any]:
    """The weight quantization spec of each of :func:`_reader_matrices`' matrices (None: not quantized;
    routers other than linears never are)."""
    if not isinstance(module, QuantFusedExperts):
        return [None]
    specs = {proj.path: fp.weight_quantizer.spec for proj, fp in module.quantized_projections()
             if fp.weight_quantizer is not None}
    return [specs.get(p.path) for p in module.fused_layout.projections if p.role != "down"]


def _prev_features(pair: ScalingPair, prev: nn.Module) -> int:
    if isinstance(prev, nn.Linear):
        return prev.out_features
    weight = getattr(prev, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.numel()
    raise ValueError(
        f"cannot fold a scale into prev_op {pair.prev_op!r} ({type(prev).__name__}): it is neither a linear "
        "layer nor a norm with a per-channel weight; remove the pair from scaling_layers"
    )


def resolve_pair(block: nn.Module, pair: ScalingPair) -> tuple[Site | None, list[str], str]:
    """``(site, missing, why)``: the site, or None with the names the block lacks (the pair does not
    apply to this kind of block) or why its shapes rule it out. The pair may list routers and fused
    MoE experts besides linears (:func:`_match_linears`)."""
    prev = _find(block, pair.prev_op)
    missing = [] if prev is not None else [pair.prev_op]
    layers: dict[str, nn.Linear] = {}
    for pattern in pair.layers:
        found = _match_linears(block, pattern)
        if not found:
            missing.append(pattern)
        layers.update(found)
    if not pair.layers:
        raise ValueError(f"scaling pair with prev_op {pair.prev_op!r} lists no layers")
    if missing:
        return None, missing, ""
    widths = {_reader_width(n, m) for n, m in layers.items()}
    if len(widths) != 1:
        raise ValueError(
            f"scaling pair {pair.prev_op!r} -> {list(layers)}: the layers take different input widths "
            f"{sorted(widths)}, so they cannot share one input"
        )
    width = widths.pop()
    out = _prev_features(pair, prev)
    if out != width:
        return None, [], (
            f"{pair.prev_op!r} produces {out} features but {list(layers)} take {width} "
            "(e.g. grouped K/V heads: v_proj is narrower than o_proj's input)"
        )
    inspect: nn.Module | None = None
    if pair.inspect is not None:
        inspect = block if pair.inspect == "" else _find(block, pair.inspect)
        if inspect is None:
            raise ValueError(f"scaling pair {pair.prev_op!r} -> {pair.layers}: inspect module {pair.inspect!r} "
                             "does not exist in the block (names are relative to one decoder block)")
    elif len(layers) > 1:
        pass  # evaluated as the layers' outputs side by side
    return Site(pair, prev, layers, inspect), [], ""


def resolve_sites(ctx: BlockContext, pairs: list[ScalingPair], through_online_rotation: bool = False,
                  algorithm: str = "") -> list[Site]:
    """The pairs that apply to this block (a pair whose modules the block lacks, or whose shapes do
    not allow a scale, is skipped; :func:`check_pairs` reports those once per model).

    A pair whose layers rotate their input online (rotation with ``r4``) is kept only when the
    algorithm scales ``through_online_rotation`` (statistics and folds in the unrotated basis, as
    SmoothQuant does); a searching algorithm's candidate evaluation does not model the rotation,
    so the pair is skipped there, reported once per model (on the first block the loop processes).
    """
    first_block = ctx.index == min(ctx.inputs.called, default=ctx.index)
    sites = []
    for pair in pairs:
        site, missing, why = resolve_pair(ctx.block, pair)
        if site is not None and not through_online_rotation and any(
            _input_rotation(layer) is not None for layer in site.layers.values()
        ):
            if first_block:
                logger.warning("%s: scaling pair %s -> %s skipped: its layers rotate their input online "
                               "(rotation r4), which %s's scale search does not model", algorithm or "scaling",
                               pair.prev_op, pair.layers, algorithm or "this algorithm")
            continue
        if site is not None:
            sites.append(site)
        else:
            logger.debug("block %d: scaling pair %s -> %s skipped: %s", ctx.index, pair.prev_op, pair.layers,
                         why or f"no module {missing}")
    return sites


def _input_rotation(layer: nn.Module):
    """The online rotation of a linear's input (R4); a fused experts module's online rotation acts
    on its down matrices' input, not on what the scaling site feeds it."""
    return online_rotation(layer) if isinstance(layer, nn.Linear) else None


def check_pairs(model: nn.Module, config: _ScalingConfig) -> None:
    """Fail early when no scaling pair applies to any decoder block (naming the first pair's missing
    modules); log the pairs that apply to no block (a template may list one pair per variant of an
    architecture, e.g. DeepSeek-V2 and V2-Lite, or a name may be mistyped) and the pairs skipped
    because of their shapes (once per model, not per block)."""
    if not config.scaling_layers:
        raise ValueError(f"{type(config).__name__}.scaling_layers is empty: give at least one ScalingPair")
    found = find_decoder_layers(model, config.model_decoder_layers or None)
    if found is None:
        raise ValueError(f"{config.name}: the model has no stack of decoder blocks; set model_decoder_layers")
    path, layers = found
    unmatched: list[tuple[ScalingPair, list[str] | None]] = []
    for pair in config.scaling_layers:
        applied, skipped, missing_first = 0, [], None
        for block in layers:
            site, missing, why = resolve_pair(block, pair)
            if site is not None:
                applied += 1
            elif why:
                skipped.append(why)
            elif missing_first is None:
                missing_first = missing
        if skipped:
            logger.info("%s: scaling pair %s -> %s skipped in %d of %d blocks: %s", config.name, pair.prev_op,
                        pair.layers, len(skipped), len(layers), skipped[0])
        if not applied and not skipped:
            unmatched.append((pair, missing_first))
    if len(unmatched) == len(config.scaling_layers):
        pair, missing = unmatched[0]
        raise ValueError(
            f"{config.name}: no scaling pair applies to any decoder block of {path!r}; e.g. {pair.prev_op!r} -> "
            f"{pair.layers}: no block has module(s) {missing}; names are relative to one decoder block "
            "(e.g. 'self_attn.q_proj')"
        )
    for pair, missing in unmatched:
        logger.warning("%s: scaling pair %r -> %s applies to no decoder block of %r (no module(s) %s): not used",
                       config.name, pair.prev_op, pair.layers, path, missing)


# ---------------------------------------------------------------------------------------------
# statistics and samples
# ---------------------------------------------------------------------------------------------
class ChannelStats:
    """Per-input-channel statistics of activations: mean |x|, min, max."""

    def __init__(self) -> None:
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if rows.shape[0] == 0:
            return
        abs_sum, lo, hi = rows.abs().sum(0), rows.amin(0), rows.amax(0)
        if self.abs_sum is None:
            self.abs_sum, self.lo, self.hi = abs_sum, lo, hi
        else:
            self.abs_sum += abs_sum
            self.lo = torch.minimum(self.lo, lo)
            self.hi = torch.maximum(self.hi, hi)
        self.count += rows.shape[0]

    def _check(self) -> None:
        if self.abs_sum is None:
            raise RuntimeError("no calibration token reached this scaling site's layers")

    @property
    def absmean(self) -> torch.Tensor:
        self._check()
        return self.abs_sum / self.count

    @property
    def absmax(self) -> torch.Tensor:
        self._check()
        return torch.maximum(-self.lo, self.hi)


@dataclass
class SiteData:
    """What the float pass recorded for one site."""

    stats: ChannelStats = field(default_factory=ChannelStats)
    #: calls of the inspect module on the search batches: (args, kwargs) and its float output
    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)


def _first_tensor(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the output tensor in a module output of type {type(output).__name__}")


def _linear_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A reader's input: a linear's ``input``, a router's or fused experts module's ``hidden_states``."""
    if args:
        return args[0]
    return kwargs["input"] if "input" in kwargs else kwargs["hidden_states"]


def _evenly(n: int, k: int) -> list[int]:
    """``k`` evenly spaced indices out of ``range(n)``."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def capture(
    ctx: BlockContext,
    sites: list[Site],
    search: bool = True,
    sample_layers: dict[str, nn.Linear] | None = None,
    stats_tokens: int | None = None,
    search_tokens: int | None = None,
    sample_tokens: int | None = None,
) -> tuple[list[SiteData], dict[str, torch.Tensor]]:
    """Run the block in float (quantizers off) on evenly spaced cached batches of about
    ``stats_tokens`` tokens (None: all) and record, through forward hooks: each site's per-channel
    input statistics; with ``search``, the calls and float outputs of each site's inspect module on
    about ``search_tokens`` of those tokens (whole batches); and, for each layer of
    ``sample_layers``, about ``sample_tokens`` rows of its input strided evenly over the batches.
    Returns ``(per-site data, per-layer input samples)``."""
    search_tokens = SEARCH_TOKENS if search_tokens is None else search_tokens
    sample_tokens = LAYER_SAMPLE_TOKENS if sample_tokens is None else sample_tokens
    inputs = ctx.inputs
    sample_layers = dict(sample_layers or {})
    per_batch = max(1, max(h.numel() // h.shape[-1] for h in inputs.hidden))
    chosen = list(range(len(inputs)))
    if stats_tokens is not None:
        chosen = _evenly(len(inputs), math.ceil(stats_tokens / per_batch))
    total = per_batch * len(chosen)
    n_search = math.ceil(search_tokens / per_batch) if search else 0
    search_batches = {chosen[i] for i in _evenly(len(chosen), n_search)} if n_search else set()
    batch_ids = iter(chosen)
    stride = max(1, total // max(1, sample_tokens))
    datas = [SiteData() for _ in sites]
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in sample_layers}
    state: dict = {"batch": -1, "seen": {}}
    hooks = []

    def on_block(_module: nn.Module, _args: tuple) -> None:
        state["batch"] = next(batch_ids)
        state["seen"] = {}

    def stats_hook(i: int) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _linear_input(args, kwargs)
            seen = state["seen"].setdefault(i, [])
            if any(t is x for t in seen):  # q, k and v get the same tensor: count it once
                return
            seen.append(x)
            datas[i].stats.update(x)

        return hook

    def inspect_hook(i: int) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if state["batch"] in search_batches:
                datas[i].calls.append((args, kwargs))
                datas[i].targets.append(_first_tensor(output).detach())

        return hook

    def sample_hook(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _linear_input(args, kwargs).detach()
            rows = x.reshape(-1, x.shape[-1])
            samples[name].append(rows[(stride - 1) // 2 :: stride].float().clone())

        return hook

    try:
        hooks.append(ctx.block.register_forward_pre_hook(on_block))
        for i, site in enumerate(sites):
            for layer in site.layers.values():
                # prepend: the statistics are of the unrotated input when the layer rotates it online
                hooks.append(layer.register_forward_pre_hook(stats_hook(i), with_kwargs=True, prepend=True))
            if search and site.inspect is not None:
                hooks.append(site.inspect.register_forward_hook(inspect_hook(i), with_kwargs=True))
        for name, layer in sample_layers.items():
            hooks.append(layer.register_forward_pre_hook(sample_hook(name), with_kwargs=True))
        with quantizers_off(ctx.block):
            subset = BlockInputs([inputs.hidden[i] for i in chosen], [inputs.extras[i] for i in chosen])
            run_block(ctx.block, subset, ctx.index)
    finally:
        for h in hooks:
            h.remove()
    return datas, {name: torch.cat(rows) for name, rows in samples.items() if rows}


# ---------------------------------------------------------------------------------------------
# evaluating a candidate scale
# ---------------------------------------------------------------------------------------------
def _quantizer(layer: nn.Module, role: str) -> TensorQuantizer | None:
    q = getattr(layer, role, None)
    return q if isinstance(q, TensorQuantizer) else None


def _act_quant(layer: nn.Module, s: torch.Tensor, stats: ChannelStats) -> Callable | None:
    """The layer's input quantization as it acts on the scaled activations ``x / s``, mapped back
    to the unscaled input: ``x -> Q(x / s) * s`` (:func:`scaled_input_quant`); fused experts: their
    gate/up input quantizer."""
    q = layer.input_quantizer() if isinstance(layer, QuantFusedExperts) else _quantizer(layer, "input_quantizer")
    return None if q is None else scaled_input_quant(q, s, stats.lo, stats.hi)


def scaled_input_quant(q: TensorQuantizer, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> Callable:
    """``x -> Q(x / s) * s`` for input quantizer ``q`` after folding ``s``. A static per-tensor scheme
    gets its min-max qparams from the per-channel range ``[lo, hi]`` of the whole calibration set
    divided by ``s`` (what a min-max observer would record after the fold); other static schemes are
    quantized dynamically (min-max of the evaluated tensor) during the search. A per-expert static
    quantizer observes each expert's own tokens: the range of all of them bounds each expert's."""
    spec = q.spec
    one = first_stage(spec)
    if not q.is_dynamic and not isinstance(spec, list) and one.qscheme is QSchemeType.per_tensor:
        qp = compute_qparams(torch.stack([lo / s, hi / s]), spec)
        return lambda x: fake_quantize(x / s.to(x.dtype), spec, qp) * s.to(x.dtype)
    return lambda x: fake_quantize(x / s.to(x.dtype), spec) * s.to(x.dtype)


def quantized_scaled_weight(layer: nn.Linear, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Q(w diag(s)) / s``: the layer's weight quantization as it acts after folding ``s``, in the
    unscaled input basis (a layer without a weight quantizer keeps ``w``)."""
    q = _quantizer(layer, "weight_quantizer")
    if q is None:
        return w
    sw = s.to(w.dtype)
    return fake_quantize(w * sw, q.spec) / sw


def quantized_scaled_matrix(w: torch.Tensor, s: torch.Tensor, spec: Any) -> torch.Tensor:
    """:func:`quantized_scaled_weight` for a router's or fused experts' matrix (``[out, in]`` or
    ``[E, out, in]``, quantized per expert with ``spec``; None: unquantized, ``w`` itself)."""
    if spec is None:
        return w
    sw = s.to(w.device, w.dtype)
    if w.dim() == 2:
        return fake_quantize(w * sw, spec) / sw
    return torch.stack([fake_quantize(w[e] * sw, spec) / sw for e in range(w.shape[0])])


class ScaleEvaluator:
    """Output error of a site with its layers quantized as if a candidate scale were folded in.

    The candidate is simulated without touching ``prev``: each layer's weight becomes
    ``Q(W diag(s)) / s`` and its input ``Q_act(x / s) * s`` (when it quantizes inputs), so the
    evaluated module sees the original activations. Every other quantizer under the evaluated
    module is off: the error is that of this site's layers only, as in the AWQ paper. Use as a
    context manager; the layers' weights are restored on exit. ``search_dtype`` sets the precision
    of the candidates' forwards (:mod:`.precision`); the targets stay the float outputs.
    """

    def __init__(self, site: Site, data: SiteData, samples: dict[str, torch.Tensor], loss: str = "mse",
                 max_layer_tokens: int | None = None, search_dtype: str = "float32") -> None:
        if loss not in LOSSES:
            raise ValueError(f"compute_scale_loss={loss!r}; allowed: {', '.join(LOSSES)}")
        self.site, self.data, self.loss = site, data, loss
        if site.inspect is None and not site.linear_only:
            raise ValueError(f"scaling pair {site.pair.prev_op!r} -> {site.pair.layers}: a pair with routers or fused "
                             "experts needs an inspect module (the MoE block) to evaluate candidate scales")
        first_name, first = next(iter(site.layers.items()))
        weight = first.weight if isinstance(first, nn.Linear) else _reader_matrices(first_name, first)[0]
        #: autocast dtype of the candidates' forwards (:mod:`.precision`; None: the model's own)
        self.autocast = precision.resolve(search_dtype, weight.device, weight.dtype)
        self.device = weight.device
        self.original = {name: layer.weight.data for name, layer in site.layers.items()
                         if isinstance(layer, nn.Linear)}
        #: routers' and fused experts' matrices: their float values, restored on exit
        self.readers = {name: (_reader_matrices(name, layer), _reader_specs(layer))
                        for name, layer in site.layers.items() if not isinstance(layer, nn.Linear)}
        self.reader_original = {name: [m.clone() for m in views] for name, (views, _) in self.readers.items()}
        self.act: dict[str, Callable | None] = {}
        self.layer_inputs: dict[str, torch.Tensor] = {}
        self.layer_targets: dict[str, torch.Tensor] = {}
        if site.inspect is None:
            for name, layer in site.layers.items():
                if name not in samples:
                    raise RuntimeError(f"no input sample was captured for {name!r}")
                x = samples[name]
                step = max(1, x.shape[0] // max(1, max_layer_tokens or SEARCH_TOKENS))
                x = x[::step].to(layer.weight.dtype)
                self.layer_inputs[name] = x
                self.layer_targets[name] = linear(x, layer.weight, layer.bias)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ScaleEvaluator:
        if self.site.inspect is not None:
            self._stack.enter_context(quantizers_off(self.site.inspect))
            for name, layer in self.site.layers.items():
                self._stack.enter_context(_pre_hook(layer, self._input_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        for name, weight in self.original.items():
            self.site.layers[name].weight.data = weight
        with torch.no_grad():
            for name, (views, _) in self.readers.items():
                for view, orig in zip(views, self.reader_original[name]):
                    view.copy_(orig)

    def _input_hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            fn = self.act.get(name)
            if fn is None:
                return None
            if isinstance(_module, QuantFusedExperts):
                return _module.map_hidden(args, kwargs, fn)
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "input": fn(kwargs["input"])}

        return hook

    def __call__(self, s: torch.Tensor) -> float:
        """The loss of scale ``s`` (``torch.ones`` = no scaling, i.e. plain rounding)."""
        for name, w in self.original.items():
            layer = self.site.layers[name]
            self.act[name] = _act_quant(layer, s.to(w.device), self.data.stats)
            layer.weight.data = quantized_scaled_weight(layer, w, s.to(w.device))
        with torch.no_grad():  # a router (weights only) or fused experts (weights, and inputs as above)
            for name, (views, specs) in self.readers.items():
                self.act[name] = _act_quant(self.site.layers[name], s, self.data.stats)
                for view, orig, spec in zip(views, self.reader_original[name], specs):
                    view.copy_(quantized_scaled_matrix(orig, s, spec))
        try:
            sq, ab, n = self._errors()
        except RuntimeError as exc:
            if self.autocast is None:
                raise
            # modelling code that is not autocast-safe (transformers' DBRX experts index_add_ their
            # bfloat16 products into a float32 buffer): this site searches at the model's precision
            where = self.site.describe()
            log = logger.debug if where in _AUTOCAST_FALLBACKS else logger.info
            _AUTOCAST_FALLBACKS.add(where)
            log("scale search of %s: its forward fails under %s autocast (%s); searching in the model's dtype",
                where, self.autocast, str(exc).splitlines()[0][:200])
            self.autocast = None
            sq, ab, n = self._errors()
        if self.loss == "mae":
            return ab / n
        return sq / n if self.loss == "mse" else math.sqrt(sq / n)

    def _errors(self) -> tuple[float, float, int]:
        """Squared and absolute error sums and the element count of the current candidate's outputs."""
        sq, ab, n = 0.0, 0.0, 0
        with torch.no_grad(), precision.search_autocast(self.autocast, self.device):
            if self.site.inspect is not None:
                for (args, kwargs), target in zip(self.data.calls, self.data.targets):
                    out = _first_tensor(self.site.inspect(*args, **kwargs))
                    sq, ab, n = self._accumulate(out, target, sq, ab, n)
            else:
                for name, layer in self.site.layers.items():
                    x = self.layer_inputs[name]
                    fn = self.act[name]
                    out = linear(fn(x) if fn is not None else x, layer.weight, layer.bias)
                    sq, ab, n = self._accumulate(out, self.layer_targets[name], sq, ab, n)
        return sq, ab, n

    def _accumulate(self, out: torch.Tensor, target: torch.Tensor, sq: float, ab: float, n: int
                    ) -> tuple[float, float, int]:
        d = (out.float() - target.float()).reshape(-1)
        if self.loss == "mae":
            ab += float(d.abs().sum())
        else:
            sq += float(torch.dot(d, d))
        return sq, ab, n + d.numel()


@contextlib.contextmanager
def _pre_hook(module: nn.Module, hook: Callable) -> Iterator[None]:
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def search(evaluator: ScaleEvaluator, candidates: list[torch.Tensor]) -> tuple[int, list[float]]:
    """Index of the candidate with the lowest loss (the first on ties) and every loss."""
    with evaluator:
        losses = [evaluator(s) for s in candidates]
    best = min(range(len(losses)), key=lambda i: (losses[i], i))
    return best, losses


# ---------------------------------------------------------------------------------------------
# folding
# ---------------------------------------------------------------------------------------------
def _norm_offset(norm: nn.Module, width: int) -> float:
    """0 for a norm computing ``norm(x) * w``, 1 for ``norm(x) * (1 + w)`` (Gemma), found by probing
    the module with ``w = 0`` and ``w = 1`` (its bias, if any, zeroed)."""
    weight = norm.weight
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    saved_w = weight.data.clone()
    saved_b = bias.data.clone() if bias is not None else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, width, generator=g).to(device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            if bias is not None:
                bias.data.zero_()
            weight.data.zero_()
            y0 = _first_tensor(norm(x)).float()
            weight.data.fill_(1.0)
            y1 = _first_tensor(norm(x)).float()
    except Exception:  # a norm that cannot be called on a plain [rows, width] tensor
        logger.warning("could not probe %s; assuming it computes norm(x) * weight", type(norm).__name__)
        return 0.0
    finally:
        weight.data.copy_(saved_w)
        if bias is not None:
            bias.data.copy_(saved_b)
    scale = y1.abs().max().clamp(min=1e-12)
    if y0.abs().max() <= 1e-5 * scale:
        return 0.0
    if (y1 - 2 * y0).abs().max() <= 1e-4 * scale:
        return 1.0
    raise ValueError(f"cannot fold a scale into {type(norm).__name__}: its output is not norm(x) * w or "
                     "norm(x) * (1 + w)")


def fold(site: Site, s: torch.Tensor) -> None:
    """Divide ``prev``'s output by ``s`` and multiply the layers' input columns by ``s`` (in place)."""
    prev = site.prev
    with torch.no_grad():
        w = prev.weight
        sp = s.to(w.device, torch.float32)
        if isinstance(prev, nn.Linear):
            w.copy_(w.float() / sp[:, None])
        else:
            offset = _norm_offset(prev, w.numel())
            w.copy_((w.float() + offset) / sp - offset)
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(bias.float() / sp)
        for name, layer in site.layers.items():
            if not isinstance(layer, nn.Linear):  # a router or fused experts: every matrix's input columns
                for m in _reader_matrices(name, layer):
                    m.copy_(m.float() * s.to(m.device, torch.float32))
                continue
            lw = layer.weight
            rot = online_rotation(layer)
            if rot is None:
                lw.copy_(lw.float() * s.to(lw.device, torch.float32))
            else:  # scale the columns of W, the stored weight being W Q
                lw.copy_(rot.from_input_basis(rot.to_input_basis(lw) * s.to(lw.device, torch.float64)))


def input_basis_weight(layer: nn.Linear) -> torch.Tensor:
    """The weight acting on the layer's input as its previous op produces it (undoing an online
    rotation's absorbed ``Q``)."""
    rot = online_rotation(layer)
    w = layer.weight.detach()
    return w if rot is None else rot.to_input_basis(w)


def weight_absmax(site: Site) -> torch.Tensor:
    """Per input channel, the largest |w| over every layer of the site (over every matrix of a router or
    fused experts module: each expert's gate/up)."""
    per_layer = []
    for name, layer in site.layers.items():
        if isinstance(layer, nn.Linear):
            per_layer.append(input_basis_weight(layer).float().abs().amax(0))
        else:
            per_layer += [m.float().abs().reshape(-1, m.shape[-1]).amax(0) for m in _reader_matrices(name, layer)]
    device = per_layer[0].device
    return torch.stack([t.to(device) for t in per_layer]).amax(0)


# ---------------------------------------------------------------------------------------------
# candidate scales
# ---------------------------------------------------------------------------------------------
#: floor of SmoothQuant's statistics before the powers (a dead channel would otherwise give 0 or inf)
EPS = 1e-5


def smooth_scale(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, clamp_min: float) -> torch.Tensor:
    """SmoothQuant's ``max|X|^alpha / max|W|^(1-alpha)`` per input channel, at least ``clamp_min``."""
    act = act_absmax.float().clamp(min=EPS)
    w = w_absmax.float().to(act.device).clamp(min=EPS)
    return (act.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=clamp_min)


def smooth_candidate(site: Site, act_absmax: torch.Tensor, alpha: float, clamp_min: float) -> torch.Tensor:
    """:func:`smooth_scale` of a site: its activations' ``max|X|`` and its layers' :func:`weight_absmax`."""
    return smooth_scale(act_absmax, weight_absmax(site), alpha, clamp_min)


def awq_candidates(absmean: torch.Tensor, num_grid: int) -> list[torch.Tensor]:
    """AWQ's ``s = m^alpha`` for ``alpha = i / num_grid``, ``i = 0 .. num_grid-1``, normalised so that
    ``max(s) * min(s) = 1`` (the first candidate is all ones: no scaling)."""
    out = []
    for i in range(num_grid):
        s = absmean.pow(i / num_grid).clamp(min=1e-4)
        out.append(s / (s.max() * s.min()).sqrt())
    return out
