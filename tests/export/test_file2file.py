"""File-to-file quantization: a sharded float checkpoint in, the same files as quantize_model + export out."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quark.torch import LLMTemplate
from quark.torch.export import file2file
from quark.torch.export.api import export_safetensors, import_model_from_safetensors
from quark.torch.export.safetensors_io import INDEX_NAME, CheckpointError, load_tensors
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.quantization.config.config import QConfig
from quark.torch.quantization.layouts import NoServingLayoutError
from tests.helpers import tiny_llama, token_batches

SHARD = "40KB"


def config(scheme, **kwargs):
    return LLMTemplate.get("llama").get_config(scheme, **kwargs)


def save(model, folder, shard=SHARD):
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.fixture(scope="module")
def bf16_src(tmp_path_factory):
    folder = save(tiny_llama().to(torch.bfloat16), tmp_path_factory.mktemp("bf16") / "src")
    assert len(list(folder.glob("model-*.safetensors"))) >= 4
    return folder


@pytest.fixture(scope="module")
def tied_src(tmp_path_factory):
    """float32, tied embeddings, q/k/v/o biases, 128 wide (int4 g128 fits)."""
    model = tiny_llama(hidden=128, tie_word_embeddings=True, attention_bias=True)
    return save(model, tmp_path_factory.mktemp("tied") / "src", "400KB")


def in_memory(src, cfg, out, dtype, **export_kwargs):
    """The reference: the checkpoint loaded in its dtype, quantize_model without data, export_safetensors."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    ModelQuantizer(cfg).quantize_model(model, progress=False)
    export_safetensors(model, out, **export_kwargs)
    return model


def same_tensors(a, b):
    def raw(t):
        return t.reshape(-1).view(torch.uint8)

    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(raw(a[k]), raw(b[k])), k


def quantization_config(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def logits(model):
    with torch.no_grad():
        return model(**token_batches(1, seq=12)[0]).logits


@pytest.mark.parametrize("scheme", ["int4_wo_32", "uint4_wo_32", "ptpc_fp8", "mxfp4", "int4_fp8"])
def test_bf16_equals_in_memory_export(scheme, bf16_src, tmp_path):
    cfg = config(scheme)
    dst = ModelQuantizer(cfg).direct_quantize_checkpoint(bf16_src, tmp_path / "f2f", progress=False)
    assert dst == tmp_path / "f2f" and not (tmp_path / "f2f.partial").exists()
    ref_model = in_memory(bf16_src, cfg, tmp_path / "mem", torch.bfloat16)
    same_tensors(load_tensors(dst), load_tensors(tmp_path / "mem"))  # also checks the recorded sha256
    assert json.loads((dst / "config.json").read_text()) == json.loads((tmp_path / "mem" / "config.json").read_text())
    assert (dst / "generation_config.json").is_file()
    assert len(list(dst.glob("model-*-of-*.safetensors"))) >= 4  # one output shard per input shard
    back = import_model_from_safetensors(None, dst)
    torch.testing.assert_close(logits(back), logits(ref_model), rtol=0, atol=0)


@pytest.mark.parametrize("quantize_lm_head", [False, True])
def test_tied_embeddings_bias_fp32_order_and_split(quantize_lm_head, tied_src, tmp_path):
    cfg = config("int4_wo_128")
    if quantize_lm_head:  # no exclusions: lm_head (tied to embed_tokens) is quantized too
        cfg = QConfig(global_quant_config=cfg.global_quant_config)
    kwargs = {"pack_method": "order"}
    dst = file2file.direct_quantize_checkpoint(cfg, tied_src, tmp_path / "f2f", max_shard_size="30KB",
                                               progress=False, **kwargs)
    in_memory(tied_src, cfg, tmp_path / "mem", torch.float32, **kwargs)
    got = load_tensors(dst)
    same_tensors(got, load_tensors(tmp_path / "mem"))
    assert quantization_config(dst) == quantization_config(tmp_path / "mem")
    assert "model.embed_tokens.weight" in got and got["model.embed_tokens.weight"].dtype == torch.float32
    assert ("lm_head.weight_scale" in got) is quantize_lm_head and ("lm_head.weight" in got) is quantize_lm_head
    assert got["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float32
    n_in = len(list(tied_src.glob("model-*.safetensors")))
    assert len(list(dst.glob("model-*.safetensors"))) > n_in  # max_shard_size split the output further


def test_single_file_checkpoint_and_unknown_tensors(tmp_path, caplog):
    save(tiny_llama(seed=3), tmp_path / "src", "10GB")
    single = tmp_path / "src" / "model.safetensors"
    assert single.is_file()
    cfg = config("int4_wo_32")
    in_memory(tmp_path / "src", cfg, tmp_path / "mem", torch.float32)
    # an old checkpoint's rotary buffer (non-persistent: not written) and a tensor the model does not know
    tensors = load_file(single)
    extra = torch.arange(6, dtype=torch.int16)
    save_file({**tensors, "model.rotary_emb.inv_freq": torch.ones(8), "extra.table": extra}, single)
    with caplog.at_level(logging.WARNING, logger=file2file.__name__):
        dst = ModelQuantizer(cfg).direct_quantize_checkpoint(tmp_path / "src", tmp_path / "f2f", progress=False)
    assert "extra.table" in caplog.text
    got = load_tensors(dst)
    assert torch.equal(got.pop("extra.table"), extra)
    same_tensors(got, load_tensors(tmp_path / "mem"))


@pytest.mark.parametrize("scheme, kwargs, expected", [
    ("fp8", {}, "input_tensors"),
    ("int8", {}, "input_tensors"),
    ("nvfp4", {}, "input_tensors"),
    ("int4_wo_32", {"kv_cache_scheme": "fp8"}, "KV cache"),
    ("int4_wo_32", {"algorithm": "gptq"}, "gptq"),
])
def test_calibrated_configs_are_refused(scheme, kwargs, expected, bf16_src, tmp_path):
    with pytest.raises(ValueError, match=expected) as info:
        ModelQuantizer(config(scheme, **kwargs)).direct_quantize_checkpoint(bf16_src, tmp_path / "out", progress=False)
    assert "quantize_model" in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_no_serving_layout_is_refused(bf16_src, tmp_path):
    with pytest.raises(NoServingLayoutError):
        ModelQuantizer(config("mx6")).direct_quantize_checkpoint(bf16_src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out.partial").exists()


def test_resume_after_crash_skips_finished_shards(bf16_src, tmp_path, monkeypatch, caplog):
    cfg = config("int4_wo_32")
    ref = ModelQuantizer(cfg).direct_quantize_checkpoint(bf16_src, tmp_path / "ref", progress=False)
    real = file2file._convert_shard
    calls = []

    def crash_on_second(plan, shard, folder, bar=None):
        calls.append(shard)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(plan, shard, folder, bar)

    monkeypatch.setattr(file2file, "_convert_shard", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        ModelQuantizer(cfg).direct_quantize_checkpoint(bf16_src, tmp_path / "out", progress=False)
    partial = tmp_path / "out.partial"
    assert not (tmp_path / "out").exists() and partial.is_dir()
    assert list(json.loads((partial / file2file.PROGRESS_NAME).read_text())["shards"]) == [calls[0]]

    calls.clear()
    monkeypatch.setattr(file2file, "_convert_shard", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    with caplog.at_level(logging.INFO, logger=file2file.__name__):
        out = ModelQuantizer(cfg).direct_quantize_checkpoint(bf16_src, tmp_path / "out", progress=False)
    first = sorted(p.name for p in bf16_src.glob("model-*.safetensors"))[0]
    assert first not in calls and len(calls) == len(list(bf16_src.glob("model-*.safetensors"))) - 1
    assert "1 of" in caplog.text and not partial.exists()
    same_tensors(load_tensors(out), load_tensors(ref))
    assert json.loads((out / INDEX_NAME).read_text()) == json.loads((ref / INDEX_NAME).read_text())
    assert (out / "config.json").read_text() == (ref / "config.json").read_text()


def test_partial_of_another_config_starts_over(bf16_src, tmp_path, monkeypatch, caplog):
    real = file2file._convert_shard
    calls = []

    def crash_on_second(plan, shard, folder, bar=None):
        calls.append(shard)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(plan, shard, folder, bar)

    monkeypatch.setattr(file2file, "_convert_shard", crash_on_second)
    with pytest.raises(RuntimeError):
        ModelQuantizer(config("int4_wo_32")).direct_quantize_checkpoint(bf16_src, tmp_path / "out", progress=False)
    calls.clear()
    monkeypatch.setattr(file2file, "_convert_shard", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    cfg = config("uint4_wo_32")
    with caplog.at_level(logging.WARNING, logger=file2file.__name__):
        out = ModelQuantizer(cfg).direct_quantize_checkpoint(bf16_src, tmp_path / "out", progress=False)
    assert "starting over" in caplog.text
    assert len(calls) == len(list(bf16_src.glob("model-*.safetensors")))
    in_memory(bf16_src, cfg, tmp_path / "mem", torch.bfloat16)
    same_tensors(load_tensors(out), load_tensors(tmp_path / "mem"))


def test_existing_output_needs_overwrite(bf16_src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    cfg = config("int4_wo_32")
    with pytest.raises(ValueError, match="overwrite=True"):
        ModelQuantizer(cfg).direct_quantize_checkpoint(bf16_src, dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and not (tmp_path / "out.partial").exists()
    ModelQuantizer(cfg).direct_quantize_checkpoint(bf16_src, dst, overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / INDEX_NAME).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is fine
    ModelQuantizer(cfg).direct_quantize_checkpoint(bf16_src, empty, progress=False)
    assert (empty / INDEX_NAME).is_file()


def test_truncated_input_shard(bf16_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in bf16_src.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    victim = sorted(src.glob("model-*.safetensors"))[2]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) - 64)
    with pytest.raises(CheckpointError, match=victim.name):
        ModelQuantizer(config("int4_wo_32")).direct_quantize_checkpoint(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_files(bf16_src, tmp_path):
    cfg = config("int4_wo_32")
    with pytest.raises(CheckpointError, match="config.json"):
        ModelQuantizer(cfg).direct_quantize_checkpoint(tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text((bf16_src / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ModelQuantizer(cfg).direct_quantize_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
