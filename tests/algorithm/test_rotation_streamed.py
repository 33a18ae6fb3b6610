"""Rotation in the streamed flow: ``prepare_model_streamed`` on a model whose decoder blocks are on
meta, then ``prepare_block(i, block)`` on each block once its float weights are loaded (and freed
again afterwards), gives bit for bit what ``prepare_model`` gives on the loaded model: every tensor,
the online rotations, the logits. Checked on tiny random models (RMSNorm and LayerNorm streams, fused
MoE experts, a fused QKV, MLA), before and after the quantized layers are swapped in."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn

from quark.torch import LLMTemplate
from quark.torch.algorithm import quantizers_off
from quark.torch.algorithm.rotation import ALGORITHM
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.algo_configs import RotationConfig
from quark.torch.quantization.online_rotation import online_rotation
from quark.torch.testing.tiny_models import build_model
from tests.helpers import tiny_llama, token_batches


def _random_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Norm weights (and biases) away from their init, and embeddings with nonzero channel means, so
    that folding the norms and keeping a LayerNorm stream's mean are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norms = {f"{n}.{p}" for n, m in model.named_modules() if "norm" in type(m).__name__.lower()
                 for p, _ in m.named_parameters(recurse=False)}
        for name, p in model.named_parameters():
            if name in norms:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight")
                        else torch.randn(p.shape, generator=g) * 0.3)
            elif ("embed" in name or "wte" in name) and p.dim() == 2:
                p.add_(torch.randn(1, p.shape[1], generator=g))
    return model


def _model(model_type: str) -> nn.Module:
    # llama with hidden 48, heads 12, intermediate 96: non-power-of-two Hadamard orders
    return _random_norms(tiny_llama(hidden=48) if model_type == "llama" else build_model(model_type))


def _config(model: nn.Module, model_type: str, swapped: bool, **fields) -> RotationConfig:
    """The template's RotationConfig with ``fields``; with ``swapped`` the quantized layers are swapped
    into ``model`` first (what the quantizer does before rotation) and the config is the quant config's."""
    rotation = copy.deepcopy(LLMTemplate.get(model_type).algorithm_configs["rotation"])
    for k, v in fields.items():
        setattr(rotation, k, v)
    if not swapped:
        return rotation
    config = LLMTemplate.get(model_type).get_config("int8", algorithm=["rotation"], algo_configs={"rotation": rotation})
    ModelQuantizer(config)._prepare(model)
    return next(c for c in config.algo_config if isinstance(c, RotationConfig))


def _to_meta(block: nn.Module) -> None:
    """Every parameter of ``block`` on meta (a streamed skeleton's block, or a block freed after its turn)."""
    for m in block.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _load(block: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a fresh copy of ``state`` (the block's float weights from disk)."""
    block.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)


def _rotate_streamed(model: nn.Module, config: RotationConfig) -> None:
    """What the streamed flow does: blocks on meta, ``prepare_model_streamed``, then each block loaded,
    prepared and freed in turn (block 0 loaded, freed and loaded again first, as the flow's probe does).
    The prepared blocks are loaded back at the end, for the comparison."""
    layers = model.get_submodule(config.model_decoder_layers)
    saved = [copy.deepcopy(b.state_dict()) for b in layers]
    for block in layers:
        _to_meta(block)
    prepare_block = ALGORITHM.prepare_model_streamed(model, config)
    _load(layers[0], saved[0])
    _to_meta(layers[0])
    done = []
    for i, block in enumerate(layers):
        _load(block, saved[i])
        prepare_block(i, block)
        done.append(copy.deepcopy(block.state_dict()))
        _to_meta(block)
    for block, state in zip(layers, done):
        block.load_state_dict(state, assign=True)


def _structure(model: nn.Module) -> list[tuple]:
    """Per module: its name, class, forward pre-hook count and online rotation (order, signs)."""
    out = []
    for name, m in model.named_modules():
        online = online_rotation(m)
        signs = None if online is None or online.rot.signs is None else online.rot.signs.tolist()
        out.append((name, type(m).__name__, len(m._forward_pre_hooks), None if online is None else online.rot.n, signs))
    return out


def _logits(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    with torch.no_grad(), quantizers_off(model):
        return torch.cat([model(**b).logits for b in batches])


def _assert_same(m1: nn.Module, m2: nn.Module, unrotated: nn.Module) -> None:
    """m1 and m2 equal bit for bit, and both compute the function of the unrotated model."""
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    differ = [k for k in s1 if s1[k].dtype != s2[k].dtype or not torch.equal(s1[k], s2[k])]
    assert differ == []
    assert _structure(m1) == _structure(m2)
    batches = token_batches(2, seq=12, vocab=m1.config.get_text_config().vocab_size)
    logits = _logits(m2, batches)
    assert torch.equal(_logits(m1, batches), logits)
    reference = _logits(unrotated, batches)
    assert ((logits - reference).norm() / reference.norm()).item() < 1e-4


ROLES = {"r1": dict(r2=False), "r1,r2": dict(), "r1,r2,r4": dict(r4=True),
         "r1,r2,r4,random": dict(r4=True, random=True, seed=7), "r2,r4": dict(r1=False, r4=True)}
CASES = [
    *[("llama", roles, swapped) for roles in ROLES for swapped in (False, True)],
    # fused MoE experts (R4 needs them quantized); qwen3_moe: a dense block, then a MoE block
    ("mixtral", "r1,r2", False), ("mixtral", "r1,r2,r4", True), ("qwen3_moe", "r1,r2,r4", True),
    # MLA (R2 on kv_b_proj's value rows), fused [q; k; v] (phi3)
    ("deepseek_v3", "r1,r2,r4", True), ("phi3", "r1,r2,r4", True),
    # LayerNorm streams: OPT's final-norm bias stays in the norm (lm_head has none), GPT-J's block
    # norms keep theirs (q/k/v have none) and read attention and MLP through one norm
    ("opt", "r1,r2", False), ("opt", "r1,r2,r4", True), ("gptj", "r1,r2,r4", True), ("phi", "r1,r2,r4", True),
]


@pytest.mark.parametrize(("model_type", "roles", "swapped"), CASES,
                         ids=[f"{t}-{r}-{'swapped' if s else 'float'}" for t, r, s in CASES])
def test_streamed_rotation_equals_prepare_model(model_type, roles, swapped):
    m1, m2 = _model(model_type), _model(model_type)
    ALGORITHM.prepare_model(m1, _config(m1, model_type, swapped, **ROLES[roles]))
    _rotate_streamed(m2, _config(m2, model_type, swapped, **ROLES[roles]))
    _assert_same(m1, m2, _model(model_type))
    assert any(online_rotation(m) is not None for m in m2.modules()) == ROLES[roles].get("r4", False)


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "gptj"])
def test_prepare_block_again_on_a_reloaded_block_gives_the_same_weights(model_type):
    """The flow loads block 0 to probe it, frees it and loads it again for its turn: prepare_block
    consumes nothing, and both calls give prepare_model's block."""
    reference, model = _model(model_type), _model(model_type)
    roles = ROLES["r1,r2,r4,random"]
    ALGORITHM.prepare_model(reference, _config(reference, model_type, True, **roles))
    config = _config(model, model_type, True, **roles)
    layers = model.get_submodule(config.model_decoder_layers)
    saved = [copy.deepcopy(b.state_dict()) for b in layers]
    for block in layers:
        _to_meta(block)
    prepare_block = ALGORITHM.prepare_model_streamed(model, config)
    expected = reference.get_submodule(config.model_decoder_layers)[0].state_dict()
    for _ in range(2):
        _load(layers[0], saved[0])
        prepare_block(0, layers[0])
        got = layers[0].state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        loaded = [weakref.ref(p) for p in layers[0].parameters()]
        del got
        _to_meta(layers[0])
        gc.collect()
        assert all(r() is None for r in loaded)  # prepare_block kept no reference to the block's weights


def test_the_skeleton_is_checked_before_anything_changes():
    """Refusals that need shapes and classes only come from prepare_model_streamed, before it changes
    the embeddings: an unfoldable norm in a block on meta (probed on stand-in weights), R4 on fused
    experts that are not quantized, a role no block has, an output head not loaded."""
    def skeleton(model_type: str, config: RotationConfig, swap_norm: bool = False) -> nn.Module:
        model = _model(model_type)
        layers = model.get_submodule(config.model_decoder_layers)
        if swap_norm:
            layers[1].post_attention_layernorm = nn.GroupNorm(1, 48)
        for block in layers:
            _to_meta(block)
        return model

    llama = copy.deepcopy(LLMTemplate.get("llama").algorithm_configs["rotation"])
    mixtral = copy.deepcopy(LLMTemplate.get("mixtral").algorithm_configs["rotation"])
    typo = copy.deepcopy(llama)
    typo.mlp_inputs = [*llama.mlp_inputs, "mlp.gate_projj"]
    for model_type, config, swap_norm, message in [
        ("llama", llama, True, r"model.layers.1.post_attention_layernorm is a GroupNorm"),
        ("mixtral", copy.deepcopy(mixtral), False, r"r4: .*fused experts that are not quantized"),
        ("llama", typo, False, r"\['mlp.gate_projj'\] match no module in any decoder block"),
        ("llama", llama, False, r"\['lm_head'\] are not loaded \(on meta\)"),
    ]:
        if model_type == "mixtral":
            config.r4 = True
        model = skeleton(model_type, config, swap_norm)
        if "lm_head" in message:  # an output head not loaded yet
            _to_meta(model.lm_head)
        before = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
        with pytest.raises(ValueError, match=message):
            ALGORITHM.prepare_model_streamed(model, config)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(online_rotation(m) for m in model.modules())


def test_a_block_refusal_comes_before_the_block_changes():
    """A value only a loaded block shows (a norm bias where the weight is 0, with a bias-free reader)
    is refused by prepare_block before it changes that block."""
    model = _model("llama")
    config = _config(model, "llama", True)
    norm = model.model.layers[1].input_layernorm

    class BiasedRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bias = nn.Parameter(norm.weight.detach().clone()), nn.Parameter(torch.zeros(48))
            with torch.no_grad():
                self.weight[3], self.bias[3] = 0.0, 1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight + self.bias

    model.model.layers[1].input_layernorm = BiasedRMSNorm()
    layers = model.model.layers
    saved = [copy.deepcopy(b.state_dict()) for b in layers]
    for block in layers:
        _to_meta(block)
    prepare_block = ALGORITHM.prepare_model_streamed(model, config)
    _load(layers[0], saved[0])
    prepare_block(0, layers[0])
    _load(layers[1], saved[1])
    with pytest.raises(ValueError, match=r"model.layers.1.input_layernorm has a nonzero bias where its weight is 0"):
        prepare_block(1, layers[1])
    assert all(torch.equal(v, saved[1][k]) for k, v in layers[1].state_dict().items())


def test_default_prepare_model_streamed_is_prepare_model():
    """An algorithm whose prepare_model changes no block weights: prepare_model, then a prepare_block
    that does nothing."""
    from quark.torch.algorithm import BlockAlgorithm

    calls = []

    class Algo(BlockAlgorithm):
        def prepare_model(self, model, config):
            calls.append((model, config))

    model = nn.Linear(2, 2)
    prepare_block = Algo().prepare_model_streamed(model, "config")
    assert calls == [(model, "config")]
    weight = model.weight.detach().clone()
    assert prepare_block(0, model) is None and torch.equal(model.weight, weight)

