"""Relative squared weight error of round-to-nearest per scheme, over the linears of a model.

``sum ||fake_quantize(W) - W||^2 / sum ||W||^2`` over every ``nn.Linear`` except ``lm_head``, with each
scheme's weight spec (no calibration, no algorithm): the quantity the integer grid of FORMATS.md 2a
lowers (docs/benchmarks.md, "The integer grid of FORMATS.md 2a"). Prints a table and writes JSON::

    python bench/weight_error.py                                  # bundled SmolLM2
    python bench/weight_error.py --schemes int4_wo_32 int8 --model path/to/hf_dir
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def weight_errors(model, schemes: list[str]) -> dict[str, float]:
    import torch

    from quark.torch import LLMTemplate
    from quark.torch.quantization.tensor_quantize import fake_quantize

    out = {}
    for scheme in schemes:
        spec = LLMTemplate.get_scheme(scheme).config.weight
        num = den = 0.0
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
                    w = m.weight.float()
                    num += float((fake_quantize(w, spec) - w).pow(2).sum())
                    den += float(w.pow(2).sum())
        out[scheme] = num / den
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=["int4_wo_32", "int4_wo_64", "int4_wo_per_channel", "int8",
                                                      "uint4_wo_32", "uint4_wo_64"])
    ap.add_argument("--model", default=None, help="a GGUF file or HF directory (default: the bundled SmolLM2)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "weight_error.json")
    args = ap.parse_args(argv)
    from quark.torch.utils.model_loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(args.model)
    errors = weight_errors(model, args.schemes)
    print("| scheme | relative squared weight error |\n| --- | ---: |")
    for scheme, e in errors.items():
        print(f"| {scheme} | {e:.6f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(errors, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
