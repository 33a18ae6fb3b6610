"""The streamed flow: a float checkpoint quantized block by block from disk equals quantize_model +
export_safetensors bit for bit, resumes after a crash to the same bits, and refuses bad input before
writing anything."""

import json
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM

from quark.torch import LLMTemplate
from quark.torch.export.api import export_safetensors
from quark.torch.export.file2file import OutputExistsError
from quark.torch.export.safetensors_io import INDEX_NAME, CheckpointError, load_tensors
from quark.torch.export.streamed_output import StreamedOutput
from quark.torch.quantization import streamed
from quark.torch.quantization.api import ModelQuantizer
from quark.torch.testing.tiny_models import build_model
from tests.helpers import tiny_llama, token_batches


def raw(t):
    return t.reshape(-1).view(torch.uint8)


def assert_same_folder(a, b):
    """Every tensor (name, dtype, shape, bytes) and config.json equal."""
    ta, tb = load_tensors(a), load_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(raw(ta[k]), raw(tb[k])), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def in_memory(src, cfg, out, batches, **export_kwargs):
    model = AutoModelForCausalLM.from_pretrained(src)
    ModelQuantizer(cfg).quantize_model(model, batches, progress=False)
    export_safetensors(model, out, **export_kwargs)


def stream(src, cfg, out, batches, **kwargs):
    return ModelQuantizer(cfg).direct_quantize_checkpoint(src, out, dataloader=batches, progress=False, **kwargs)


def with_lm_head(cfg):
    """``cfg`` with lm_head quantized (the templates exclude it)."""
    cfg.exclude = [e for e in cfg.exclude if "lm_head" not in e]
    return cfg


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    """bfloat16, three blocks, several shards (a block's tensors spread over shards)."""
    folder = tmp_path_factory.mktemp("llama") / "src"
    tiny_llama(layers=3).to(torch.bfloat16).save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("model-*.safetensors"))) >= 4
    return folder


@pytest.fixture(scope="module")
def tied_src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tied") / "src"
    tiny_llama(tie_word_embeddings=True, attention_bias=True).save_pretrained(folder)
    return folder


def llama(scheme, overrides=None, **kwargs):
    from quark.torch.quantization.config.algo_configs import with_field_overrides

    tmpl = LLMTemplate.get("llama")
    if overrides:
        kwargs["algo_configs"] = with_field_overrides(tmpl.algorithm_configs, overrides)
    return tmpl.get_config(scheme, **kwargs)


@pytest.mark.parametrize("cfg_kwargs, export_kwargs", [
    (dict(scheme="int4_wo_32", algorithm=["gptq"]), {}),
    (dict(scheme="uint4_wo_32", algorithm=["awq"]), dict(custom_mode="awq")),
    (dict(scheme="int8", algorithm=["smoothquant"]), {}),
    (dict(scheme="int8", algorithm=["autosmoothquant"]), {}),
    (dict(scheme="fp8", kv_cache_scheme="fp8", attention_scheme="fp8"), {}),
    (dict(scheme="int4_wo_32", algorithm=["gptaq"]), {}),  # the float stream rides along
    (dict(scheme="mxfp4"), dict(weight_format="fake_quantized")),
    (dict(scheme="int4_wo_32", algorithm=["rotation", "gptq"]), {}),
    (dict(scheme="int8", algorithm=["rotation", "smoothquant"], overrides=["rotation.r4=true"]), {}),
], ids=["gptq", "awq-layout", "smoothquant", "autosmoothquant", "fp8-kv-attention", "gptaq", "mxfp4-fake",
        "rotation-gptq", "rotation-r4-smoothquant"])
def test_streamed_equals_in_memory(llama_src, tmp_path, cfg_kwargs, export_kwargs):
    batches = token_batches(3)
    scheme = cfg_kwargs.pop("scheme")
    in_memory(llama_src, llama(scheme, **cfg_kwargs), tmp_path / "mem", batches, **export_kwargs)
    out = stream(llama_src, llama(scheme, **cfg_kwargs), tmp_path / "stream", batches, **export_kwargs)
    assert out == tmp_path / "stream"
    assert_same_folder(tmp_path / "mem", tmp_path / "stream")
    assert not (tmp_path / "stream.partial").exists()


def test_tied_embeddings_and_a_quantized_lm_head(tied_src, tmp_path):
    """lm_head tied to the embeddings and quantized (not excluded): its own quantized tensors."""
    batches = token_batches(2)

    def cfg():
        return with_lm_head(llama("int4_wo_32", algorithm=["gptq"]))

    in_memory(tied_src, cfg(), tmp_path / "mem", batches)
    stream(tied_src, cfg(), tmp_path / "stream", batches)
    assert "lm_head.weight_scale" in load_tensors(tmp_path / "stream")
    assert_same_folder(tmp_path / "mem", tmp_path / "stream")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_fused_moe_experts_with_gptq(model_type, tmp_path):
    """transformers merges the per-expert checkpoint tensors into fused parameters: the streamed loader
    goes through the same converters, and GPTQ solves the experts as in memory."""
    src = tmp_path / "src"
    build_model(model_type).save_pretrained(src)
    batches = token_batches(3, vocab=64)
    tmpl = LLMTemplate.get(model_type)
    in_memory(src, tmpl.get_config("int4_wo_32", algorithm=["gptq"]), tmp_path / "mem", batches)
    stream(src, tmpl.get_config("int4_wo_32", algorithm=["gptq"]), tmp_path / "stream", batches)
    tensors = load_tensors(tmp_path / "stream")
    assert any(".experts.0." in k and k.endswith("weight_scale") for k in tensors)
    assert_same_folder(tmp_path / "mem", tmp_path / "stream")


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "mllama"])
def test_irregular_stacks(model_type, tmp_path):
    """GLM-MoE-DSA's blocks pass their top-k indices to the next one (linked inputs); Mllama's
    cross-attention blocks are not called on text (skipped blocks: weights only, still written)."""
    model = build_model(model_type)
    src = tmp_path / "src"
    model.save_pretrained(src)
    batches = token_batches(2, vocab=64)
    tmpl = LLMTemplate.get(model_type)
    reference = type(model).from_pretrained(src)
    ModelQuantizer(tmpl.get_config("int4_wo_32", algorithm=["gptq"])).quantize_model(reference, batches, progress=False)
    export_safetensors(reference, tmp_path / "mem")
    stream(src, tmpl.get_config("int4_wo_32", algorithm=["gptq"]), tmp_path / "stream", batches)
    assert_same_folder(tmp_path / "mem", tmp_path / "stream")


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------
class Crash(Exception):
    pass


def crash_at(monkeypatch, block, entered):
    """Make the run die when it loads ``block`` for its turn; ``entered`` records the blocks loaded."""
    real = streamed.DiskBlockStore.enter

    def enter(self, index, module):
        entered.append(index)
        if index == block and crash_at.armed:
            raise Crash(f"killed at block {index}")
        return real(self, index, module)

    crash_at.armed = True
    monkeypatch.setattr(streamed.DiskBlockStore, "enter", enter)


def test_a_crash_resumes_at_the_next_block_bit_identically(llama_src, tmp_path, monkeypatch):
    batches = token_batches(3)
    cfg = lambda: llama("int4_wo_32", algorithm=["gptaq"])  # noqa: E731 - GPTAQ: the float stream is resumed too
    stream(llama_src, cfg(), tmp_path / "whole", batches)
    entered = []
    crash_at(monkeypatch, 2, entered)
    with pytest.raises(Crash):
        stream(llama_src, cfg(), tmp_path / "out", batches)
    assert not (tmp_path / "out").exists()  # nothing that looks finished
    progress = json.loads((tmp_path / "out.partial" / "progress.json").read_text())
    assert sorted(progress["blocks"]) == ["0", "1"] and progress["next"] == 2
    crash_at.armed = False
    entered.clear()
    stream(llama_src, cfg(), tmp_path / "out", batches)
    # the capture probes block 0 once; then only block 2 is quantized
    assert entered == [0, 2]
    assert_same_folder(tmp_path / "whole", tmp_path / "out")
    assert not (tmp_path / "out.partial").exists()


def test_resume_never_reuses_blocks_of_another_checkpoint(tmp_path, monkeypatch):
    """Same shapes, other weights in block 0: the finished blocks are not reused."""
    src = tmp_path / "src"
    tiny_llama(layers=3).save_pretrained(src)
    batches = token_batches(2)
    entered = []
    crash_at(monkeypatch, 2, entered)
    with pytest.raises(Crash):
        stream(src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "out", batches)
    crash_at.armed = False
    other = tiny_llama(layers=3)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    other.save_pretrained(src)  # same names and shapes
    entered.clear()
    stream(src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "out", batches)
    assert entered == [0, 0, 1, 2]  # started over
    in_memory(src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "mem", batches)
    assert_same_folder(tmp_path / "mem", tmp_path / "out")


def test_other_calibration_data_starts_over(llama_src, tmp_path, monkeypatch):
    entered = []
    crash_at(monkeypatch, 2, entered)
    with pytest.raises(Crash):
        stream(llama_src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "out", token_batches(2, seed=1))
    crash_at.armed = False
    entered.clear()
    stream(llama_src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "out", token_batches(2, seed=2))
    assert entered == [0, 0, 1, 2]
    in_memory(llama_src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "mem", token_batches(2, seed=2))
    assert_same_folder(tmp_path / "mem", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_destination_overlapping_the_source_is_refused_before_anything_is_written(tmp_path, where):
    src = tmp_path / "models" / "src"
    tiny_llama().save_pretrained(src)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    dst = {"same": src, "inside": src / "quantized", "containing": tmp_path / "models"}[where]
    with pytest.raises(ValueError, match="source folder"):
        stream(src, llama("int4_wo_32", algorithm=["gptq"]), dst, token_batches(1), overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


class _Payload:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(tmp_path):
    src = tmp_path / "src"
    tiny_llama().config.save_pretrained(src)
    marker = tmp_path / "unpickled"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="pickle.*safetensors"):
        stream(src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "out", token_batches(1))
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_missing_shard_is_named(llama_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in llama_src.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    shard = sorted(json.loads((src / INDEX_NAME).read_text())["weight_map"].values())[-1]
    (src / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        stream(src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "out", token_batches(1))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_existing_output_needs_overwrite(llama_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        stream(llama_src, llama("int4_wo_32"), out, token_batches(1))
    assert (out / "keep.txt").read_text() == "mine"
    stream(llama_src, llama("int4_wo_32"), out, token_batches(1), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / INDEX_NAME).is_file()


def test_a_failure_mid_run_leaves_the_old_output_untouched(llama_src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    stream(llama_src, llama("int4_wo_32"), out, token_batches(1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StreamedOutput, "write_block", boom)
    with pytest.raises(OSError, match="No space"):
        stream(llama_src, llama("int4_wo_32", algorithm=["gptq"]), out, token_batches(1), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_untied_output_head_is_loaded_only_after_the_blocks(llama_src, tmp_path, monkeypatch):
    seen = []
    real = streamed.DiskBlockStore.enter

    def enter(self, index, block):
        seen.append(self.model.lm_head.weight.device.type)
        return real(self, index, block)

    monkeypatch.setattr(streamed.DiskBlockStore, "enter", enter)
    stream(llama_src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "out", token_batches(1))
    assert seen == ["meta"] * 4  # the probe and three blocks
    assert "lm_head.weight" in load_tensors(tmp_path / "out")


def test_spilled_hidden_states_give_the_same_bits(llama_src, tmp_path, monkeypatch):
    """Above hidden_states_budget the carried hidden states (both streams for GPTAQ) live in files;
    the result does not change."""
    from quark.torch.quantization import driver

    puts = []
    real = driver.HiddenSpill.put
    monkeypatch.setattr(driver.HiddenSpill, "put", lambda self, t: puts.append(t.shape) or real(self, t))
    batches = token_batches(3)
    cfg = lambda: llama("int4_wo_32", algorithm=["gptaq"])  # noqa: E731
    stream(llama_src, cfg(), tmp_path / "memory", batches, hidden_states_budget="1GB")
    assert puts == []
    stream(llama_src, cfg(), tmp_path / "spilled", batches, hidden_states_budget=1000)
    # captured once, then both streams for every one of the 3 blocks (3 batches each)
    assert len(puts) == 3 + 3 * 3 * 2
    assert_same_folder(tmp_path / "memory", tmp_path / "spilled")


def test_a_crash_after_the_last_block_only_writes_the_rest(llama_src, tmp_path, monkeypatch):
    batches = token_batches(2)
    entered = []
    crash_at(monkeypatch, -1, entered)
    real = StreamedOutput.finish

    def finish(self, *args):
        if crash_at.armed:
            raise Crash("killed before the end")
        return real(self, *args)

    monkeypatch.setattr(StreamedOutput, "finish", finish)
    with pytest.raises(Crash):
        stream(llama_src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "out", batches)
    crash_at.armed = False
    entered.clear()
    stream(llama_src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "out", batches)
    assert entered == [0]  # the capture's probe; no block quantized again
    in_memory(llama_src, llama("int4_wo_32", algorithm=["gptq"]), tmp_path / "mem", batches)
    assert_same_folder(tmp_path / "mem", tmp_path / "out")


@pytest.mark.parametrize("src_name", ["llama_src", "tied_src"])
def test_static_quantizers_after_the_blocks_see_the_last_blocks_outputs(request, src_name, tmp_path):
    """A quantized lm_head with a static int8 input: calibrated on what the last block returned, as a
    whole-model pass in memory calibrates it."""
    src = request.getfixturevalue(src_name)
    batches = token_batches(2)

    def cfg():
        return with_lm_head(llama("int8", algorithm=["smoothquant"]))

    in_memory(src, cfg(), tmp_path / "mem", batches)
    stream(src, cfg(), tmp_path / "stream", batches)
    assert "lm_head.input_scale" in load_tensors(tmp_path / "stream")
    assert_same_folder(tmp_path / "mem", tmp_path / "stream")
