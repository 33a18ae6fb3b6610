"""The architecture coverage harness (``quark/torch/testing/coverage.py``, ``bench/coverage.py``).

A CI subset of ``docs/architectures.md``: dense (llama, qwen2), MoE (qwen3_moe, mixtral), multimodal
with a (1 + w) norm (gemma3), multimodal with cross-attention blocks that run only on images (mllama,
calibrated on image batches) and MLA + MoE (deepseek_v3) tiny models are quantized with every
column's config, exported, reimported and loaded with transformers' ``from_pretrained``. Every column claimed to pass must pass; in the MoE types
the fused 3-D expert weights must be quantized (per expert) in every column. The whole table (every
registered model type) is the ``slow`` test.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from quark.torch import LLMTemplate
from quark.torch.testing import coverage
from quark.torch.testing.coverage import COLUMNS, QUANT_COLUMNS, QUICK_TYPES

ROOT = Path(__file__).resolve().parents[1]
#: model types whose tiny model holds fused 3-D expert weights (transformers-5 MoE blocks): every
#: quantization column that runs must quantize them (``fused_expert_projections`` > 0)
FUSED_MOE = {
    "dbrx", "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "glm4_moe", "glm4_moe_lite",
    "glm_moe_dsa", "gpt_oss", "granitemoehybrid", "kimi_k25", "llama4", "minimax_m2", "minimax_m3_vl",
    "mixtral", "qwen2_moe", "qwen3_5_moe", "qwen3_moe", "qwen3_next", "qwen3_vl_moe",
}
#: (model type, column) -> the start of the reason of a known failure (see docs/architectures.md);
#: none: every cell of every native type passes
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


@functools.cache
def row(model_type: str) -> dict:
    return coverage.run_type(model_type)


def test_quick_types_are_registered_and_native():
    from quark.torch.testing.tiny_models import CASES

    assert set(QUICK_TYPES) <= set(LLMTemplate.list_available())
    assert set(QUICK_TYPES) <= set(CASES)


def has_defaults(model_type: str, column: str) -> bool:
    """Whether the template has a default config for every algorithm of a quantization column."""
    return not coverage.missing_defaults(LLMTemplate.get(model_type), column)


#: quick types whose template has no rotation default (Gemma 3's post-norms: see its template module's
#: docstring)
NO_ROTATION = {"gemma3"}


@pytest.mark.parametrize("model_type", QUICK_TYPES)
def test_quick_subset(model_type):
    r = row(model_type)
    assert list(r["cells"]) == list(COLUMNS)
    cells = {c: coverage.cell(r, c) for c in COLUMNS}
    missing = [c for c in QUANT_COLUMNS if not has_defaults(model_type, c)]
    assert missing == (["rotation"] if model_type in NO_ROTATION else [])
    for column in missing:  # not run, and said why
        assert cells.pop(column).text() == "n/a: no template default for rotation"
    for column, c in cells.items():
        assert c.status == "pass", f"{model_type} {column}: {c.text()}"
        if column in QUANT_COLUMNS:
            assert c.details["quantized_linears"] > 0
            # the routed experts (most of a MoE model's weights) are quantized, per expert
            assert (c.details["fused_expert_projections"] > 0) == (model_type in FUSED_MOE), (column, c.details)
    assert cells["fp8+kv"].details["kv_quantized"] > 0
    for column in (c for c in QUANT_COLUMNS if c not in missing):  # exported, reimported: equal logits
        assert cells["export"].details[column]["status"] == "pass"
        assert cells["reimport"].details[column]["details"]["rel_diff"] < coverage.RTOL
        # transformers' from_pretrained (its quark integration) loads every key and gives the same logits
        loaded = cells["transformers"].details[column]["details"]
        assert loaded["rel_diff"] < coverage.RTOL and loaded["class"] == r["class"], loaded
        assert not any(k.endswith("_keys") for k in loaded), loaded
    assert all(p["total"] > 0 or p.get("note") for p in r["patterns"]), model_type


def test_pattern_counts_of_llama():
    counts = {(p["role"], p["pattern"]): p["total"] for p in row("llama")["patterns"]}
    assert counts[("kv", "*k_proj")] == counts[("kv", "*v_proj")] == 2
    assert counts[("q", "*q_proj")] == 2
    assert counts[("gate_up", "*gate_proj")] == 2
    assert counts[("exclude", "lm_head")] == 1
    # every scaling pair applies in both blocks, every GPTQ entry matches one layer per block
    assert {n for (role, _), n in counts.items() if role in ("awq pair", "smoothquant pair")} == {2}
    assert {n for (role, _), n in counts.items() if role == "gptq entry"} == {2}


MLLAMA_INPUTS = {
    "input_ids": [1, 16],
    "pixel_values": [1, 1, 4, 3, 56, 56],  # [batch, images, max_num_tiles, channels, H, W]
    "aspect_ratio_ids": [1, 1],
    "aspect_ratio_mask": [1, 1, 4],
    "cross_attention_mask": [1, 16, 1, 4],  # [batch, seq, images, max_num_tiles]
}
TEXT_STACK = "model.language_model.layers"


def test_mllama_batches_carry_tiled_images():
    from quark.torch.testing.tiny_models import build_model

    model = build_model("mllama")
    assert coverage.input_builder(model).name == "tiled images with a cross-attention mask"
    data = coverage.batches(model=model)
    vision = model.config.vision_config
    for batch in data:
        assert coverage.describe_batch(batch) == MLLAMA_INPUTS
        ids = batch["input_ids"][0]
        # the image token (the first id past the text vocabulary) first, text tokens after it
        assert ids[0] == model.config.image_token_id == 128 and (ids[1:] < coverage.VOCAB).all()
        ratio = int(batch["aspect_ratio_ids"]) - 1
        rows, cols = vision.supported_aspect_ratios[ratio]
        tiles = batch["aspect_ratio_mask"][0, 0]
        assert tiles.tolist() == [1] * (rows * cols) + [0] * (4 - rows * cols)
        assert (batch["cross_attention_mask"] == tiles).all()  # every token attends to the image's tiles
        used = batch["pixel_values"][0, 0].flatten(1).abs().sum(1) > 0
        assert used.tolist() == tiles.bool().tolist()  # padding tiles are zero
    # text models (and no model) get the same text-only batches as before
    llama = coverage.batches(model=build_model("llama"))
    assert [list(b) for b in llama] == [["input_ids"]] * coverage.N_BATCHES
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(llama, coverage.batches()))
    # the gates transformers initialises to 0 are filled: the cross-attention block moves the logits
    text = {"input_ids": data[0]["input_ids"]}
    assert coverage.rel_diff(coverage.logits(model, data[0]), coverage.logits(model, text)) > 0.01


def test_an_image_token_outside_the_embedding_is_refused():
    from quark.torch.testing.tiny_models import build_model

    model = build_model("mllama")
    model.config.image_token_id = 128256  # transformers' default, past the tiny 136-row embedding
    with pytest.raises(ValueError, match="token id 128256 is outside the 136-row input embedding"):
        coverage.batches(model=model)


def test_a_fill_pattern_matching_no_parameter_is_refused(monkeypatch):
    import dataclasses

    from quark.torch.testing import tiny_models

    case = dataclasses.replace(tiny_models.CASES["mllama"][0], fill={"*cross_attn_gate_renamed": 1.0})
    monkeypatch.setitem(tiny_models.CASES, "mllama", [case])
    with pytest.raises(ValueError, match=r"fill patterns \['\*cross_attn_gate_renamed'\] match no parameter"):
        tiny_models.build_model("mllama")


def test_mllama_calibrates_every_block_on_images():
    r = row("mllama")
    builds = coverage.cell(r, "builds")
    assert builds.details == {"inputs": MLLAMA_INPUTS, "blocks": 3, "uncalled_blocks": []}
    assert builds.note.startswith("calibrated and compared on tiled images with a cross-attention mask: input_ids")
    assert [c for c in COLUMNS if coverage.cell(r, c).status != "pass"] == []  # rotation too, on images
    assert set(coverage.cell(r, "export").details) == set(QUANT_COLUMNS)


def test_text_only_batches_leave_the_cross_attention_block_uncalled(monkeypatch):
    """Without the image builder the harness names the skipped block in builds, and the static
    activation quantizers it leaves uncalibrated fail the export of fp8+kv (int4 is weight-only)."""
    monkeypatch.setattr(coverage, "INPUT_BUILDERS", ())
    r = coverage.run_type("mllama", ("builds", "int4", "fp8+kv", "export", "reimport"))
    builds = coverage.cell(r, "builds")
    assert builds.text() == (
        f"fail: the calibration batches never call decoder blocks [1] of {TEXT_STACK!r} (input_ids): the model "
        "skips them"
    )
    assert builds.details["uncalled_blocks"] == [1] and builds.note == ""
    assert coverage.cell(r, "int4").status == coverage.cell(r, "fp8+kv").status == "pass"
    export = coverage.cell(r, "export")
    assert export.status == "fail" and export.reason.startswith(
        f"fp8+kv: ValueError: cannot export: static activation quantizer {TEXT_STACK}.1.cross_attn.q_proj")
    assert export.details["int4"]["status"] == "pass"
    assert coverage.cell(r, "reimport").status == "pass"  # int4 only: fp8+kv was not exported
    causes = coverage.render_markdown([r], {})
    assert "the calibration batches never call decoder blocks" in causes.split("## Failures by cause")[1]


def test_mla_kv_cache_note():
    note = coverage.cell(row("deepseek_v3"), "fp8+kv").note
    assert note.startswith("MLA:") and "latent" in note


def _register(model_type: str, **changes) -> None:
    base = LLMTemplate.get(model_type)
    kw = dict(
        model_type=model_type,
        kv_layers_name=base.kv_layers_name,
        q_layer_name=base.q_layer_name,
        gate_up_layers_name=base.gate_up_layers_name,
        exclude_layers_name=base.exclude_layers_name,
        algorithm_configs=dict(base.algorithm_configs),
    )
    kw.update(changes)
    LLMTemplate.register_template(LLMTemplate(**kw))  # conftest restores the registry


def test_a_pattern_matching_nothing_fails_its_cell():
    _register("llama", kv_layers_name=["*k_proj", "*v_proj", "*kv_nowhere"], q_layer_name="*q_nowhere")
    r = coverage.run_type("llama", ("builds", "fp8+kv"))
    assert coverage.cell(r, "fp8+kv").status == "fail"
    assert "kv '*kv_nowhere'" in coverage.cell(r, "fp8+kv").reason
    assert coverage.cell(r, "builds").status == "fail"
    assert "q '*q_nowhere'" in coverage.cell(r, "builds").reason


def test_an_exception_fails_one_cell_and_the_run_goes_on():
    from quark.torch.quantization.config.algo_configs import AWQConfig, ScalingPair

    awq = AWQConfig(model_decoder_layers="model.layers",
                    scaling_layers=[ScalingPair("input_layernorm", ["self_attn.qkv_missing"], "self_attn")])
    base = LLMTemplate.get("llama").algorithm_configs
    _register("llama", algorithm_configs={**base, "awq": awq, "smoothquant": None})
    r = coverage.run_type("llama", ("builds", "int4", "awq", "smoothquant", "export", "reimport"))
    awq_cell = coverage.cell(r, "awq")
    assert awq_cell.status == "fail" and awq_cell.reason.startswith("ValueError: ")
    assert "\n" not in awq_cell.reason and "self_attn.qkv_missing" in awq_cell.reason
    assert coverage.cell(r, "smoothquant").text() == "n/a: no template default for smoothquant"
    assert coverage.cell(r, "int4").status == "pass"
    assert coverage.cell(r, "export").status == coverage.cell(r, "reimport").status == "pass"
    assert set(coverage.cell(r, "export").details) == {"int4"}  # the failed column was not exported


def test_a_transformers_load_failure_is_its_first_line_and_only_that_column(monkeypatch):
    import transformers

    def refuse(cls, *args, **kwargs):
        raise ValueError("no quark here\nsecond line")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", classmethod(refuse))
    r = coverage.run_type("llama", ("builds", "int4", "fp8+kv", "export", "reimport", "transformers"))
    assert coverage.cell(r, "transformers").text() == "fail: int4, fp8+kv: ValueError: no quark here"
    assert [c for c in r["cells"] if coverage.cell(r, c).status != "pass"] == ["transformers"]
    # without the column nothing is loaded with transformers (the load is a third of the table's time)
    r = coverage.run_type("llama", ("builds", "int4", "export", "reimport"))
    assert "transformers" not in r["cells"] and coverage.cell(r, "reimport").status == "pass"


def test_a_wrong_decoder_path_fails_builds_and_the_algorithms():
    import copy

    base = LLMTemplate.get("llama").algorithm_configs
    configs = {k: copy.deepcopy(v) for k, v in base.items()}
    for cfg in configs.values():
        if cfg is not None:
            cfg.model_decoder_layers = "model.blocks"
    _register("llama", algorithm_configs=configs)
    r = coverage.run_type("llama", ("builds", "int4", "gptq"))
    assert coverage.cell(r, "builds").reason == "the decoder path 'model.blocks' is no nn.ModuleList of LlamaForCausalLM"
    assert coverage.cell(r, "int4").status == "pass"
    assert "model.blocks" in coverage.cell(r, "gptq").reason


def test_remote_code_type_is_checked_by_name_only():
    r = coverage.run_type("chatglm")
    assert r["kind"] == "remote"
    assert coverage.cell(r, "builds").status == "pass"
    assert coverage.cell(r, "builds").note.startswith("remote code")
    for column in COLUMNS[1:]:
        assert coverage.cell(r, column).text() == "n/a: remote code (not shipped by transformers)"
    # chatglm's head is transformer.output_layer: the lm_head exclusion matches nothing, explained
    head = next(p for p in r["patterns"] if p["role"] == "exclude" and p["pattern"] == "lm_head")
    assert head["total"] == 0 and "output_layer" in head["note"]


def test_markdown_has_every_column_and_a_reason_in_every_non_pass_cell():
    rows = [row("llama"), row("mixtral"), coverage.run_type("chatglm")]
    text = coverage.render_markdown(rows, {"date": "today", "threads": 1, "wall_seconds": 1.0})
    header = next(line for line in text.splitlines() if line.startswith("| model type | class |"))
    assert header.split("|")[3:-1] == [f" {c} " for c in COLUMNS]
    body = [line for line in text.splitlines() if line.startswith("| `")]
    table = body[: len(rows)]
    for line in table:
        for cell in line.split(" | ")[2:]:
            cell = cell.rstrip(" |")
            assert cell.startswith("pass") or (cell.startswith(("fail: ", "n/a: ")) and len(cell) > 6), cell
    assert "## Pattern match counts" in text and "`*k_proj` 2" in text
    assert "## Failures by cause\n\nNone: every cell passes or is n/a.\n" in text


def test_bench_script_writes_json_and_merges(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_coverage", ROOT / "bench" / "coverage.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "coverage.json"
    assert bench.main(["--types", "qwen2", "--columns", "int4", "export", "--output", str(out), "--verbose"]) == 0
    assert bench.main(["--types", "chatglm", "--output", str(out), "--verbose"]) == 0
    data = json.loads(out.read_text())
    assert [r["model_type"] for r in data["rows"]] == ["chatglm", "qwen2"]  # registry order, merged
    assert list(data["rows"][1]["cells"]) == ["builds", "int4", "export"]
    assert data["meta"]["threads"] == 1 and torch.get_num_threads() == 1


@pytest.mark.slow
def test_full_table():
    """Every registered model type: every cell is what docs/architectures.md records (the pass cells
    pass, the failures are the known ones); a fixed failure fails this test too, so that the table
    and these lists are updated with it."""
    unexpected = []
    for model_type in LLMTemplate.list_available():
        r = coverage.run_type(model_type)
        assert list(r["cells"]) == list(COLUMNS), model_type
        for column in COLUMNS:
            c = coverage.cell(r, column)
            assert c.status == "pass" or c.reason, (model_type, column)
            if r["kind"] == "remote" and column != "builds":
                expected = ("n/a", "remote code")
            elif column in QUANT_COLUMNS and not has_defaults(model_type, column):
                expected = ("n/a", "no template default")
            elif (model_type, column) in KNOWN_FAILURES:
                expected = ("fail", KNOWN_FAILURES[model_type, column])
            else:
                expected = ("pass", "")
            if c.status != expected[0] or not c.reason.startswith(expected[1]):
                unexpected.append(f"{model_type} {column}: {c.text()} (expected {expected[0]}: {expected[1]})")
            if column in QUANT_COLUMNS and c.status == "pass" and model_type in FUSED_MOE:
                if not c.details.get("fused_expert_projections"):
                    unexpected.append(f"{model_type} {column}: the fused experts were not quantized")
    assert not unexpected, "\n".join(unexpected)
