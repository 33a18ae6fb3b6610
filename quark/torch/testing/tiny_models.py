"""Tiny random models of every architecture transformers ships that has an ``LLMTemplate``.

The tiny-config data shared by ``tests/test_template_patterns.py`` (template names against real
module names) and the coverage harness (:mod:`quark.torch.testing.coverage`, ``bench/coverage.py``):
for each native model type, one or more :class:`Case` variants (the class a user loads, fields of
the text config, work-arounds), built without any download from ``AutoConfig.for_model``.
Remote-code model types (not shipped by transformers) have no case: their module names are listed
in ``quark/torch/testing/data/remote_code_module_names.json``, package data installed with quark
(:func:`remote_listing`).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quark.torch.quantization.config.templates import MODEL_TYPES

#: the module listing of remote-code layouts (package data of ``quark.torch.testing``, installed with it)
REMOTE_LISTING = resources.files("quark.torch.testing") / "data" / "remote_code_module_names.json"

#: applied to the (text) config wherever the field exists and is set in the default config
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    shared_intermediate_size=32,
    dense_intermediate_size=64,
    intermediate_size_mlp=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    n_routed_experts=4,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    pad_token_id=0,
    max_position_embeddings=256,
    kv_lora_rank=32,
    q_lora_rank=96,  # a multiple of 32: int4 g32 / MX groups divide q_b_proj's input
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=4,
)


@dataclass
class Case:
    """How to build one tiny variant: the model class, text-config fields, top-level fields, fixes."""

    cls: str
    text: dict[str, Any] = field(default_factory=dict)
    top: dict[str, Any] = field(default_factory=dict)
    #: attribute paths set after construction (work-arounds for default-config gaps)
    patch: dict[str, Any] = field(default_factory=dict)
    #: skip TINY (configs with their own field names)
    raw: bool = False
    #: parameter-name pattern (fnmatch) -> a constant the matching parameters are filled with after
    #: construction: gates transformers initialises to zero, which would hide a block's output from
    #: the logits (and from the harness's logit comparison)
    fill: dict[str, float] = field(default_factory=dict)


_MHA = {"num_key_value_heads": 4}
#: MLA attention expands the latent to one K/V head per query head
_MLA = {"num_key_value_heads": 4}
_DENSE_FIRST = {"mlp_only_layers": [0]}
#: tiny vision towers for the multimodal classes (without them each model carries a 0.1-0.8 B-parameter
#: random vision tower); the harness feeds them images only where decoder blocks need them
#: (``quark.torch.testing.coverage.INPUT_BUILDERS``), text elsewhere
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
_QWEN_VIT = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                 num_position_embeddings=16)

#: model type -> variants (each must be covered by the template); classes are those a user loads
CASES: dict[str, list[Case]] = {
    "cohere": [Case("CohereForCausalLM")],
    "dbrx": [
        Case(
            "DbrxForCausalLM",
            text=dict(
                d_model=64,
                n_heads=4,
                n_layers=2,
                vocab_size=128,
                max_seq_len=256,
                attn_config=dict(kv_n_heads=2, clip_qkv=8.0),
                ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
            ),
            # transformers 5.24's default DbrxAttentionConfig lacks the rope_theta the attention reads
            patch={"attn_config.rope_theta": 10000.0},
            raw=True,
        )
    ],
    "deepseek_v2": [
        Case("DeepseekV2ForCausalLM", text=dict(num_experts_per_tok=2, **_MLA)),
        Case("DeepseekV2ForCausalLM", text=dict(num_experts_per_tok=2, q_lora_rank=None, **_MLA)),
    ],
    "deepseek_v3": [Case("DeepseekV3ForCausalLM", text=_MLA)],
    "deepseek_v32": [Case("DeepseekV32ForCausalLM", text=_MLA)],
    "deepseek_v4": [
        Case(
            "DeepseekV4ForCausalLM",
            text=dict(
                num_hidden_layers=3,
                num_key_value_heads=1,
                head_dim=32,
                layer_types=[
                    "sliding_attention",
                    "heavily_compressed_attention",
                    "compressed_sparse_attention",
                ],
                mlp_layer_types=["hash_moe", "moe", "moe"],
                compress_rates={"heavily_compressed_attention": 4, "compressed_sparse_attention": 2},
                sliding_window=8,
                o_groups=2,
                o_lora_rank=16,
            ),
        )
    ],
    "gemma2": [Case("Gemma2ForCausalLM")],
    "gemma3": [
        Case(
            "Gemma3ForConditionalGeneration",
            top=dict(vision_config=dict(_VIT, image_size=64, patch_size=16), mm_tokens_per_image=4),
        )
    ],
    "gemma3_text": [Case("Gemma3ForCausalLM")],
    "glm4_moe": [Case("Glm4MoeForCausalLM")],
    "glm4_moe_lite": [Case("Glm4MoeLiteForCausalLM", text=_MLA)],
    "glm_moe_dsa": [Case("GlmMoeDsaForCausalLM", text=dict(indexer_types=["full", "shared"], **_MLA))],
    "gptj": [Case("GPTJForCausalLM", text=dict(rotary_dim=8))],
    "gpt_oss": [Case("GptOssForCausalLM")],
    "granitemoehybrid": [
        Case(
            "GraniteMoeHybridForCausalLM",
            text=dict(
                layer_types=["mamba", "attention"],
                intermediate_size=32,
                shared_intermediate_size=64,
                mamba_n_heads=8,  # in_proj: 2 * 128 + 2 * 16 + 8 = 296 outputs, a multiple of 8 (int4 packing)
                mamba_d_head=16,
                mamba_d_state=16,
                mamba_chunk_size=8,
            ),
        )
    ],
    "kimi_k25": [
        Case(
            "Kimi_K25ForConditionalGeneration",
            text=_MLA,
            # the projector's pre-norm is over one vision patch's features (the vision hidden size)
            top=dict(vision_config=dict(_VIT, pos_emb_height=8, pos_emb_width=8),
                     projection_hidden_size=_VIT["hidden_size"]),
        )
    ],
    "llama": [Case("LlamaForCausalLM")],
    "llama4": [
        Case(
            "Llama4ForConditionalGeneration",
            text=dict(interleave_moe_layer_step=2, intermediate_size=32),
            top=dict(
                vision_config=dict(
                    _VIT,
                    # the pixel-shuffle MLP reads 4 x hidden channels (shuffle ratio 0.5)
                    intermediate_size=4 * _VIT["hidden_size"],
                    image_size=56,
                    patch_size=14,
                    vision_output_dim=64,
                    projector_input_dim=64,
                    projector_output_dim=64,
                )
            ),
        )
    ],
    "minimax_m2": [Case("MiniMaxM2ForCausalLM")],
    "minimax_m3_vl": [
        Case(
            "MiniMaxM3SparseForConditionalGeneration",
            text=dict(
                layer_types=["full_attention", "minimax_m3_sparse"],
                mlp_layer_types=["dense", "sparse"],
                index_block_size=4,
                index_topk_blocks=2,
                index_local_blocks=1,
                rotary_dim=8,
            ),
            top=dict(vision_config=dict(_VIT, image_size=56)),
        )
    ],
    "mistral": [Case("MistralForCausalLM")],
    "mixtral": [Case("MixtralForCausalLM")],
    "mllama": [
        Case(
            "MllamaForConditionalGeneration",
            text=dict(num_hidden_layers=3, cross_attention_layers=[1]),
            # the cross-attention block's tanh gates start at 0 (its output would not reach the logits)
            fill={"*cross_attn_attn_gate": 1.0, "*cross_attn_mlp_gate": 1.0},
            top=dict(
                # the image token is the first id past the text vocabulary (128256 in Llama 3.2
                # Vision), inside the embedding's 8 extra rows
                image_token_index=128,
                vision_config=dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_global_layers=1,
                    attention_heads=2,
                    image_size=56,
                    intermediate_layers_indices=[0],
                    vision_output_dim=64,
                )
            ),
        )
    ],
    "olmo": [Case("OlmoForCausalLM")],
    "opt": [Case("OPTForCausalLM", text=dict(ffn_dim=128, word_embed_proj_dim=64))],
    "phi": [Case("PhiForCausalLM", text=_MHA)],
    "phi3": [Case("Phi3ForCausalLM")],
    "qwen2": [Case("Qwen2ForCausalLM")],
    "qwen2_moe": [Case("Qwen2MoeForCausalLM", text=_DENSE_FIRST)],
    "qwen3": [Case("Qwen3ForCausalLM")],
    "qwen3_moe": [Case("Qwen3MoeForCausalLM", text=_DENSE_FIRST)],
    "qwen3_next": [
        Case(
            "Qwen3NextForCausalLM",
            text=dict(
                layer_types=["linear_attention", "full_attention"],
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                linear_key_head_dim=16,
                linear_value_head_dim=16,
                **_DENSE_FIRST,
            ),
        )
    ],
    "qwen3_vl_moe": [
        Case(
            "Qwen3VLMoeForConditionalGeneration",
            text=_DENSE_FIRST,
            top=dict(vision_config=dict(_QWEN_VIT, deepstack_visual_indexes=[0])),
        )
    ],
    "qwen3_5_moe": [
        Case(
            "Qwen3_5MoeForConditionalGeneration",
            text=dict(
                layer_types=["linear_attention", "full_attention"],
                linear_num_key_heads=2,
                linear_num_value_heads=8,  # in_proj_a / in_proj_b: 8 outputs (int4 packs 8 per word)
                linear_key_head_dim=16,
                linear_value_head_dim=16,
            ),
            top=dict(vision_config=_QWEN_VIT),
        )
    ],
}

#: model types built from transformers classes / known only from the remote-code listing
NATIVE = sorted(CASES)
REMOTE_ONLY = sorted(t for t in MODEL_TYPES if t not in CASES)


def remote_listing(path: str | Path | None = None) -> dict[str, Any]:
    """The remote-code module listing: model type -> ``{"source", "layouts": {name: layout}}``."""
    data = json.loads((Path(path) if path else REMOTE_LISTING).read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _set_path(obj: Any, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def _tiny_kwargs(default_cfg: Any, case: Case) -> dict[str, Any]:
    if case.raw:
        return dict(case.text)
    kwargs = {k: v for k, v in TINY.items() if getattr(default_cfg, k, None) is not None}
    kwargs.update(case.text)
    return kwargs


def build_config(model_type: str, case: Case) -> Any:
    """The tiny config of one case: :data:`TINY` applied to the (text) config where the field exists."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    text = default.get_text_config(decoder=True)
    if text is default:
        cfg = AutoConfig.for_model(model_type, **_tiny_kwargs(default, case), **case.top)
    else:
        key = next(k for k, v in vars(default).items() if v is text)
        cfg = AutoConfig.for_model(model_type, **{key: _tiny_kwargs(text, case)}, **case.top)
    for path, value in case.patch.items():
        _set_path(cfg, path, value)
    return cfg


def build_model(model_type: str, index: int = 0, *, device: str | torch.device | None = None,
                seed: int = 0) -> nn.Module:
    """The tiny model of ``CASES[model_type][index]``: random weights (seeded), eval mode, float32;
    ``device="meta"`` builds it without memory (names and shapes only)."""
    import transformers

    case = CASES[model_type][index]
    cfg = build_config(model_type, case)
    cls = getattr(transformers, case.cls)
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            return cls(cfg)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = cls(cfg).eval()
    filled = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            pattern = next((p for p in case.fill if fnmatch.fnmatchcase(name, p)), None)
            if pattern is not None:
                param.fill_(case.fill[pattern])
                filled.add(pattern)
    if set(case.fill) - filled:  # a renamed parameter: fail loudly rather than test a silent block
        raise ValueError(f"{case.cls}: fill patterns {sorted(set(case.fill) - filled)} match no parameter")
    return model


def case_name(case: Case) -> str:
    """A readable name of one variant: the class and the text-config fields it sets."""
    return f"{case.cls}{'' if not case.text else ' ' + str(sorted(case.text))}"


# -- layouts: module names of one model, per decoder block --------------------------------------
@dataclass
class Layout:
    """The module names of one model (built, or listed for remote code), per decoder block."""

    name: str
    decoder_layers: str
    #: full module name -> kind ("Linear" for nn.Linear, else the class name or the listing's kind)
    modules: dict[str, str]
    #: full names of fused-expert parameters (transformers-5 3-D expert weights)
    fused: set[str]
    #: per decoder block: block-relative module name ("" = the block) -> kind
    blocks: list[dict[str, str]]
    lm_heads: set[str]
    #: the real model (meta device or not) for shape checks; None for listings
    model: nn.Module | None = None


def module_kind(module: nn.Module) -> str:
    return "Linear" if isinstance(module, nn.Linear) else type(module).__name__


def fused_expert_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters held directly by expert containers (``*experts`` modules): the fused 3-D expert
    weights (and their biases) of transformers-5 MoE blocks, which are no ``nn.Linear``."""
    return {
        f"{n}.{p}": param
        for n, m in model.named_modules()
        if n.endswith("experts") or ".experts." in n
        for p, param in m.named_parameters(recurse=False)
    }


def model_layout(model: nn.Module, decoder_layers: str, name: str) -> Layout:
    """The layout of a built model whose decoder blocks are the ``nn.ModuleList`` at ``decoder_layers``."""
    layers = model.get_submodule(decoder_layers)
    head = model.get_output_embeddings()
    return Layout(
        name=name,
        decoder_layers=decoder_layers,
        modules={n: module_kind(m) for n, m in model.named_modules() if n},
        fused=set(fused_expert_params(model)),
        blocks=[{n: module_kind(m) for n, m in block.named_modules()} for block in layers],
        lm_heads={n for n, m in model.named_modules() if m is head},
        model=model,
    )


def listed_layouts(entry: dict[str, Any]) -> list[Layout]:
    """The layouts of one model type's entry in the remote-code listing (:func:`remote_listing`)."""
    out = []
    for name, data in entry.get("layouts", {}).items():
        path = data["decoder_layers"]
        modules = dict(data["model"])
        for i, block in enumerate(data["blocks"]):
            modules[f"{path}.{i}"] = "Module"
            modules.update({f"{path}.{i}.{rel}": kind for rel, kind in block.items()})
        out.append(
            Layout(
                name=name,
                decoder_layers=path,
                modules=modules,
                fused=set(),
                blocks=[{"": "Module", **block} for block in data["blocks"]],
                lm_heads={n for n in modules if n.split(".")[-1] in ("lm_head", "output_layer")},
            )
        )
    return out
