"""The ``quark`` command line: ``quark quantize | eval | schemes | templates | demo``.

Human errors (a bad scheme name, a missing file) print one clear line and exit with status 2; they
never show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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


def cmd_demo(args: argparse.Namespace) -> int:
    print("Quantization schemes\n")
    print(schemes_table())
    print("\nModel templates\n")
    print(templates_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quark", description="Post-training quantization of LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("schemes", help="list quantization schemes").set_defaults(func=cmd_schemes)
    sub.add_parser("templates", help="list model templates").set_defaults(func=cmd_templates)
    sub.add_parser("demo", help="quantize the bundled SmolLM2 model and report").set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, KeyError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"quark {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
