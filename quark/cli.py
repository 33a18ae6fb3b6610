"""The ``quark`` command line: ``quark quantize | eval | schemes | templates | demo``.

Human errors (a bad scheme name, a missing file) print one clear line and exit with status 2; they
never show a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class CLIError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def _describe_spec(spec: object) -> str:
    from quark.torch.quantization.config.config import QTensorConfig

    if spec is None:
        return "-"
    if isinstance(spec, list):
        return " -> ".join(_describe_spec(s) for s in spec)
    assert isinstance(spec, QTensorConfig)
    parts = [spec.dtype.value]
    if spec.qscheme is not None:
        gran = spec.qscheme.value.replace("per_", "")
        if spec.group_size:
            gran += str(spec.group_size)
        parts.append(gran)
    if spec.scale_format:
        parts.append(f"scale={spec.scale_format}")
    if spec.symmetric is False:
        parts.append("asym")
    parts.append("dyn" if spec.is_dynamic else "static")
    if spec.is_scale_quant:
        parts.append("(scales)")
    return " ".join(parts)


def schemes_table() -> str:
    from quark.torch import LLMTemplate

    rows = []
    for name in LLMTemplate.list_schemes():
        cfg = LLMTemplate.get_scheme(name).config
        rows.append([name, _describe_spec(cfg.weight), _describe_spec(cfg.input_tensors)])
    return _table(["scheme", "weight", "input activation"], rows)


def templates_table() -> str:
    from quark.torch import LLMTemplate

    rows = []
    for name in LLMTemplate.list_available():
        t = LLMTemplate.get(name)
        algos = ",".join(k for k, v in t.algorithm_configs.items() if v is not None) or "-"
        rows.append([name, ",".join(t.kv_layers_name or []) or "-", ",".join(t.exclude_layers_name), algos])
    return _table(["model type", "kv layers", "excluded", "algorithm defaults"], rows)


def cmd_schemes(args: argparse.Namespace) -> int:
    print(schemes_table())
    return 0


def cmd_templates(args: argparse.Namespace) -> int:
    print(templates_table())
    return 0


def _template_for(model: Any, model_type: str | None) -> Any:
    from quark.torch import LLMTemplate

    config = getattr(model, "config", None)
    candidates = [model_type] if model_type else [getattr(config, "model_type", None), *(getattr(config, "architectures", None) or [])]
    for name in candidates:
        if name and name in LLMTemplate.list_available():
            return LLMTemplate.get(name)
    raise CLIError(
        f"no template for model type {candidates[0]!r}; pass --model-type (one of: "
        f"{', '.join(LLMTemplate.list_available())})"
    )


def _parse_layer_schemes(pairs: list[list[str]] | None) -> dict[str, str]:
    return {pattern: scheme for pattern, scheme in pairs or []}


#: ``--dtype`` choices: the parameter dtype the model is loaded (and calibrated, quantized, evaluated) in;
#: ``auto`` keeps the checkpoint's own
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from quark.torch.utils.model_loading import load_model_and_tokenizer

    path = args.model
    if path is not None and not Path(path).exists():
        raise CLIError(f"--model {path}: no such file or directory")
    import torch

    name = args.dtype or "float32"
    dtype = None if name == "auto" else getattr(torch, name)
    return load_model_and_tokenizer(path, device=args.device, dtype=dtype)


def _eval(model: Any, tokenizer: Any, args: argparse.Namespace) -> float:
    from quark.torch.evaluation.perplexity import evaluate_shared_protocol

    return evaluate_shared_protocol(model, tokenizer, num_windows=args.eval_windows, seq_len=args.seq_len)


def _quantize(model: Any, tokenizer: Any, args: argparse.Namespace) -> tuple[Any, float]:
    from quark.torch.evaluation.data import calibration_dataloader, read_calibration_file
    from quark.torch.quantization.api import ModelQuantizer

    template = _template_for(model, args.model_type)
    config = _config_for(template, args)
    dataloader = None
    if config.needs_calibration() or config.algo_config:
        text = read_calibration_file(args.calib_data) if args.calib_data else None
        dataloader = calibration_dataloader(tokenizer, args.num_calib_samples, args.seq_len, text=text)
    start = time.perf_counter()
    ModelQuantizer(config).quantize_model(model, dataloader, device=args.device)
    return config, time.perf_counter() - start


def _check_output(args: argparse.Namespace) -> None:
    if args.output is None:
        return
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--output {out} exists and is not empty; pass --overwrite to replace it")
    try:
        import quark.torch.export.api  # noqa: F401
    except ModuleNotFoundError:
        raise CLIError("--output: export is not available in this version of quark yet") from None


def _check_algo_config(args: argparse.Namespace) -> None:
    """--algorithm names, and syntax, algorithm and field names and values of --algo-config, before the
    model loads (the template's own defaults are applied later)."""
    from quark.torch.quantization.config.algo_configs import ALGO_CONFIG_CLASSES, with_field_overrides

    for name in getattr(args, "algorithm", None) or []:
        if name not in ALGO_CONFIG_CLASSES:
            raise CLIError(f"--algorithm: unknown algorithm {name!r}; allowed: {', '.join(ALGO_CONFIG_CLASSES)}")
    try:
        with_field_overrides({n: cls() for n, cls in ALGO_CONFIG_CLASSES.items()}, args.algo_config or [])
    except ValueError as exc:
        raise CLIError(f"--algo-config: {exc}") from None


def _check_schemes(args: argparse.Namespace) -> None:
    """--scheme, --layer-scheme, --kv-cache-scheme, --attention-scheme and --calib-data, before the
    model loads."""
    from quark.torch import LLMTemplate
    from quark.torch.quantization.config.template import (
        SUPPORTED_ATTENTION_SCHEMES,
        SUPPORTED_KV_CACHE_SCHEMES,
    )

    known = LLMTemplate.list_schemes()
    wanted = [("--scheme", args.scheme)] + [("--layer-scheme", s) for _, s in args.layer_scheme or []]
    for flag, name in wanted:
        if name not in known:
            raise CLIError(f"{flag}: unknown scheme {name!r}; available: {', '.join(known)} (see `quark schemes`)")
    for flag, name, allowed in (("--kv-cache-scheme", args.kv_cache_scheme, SUPPORTED_KV_CACHE_SCHEMES),
                                ("--attention-scheme", args.attention_scheme, SUPPORTED_ATTENTION_SCHEMES)):
        if name is not None and name not in allowed:
            raise CLIError(f"{flag}: unknown scheme {name!r}; allowed: {', '.join(allowed)}")
    if args.calib_data and not Path(args.calib_data).is_file():
        raise CLIError(f"--calib-data {args.calib_data}: no such file")


def _export(model: Any, tokenizer: Any, args: argparse.Namespace) -> None:
    fmt = getattr(args, "format", "safetensors")
    if fmt == "gguf":
        from quark.torch.export.gguf import export_gguf

        path = export_gguf(model, args.output, overwrite=args.overwrite)
        print(f"exported to {path}")
        return
    from quark.torch.export.api import export_safetensors

    custom_mode = "awq" if fmt == "awq" else "quark"
    export_safetensors(model, args.output, custom_mode=custom_mode, overwrite=args.overwrite, tokenizer=tokenizer)
    print(f"exported to {args.output}")


def _config_for(template: Any, args: argparse.Namespace) -> Any:
    from quark.torch.quantization.config.algo_configs import with_field_overrides

    try:
        overrides = with_field_overrides(template.algorithm_configs, args.algo_config or [])
    except ValueError as exc:
        raise CLIError(f"--algo-config: {exc}") from None
    return template.get_config(
        scheme=args.scheme,
        algorithm=args.algorithm or None,
        algo_configs=overrides or None,
        kv_cache_scheme=args.kv_cache_scheme,
        attention_scheme=args.attention_scheme,
        layer_config=_parse_layer_schemes(args.layer_scheme),
        exclude_layers=args.exclude or None,
        min_kv_scale=args.min_kv_scale,
    )


def _quantize_streamed(args: argparse.Namespace) -> int:
    """``quark quantize --stream``: the checkpoint folder quantized block by block from disk into --output."""
    from quark.torch import LLMTemplate
    from quark.torch.quantization.api import ModelQuantizer

    model_dir = Path(args.model) if args.model else None
    if model_dir is None or not model_dir.is_dir():
        raise CLIError("--stream reads a Hugging Face checkpoint folder with safetensors weights: give it as --model DIR "
                       "(a .gguf file is loaded whole; run without --stream)")
    if not args.output:
        raise CLIError("--stream writes the quantized checkpoint block by block: give --output DIR")
    for flag, bad in (("--eval", args.eval), ("--format gguf", args.format == "gguf")):
        if bad:
            raise CLIError(f"{flag} needs the whole model in memory; run without --stream "
                           "(or evaluate the export afterwards with `quark eval --model OUTPUT`)")
    if args.dtype not in (None, "auto"):
        raise CLIError("--stream quantizes in the checkpoint's own dtype; drop --dtype (or pass --dtype auto)")
    import json

    try:
        model_type = args.model_type or json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise CLIError(f"--model {model_dir}: cannot read config.json ({exc})") from None
    try:
        template = LLMTemplate.get(model_type)
    except KeyError:
        raise CLIError(f"no template for model_type {model_type!r}; pass --model-type (see `quark templates`)") from None
    config = _config_for(template, args)
    custom_mode = "awq" if args.format == "awq" else "quark"
    dataloader = None
    if config.needs_calibration() or config.algo_config or custom_mode != "quark":
        from transformers import AutoTokenizer

        from quark.torch.evaluation.data import calibration_dataloader, read_calibration_file

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        text = read_calibration_file(args.calib_data) if args.calib_data else None
        dataloader = calibration_dataloader(tokenizer, args.num_calib_samples, args.seq_len, text=text)
    start = time.perf_counter()
    ModelQuantizer(config).direct_quantize_checkpoint(
        model_dir, args.output, dataloader=dataloader, device=args.device, custom_mode=custom_mode,
        overwrite=args.overwrite, hidden_states_budget=args.hidden_states_budget if dataloader is not None else None)
    flow = "block by block" if dataloader is not None else "file to file"
    print(f"quantized {model_dir} {flow} in {time.perf_counter() - start:.1f} s; exported to {args.output}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from quark.torch.utils.model_loading import model_size_bytes

    _check_output(args)
    _check_schemes(args)
    _check_algo_config(args)
    if args.stream:
        return _quantize_streamed(args)
    if args.hidden_states_budget is not None:
        raise CLIError("--hidden-states-budget applies to --stream only")
    model, tokenizer = _load(args)
    rows = []
    size_before = model_size_bytes(model)
    ppl_before = _eval(model, tokenizer, args) if args.eval else None
    _, seconds = _quantize(model, tokenizer, args)
    ppl_after = _eval(model, tokenizer, args) if args.eval else None
    from quark.torch.quantization.api import ModelQuantizer

    ModelQuantizer.freeze(model)
    size_after = model_size_bytes(model)
    rows.append(_report_row(args.scheme, ppl_before, ppl_after, size_before, size_after, seconds))
    print(_table(REPORT_HEADERS, rows))
    if args.output:
        _export(model, tokenizer, args)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    start = time.perf_counter()
    ppl = _eval(model, tokenizer, args)
    print(f"perplexity {ppl:.3f} ({args.eval_windows} windows of {args.seq_len} tokens, {time.perf_counter() - start:.1f} s)")
    return 0


REPORT_HEADERS = ["scheme", "ppl before", "ppl after", "size before (MB)", "size after (MB)", "quantize (s)"]


def _report_row(scheme: str, before: float | None, after: float | None, size_before: int, size_after: int,
                seconds: float) -> list[str]:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    return [scheme, fmt(before), fmt(after), f"{size_before / 1e6:.1f}", f"{size_after / 1e6:.1f}", f"{seconds:.1f}"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Quantize the bundled SmolLM2-135M and report perplexity, size and time."""
    args.eval = True
    print(f"quark demo: {args.scheme} on the bundled SmolLM2-135M-Instruct (shared WikiText-2 protocol)")
    if args.scheme.startswith("uint4") and args.scheme.endswith("_32"):
        print("note: the bundled weights were stored as GGUF Q4_1 (uint4, groups of 32): uint4 g32 is flattered")
    if args.output is None:  # the demo always writes its export (a git-ignored folder)
        args.output, args.overwrite = f"out/smollm2-{args.scheme}", True
    return cmd_quantize(args)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a .gguf file or a Hugging Face model directory (default: bundled SmolLM2)")
    p.add_argument("--model-type", default=None, help="template to use (default: the model's config.model_type)")
    p.add_argument("--device", default=None, help="compute device, e.g. cpu, cuda, cuda:1 (default: where the model loads)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="parameter dtype to load the model in and calibrate with (auto: the checkpoint's own); "
                        "bfloat16 is what GPU users quantize in and about 1.3x faster on CPUs with AVX512-BF16")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration/evaluation window")
    p.add_argument("--eval-windows", type=int, default=40, help="evaluation windows (shared protocol: 40)")


def _add_quantize_args(p: argparse.ArgumentParser, default_scheme: str | None) -> None:
    p.add_argument("--scheme", required=default_scheme is None, default=default_scheme, help="quantization scheme (see `quark schemes`)")
    p.add_argument("--algorithm", nargs="+", default=None, help="algorithms to run, in order (awq gptq ...)")
    p.add_argument("--algo-config", action="append", metavar="ALGO.FIELD=VALUE",
                   help="change a field of the template's algorithm config, e.g. rotation.r4=true (repeatable)")
    p.add_argument("--kv-cache-scheme", default=None, help="fp8")
    p.add_argument("--attention-scheme", default=None, help="fp8")
    p.add_argument("--min-kv-scale", type=float, default=0.0)
    p.add_argument("--layer-scheme", nargs=2, action="append", metavar=("PATTERN", "SCHEME"), help="per-layer scheme override")
    p.add_argument("--exclude", nargs="+", default=None, help="layer name patterns to leave in float")
    p.add_argument("--calib-data", default=None, help="calibration text file (.txt or .jsonl with a 'text' field)")
    p.add_argument("--num-calib-samples", type=int, default=32)
    p.add_argument("--output", default=None, help="export directory")
    p.add_argument("--format", choices=("safetensors", "awq", "gguf"), default="safetensors",
                   help="export format: quark safetensors (default), the AutoAWQ layout, or one GGUF file")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quark", description="Post-training quantization of LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("schemes", help="list quantization schemes").set_defaults(func=cmd_schemes)
    sub.add_parser("templates", help="list model templates").set_defaults(func=cmd_templates)
    q = sub.add_parser("quantize", help="quantize a model")
    _add_model_args(q)
    _add_quantize_args(q, None)
    q.add_argument("--eval", action="store_true", help="report perplexity before and after (shared protocol)")
    q.add_argument("--stream", action="store_true",
                   help="quantize a Hugging Face safetensors folder (--model DIR) one decoder block at a time from disk "
                        "into --output: for models larger than memory (RAM, or GPU memory with --device cuda). Memory: "
                        "embeddings + lm_head + one block + the calibration activations. Every scheme and algorithm; "
                        "same output as without --stream; rerun the same command to resume after a crash")
    q.add_argument("--hidden-states-budget", default=None, metavar="SIZE",
                   help="with --stream: keep the calibration activations carried between blocks in files next to "
                        "--output when they would take more than SIZE (e.g. 8GB) of memory")
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help="perplexity of a model under the shared protocol")
    _add_model_args(e)
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("demo", help="quantize the bundled SmolLM2 model and report")
    _add_model_args(d)
    _add_quantize_args(d, DEMO_SCHEME)
    d.set_defaults(func=cmd_demo)
    return parser


DEMO_SCHEME = "int4_wo_64"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, KeyError, FileNotFoundError, NotImplementedError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"quark {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
