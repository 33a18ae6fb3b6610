"""The per-architecture template data names real modules, and its scaling sites are exact.

For every model type whose classes transformers 5.24 ships, tiny models are built (on the meta
device for the name checks, with real weights for the scaling check) from the class a user loads;
for remote-code model types the module names come from ``quark/torch/testing/data/remote_code_module_names.json``
(sources noted there). Checks, per template:

* every K/V, Q and gate/up pattern matches a real ``nn.Linear`` (or a fused-expert parameter) of some
  layout; the K/V and Q patterns match in every layout, and only attention K/V / Q projections
  outside the excluded modules;
* every exclusion pattern matches something, the LM head is always excluded, and no exclusion ever
  hits an MLP / expert layer or a layer an algorithm works on;
* every name in the algorithm defaults (scaling pairs, GPTQ groups, rotation roles) resolves inside
  the decoder blocks at ``model_decoder_layers``, every scaling pair applies somewhere and has
  matching shapes;
* folding a random per-channel scale through every applicable scaling pair of every block leaves the
  model output unchanged (so each pair lists all consumers of its ``prev_op``).

The data is read from ``templates.ALL_TEMPLATES`` directly: these are the dicts the registry is built from.
"""

from __future__ import annotations

import fnmatch
import functools
from typing import Any

import pytest
import torch
from torch import nn

from quark.torch.quantization.config.algo_configs import (
    GPTQConfig,
    RotationConfig,
    ScalingPair,
    _ScalingConfig,
)
from quark.torch.quantization.config.templates import ALL_TEMPLATES, MODEL_TYPES

# the tiny configs (and the listing of remote-code names) are shared with the coverage harness
from quark.torch.testing.tiny_models import (
    CASES,
    NATIVE,
    REMOTE_ONLY,
    Layout,
    build_config,
    build_model,
    case_name,
    listed_layouts,
    model_layout,
    module_kind,
    remote_listing,
)

TEMPLATES = {kw["model_type"]: kw for kw in ALL_TEMPLATES}


REMOTE = remote_listing()  # quark/torch/testing/data/remote_code_module_names.json


def test_native_and_remote_cover_every_model_type():
    assert set(NATIVE) | set(REMOTE_ONLY) == set(MODEL_TYPES)
    assert set(REMOTE_ONLY) <= set(REMOTE), "every remote-code model type needs a module listing"
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert all(t in CONFIG_MAPPING_NAMES for t in NATIVE)
    assert not any(t in CONFIG_MAPPING_NAMES for t in REMOTE_ONLY), (
        "transformers ships it now: add a tiny case"
    )


# -- layouts: module names of one model, per decoder block --------------------------------------
@functools.cache
def meta_model(model_type: str, index: int) -> nn.Module:
    return build_model(model_type, index, device="meta")


def _native_layout(model_type: str, index: int) -> Layout:
    case = CASES[model_type][index]
    model = meta_model(model_type, index)
    path = TEMPLATES[model_type]["algorithm_configs"]["gptq"].model_decoder_layers
    layers = model.get_submodule(path)
    assert isinstance(layers, nn.ModuleList), f"{path} is not the decoder ModuleList of {case.cls}"
    return model_layout(model, path, case_name(case))


def _listed_layouts(model_type: str) -> list[Layout]:
    return listed_layouts(REMOTE.get(model_type, {}))


@functools.cache
def layouts(model_type: str) -> tuple[Layout, ...]:
    found = [_native_layout(model_type, i) for i in range(len(CASES.get(model_type, [])))] + _listed_layouts(
        model_type
    )
    assert found, f"no layout for {model_type}"
    return tuple(found)


def _match(names: Any, pattern: str) -> list[str]:
    return [n for n in names if n and fnmatch.fnmatchcase(n, pattern)]


def _match_rel(block: dict[str, str], pattern: str) -> list[str]:
    return [""] if pattern == "" else _match(block, pattern)


def _excluded(layout: Layout, patterns: list[str]) -> set[str]:
    return {n for p in patterns for n in _match(layout.modules, p)}


#: leaf names of the layers that produce attention K/V, Q; parents that are attention modules
KV_LEAVES = {"k_proj", "v_proj", "kv_b_proj", "kv_proj", "Wqkv", "qkv_proj", "query_key_value", "c_attn"}
Q_LEAVES = {"q_proj", "q_b_proj"}
ATTENTION_PARENTS = {"self_attn", "attn", "cross_attn", "self_attention"}
#: leaf names that must never be excluded (MLP / expert projections)
MLP_LEAVES = {
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "w1",
    "w2",
    "w3",
    "v1",
    "fc1",
    "fc2",
    "fc_in",
    "fc_out",
}
DOWN_LEAVES = {"down_proj", "fc2", "fc_out", "dense_4h_to_h", "output_linear"}


def _as_list(value: Any) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _check_layer_patterns(model_type: str, key: str, leaves: set[str] | None) -> None:
    kw = TEMPLATES[model_type]
    patterns = _as_list(kw[key])
    for layout in layouts(model_type):
        excluded = _excluded(layout, kw["exclude_layers_name"])
        targets = {n for n, k in layout.modules.items() if k == "Linear"} | layout.fused
        union = {n for p in patterns for n in _match(targets, p)}
        if leaves is not None:
            assert union - excluded, f"{model_type}: {key} {patterns} match nothing in {layout.name}"
        for name in union - excluded:
            if leaves is not None:
                leaf, parent = name.split(".")[-1], name.split(".")[-2]
                assert leaf in leaves and parent in ATTENTION_PARENTS, f"{model_type}: {key} matches {name}"
            else:
                assert name.split(".")[-1] not in DOWN_LEAVES, f"{model_type}: {key} matches {name}"
        # nothing else a pattern hits: non-Linear modules are never K/V/Q/gate-up layers
        others = {n for p in patterns for n in _match(layout.modules, p)} - targets - excluded
        assert not others, f"{model_type}: {key} {patterns} match non-Linear modules {sorted(others)[:4]}"
    for p in patterns:
        assert any(
            _match({n for n, k in lo.modules.items() if k == "Linear"} | lo.fused, p)
            for lo in layouts(model_type)
        ), f"{model_type}: {key} pattern {p!r} matches no layer in any layout"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_kv_q_gate_up_patterns(model_type):
    kw = TEMPLATES[model_type]
    assert kw["kv_layers_name"], f"{model_type} names no K/V layers"
    _check_layer_patterns(model_type, "kv_layers_name", KV_LEAVES)
    if kw["q_layer_name"] is not None:
        _check_layer_patterns(model_type, "q_layer_name", Q_LEAVES)
    if kw["gate_up_layers_name"] is not None:
        _check_layer_patterns(model_type, "gate_up_layers_name", None)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_exclude_patterns(model_type):
    kw = TEMPLATES[model_type]
    patterns = kw["exclude_layers_name"]
    assert patterns[0] == "lm_head"
    worked_on = _algorithm_targets(model_type)
    for p in patterns[1:]:
        assert any(_match(lo.modules, p) for lo in layouts(model_type)), (
            f"{model_type}: exclude {p!r} matches nothing"
        )
    for layout in layouts(model_type):
        excluded = _excluded(layout, patterns)
        assert layout.lm_heads and layout.lm_heads <= excluded, (
            f"{model_type}: LM head not excluded in {layout.name}"
        )
        for name in (n for n in excluded if n.startswith(layout.decoder_layers + ".")):
            assert name.split(".")[-1] not in MLP_LEAVES, f"{model_type}: excludes MLP layer {name}"
            assert not name.endswith("experts") and ".experts." not in name, (
                f"{model_type}: excludes experts {name}"
            )
        clash = excluded & worked_on[layout.name]
        assert not clash, f"{model_type}: excluded layers are algorithm targets: {sorted(clash)[:4]}"


def _algorithm_targets(model_type: str) -> dict[str, set[str]]:
    """Per layout: full names of the layers the GPTQ groups and the K/V/Q/gate-up patterns name
    inside the decoder blocks (what must never be excluded)."""
    kw = TEMPLATES[model_type]
    gptq = kw["algorithm_configs"].get("gptq")
    out: dict[str, set[str]] = {}
    for layout in layouts(model_type):
        names: set[str] = set()
        prefix = layout.decoder_layers
        for i, block in enumerate(layout.blocks):
            for group in gptq.inside_layer_modules if gptq else []:
                names.update(f"{prefix}.{i}.{n}" for entry in group for n in _match_rel(block, entry))
        in_blocks = {n for n in layout.modules if n.startswith(prefix + ".")}
        for key in ("kv_layers_name", "q_layer_name", "gate_up_layers_name"):
            names.update(n for p in _as_list(kw[key]) for n in _match(in_blocks, p))
        out[layout.name] = names
    return out


# -- algorithm defaults ---------------------------------------------------------------------------
def _configs(model_type: str) -> dict[str, Any]:
    return {k: v for k, v in TEMPLATES[model_type]["algorithm_configs"].items() if v is not None}


def _applies(block: dict[str, str], p: ScalingPair) -> bool:
    return len(_match_rel(block, p.prev_op)) == 1 and all(_match_rel(block, e) for e in p.layers)


def _dim_out(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.weight.numel()


#: (model type, layout) whose rotation default names another layout's modules (rotation refuses it by name)
ROTATION_REFUSED = {("minimax_m2", "MiniMaxM2ForCausalLM (remote)")}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_algorithm_names_resolve(model_type):
    configs = _configs(model_type)
    assert {"awq", "gptq"} <= set(configs), f"{model_type} has no AWQ/GPTQ default"
    for name, cfg in configs.items():
        for layout in layouts(model_type):
            assert cfg.model_decoder_layers == layout.decoder_layers, (
                f"{model_type}/{name}: decoder path in {layout.name}"
            )
            if isinstance(cfg, _ScalingConfig):
                _check_scaling(model_type, name, cfg, layout)
            elif isinstance(cfg, GPTQConfig) or hasattr(cfg, "inside_layer_modules"):
                _check_groups(model_type, name, cfg, layout)
            elif isinstance(cfg, RotationConfig) and (model_type, layout.name) in ROTATION_REFUSED:
                with pytest.raises(AssertionError):  # the default names the other layout's modules
                    _check_rotation(model_type, cfg, layout)
            elif isinstance(cfg, RotationConfig):
                _check_rotation(model_type, cfg, layout)
        # every entry of every config resolves somewhere
        entries = _entries(cfg)
        for entry in entries:
            assert any(_match_rel(block, alt) for alt in entry.split("|")
                       for lo in layouts(model_type) for block in lo.blocks), (
                f"{model_type}/{name}: {entry!r} matches nothing in any decoder block"
            )
        if isinstance(cfg, _ScalingConfig):
            for p in cfg.scaling_layers:
                assert any(_applies(b, p) for lo in layouts(model_type) for b in lo.blocks), (
                    f"{model_type}: {p} never applies"
                )


def _entries(cfg: Any) -> list[str]:
    if isinstance(cfg, _ScalingConfig):
        return [e for p in cfg.scaling_layers for e in (p.prev_op, *p.layers)]
    if hasattr(cfg, "inside_layer_modules"):
        return [e for g in cfg.inside_layer_modules for e in g]
    return [*_attention_roles(cfg), cfg.mlp_norm, *cfg.mlp_inputs, *_mlp_outputs(cfg)]


def _attention_roles(cfg: RotationConfig) -> list[str]:
    """Rotation roles every block has (only R2 uses v_proj)."""
    return [cfg.attn_norm, *([cfg.v_proj] if cfg.r2 else []), cfg.o_proj, cfg.mlp_norm]


def _has(block: dict, entry: str) -> bool:
    """The block has the role (``a|b``: one of the alternatives)."""
    return any(len(_match_rel(block, n)) == 1 for n in entry.split("|"))


def _mlp_outputs(cfg: RotationConfig) -> list[str]:
    return cfg.mlp_outputs or [cfg.down_proj]


def _check_scaling(model_type: str, name: str, cfg: Any, layout: Layout) -> None:
    blocks = (
        [layout.model.get_submodule(layout.decoder_layers)[i] for i in range(len(layout.blocks))]
        if layout.model
        else None
    )
    assert any(_applies(layout.blocks[0], p) for p in cfg.scaling_layers), (
        f"{model_type}/{name}: no scaling pair applies to the first block of {layout.name}"
    )
    for i, block in enumerate(layout.blocks):
        for p in cfg.scaling_layers:
            if not _applies(block, p):
                continue
            if p.inspect is not None:
                assert len(_match_rel(block, p.inspect)) == 1, (
                    f"{model_type}: inspect {p.inspect!r} in {layout.name}"
                )
            layers = [n for e in p.layers for n in _match_rel(block, e)]
            assert len(set(layers)) == len(layers), f"{model_type}: {p} lists a layer twice"
            for n in layers:
                # SmoothQuant, AWQ and AutoSmoothQuant also scale fused MoE experts (their gate/up input columns)
                fused = name in ("smoothquant", "awq", "autosmoothquant") and block[n].endswith("Experts")
                assert block[n] in ("Linear", "Router") or "Router" in block[n] or fused, (
                    f"{model_type}/{name}: {n} is a {block[n]}"
                )
            if blocks is not None:
                from quark.torch.algorithm.scaling import _reader_width

                module = blocks[i]
                width = _dim_out(module.get_submodule(_match_rel(block, p.prev_op)[0]))
                for n in layers:
                    assert _reader_width(n, module.get_submodule(n)) == width, (
                        f"{model_type}: {p.prev_op} -> {n} shapes"
                    )


def _check_groups(model_type: str, name: str, cfg: Any, layout: Layout) -> None:
    first = [e for g in cfg.inside_layer_modules for e in g if _match_rel(layout.blocks[0], e)]
    assert first, f"{model_type}/{name}: no group entry in the first block of {layout.name}"
    for block in layout.blocks:
        seen: list[str] = []
        for group in cfg.inside_layer_modules:
            for entry in group:
                for n in _match_rel(block, entry):
                    assert block[n] == "Linear", f"{model_type}/{name}: {n} is a {block[n]}"
                    seen.append(n)
        assert len(seen) == len(set(seen)), f"{model_type}/{name}: a layer sits in two groups"


def _check_rotation(model_type: str, cfg: RotationConfig, layout: Layout) -> None:
    for n in (*cfg.embedding_layers, cfg.lm_head, cfg.final_norm):
        assert n in layout.modules, f"{model_type}: rotation role {n!r} missing in {layout.name}"
    for block in layout.blocks:
        for n in _attention_roles(cfg):
            assert _has(block, n), f"{model_type}: rotation role {n!r} in {layout.name}"
        # stream readers and writers: blocks differ (dense / MoE, own / shared indexer); each block has an
        # attention input, an MLP input and an MLP output among them
        for names in (cfg.attn_inputs, cfg.mlp_inputs, _mlp_outputs(cfg)):
            assert any(_has(block, n) for n in names), f"{model_type}: {names} in {layout.name}"
    for n in (*cfg.attn_inputs, *cfg.mlp_inputs, *_mlp_outputs(cfg)):
        assert any(_has(block, n) for block in layout.blocks), f"{model_type}: rotation role {n!r} in no block of {layout.name}"


# -- exactness of the scaling pairs ---------------------------------------------------------------
def _is_one_plus(norm: nn.Module) -> bool:
    """True when the norm computes ``norm(x) * (1 + w)`` (Gemma style), probed numerically."""
    saved = {n: p.detach().clone() for n, p in norm.named_parameters(recurse=False)}
    with torch.no_grad():
        for p in norm.parameters(recurse=False):
            p.zero_()
        out = norm(torch.randn(2, saved["weight"].numel(), dtype=saved["weight"].dtype))
        for n, p in norm.named_parameters(recurse=False):
            p.copy_(saved[n])
    return bool(out.abs().max() > 0)


def _fold(prev: nn.Module, layers: list[nn.Module], scale: torch.Tensor) -> None:
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(scale.view(-1, *([1] * (prev.weight.dim() - 1))))
        elif _is_one_plus(prev):
            prev.weight.copy_((1 + prev.weight) / scale - 1)
        else:
            prev.weight.div_(scale)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(scale)
        for layer in layers:
            if isinstance(getattr(layer, "weight", None), torch.Tensor):
                layer.weight.mul_(scale)
                continue
            # fused MoE experts: every expert's gate/up matrix reads the input (rotation's reader view)
            from quark.torch.algorithm.rotation import StreamModule

            for m in StreamModule(layer, "experts", writes=False).matrices():
                m.mul_(scale)


def _text_model(model_type: str, index: int) -> tuple[nn.Module, str]:
    """The real-weight module holding the decoder blocks (the text model of a VL model), and the
    path of the blocks inside it."""
    path = TEMPLATES[model_type]["algorithm_configs"]["awq"].model_decoder_layers
    parent = path.rsplit(".", 1)[0]
    cls = type(meta_model(model_type, index).get_submodule(parent))
    cfg = build_config(model_type, CASES[model_type][index])
    torch.manual_seed(0)
    return cls(cfg.get_text_config(decoder=True)).eval(), path[len(parent) + 1 :]


@pytest.mark.parametrize("model_type", NATIVE)
def test_scaling_pairs_are_exact(model_type):
    pairs = TEMPLATES[model_type]["algorithm_configs"]["awq"].scaling_layers
    for index in range(len(CASES[model_type])):
        model, layers_attr = _text_model(model_type, index)
        ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False)[0]
        g = torch.Generator().manual_seed(1)
        applied = 0
        for block in model.get_submodule(layers_attr):
            rel = {n: module_kind(m) for n, m in block.named_modules()}
            for p in pairs:
                if not _applies(rel, p):
                    continue
                prev = block.get_submodule(_match_rel(rel, p.prev_op)[0])
                layers = [block.get_submodule(n) for e in p.layers for n in _match_rel(rel, e)]
                scale = torch.exp(torch.randn(_dim_out(prev), generator=g) * 0.5)
                _fold(prev, layers, scale)
                applied += 1
        assert applied, f"{model_type}: no scaling pair applied"
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False)[0]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# -- the data builds valid templates --------------------------------------------------------------
def test_templates_in_documented_order_and_valid():
    from quark.torch.quantization.config.template import LLMTemplate

    assert [kw["model_type"] for kw in ALL_TEMPLATES] == list(MODEL_TYPES)
    for kw in ALL_TEMPLATES:
        template = LLMTemplate(**kw)
        for algo in _configs(kw["model_type"]):
            cfg = template.get_config("int4_wo_128", algorithm=algo)
            assert cfg.algo_config[0] is not kw["algorithm_configs"][algo], (
                "the template default must be copied"
            )
        missing = [a for a, v in kw["algorithm_configs"].items() if v is None]
        for algo in missing:
            with pytest.raises(ValueError, match="algo_configs"):
                template.get_config("int4_wo_128", algorithm=algo)
