"""Online Hadamard rotation: what a model rotated with R4 (:mod:`quark.torch.algorithm.rotation`)
needs at run time.

R4 rotates the input of every MLP output at run time by an orthogonal ``Q = D H / sqrt(n)`` (``H`` a
Hadamard matrix, :mod:`.hadamard`; ``D`` = I or seeded random signs) and stores the weight as ``W Q``,
so the layer's output is unchanged while its input quantizer sees the rotated activations:

- :class:`OnlineHadamard`: the transform attached to a module as ``online_rotation`` (a linear's
  forward pre-hook applies it; quantized fused MoE experts apply it to each expert's down input,
  :meth:`~quark.torch.quantization.fused_experts.QuantFusedExperts.down_input`);
- :func:`attach_online_rotation` (absorbing ``Q`` into the weight, or not for a loaded checkpoint),
  :func:`online_rotation` / :func:`online_rotated_layers` (which modules have one);
- :func:`restore_online_rotations`: re-creates them on a model loaded from a rotated checkpoint
  (exported checkpoints do not carry them), from the ``rotation`` entry of its config: which modules
  (:func:`r4_targets`), of which size (:func:`r4_input_size`), with which transform
  (:func:`rotation_transform`, seeded with ``RotationConfig.seed + R4_SEED_OFFSET``).

The rotation algorithm (computing the rotations and folding them into the weights) is
:mod:`quark.torch.algorithm.rotation`; it builds on these.
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.nn as nn

from .config.algo_configs import RotationConfig
from .driver import find_decoder_layers, get_submodule
from .fused_experts import QuantFusedExperts, expert_view, experts_layout
from .hadamard import HadamardTransform, MeanPreservingTransform, construction, random_signs

logger = logging.getLogger(__name__)

#: rows (or columns) rotated at once: bounds the float64 scratch memory on large embeddings
_CHUNK = 4096


def _transform(rot: HadamardTransform, like: torch.Tensor) -> HadamardTransform:
    return rot.to(like.device)


@torch.no_grad()
def rotate_input_side(weight: torch.Tensor, rot: HadamardTransform) -> None:
    """``W <- W Q`` in place (the layer now reads ``x Q``): rotates each row."""
    rot = _transform(rot, weight)
    for i in range(0, weight.shape[0], _CHUNK):
        block = weight[i : i + _CHUNK]
        block.copy_(rot(block.double()))


def rotation_transform(n: int, cfg: RotationConfig, seed: int, role: str,
                       keep_mean: bool = False) -> HadamardTransform | MeanPreservingTransform:
    """The Hadamard transform of order ``n``; ``keep_mean``: one that maps the all-ones direction to
    itself (a LayerNorm stream), built from a transform with random signs (without them the
    reflection that keeps the mean makes a few entries large; see :class:`.MeanPreservingTransform`)."""
    try:
        how = construction(n)
    except ValueError as exc:
        raise ValueError(f"rotation {role}: {exc}; disable {role} for this model") from None
    signs = cfg.random or keep_mean
    logger.info("rotation %s: order %d = %s%s%s", role, n, how, ", random signs" if signs else "",
                ", reflected to keep the mean (LayerNorm stream)" if keep_mean else "")
    rot = HadamardTransform(n, random_signs(n, seed) if signs else None)
    return MeanPreservingTransform(rot) if keep_mean else rot


class OnlineHadamard(nn.Module):
    """R4: rotates a linear's input at run time (attached to the linear as ``online_rotation``;
    its forward pre-hook runs before the linear's forward, hence before the input quantizer).

    Exported checkpoints do not carry it: a runtime loading them must apply the same transform.
    """

    def __init__(self, rot: HadamardTransform) -> None:
        super().__init__()
        self.rot = rot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rot(x)

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])

    def to_input_basis(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored weight ``W Q`` -> ``W``, the weight acting on the unrotated input (float64)."""
        q = self.rot.matrix(torch.float64).to(weight.device)
        return weight.double() @ q.T

    def from_input_basis(self, weight: torch.Tensor) -> torch.Tensor:
        """``W`` -> the stored weight ``W Q`` (float64)."""
        q = self.rot.matrix(torch.float64).to(weight.device)
        return weight.double() @ q


def online_rotation(module: nn.Module) -> OnlineHadamard | None:
    """The online input rotation R4 attached to ``module`` (``None`` if it has none): its stored weight
    is then ``W Q`` and a pre-hook rotates its input by ``Q``."""
    return module.__dict__.get("online_rotation")


def online_rotated_layers(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that rotate their input online."""
    return [n for n, m in model.named_modules() if online_rotation(m) is not None]


def attach_online_rotation(module: nn.Module, rot: HadamardTransform, absorb: bool = True) -> OnlineHadamard:
    """``W <- W H`` (unless the weight already ``absorb``-ed it, as in a loaded checkpoint) and rotate
    the input online by ``H``: the layer's output is unchanged. ``module`` is a linear (a forward
    pre-hook rotates its input) or quantized fused MoE experts (every expert's down matrix absorbs
    ``H`` and the experts' loop rotates each expert's down input,
    :meth:`~quark.torch.quantization.fused_experts.QuantFusedExperts.down_input`)."""
    experts = experts_layout(module) is not None
    if absorb:
        if experts:
            for view in _down_matrices(module):  # [E, hidden, intermediate]
                for e in range(view.shape[0]):
                    rotate_input_side(view[e], rot)
        else:
            rotate_input_side(module.weight, rot)
    online = OnlineHadamard(rot)
    device = next(itertools.chain(module.parameters(), module.buffers())).device
    if device.type != "meta":  # (a model being loaded: the transform follows its input)
        online = online.to(device)
    # a plain attribute, not a registered submodule: its (non-persistent) buffers stay out of the
    # module tree, where a loader that re-creates every tensor missing from the checkpoint
    # (transformers) would overwrite them with uninitialised memory
    module.__dict__["online_rotation"] = online
    if not experts:
        module.register_forward_pre_hook(online.pre_hook)
    return online


def _down_matrices(module: QuantFusedExperts) -> list[torch.Tensor]:
    """The ``[E, out, in]`` views of quantized fused experts' float down projection (none once frozen)."""
    weights = [(proj, module.float_weight(proj)) for proj in module.fused_layout.projections if proj.role == "down"]
    return [expert_view(w.detach(), int(module.num_experts), proj.transposed) for proj, w in weights if w is not None]


def r4_input_size(module: nn.Module, path: str) -> int:
    """The size R4 rotates for an MLP output (``RotationConfig.mlp_outputs`` / ``down_proj``): a
    linear's input features, or the intermediate size of fused experts' down projections. Refuses
    fused experts that are not quantized (only the quantized experts' loop can rotate online)."""
    if experts_layout(module) is None:
        return _linear(module, path).in_features
    if not isinstance(module, QuantFusedExperts):
        raise ValueError(f"rotation r4: {path} holds fused experts that are not quantized (excluded by the config): "
                         "only quantized experts rotate their down input online; set r4=False")
    for proj, fp in module.quantized_projections():
        if proj.role == "down":
            return fp.in_features
    return _down_matrices(module)[0].shape[-1]


def r4_targets(layers: nn.ModuleList, cfg: RotationConfig, path: str) -> list[tuple[str, nn.Module]]:
    """What R4 rotates online, block by block: each block's MLP outputs (``cfg.mlp_outputs``, else
    ``cfg.down_proj``) that it has; every block needs one."""
    outputs = cfg.mlp_outputs or [cfg.down_proj]
    targets = []
    for i, block in enumerate(layers):
        prefix = f"{path}.{i}" if path else str(i)
        found = [r for r in (find_role(block, entry) for entry in outputs) if r is not None]
        if not found:
            raise ValueError(f"rotation r4: block {prefix} has none of the MLP outputs {outputs}")
        targets.extend((f"{prefix}.{name}", m) for name, m in found)
    return targets


def _linear(module: nn.Module, path: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise ValueError(f"rotation: {path} is a {type(module).__name__}, expected a linear layer")
    return module


def find_role(block: nn.Module, entry: str) -> tuple[str, nn.Module] | None:
    """``(path, module)`` of a block-level role: ``entry`` is a path, or ``a|b`` alternatives of which
    the first the block has is taken (a hybrid model's blocks write the stream through
    ``self_attn.o_proj`` or ``mamba.out_proj``); None when the block has none of them."""
    for n in entry.split("|"):
        try:
            return n, get_submodule(block, n)
        except ValueError:
            continue
    return None


#: R4's random signs are drawn with ``RotationConfig.seed + R4_SEED_OFFSET`` (R1: +0, R2: +1)
R4_SEED_OFFSET = 2


def restore_online_rotations(model: nn.Module, quant_config: object) -> list[str]:
    """Re-create R4's online rotations on a model loaded from a checkpoint whose MLP outputs (down_proj
    weights, fused experts' down matrices) already absorb them (``import_model_from_safetensors`` and
    transformers' loader call this through ``_map_to_quark``): the online transforms only, weights
    untouched, from the ``rotation`` entry of ``quant_config.algo_config``. Returns the rotated
    modules' names."""
    names = []
    for cfg in getattr(quant_config, "algo_config", None) or []:
        if not (isinstance(cfg, RotationConfig) and cfg.r4):
            continue
        found = find_decoder_layers(model, cfg.model_decoder_layers or None)
        if found is None:
            raise ValueError("the checkpoint was rotated with r4 but the model has no stack of decoder layers; "
                             "set model_decoder_layers in its rotation config")
        transforms: dict[int, HadamardTransform] = {}
        for name, module in r4_targets(found[1], cfg, found[0]):
            if online_rotation(module) is not None:
                continue
            n = r4_input_size(module, name)
            # real tensors even when the loader builds the model under a meta-device context (transformers);
            # the transform moves its factors to its input's device
            with torch.device("cpu"):
                if n not in transforms:
                    transforms[n] = rotation_transform(n, cfg, cfg.seed + R4_SEED_OFFSET, "r4")
                attach_online_rotation(module, HadamardTransform(n, transforms[n].signs), absorb=False)
            names.append(name)
    return names
