"""One dataclass per quantization algorithm.

These are pure data: what an algorithm should do and, for per-architecture fields, *where* in a
decoder block it should do it. Layer names are relative to one decoder block (e.g.
``"self_attn.q_proj"``) and may be fnmatch patterns (``"mlp.experts.*.gate_proj"``). The
architecture templates (``templates/``) fill those fields in; users override them with
``LLMTemplate.get_config(..., algo_configs={...})``.

Each config serialises with :meth:`AlgoConfig.to_dict` (including its ``name``) and is rebuilt by
:func:`algo_config_from_dict`, so a ``QConfig`` round-trips through config.json.

Adding an algorithm takes two declarations and no list: here, an ``AlgoConfig`` subclass with its
``name`` and the :func:`register_algo_config` decorator (definition order is the order in which the
algorithms are listed everywhere); in ``quark/torch/algorithm/<name>.py``, the implementation, a
``BlockAlgorithm`` subclass with ``config_class = <the config class>``, registered with
``ALGORITHM = register_algorithm(<the class>())``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar


@dataclass
class ScalingPair:
    """One smoothing/scaling site inside a decoder block.

    ``prev_op`` produces the activations that feed every module in ``layers``; a per-input-channel
    scale ``s`` is folded as ``prev_op /= s`` and ``layer.weight *= s``. ``inspect`` is the
    module whose output error is measured when a scale is searched (the enclosing attention or MLP
    module; ``None`` means the single layer in ``layers``).
    """

    prev_op: str
    layers: list[str]
    inspect: str | None = None

    @classmethod
    def from_any(cls, value: ScalingPair | dict[str, Any]) -> ScalingPair:
        if isinstance(value, ScalingPair):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"a scaling pair must be a ScalingPair or a dict, got {type(value).__name__}")
        return cls(**value)


@dataclass
class AlgoConfig:
    """Base class: every algorithm config has a ``name`` and the path of the decoder block list."""

    name: ClassVar[str] = ""
    #: attribute path of the ``nn.ModuleList`` of decoder blocks, e.g. ``"model.layers"``
    model_decoder_layers: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value is out of range or of the wrong kind
        (with the value and what is allowed), so that a bad setting fails at once instead of deep in a
        run. Called on construction, after each ``--algo-config`` assignment and by
        ``LLMTemplate.get_config`` (a field may have been changed after construction)."""
        check_text(self, "model_decoder_layers")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"name": self.name, **data}

    def copy(self) -> AlgoConfig:
        return copy.deepcopy(self)


#: algorithm name -> config class, in registration order (the order the documentation lists them):
#: filled by :func:`register_algo_config`, the one place an algorithm's name is declared. Every other
#: list of algorithm names derives from it (``LLMTemplate``'s ``SUPPORTED_ALGORITHMS``, the templates'
#: algorithm keys, the CLI's checks, ``quark.torch.algorithm.get_algorithm``).
ALGO_CONFIG_CLASSES: dict[str, type[AlgoConfig]] = {}

_AlgoConfigT = TypeVar("_AlgoConfigT", bound=type[AlgoConfig])


def register_algo_config(cls: _AlgoConfigT) -> _AlgoConfigT:
    """Class decorator: register an :class:`AlgoConfig` subclass under the ``name`` it declares
    (``name: ClassVar[str] = "gptq"``), which becomes the algorithm's name everywhere (``algorithm=``,
    ``algo_configs={...}``, config.json). Its implementation registers itself in
    :mod:`quark.torch.algorithm` (a plugin module named after the algorithm) with
    ``register_algorithm``."""
    if not (isinstance(cls, type) and issubclass(cls, AlgoConfig)):
        raise TypeError(f"register_algo_config: {cls!r} is not an AlgoConfig subclass")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"register_algo_config: {cls.__name__} must declare its own algorithm name, a Python "
                        f"identifier, as a class attribute (name: ClassVar[str] = \"...\"); got {name!r}")
    known = ALGO_CONFIG_CLASSES.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"register_algo_config: algorithm name {name!r} of {cls.__module__}.{cls.__qualname__} "
                         f"is already taken by {known.__module__}.{known.__qualname__}")
    ALGO_CONFIG_CLASSES[name] = cls  # a reloaded module replaces its own class
    return cls


def _pairs_field() -> Any:
    return field(default_factory=list)


@dataclass
class _ScalingConfig(AlgoConfig):
    scaling_layers: list[ScalingPair] = _pairs_field()

    def __post_init__(self) -> None:
        if not isinstance(self.scaling_layers, (list, tuple)):
            raise ValueError(f"{type(self).__name__}.scaling_layers={self.scaling_layers!r}; allowed: a list of "
                             "ScalingPair (or of dicts with prev_op, layers and inspect)")
        self.scaling_layers = [ScalingPair.from_any(p) for p in self.scaling_layers]
        super().__post_init__()


#: accepted values of ``search_dtype`` (AWQ, AutoSmoothQuant) and ``cross_term_dtype`` (GPTAQ, Qronos):
#: the precision of work that may run in bfloat16 (``quark.torch.algorithm.precision``)
DTYPE_CHOICES = ("auto", "float32", "bfloat16")


#: losses AutoSmoothQuant may minimise over its alpha grid
SCALE_LOSSES = ("mse", "mae", "rmse")


# -- field checks: each raises ValueError("Class.field=value; allowed: ...") --------------------------
def _bad(config: AlgoConfig, field_name: str, allowed: str) -> ValueError:
    return ValueError(f"{type(config).__name__}.{field_name}={getattr(config, field_name)!r}; allowed: {allowed}")


def check_choice(config: AlgoConfig, field_name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, field_name) not in choices:
        raise _bad(config, field_name, ", ".join(map(repr, choices)))


def check_dtype_choice(config: AlgoConfig, field_name: str) -> None:
    check_choice(config, field_name, DTYPE_CHOICES)


def check_bool(config: AlgoConfig, field_name: str) -> None:
    if not isinstance(getattr(config, field_name), bool):
        raise _bad(config, field_name, "true or false")


def check_text(config: AlgoConfig, field_name: str) -> None:
    if not isinstance(getattr(config, field_name), str):
        raise _bad(config, field_name, "a string")


def check_texts(config: AlgoConfig, field_name: str) -> None:
    value = getattr(config, field_name)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _bad(config, field_name, "a list of strings")


def check_number(config: AlgoConfig, field_name: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False) -> None:
    """A finite number (an integer if ``integer``; never a bool) in ``[low, high]``, or ``(low, high]``
    if ``low_open``; None bounds are open-ended."""
    value = getattr(config, field_name)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        where = ""
        if low is not None and high is not None:
            where = f" in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            where = f" {'>' if low_open else '>='} {low:g}"
        raise _bad(config, field_name, ("an integer" if integer else "a number") + where)


def check_solver_fields(config: AlgoConfig) -> None:
    """The fields GPTQ, GPTAQ and Qronos share: lazy blocks, the clipping search and the layer groups."""
    check_number(config, "block_size", 1, integer=True)
    check_number(config, "clip_search_steps", 0, integer=True)
    check_number(config, "clip_search_min", 0, 1, low_open=True)
    groups = config.inside_layer_modules
    if not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, (list, tuple)) and all(isinstance(n, str) for n in g) for g in groups):
        raise _bad(config, "inside_layer_modules", "a list of lists of layer-name patterns, e.g. "
                   "[['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'], ['self_attn.o_proj']]")


@register_algo_config
@dataclass
class AWQConfig(_ScalingConfig):
    """Activation-aware Weight Quantization (Lin et al. 2023, arXiv:2306.00978)."""

    name: ClassVar[str] = "awq"
    num_grid: int = 20
    #: run the per-layer weight clipping search after scaling (fused MoE experts: per expert, on its tokens)
    clip_search: bool = True
    #: layer-name patterns (relative to a block; fused experts: ``<module>.<parameter>``, e.g.
    #: ``mlp.experts.down_proj``) skipped by the clipping search. AutoAWQ skips q/k
    #: (attention scores being sensitive); the search minimises each layer's own output error, which
    #: holds for q/k as well, and clipping them measured better on SmolLM2 uint4_wo_64 (32.71 -> 32.49
    #: ppl). ``["*q_proj", "*k_proj", "*q_a_proj", "*q_b_proj"]`` restores AutoAWQ's choice.
    clip_exclude: list[str] = field(default_factory=list)
    #: precision of the scale search's candidate forwards: "auto" (bfloat16 autocast for a float32
    #: model where bfloat16 products are fast), "float32" or "bfloat16" (``quark.torch.algorithm.precision``)
    search_dtype: str = "auto"
    #: also scale each fused MoE expert's up rows into its down columns, searched per expert on its
    #: routed tokens (``quark.torch.algorithm.expert_scaling``)
    scale_expert_down: bool = True

    def validate(self) -> None:
        super().validate()
        check_number(self, "num_grid", 1, integer=True)
        check_bool(self, "clip_search")
        check_texts(self, "clip_exclude")
        check_dtype_choice(self, "search_dtype")
        check_bool(self, "scale_expert_down")


@register_algo_config
@dataclass
class GPTQConfig(AlgoConfig):
    """GPTQ (Frantar et al. 2022, arXiv:2210.17323): second-order, column-by-column error compensation."""

    name: ClassVar[str] = "gptq"
    damp_percent: float = 0.01
    block_size: int = 128
    desc_act: bool = True
    static_groups: bool = True
    #: choose each group's scale (and zero point) among min-max of ``s * w`` for ``clip_search_steps + 1``
    #: shrink factors ``s`` from 1 down to ``clip_search_min``, minimising the diag(H)-weighted squared
    #: error, instead of plain min-max (0 disables: min-max qparams, the GPTQ paper's setting)
    clip_search_steps: int = 20
    clip_search_min: float = 0.6
    #: ordered groups of layers inside a block; each group is quantized on inputs produced by the
    #: already-quantized previous groups ("true sequential")
    inside_layer_modules: list[list[str]] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        check_number(self, "damp_percent", 0)
        check_bool(self, "desc_act")
        check_bool(self, "static_groups")
        check_solver_fields(self)


@register_algo_config
@dataclass
class GPTAQConfig(GPTQConfig):
    """GPTAQ (Li et al. 2025, arXiv:2504.02692): GPTQ that also corrects the float/quantized input drift."""

    name: ClassVar[str] = "gptaq"
    alpha: float = 0.25
    #: precision of the products accumulating the drift term D: "float32" (default), "bfloat16" or
    #: "auto" (bfloat16 for float32 activations where the hardware multiplies it natively); H is
    #: always float32. bfloat16 made SmolLM2 int4_wo_64 GPTAQ 12% faster but 0.3 ppl worse (the
    #: solver multiplies D's rounding by H^-1, large in the weakly excited directions)
    cross_term_dtype: str = "float32"

    def validate(self) -> None:
        super().validate()
        check_number(self, "alpha", 0)
        check_dtype_choice(self, "cross_term_dtype")


@register_algo_config
@dataclass
class SmoothQuantConfig(_ScalingConfig):
    """SmoothQuant (Xiao et al. 2022, arXiv:2211.10438): migrate activation outliers into weights."""

    name: ClassVar[str] = "smoothquant"
    alpha: float = 0.5
    scale_clamp_min: float = 1e-3
    #: also scale each fused MoE expert's up rows into its down columns, per expert from its routed
    #: tokens (``quark.torch.algorithm.expert_scaling``); it moves difficulty into the up rows, as the
    #: dense ``up_proj -> down_proj`` pair does
    scale_expert_down: bool = True

    def validate(self) -> None:
        super().validate()
        check_number(self, "alpha", 0, 1)
        check_number(self, "scale_clamp_min", 0, low_open=True)
        check_bool(self, "scale_expert_down")


@register_algo_config
@dataclass
class AutoSmoothQuantConfig(_ScalingConfig):
    """SmoothQuant with the migration strength ``alpha`` searched per scaling pair on the block output."""

    name: ClassVar[str] = "autosmoothquant"
    #: block-output error minimised by the search: "mse", "mae" or "rmse"
    compute_scale_loss: str = "mse"
    num_grid: int = 20
    scale_clamp_min: float = 1e-3
    #: precision of the alpha search's candidate forwards (see ``AWQConfig.search_dtype``)
    search_dtype: str = "auto"
    #: inside every fused MoE expert, search a scale for up -> down on the expert's own tokens
    scale_expert_down: bool = True

    def validate(self) -> None:
        super().validate()
        check_bool(self, "scale_expert_down")
        check_choice(self, "compute_scale_loss", SCALE_LOSSES)
        check_number(self, "num_grid", 1, integer=True)
        check_number(self, "scale_clamp_min", 0, low_open=True)
        check_dtype_choice(self, "search_dtype")


@register_algo_config
@dataclass
class QronosConfig(AlgoConfig):
    """Qronos (Zhang et al. 2025, arXiv:2505.11695): error correction from float and quantized streams."""

    name: ClassVar[str] = "qronos"
    #: relative damping of the quantized-input Hessian (x mean(diag H~)), as GPTQ's damp_percent
    alpha: float = 1e-2
    #: the first-column least-squares correction is damped by alpha * beta * mean(diag H~), toward the
    #: current weights (1.0: the same strength as the diffusion's damping). 100 (a ridge of mean(diag
    #: H~)): with 16k calibration tokens the weaker ridge overfits, most with quantized activations
    #: (SmolLM2, shared protocol: mxfp4 104.8 / 61.4 / 58.0 / 62.1 ppl and int4_wo_64 32.89 / 32.38 /
    #: 32.57 / 32.79 for beta 1 / 100 / 300 / 1000)
    beta: float = 100.0
    block_size: int = 128
    #: the clipping search of GPTQConfig (see there)
    clip_search_steps: int = 20
    clip_search_min: float = 0.6
    inside_layer_modules: list[list[str]] = field(default_factory=list)
    #: precision of the products accumulating the drift term ``X~^T (X - X~)`` (G is H~ plus it); see
    #: ``GPTAQConfig.cross_term_dtype`` (bfloat16: SmolLM2 int4_wo_64 32.08 -> 32.50 ppl)
    cross_term_dtype: str = "float32"

    def validate(self) -> None:
        super().validate()
        check_number(self, "alpha", 0)
        check_number(self, "beta", 0)
        check_solver_fields(self)
        check_dtype_choice(self, "cross_term_dtype")


@register_algo_config
@dataclass
class RotationConfig(AlgoConfig):
    """Hadamard rotation (QuaRot, Ashkboos et al. 2024, arXiv:2404.00456; SpinQuant's R1-R4 placement).

    Roles are module names: ``embedding_layers`` and ``lm_head`` are model-level paths, the rest are
    relative to a decoder block. ``mlp_inputs`` (what reads the MLP norm's output) and
    ``mlp_outputs`` (what writes the MLP's result into the residual stream; empty: ``down_proj``) may
    name linears, routers (a module with a ``[n, hidden]`` weight applied as ``x W^T``) and fused
    MoE experts modules (their gate/up projections read the stream, their down projections write it);
    in models whose blocks differ (dense and MoE blocks, blocks with and without an indexer), an
    entry of ``attn_inputs``, ``mlp_inputs`` or ``mlp_outputs`` may be missing from some blocks but must
    be found in at least one, and every block must have one of each; an entry ``a|b`` names
    alternatives (the first one a block has), e.g. ``q_proj`` or ``q_a_proj`` by checkpoint; so may
    ``o_proj`` and ``v_proj`` (``self_attn.o_proj|mamba.out_proj`` in a hybrid model), which every block needs.
    R4 rotates the input of every MLP output a block has (``mlp_outputs``, else ``down_proj``). ``stream_writers`` are model-level paths
    (fnmatch patterns allowed) of modules outside the decoder blocks whose output enters the
    residual stream besides the embeddings, e.g. a multimodal projector's last linear, whose image
    features replace image-token embeddings: they are rotated like ``o_proj`` (``W <- Qᵀ W``, bias
    ``b <- b Q``). Each entry must match at least one module.
    """

    name: ClassVar[str] = "rotation"
    r1: bool = True
    r2: bool = True
    r3: bool = False
    r4: bool = False
    random: bool = False
    seed: int = 0
    embedding_layers: list[str] = field(default_factory=lambda: ["model.embed_tokens"])
    lm_head: str = "lm_head"
    final_norm: str = "model.norm"
    attn_norm: str = "input_layernorm"
    attn_inputs: list[str] = field(default_factory=lambda: ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    v_proj: str = "self_attn.v_proj"
    #: ``v_proj`` is a fused ``[q; k; v]`` projection (output rows: the query heads, as many features as
    #: o_proj's input, then the key heads, then as many value features): R2 rotates its value rows
    fused_qkv: bool = False
    #: ``v_proj`` holds, head after head, the head's key part and then its value part (MLA's ``kv_b_proj``,
    #: value size ``v_head_dim``): R2 rotates the value part of each head
    kv_per_head: bool = False
    o_proj: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    mlp_inputs: list[str] = field(default_factory=lambda: ["mlp.gate_proj", "mlp.up_proj"])
    down_proj: str = "mlp.down_proj"
    mlp_outputs: list[str] = field(default_factory=list)
    stream_writers: list[str] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        for name in ("r1", "r2", "r3", "r4", "random", "fused_qkv", "kv_per_head"):
            check_bool(self, name)
        check_number(self, "seed", integer=True)
        for name in ("lm_head", "final_norm", "attn_norm", "v_proj", "o_proj", "mlp_norm", "down_proj"):
            check_text(self, name)
        for name in ("embedding_layers", "attn_inputs", "mlp_inputs", "mlp_outputs", "stream_writers"):
            check_texts(self, name)


def algo_config_from_dict(data: dict[str, Any]) -> AlgoConfig:
    """Rebuild an algorithm config from :meth:`AlgoConfig.to_dict` output."""
    data = dict(data)
    name = data.pop("name", None)
    if name not in ALGO_CONFIG_CLASSES:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(ALGO_CONFIG_CLASSES)}")
    cls = ALGO_CONFIG_CLASSES[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; allowed: {sorted(known)}")
    return cls(**data)


def with_field_overrides(defaults: dict[str, AlgoConfig], assignments: list[str]) -> dict[str, AlgoConfig]:
    """Copies of the template's algorithm ``defaults`` with ``"algorithm.field=value"`` assignments
    applied (values are JSON: ``true``, ``0.8``, ``"x"``; anything else is taken as a string), e.g.
    ``["rotation.r4=true", "smoothquant.alpha=0.6"]`` for the CLI's ``--algo-config``. Returns only
    the algorithms that were assigned to, ready for ``get_config(..., algo_configs=...)``."""
    out: dict[str, AlgoConfig] = {}
    for item in assignments:
        target, sep, raw = item.partition("=")
        name, dot, key = target.strip().partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"algorithm override {item!r}: expected algorithm.field=value, e.g. rotation.r4=true")
        if name not in ALGO_CONFIG_CLASSES:
            raise ValueError(f"algorithm override {item!r}: unknown algorithm {name!r}; allowed: "
                             f"{', '.join(ALGO_CONFIG_CLASSES)}")
        if name not in out:
            if defaults.get(name) is None:
                raise ValueError(f"algorithm override {item!r}: the template has no default {name} config to "
                                 "change; pass a full config with algo_configs={...}")
            out[name] = defaults[name].copy()
        known = {f.name for f in fields(out[name])}
        if key not in known:
            raise ValueError(f"algorithm override {item!r}: {type(out[name]).__name__} has no field {key!r}; "
                             f"allowed: {', '.join(sorted(known))}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        setattr(out[name], key, value)
        out[name].__post_init__()  # validates (and normalises scaling pairs given as dicts)
    return out
