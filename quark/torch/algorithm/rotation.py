"""Hadamard rotation of a pre-norm decoder: QuaRot (Ashkboos et al. 2024, arXiv:2404.00456) with
SpinQuant's R1-R4 placement (Liu et al. 2024, arXiv:2405.16406).

An orthogonal ``Q`` inserted as ``Q Qᵀ`` between two linear maps changes nothing in float, but
spreads each outlier channel over all channels, so activations (and weights) quantize with a much
smaller range. Where the rotations go:

- **R1** (hidden size, offline): the residual stream ``x`` becomes ``x Q``. RMSNorm commutes with
  ``Q`` once its weight is folded into the linears it feeds (``rms(x Q) = rms(x)``), so: fold each
  norm's weight into its following linears and set it to 1 (a Gemma-style ``(1 + weight)`` scale
  folds the same way, leaving ``weight = 0``); embeddings ``E <- E Q`` (and what else
  writes the stream from outside the blocks, e.g. a multimodal projector: ``W <- Qᵀ W``); every linear
  reading the stream (q/k/v, gate/up, lm_head) ``W <- W Q``; every linear writing into it (o_proj,
  down_proj) ``W <- Qᵀ W`` (and its bias ``b <- b Q``). In MoE blocks the router's weight and each
  fused expert's gate/up matrix read the stream, each expert's down matrix (and bias) writes it:
  routing logits and every expert's output are unchanged, so is the mixture.
- **LayerNorm streams** (OPT, Phi-1/2, GPT-J, Cohere, DBRX, OLMo): a LayerNorm subtracts the mean first,
  ``LN(x) = norm(x M)`` with the centring projection ``M = I - u uᵀ`` (``u`` the unit all-ones
  vector), and a Hadamard ``Q`` does not commute with ``M``. An orthogonal ``Q`` with ``Q u = u``
  does (it maps ``u`` and ``u⊥`` to themselves), so ``LN(x Q) = LN(x) Q`` once the norm's weight and
  bias are folded away: R1 is then ``Q G`` with ``G`` the Householder reflection that sends ``u Q``
  back to ``u`` (:class:`.MeanPreservingTransform`). SliceGPT (Ashkboos et al. 2024, arXiv:2401.15024)
  reaches the same end by centring every write into the stream and replacing the LayerNorms by
  RMSNorms; keeping ``u`` fixed instead leaves the stream's mean in place and the norms LayerNorms,
  so the checkpoint keeps its architecture. A norm's bias folds into its readers' biases (``c <- c
  + W b``) or, where a reader has none (OPT's lm_head, GPT-J's q/k/v), stays in the norm as ``(b / w) Q``. RMSNorm
  and LayerNorm streams cannot be mixed.
- **R2** (head size, offline): per head, V's output ``v_h <- v_h H`` (v_proj's rows, the value
  rows of a fused ``[q; k; v]`` projection with ``fused_qkv``, or the value part of each head of
  MLA's ``kv_b_proj`` with ``kv_per_head``) and o_proj's input columns of that
  head ``W_o[:, h] <- W_o[:, h] H``. Attention probabilities mix rows of V,
  so the rotation passes through them; with grouped K/V heads every head uses the same ``H``.
- **R4** (intermediate size, online): the input of every MLP output (``mlp_outputs``, else
  ``down_proj``) is rotated at run time, before its input quantizer, and its weight ``W <- W H``
  absorbs the inverse: a linear's by a forward pre-hook; quantized fused MoE experts' inside their
  per-expert loop (each expert's down input; every expert's down matrix absorbs ``H``). The run-time
  part (the online transform, attaching it, re-creating it on a loaded checkpoint) is
  :mod:`quark.torch.quantization.online_rotation`.
- **R3** (online rotation of Q and K after RoPE) is not implemented: this toolkit quantizes Q/K at
  the projections' outputs, before RoPE, so no quantized tensor would change.

``Q = D H / sqrt(n)`` with ``H`` a Hadamard matrix (:mod:`quark.torch.quantization.hadamard`) and
``D`` = I, or a seeded random ±1 diagonal when ``random=True``. All weight updates are computed in
float64 and written back in place, so the Parameters shared with the quantized modules stay the same
objects.

A norm applied to a branch's output before it joins the stream (Gemma 2/3's post-norms) does not
commute with ``Q`` and cannot be folded anywhere: such models get no rotation. Whatever the roles,
the quantizer checks the float logits on a calibration batch before and after the rotation
(:mod:`.float_check`) and refuses a rotation that changed them.

Rotation is model-level (:meth:`RotationAlgorithm.prepare_model`, run once before calibration);
the per-block step does nothing. The streamed flow, whose blocks are loaded one at a time, runs it
as :meth:`RotationAlgorithm.prepare_model_streamed` (the embeddings, lm_head and the online
transforms) followed by each block's part when the block is loaded, with the same result bit for
bit. Module roles come from :class:`RotationConfig` (template data).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable

import torch
import torch.nn as nn

from quark.torch.quantization.config.algo_configs import AlgoConfig, RotationConfig
from quark.torch.quantization.driver import find_decoder_layers, get_submodule
from quark.torch.quantization.fused_experts import expert_view, experts_layout
from quark.torch.quantization.hadamard import HadamardTransform
from quark.torch.quantization.online_rotation import (
    _CHUNK,
    R4_SEED_OFFSET,
    _down_matrices,
    _linear,
    _transform,
    attach_online_rotation,
    find_role,
    online_rotation,
    r4_input_size,
    r4_targets,
    rotate_input_side,
    rotation_transform,
)

from . import BlockAlgorithm, match_modules, register_algorithm

logger = logging.getLogger(__name__)


# -- weight updates ---------------------------------------------------------------------------------
@torch.no_grad()
def rotate_output_side(weight: torch.Tensor, rot: HadamardTransform) -> None:
    """``W <- Qᵀ W`` in place for a ``(out, in)`` weight, or ``b <- b Q`` for a bias (the layer now
    writes ``y Q``): rotates each column."""
    rot = _transform(rot, weight)
    if weight.dim() == 1:
        weight.copy_(rot(weight.double()))
        return
    for j in range(0, weight.shape[1], _CHUNK):
        block = weight[:, j : j + _CHUNK]
        block.copy_(rot(block.double().T).T)


@torch.no_grad()
def rotate_heads_output(linear: nn.Linear, rot: HadamardTransform, rows: slice = slice(None),
                        block: int | None = None, offset: int = 0) -> None:
    """Per head of size ``rot.n``: ``out_h <- out_h H`` (rows of the weight, and the bias), for the
    heads in ``rows`` of the output (all of them by default; V's rows of a fused QKV projection).
    With ``block``, a head is rows ``offset .. offset + n`` of every ``block`` rows (the value part of
    each head of MLA's ``kv_b_proj``, whose heads hold their key part first)."""
    rot = _transform(rot, linear.weight)
    block = block or rot.n
    w = linear.weight[rows]
    heads = w.shape[0] // block
    view = w.view(heads, block, w.shape[1])[:, offset : offset + rot.n]
    for j in range(0, w.shape[1], _CHUNK):
        part = view[:, :, j : j + _CHUNK]
        part.copy_(rot(part.double().transpose(1, 2)).transpose(1, 2))
    if linear.bias is not None:
        b = linear.bias[rows].view(heads, block)[:, offset : offset + rot.n]
        b.copy_(rot(b.double()))


@torch.no_grad()
def rotate_heads_input(linear: nn.Linear, rot: HadamardTransform) -> None:
    """Per head of size ``rot.n``: the columns of that head ``W[:, h] <- W[:, h] H``."""
    rot = _transform(rot, linear.weight)
    w = linear.weight
    view = w.view(w.shape[0], w.shape[1] // rot.n, rot.n)
    for i in range(0, w.shape[0], _CHUNK):
        block = view[i : i + _CHUNK]
        block.copy_(rot(block.double()))


# -- norms ------------------------------------------------------------------------------------------
def _tensor_attr(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


@torch.no_grad()
def norm_kind(norm: nn.Module, path: str, hidden: int) -> tuple[str, float]:
    """``("rms", offset)`` for ``y = x / rms(x) * (offset + weight) (+ bias)``, ``("layer", offset)`` for
    a LayerNorm ``y = (x - mean(x)) / std(x) * (offset + weight) (+ bias)``, over the last dimension,
    with ``offset`` 0 or 1 (Gemma-style norms scale by ``1 + weight``); weight and bias optional.
    Anything else is refused. Checked on a probe input, so any class computing one of these passes
    (Llama's, Gemma's, Cohere's and OLMo's norms, ``nn.LayerNorm``) and a group norm does not:
    rotation needs a norm that commutes with an orthogonal map once its scale and bias are folded
    into the following linears."""
    name = type(norm).__name__
    if isinstance(norm, nn.GroupNorm):
        raise ValueError(f"rotation: {path} is a GroupNorm (it normalises dimension 1, not the hidden size); it "
                         "cannot be folded into the following linears")
    weight, bias = _tensor_attr(norm, "weight"), _tensor_attr(norm, "bias")
    like = weight if weight is not None else bias
    device = like.device if like is not None else None
    dtype = like.dtype if like is not None else torch.float32
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, hidden, generator=g) * 4 + 3).to(device=device, dtype=dtype)
    try:
        y = norm(x).double()
    except Exception as exc:  # noqa: BLE001 - any failure means "not a norm over the hidden size"
        raise ValueError(f"rotation: {path} ({name}) failed on a [4, {hidden}] probe input: {exc}") from None
    xd = x.double()
    centered = xd - xd.mean(-1, keepdim=True)
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    fits = []  # (relative residual, kind, offset) of every candidate within the tolerance
    for kind, base in (("rms", xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True))),
                       ("layer", centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True)))):
        for offset in (0.0, 1.0) if weight is not None else (0.0,):
            expected = base
            if weight is not None:
                expected = expected * (offset + weight.double())
            if bias is not None:
                expected = expected + bias.double()
            if y.shape == expected.shape:
                residual = float((y - expected).norm() / expected.norm().clamp_min(1e-30))
                if residual <= tol:
                    fits.append((residual, kind, offset))
    if fits:  # the closest: in half precision a large weight w fits both w and 1 + w within the tolerance
        _, kind, offset = min(fits)
        return kind, offset
    raise ValueError(
        f"rotation: {path} ({name}) computes neither an RMSNorm (x / rms(x) * weight) nor a LayerNorm "
        "((x - mean) / std * weight + bias) over the hidden size, with weight or (1 + weight) (another "
        "normalisation?); it cannot be folded into the following linears"
    )


def _bias_kept_in_norm(norm: nn.Module, readers: list[StreamModule], path: str, offset: float = 0.0) -> bool:
    """Where a norm's nonzero bias ``b`` goes. Into its readers' biases (``c <- c + W b``, returns
    False) when every reader has one; otherwise it stays in the norm, divided by the norm's weight
    (which folds into the readers) and rotated with the stream (returns True): OPT's final
    LayerNorm feeds a bias-free lm_head. Refused when the weight is 0 where the bias is not."""
    bias = _tensor_attr(norm, "bias")
    if bias is None or not bool((bias != 0).any()):
        return False
    if all(b is not None for reader in readers for _, b in reader.pairs()):
        return False
    weight = _tensor_attr(norm, "weight")
    if weight is not None and bool(((weight + offset == 0) & (bias != 0)).any()):
        lacking = next(r.path for r in readers if any(b is None for _, b in r.pairs()))
        raise ValueError(
            f"rotation r1: {path} has a nonzero bias where its weight is 0, and {lacking} (reading it) has no bias "
            "to take it"
        )
    return True


def _per_matrix(m: torch.Tensor, b: torch.Tensor | None = None):
    """``(matrix [out, in], bias [out] or None)`` per expert of an ``[E, out, in]`` view, or the pair itself."""
    if m.dim() == 3:
        return [(m[e], None if b is None else b[e]) for e in range(m.shape[0])]
    return [(m, b)]


@torch.no_grad()
def fold_norm(norm: nn.Module, readers: list[StreamModule], keep_bias: bool = False, offset: float = 0.0) -> None:
    """Fold a norm's scale ``s = offset + w`` (``offset`` 1 for a ``(1 + weight)`` norm) and bias ``b``
    into the matrices reading its output: ``W <- W diag(s)``, then ``w <- 1 - offset`` (a scale of 1);
    the bias into the readers' biases (``c <- c + W b``, ``b <- 0``), or with ``keep_bias`` (see
    :func:`_bias_kept_in_norm`) ``b <- b / s`` in the norm, to be rotated with the stream. Afterwards
    the norm is a plain normalisation (plus that bias)."""
    weight, bias = _tensor_attr(norm, "weight"), _tensor_attr(norm, "bias")
    shift = bias is not None and bool((bias != 0).any()) and not keep_bias
    for reader in readers:
        for pair in reader.pairs():
            for m, b in _per_matrix(*pair):
                for i in range(0, m.shape[0], _CHUNK):
                    rows = m[i : i + _CHUNK]
                    if shift:
                        b[i : i + _CHUNK].add_((rows.double() @ bias.double().to(m.device)).to(b.dtype))
                    if weight is not None:
                        rows.copy_(rows.double() * (offset + weight.double().to(m.device)))
    if bias is not None:
        if keep_bias and weight is not None:
            w = offset + weight.double()
            bias.copy_(torch.where(bias != 0, bias.double() / torch.where(w == 0, 1.0, w), 0.0))
        elif not keep_bias:
            bias.zero_()
    if weight is not None:
        weight.fill_(1.0 - offset)


# -- what reads / writes the residual stream ----------------------------------------------------------
class StreamModule:
    """A block module that reads the residual stream (``x W^T`` per matrix, input features = hidden)
    or writes into it (output features = hidden): a linear, a router holding a ``[n, hidden]`` weight,
    or a fused MoE experts module (:mod:`quark.torch.quantization.fused_experts`: every expert's
    gate/up matrix reads, every down matrix writes)."""

    def __init__(self, module: nn.Module, path: str, writes: bool) -> None:
        self.module, self.path, self.writes = module, path, writes
        self.layout = experts_layout(module)
        if self.layout is None and not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ValueError(f"rotation: {path} is a {type(module).__name__}: expected a linear layer, a router with a "
                             "weight or a fused MoE experts module")
        if writes and self.layout is not None and self.layout.post_norm:
            raise ValueError(f"rotation: {path} normalises each expert's output ({self.layout.post_norm}), which does "
                             "not commute with a rotation of the stream")
        if self.layout is None and module.weight.dim() != 2:
            raise ValueError(f"rotation: {path} has a {module.weight.dim()}-D weight, expected [out, in]")

    def _projections(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per fused projection on our side: its ``[E, out, in]`` view and its ``[E, out]`` bias."""
        out = []
        for proj in self.layout.projections:
            if (proj.role == "down") != self.writes:
                continue
            head, _, leaf = proj.path.rpartition(".")
            owner = self.module.get_submodule(head) if head else self.module
            w = getattr(owner, leaf)
            experts = w.shape[0] if w.dim() == 3 else int(self.module.num_experts)
            bias = getattr(owner, leaf + self.layout.bias_suffix, None) if self.layout.bias_suffix else None
            out.append((expert_view(w.detach(), experts, proj.transposed), bias))
        return out

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``([out, in] matrix or [E, out, in] view, its [out] / [E, out] bias or None)`` per matrix on the
        stream's side."""
        if self.layout is None:
            return [(self.module.weight.detach(), None if _tensor_attr(self.module, "bias") is None
                     else self.module.bias.detach())]
        return [(view, None if b is None else b.detach()) for view, b in self._projections()]

    def matrices(self) -> list[torch.Tensor]:
        """``[out, in]`` matrices (or ``[E, out, in]`` views of fused experts) on the stream's side."""
        return [m for m, _ in self.pairs()]

    def biases(self) -> list[torch.Tensor]:
        """Biases added to what this module writes into the stream (``[out]`` or ``[E, out]``)."""
        if not self.writes:
            return []
        return [b for _, b in self.pairs() if b is not None]

    def features(self) -> set[int]:
        """The sizes on the stream's side (must be the hidden size)."""
        return {m.shape[-2] if self.writes else m.shape[-1] for m in self.matrices()}

    @torch.no_grad()
    def rotate(self, rot: HadamardTransform) -> None:
        for m in self.matrices():
            for e in range(m.shape[0]) if m.dim() == 3 else [None]:
                w = m if e is None else m[e]
                (rotate_output_side if self.writes else rotate_input_side)(w, rot)
        for b in self.biases():
            for row in (b if b.dim() == 2 else [b]):
                rotate_output_side(row, rot)


# -- model-level helpers -----------------------------------------------------------------------------
def _text_config(model: nn.Module) -> object | None:
    """The model config's text part (the config itself for a text-only model)."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _attention_size(attention: nn.Module, model: nn.Module, name: str) -> int | None:
    """The integer ``name`` of the attention module, else of the model's text config, else None."""
    for owner in (attention, _text_config(model)):
        value = getattr(owner, name, None)
        if isinstance(value, int):
            return value
    return None


def _head_dim(attention: nn.Module, model: nn.Module) -> int:
    """The attention head size: the attention module's ``head_dim``, else the model config's
    ``head_dim``, else ``hidden_size // num_attention_heads``."""
    value = _attention_size(attention, model, "head_dim")
    if value is not None:
        return value
    text = _text_config(model)
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads:
        return hidden // heads
    raise ValueError(
        f"rotation r2: cannot tell the head size of {type(attention).__name__} (no head_dim attribute and no "
        "head_dim / hidden_size + num_attention_heads in the model config); set r2=False"
    )


def _value_head_dim(attention: nn.Module, model: nn.Module) -> int:
    """An MLA attention's value head size: its ``v_head_dim``, else the model config's."""
    value = _attention_size(attention, model, "v_head_dim")
    if value is None:
        raise ValueError(f"rotation r2: cannot tell the value head size of {type(attention).__name__} (kv_per_head=True "
                         "needs a v_head_dim attribute or config field); set r2=False")
    return value


def warn_if_round_to_nearest_follows(algorithms: list[tuple[BlockAlgorithm, AlgoConfig]],
                                     weight_bits: int | None) -> bool:
    """Warn when R1 rotation is followed by plain round-to-nearest on weights of 4 bits or fewer.

    Folding a norm's weight into the next linears (needed before R1) removes the norm's per-channel
    damping from the weight error: models with massive activations on channels whose norm weight is
    small (the attention-sink token; SmolLM2's channel 507, norm weight 0.07, normalised value 24) see
    that token's q/k/v error grow several times, and a 4-bit RTN model gets worse with rotation
    (SmolLM2 int4_wo_64, 8 windows: 44.1 -> 87.2; folding alone: 74.7; ``bench/rotation_fold.py``).
    GPTQ-style solvers (``corrects_weight_error``) see that token in their Hessian and correct it.
    ``algorithms`` are the (algorithm, config) pairs in order. Returns whether it warned."""
    names = [config.name for _, config in algorithms]
    if "rotation" not in names or weight_bits is None or weight_bits > 4:
        return False
    at = names.index("rotation")
    if not algorithms[at][1].r1 or any(algo.corrects_weight_error for algo, _ in algorithms[at + 1 :]):
        return False
    logger.warning(
        "rotation followed by round-to-nearest %d-bit weights: folding the norms into the linears can make "
        "4-bit weight error worse on models with attention-sink outliers; add gptq, gptaq or qronos after "
        "rotation (e.g. algorithm=['rotation', 'gptq'])", weight_bits,
    )
    return True


def untie_embeddings(model: nn.Module, embeddings: list[nn.Module], lm_head: nn.Module) -> bool:
    """Give ``lm_head`` its own copy of a weight it shares with an embedding (rotation changes the
    two differently) and record it in the config. Returns whether anything was untied."""
    shared = any(getattr(e, "weight", None) is lm_head.weight for e in embeddings)
    if not shared:
        return False
    lm_head.weight = nn.Parameter(lm_head.weight.detach().clone(), requires_grad=lm_head.weight.requires_grad)
    config = getattr(model, "config", None)
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)())}.values():
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys") and hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    logger.info("rotation: lm_head shared its weight with the embeddings; untied it (a copy) and set "
                "config.tie_word_embeddings = False")
    return True


def find_stream_writers(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    """The modules ``RotationConfig.stream_writers`` names (paths or fnmatch patterns), entry by entry."""
    out: dict[str, nn.Module] = {}
    for pattern in patterns:
        found = match_modules(model, pattern)
        if not found:
            raise ValueError(f"rotation r1: stream_writers entry {pattern!r} matches no module of the model")
        out.update(found)
    return list(out.items())


def resolve_role(block: nn.Module, entry: str, prefix: str, role: str) -> tuple[str, nn.Linear]:
    """The linear a role every block must have names (:func:`find_role`)."""
    found = find_role(block, entry)
    if found is None:
        raise ValueError(f"rotation {role}: block {prefix} has no {' or '.join(repr(n) for n in entry.split('|'))}")
    return found[0], _linear(found[1], f"{prefix}.{found[0]}")


def block_prefix(cfg: RotationConfig, index: int) -> str:
    """Block ``index``'s path in the model (in messages)."""
    return f"{cfg.model_decoder_layers}.{index}" if cfg.model_decoder_layers else str(index)


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _probe_copy(norm: nn.Module) -> nn.Module:
    """What :func:`norm_kind` probes: ``norm``, or where its tensors are not loaded (on meta: a
    streamed model's skeleton) a copy holding stand-ins of the same dtypes, weights in [0.5, 1.5) and
    small random biases (its kind is the class's; a block checks it again on its loaded weights)."""
    if not _is_meta(norm):
        return norm
    probe = copy.deepcopy(norm)
    g = torch.Generator().manual_seed(0)
    for m in probe.modules():
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is not None and t.is_meta:
                    value = (torch.rand(t.shape, generator=g) + 0.5 if name == "weight"
                             else torch.randn(t.shape, generator=g) * 0.3).to(t.dtype)
                    store[name] = nn.Parameter(value, requires_grad=False) if store is m._parameters else value
    return probe


def _check_width(modules: list[StreamModule], hidden: int, role: str = "") -> None:
    for m in modules:
        if m.features() != {hidden}:
            raise ValueError(f"rotation r1: {role}{m.path} {'writes' if m.writes else 'reads'} "
                             f"{sorted(m.features())} features, not the hidden size {hidden}")


def _fold_and_rotate_bias(norm: nn.Module, readers: list[StreamModule], keep: bool, offset: float,
                          rot: HadamardTransform) -> None:
    fold_norm(norm, readers, keep, offset)
    if keep:  # the bias is added to the normalised (rotated) stream
        rotate_output_side(norm.bias.detach(), rot)


@torch.no_grad()
def absorb_online_rotation(module: nn.Module) -> None:
    """``W <- W H`` with the online rotation ``H`` attached to ``module`` with ``absorb=False``
    (:func:`attach_online_rotation` with ``absorb=True`` in two steps): a linear's weight, or every
    expert's down matrix of quantized fused experts."""
    rot = online_rotation(module).rot
    if experts_layout(module) is None:
        rotate_input_side(module.weight, rot)
        return
    for view in _down_matrices(module):  # [E, hidden, intermediate]
        for e in range(view.shape[0]):
            rotate_input_side(view[e], rot)


#: what a rotation step does: ``(outside the blocks and structural changes, block index -> the block's weights)``
_Step = tuple[Callable[[], None], Callable[[int, nn.Module], None]]


class RotationAlgorithm(BlockAlgorithm):
    config_class = RotationConfig
    keeps_float_function = True
    acts_on_fused_experts = True  # R1 rotates their gate/up and down matrices

    def prepare_model(self, model: nn.Module, config: RotationConfig) -> None:
        """Rotate the model's weights in place (R1, R2, R4 as configured); float outputs unchanged:
        :meth:`prepare_model_streamed`, then every block's weights."""
        planned = self._plan(model, config)
        if planned is not None:
            layers, prepare_block = planned
            for i, block in enumerate(layers):
                prepare_block(i, block)

    def prepare_model_streamed(self, model: nn.Module, config: RotationConfig) -> Callable[[int, nn.Module], None]:
        """:meth:`prepare_model` on a skeleton whose decoder blocks are on meta: rotates the embeddings, the
        stream writers and lm_head (folding the final norm) and attaches R4's online rotations; the
        returned ``prepare_block(index, block)`` folds the block's norms and rotates its weights (R1, R2,
        R4's absorption), a function of the loaded float weights alone. Everything global (the
        transforms, which norms keep the stream's mean) is decided here from shapes and classes (a
        meta norm is probed on stand-in weights); what needs a block's values (its norms' kinds, a bias
        its weight cannot carry) is checked by ``prepare_block`` before it changes the block."""
        planned = self._plan(model, config)
        return (lambda index, block: None) if planned is None else planned[1]

    def _plan(self, model: nn.Module, cfg: RotationConfig
              ) -> tuple[nn.ModuleList, Callable[[int, nn.Module], None]] | None:
        """Check and plan everything, change what lies outside the blocks; ``(decoder layers, prepare_block)``,
        or None when nothing is to be done."""
        if cfg.r3:
            raise NotImplementedError(
                "rotation r3 (online Hadamard on Q/K after RoPE) is not implemented: Q/K are quantized at "
                "q_proj/k_proj outputs, before RoPE, so it would change no quantized tensor; set r3=False"
            )
        if not (cfg.r1 or cfg.r2 or cfg.r4):
            logger.warning("rotation: r1, r2 and r4 are all off; nothing to do")
            return None
        found = find_decoder_layers(model, cfg.model_decoder_layers or None)
        if found is None:
            raise ValueError("rotation needs the model's decoder layers: set model_decoder_layers in RotationConfig")
        layers = found[1]
        # plan everything (checks, Hadamard constructions) before the first change, so that a refusal
        # leaves the model untouched
        steps: list[_Step] = []
        if cfg.r1:
            steps.append(self._plan_r1(model, layers, cfg, cfg.seed))
        if cfg.r2:
            steps.append(self._plan_r2(model, layers, cfg, cfg.seed + 1))
        if cfg.r4:
            steps.append(self._plan_r4(layers, cfg, cfg.seed + R4_SEED_OFFSET))
        for apply_model, _ in steps:
            apply_model()

        def prepare_block(index: int, block: nn.Module) -> None:
            # each block in the order R1, R2, R4 (the order in which they change the same matrices)
            for _, apply_block in steps:
                apply_block(index, block)

        return layers, prepare_block

    _rotation = staticmethod(rotation_transform)

    @staticmethod
    def _r1_block(block: nn.Module, prefix: str, cfg: RotationConfig, hidden: int, found: set[str]
                  ) -> tuple[list[tuple[nn.Module, str, list[StreamModule]]], list[StreamModule]]:
        """R1's roles in one block: ``([(norm, path, its readers)], [every stream reader and writer])``;
        adds the role entries it finds to ``found``."""

        def sub(name: str) -> nn.Module:
            return get_submodule(block, name) if name else block

        def present(names: list[str], writes: bool) -> list[StreamModule]:
            """The entries this block has (dense and MoE blocks, or blocks with and without an indexer,
            differ)."""
            out = []
            for entry in names:
                role = find_role(block, entry)
                if role is not None:
                    found.add(entry)
                    out.append(StreamModule(role[1], f"{prefix}.{role[0]}", writes))
            return out

        mlp_outputs = cfg.mlp_outputs or [cfg.down_proj]
        attn_norm, mlp_norm = sub(cfg.attn_norm), sub(cfg.mlp_norm)
        attn_in = present(cfg.attn_inputs, False)
        mlp_in, mlp_out = present(cfg.mlp_inputs, False), present(mlp_outputs, True)
        for what, modules, names in (("attention inputs", attn_in, cfg.attn_inputs),
                                     ("MLP inputs", mlp_in, cfg.mlp_inputs), ("MLP outputs", mlp_out, mlp_outputs)):
            if not modules:
                raise ValueError(f"rotation r1: block {prefix} has none of the {what} {names}")
        o_name, o_proj = resolve_role(block, cfg.o_proj, prefix, "r1")
        outs = [StreamModule(o_proj, f"{prefix}.{o_name}", True), *mlp_out]
        _check_width(attn_in + mlp_in + outs, hidden)
        # a parallel block (Phi, Cohere) reads attention and MLP through one norm: fold it once
        readers: dict[int, tuple[nn.Module, str, list[StreamModule]]] = {}
        for norm, name, ins in ((attn_norm, cfg.attn_norm, attn_in), (mlp_norm, cfg.mlp_norm, mlp_in)):
            readers.setdefault(id(norm), (norm, f"{prefix}.{name}", []))[2].extend(ins)
        return list(readers.values()), attn_in + mlp_in + outs

    def _plan_r1(self, model: nn.Module, layers: nn.ModuleList, cfg: RotationConfig, seed: int) -> _Step:
        embeddings = [get_submodule(model, p) for p in cfg.embedding_layers]
        if not embeddings:
            raise ValueError("rotation r1: RotationConfig.embedding_layers is empty")
        lm_head = _linear(get_submodule(model, cfg.lm_head), cfg.lm_head)
        final_norm = get_submodule(model, cfg.final_norm)
        hidden = lm_head.in_features
        for path, emb in zip(cfg.embedding_layers, embeddings):
            weight = getattr(emb, "weight", None)
            if weight is None or weight.dim() != 2 or weight.shape[1] != hidden:
                raise ValueError(f"rotation r1: {path} has no (rows, {hidden}) weight to rotate")

        writers = [StreamModule(m, path, True) for path, m in find_stream_writers(model, cfg.stream_writers)]
        _check_width(writers, hidden, "stream writer ")
        outside = [*zip(cfg.embedding_layers, embeddings), *((w.path, w.module) for w in writers),
                   (cfg.final_norm, final_norm), (cfg.lm_head, lm_head)]
        unloaded = [path for path, m in outside if _is_meta(m)]
        if unloaded:  # (a streamed model's skeleton has only its decoder blocks on meta)
            raise ValueError(f"rotation r1: {unloaded} are not loaded (on meta); R1 rotates them with the stream: load "
                             "everything outside the decoder blocks before the rotation")

        norms: list[tuple[nn.Module, str, list[StreamModule]]] = []  # (norm, path, its readers)
        found: set[str] = set()
        for i, block in enumerate(layers):
            norms.extend(self._r1_block(block, block_prefix(cfg, i), cfg, hidden, found)[0])
        missing = [n for n in [*cfg.attn_inputs, *cfg.mlp_inputs, *(cfg.mlp_outputs or [cfg.down_proj])]
                   if n not in found]
        if missing:
            raise ValueError(f"rotation r1: {missing} match no module in any decoder block")
        head = StreamModule(lm_head, cfg.lm_head, False)
        norms.append((final_norm, cfg.final_norm, [head]))
        found_kinds = {path: norm_kind(_probe_copy(norm), path, hidden) for norm, path, _ in norms}
        kinds = {path: kind for path, (kind, _) in found_kinds.items()}
        # the bias checks of the norms whose values are there (a streamed block's: when it is loaded)
        kept = {path: _bias_kept_in_norm(norm, ins, path, found_kinds[path][1])
                for norm, path, ins in norms if not _is_meta(norm)}
        keep_mean = "layer" in kinds.values()
        if keep_mean and "rms" in kinds.values():
            layer = next(p for p, k in kinds.items() if k == "layer")
            rms = next(p for p, k in kinds.items() if k == "rms")
            raise ValueError(
                f"rotation r1: the residual stream is read through LayerNorms and RMSNorms ({layer} is a LayerNorm, "
                f"{rms} an RMSNorm); R1 needs one kind: a LayerNorm stream is rotated by a Q that keeps the "
                "all-ones direction, which an RMSNorm does not commute with"
            )
        rot = self._rotation(hidden, cfg, seed, "r1", keep_mean=keep_mean)

        def apply_model() -> None:
            untie_embeddings(model, embeddings, lm_head)
            for emb in embeddings:
                rotate_input_side(emb.weight, rot)  # token vectors are rows: E <- E Q
            for w in writers:  # e.g. image features that replace image-token embeddings
                w.rotate(rot)
            _fold_and_rotate_bias(final_norm, [head], kept[cfg.final_norm], found_kinds[cfg.final_norm][1], rot)
            head.rotate(rot)

        def apply_block(index: int, block: nn.Module) -> None:
            block_norms, modules = self._r1_block(block, block_prefix(cfg, index), cfg, hidden, set())
            folds = []
            for norm, path, ins in block_norms:  # all checks before the block changes
                kind, offset = norm_kind(norm, path, hidden)
                if (kind == "layer") != keep_mean:
                    raise ValueError(
                        f"rotation r1: {path} computes a{' LayerNorm' if kind == 'layer' else 'n RMSNorm'} with its "
                        f"weights, but the stream was rotated for {'LayerNorms' if keep_mean else 'RMSNorms'} (as "
                        "probed on the model before its blocks were loaded)"
                    )
                folds.append((norm, ins, _bias_kept_in_norm(norm, ins, path, offset), offset))
            for fold in folds:
                _fold_and_rotate_bias(*fold, rot)
            for m in modules:
                m.rotate(rot)

        return apply_model, apply_block

    @staticmethod
    def _r2_block(model: nn.Module, block: nn.Module, prefix: str, cfg: RotationConfig
                  ) -> tuple[nn.Linear, slice, int | None, int, nn.Linear, int]:
        """R2's roles in one block: ``(v, its value rows, rows per head block, offset, o, head size)``
        (the arguments of :func:`rotate_heads_output` and :func:`rotate_heads_input`)."""
        try:
            v_name, v = resolve_role(block, cfg.v_proj, prefix, "r2")
        except ValueError as exc:
            raise ValueError(
                f"{exc}; R2 rotates V's heads and needs V's projection (RotationConfig.v_proj; with "
                "fused_qkv=True a fused [q; k; v] projection) in every block: set r2=False if the model has "
                "neither"
            ) from None
        v_alts, o_alts = cfg.v_proj.split("|"), cfg.o_proj.split("|")
        # paired alternatives (self_attn.v_proj|cross_attn.v_proj with self_attn.o_proj|cross_attn.o_proj):
        # O from the same attention as V
        o_entry = o_alts[v_alts.index(v_name)] if len(v_alts) == len(o_alts) > 1 else cfg.o_proj
        o_name, o = resolve_role(block, o_entry, prefix, "r2")
        parent = v_name.rpartition(".")[0]
        attention = get_submodule(block, parent) if parent else block
        rows, block_rows, offset = slice(None), None, 0  # where V's heads sit (rotate_heads_output)
        if cfg.kv_per_head:  # MLA: each head's rows of kv_b_proj are [k_nope; v]
            head_dim = _value_head_dim(attention, model)
            heads = o.in_features // head_dim if o.in_features % head_dim == 0 else 0
            if not heads or v.out_features % heads or v.out_features // heads < head_dim:
                raise ValueError(
                    f"rotation r2: {prefix}.{v_name} has {v.out_features} outputs, not one [key; value] block of "
                    f"at least the value size {head_dim} per head of {o_name}'s {o.in_features} inputs "
                    "(kv_per_head=True)"
                )
            block_rows = v.out_features // heads
            offset = block_rows - head_dim
        else:
            head_dim = _head_dim(attention, model)
            if cfg.fused_qkv:  # [q; k; v]: q as wide as o_proj's input, k and v equally wide
                kv = (v.out_features - o.in_features) // 2
                if kv <= 0 or v.out_features != o.in_features + 2 * kv:
                    raise ValueError(
                        f"rotation r2: {prefix}.{v_name} has {v.out_features} outputs, not {o.in_features} query "
                        f"features ({o_name}'s inputs) plus two equal key and value parts (fused_qkv=True)"
                    )
                rows = slice(o.in_features + kv, v.out_features)
            width = v.out_features if rows.start is None else rows.stop - rows.start
            if width % head_dim or o.in_features % head_dim:
                raise ValueError(
                    f"rotation r2: {prefix}: head size {head_dim} does not divide {v_name}'s value outputs "
                    f"({width}) and {o_name}'s inputs ({o.in_features})"
                )
        return v, rows, block_rows, offset, o, head_dim

    def _plan_r2(self, model: nn.Module, layers: nn.ModuleList, cfg: RotationConfig, seed: int) -> _Step:
        rots: dict[int, HadamardTransform] = {}
        for i, block in enumerate(layers):
            head_dim = self._r2_block(model, block, block_prefix(cfg, i), cfg)[-1]
            if head_dim not in rots:
                rots[head_dim] = self._rotation(head_dim, cfg, seed, "r2")

        def apply_block(index: int, block: nn.Module) -> None:
            v, rows, block_rows, offset, o, head_dim = self._r2_block(model, block, block_prefix(cfg, index), cfg)
            rotate_heads_output(v, rots[head_dim], rows, block_rows, offset)
            rotate_heads_input(o, rots[head_dim])

        return (lambda: None), apply_block

    def _plan_r4(self, layers: nn.ModuleList, cfg: RotationConfig, seed: int) -> _Step:
        targets = r4_targets(layers, cfg, cfg.model_decoder_layers)
        sizes = [r4_input_size(module, name) for name, module in targets]
        rots: dict[int, HadamardTransform] = {}
        for n in sizes:
            if n not in rots:
                rots[n] = self._rotation(n, cfg, seed, "r4")

        def apply_model() -> None:
            # the online transforms (structure); each block's weights absorb them in apply_block
            for (_, module), n in zip(targets, sizes):
                attach_online_rotation(module, HadamardTransform(n, rots[n].signs), absorb=False)
            logger.warning(
                "rotation r4: the inputs of %d MLP outputs (e.g. %s) are rotated online; a runtime loading an "
                "exported checkpoint must apply the same Hadamard transform", len(targets), targets[0][0]
            )

        def apply_block(index: int, block: nn.Module) -> None:
            for entry in cfg.mlp_outputs or [cfg.down_proj]:  # as r4_targets finds them
                role = find_role(block, entry)
                if role is not None:
                    absorb_online_rotation(role[1])

        return apply_model, apply_block


ALGORITHM = register_algorithm(RotationAlgorithm())
