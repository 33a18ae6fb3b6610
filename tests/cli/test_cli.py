"""The `quark` command: tables, and one clear line (no traceback) for human errors."""

import pytest
import torch

from quark.cli import main


def test_schemes_and_templates_tables(capsys):
    assert main(["schemes"]) == 0
    out = capsys.readouterr().out
    assert "| int4_wo_64 " in out and "int4 group64 static" in out and "| nvfp4 " in out
    assert main(["templates"]) == 0
    out = capsys.readouterr().out
    assert "| llama " in out and "*k_proj,*v_proj" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quantize", "--model", "/nonexistent/model.gguf", "--scheme", "fp8"], "--model /nonexistent/model.gguf: no such file"),
        (["eval", "--model", "/nonexistent/dir"], "no such file or directory"),
        (["quantize", "--scheme", "int8", "--algorithm", "rotation", "--algo-config", "rotation.r5=true"],
         "--algo-config: algorithm override 'rotation.r5=true': RotationConfig has no field 'r5'"),
    ],
)
def test_human_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--algorithm", "gptqq"], "--algorithm: unknown algorithm 'gptqq'; allowed: awq, gptq, gptaq"),
        (["--algorithm", "gptq", "--algo-config", "gptq.damp_percent=-1"],
         "--algo-config: GPTQConfig.damp_percent=-1; allowed: a number >= 0"),
        (["--algorithm", "smoothquant", "--algo-config", "smoothquant.alpha=2"],
         "--algo-config: SmoothQuantConfig.alpha=2; allowed: a number in [0, 1]"),
    ],
)
def test_algorithm_mistakes_are_refused_before_the_model_loads(monkeypatch, argv, message, capsys):
    """A typo in an algorithm's name or an out-of-range field costs no model load (minutes for a big
    checkpoint), let alone a calibration."""
    import quark.cli as cli

    def no_load(_args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load", no_load)
    assert main(["quantize", "--scheme", "int4_wo_64", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_non_empty_output_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert main(["quantize", "--scheme", "fp8", "--output", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "keep me"


def test_missing_required_scheme_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize"])
    assert exc.value.code == 2
    assert "--scheme" in capsys.readouterr().err


def test_export_format_choices(capsys):
    from quark.cli import build_parser

    args = build_parser().parse_args(["quantize", "--scheme", "int4_wo_32", "--output", "o", "--format", "gguf"])
    assert args.format == "gguf"
    assert build_parser().parse_args(["quantize", "--scheme", "fp8"]).format == "safetensors"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--scheme", "fp8", "--format", "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


def test_export_dispatches_on_format(monkeypatch, tmp_path, capsys):
    import argparse

    import quark.cli as cli
    import quark.torch.export.api as api
    import quark.torch.export.gguf as gguf_export

    calls = []
    monkeypatch.setattr(gguf_export, "export_gguf", lambda model, out, overwrite: calls.append(("gguf", out)) or tmp_path / "m.gguf")
    monkeypatch.setattr(api, "export_safetensors",
                        lambda model, out, custom_mode, overwrite, tokenizer: calls.append((custom_mode, out)))
    for fmt in ("gguf", "awq", "safetensors"):
        cli._export(object(), None, argparse.Namespace(format=fmt, output=str(tmp_path), overwrite=False))
    assert calls == [("gguf", str(tmp_path)), ("awq", str(tmp_path)), ("quark", str(tmp_path))]


@pytest.mark.parametrize("flag, expected", [([], "float32"), (["--dtype", "bfloat16"], "bfloat16"),
                                            (["--dtype", "float16"], "float16"), (["--dtype", "auto"], None)])
def test_dtype_flag_reaches_the_loader(monkeypatch, flag, expected):
    import torch

    import quark.cli as cli
    import quark.torch.utils.model_loading as loading

    seen = {}
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda path, device, dtype: seen.setdefault("dtype", dtype))
    cli._load(cli.build_parser().parse_args(["quantize", "--scheme", "fp8", *flag]))
    assert seen["dtype"] == (None if expected is None else getattr(torch, expected))


def test_dtype_choices(capsys):
    from quark.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--scheme", "int4_wo_65"], "--scheme: unknown scheme 'int4_wo_65'; available: "),
        (["--scheme", "int8", "--layer-scheme", "*down_proj", "fp9"], "--layer-scheme: unknown scheme 'fp9'"),
        (["--scheme", "int8", "--kv-cache-scheme", "int8"], "--kv-cache-scheme: unknown scheme 'int8'; allowed: fp8"),
        (["--scheme", "int8", "--attention-scheme", "fp4"], "--attention-scheme: unknown scheme 'fp4'; allowed: fp8"),
        (["--scheme", "int8", "--calib-data", "/nonexistent/calib.txt"], "--calib-data /nonexistent/calib.txt: no such file"),
    ],
)
def test_scheme_and_data_mistakes_are_refused_before_the_model_loads(monkeypatch, argv, message, capsys):
    import quark.cli as cli

    def no_load(_args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load", no_load)
    assert main(["quantize", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _word_tokenizer(folder, vocab=128):
    """A word-level tokenizer of ``vocab`` entries (no download), saved into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def test_stream_quantizes_a_folder_block_by_block_as_the_api_does(tmp_path, capsys):
    from transformers import AutoTokenizer

    from quark.torch import LLMTemplate
    from quark.torch.evaluation.data import calibration_dataloader
    from quark.torch.export.safetensors_io import load_tensors
    from quark.torch.quantization.api import ModelQuantizer
    from tests.helpers import tiny_llama

    src = tmp_path / "src"
    tiny_llama(layers=2).save_pretrained(src)
    _word_tokenizer(src)
    text = " ".join(f"w{(7 * i) % 127 + 1}" for i in range(400))
    (tmp_path / "calib.txt").write_text(text)
    argv = ["quantize", "--stream", "--model", str(src), "--scheme", "int4_wo_32", "--algorithm", "gptq",
            "--calib-data", str(tmp_path / "calib.txt"), "--num-calib-samples", "2", "--seq-len", "16",
            "--output", str(tmp_path / "cli")]
    assert main(argv) == 0
    assert "block by block" in capsys.readouterr().out
    batches = calibration_dataloader(AutoTokenizer.from_pretrained(src), 2, 16, text=text)
    cfg = LLMTemplate.get("llama").get_config("int4_wo_32", algorithm=["gptq"])
    ModelQuantizer(cfg).direct_quantize_checkpoint(src, tmp_path / "api", dataloader=batches, progress=False)
    a, b = load_tensors(tmp_path / "cli"), load_tensors(tmp_path / "api")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cli" / "tokenizer.json").is_file()


@pytest.mark.parametrize("extra, message", [
    ([], "give --output DIR"),
    (["--output", "OUT", "--eval"], "--eval needs the whole model in memory"),
    (["--output", "OUT", "--dtype", "float16"], "checkpoint's own dtype"),
])
def test_stream_mistakes_are_one_line(tmp_path, capsys, extra, message):
    from tests.helpers import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "src")
    capsys.readouterr()
    extra = [str(tmp_path / "out") if e == "OUT" else e for e in extra]
    assert main(["quantize", "--stream", "--model", str(tmp_path / "src"), "--scheme", "int4_wo_32", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
