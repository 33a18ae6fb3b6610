"""The GPTQ family on fused MoE experts: how much of the experts' quantization error each algorithm
removes, on a tiny random model of every MoE template (no real MoE checkpoint is bundled).

For every model type whose tiny model holds fused 3-D experts, quantize (``--scheme``, default
``int4_wo_32``) with round-to-nearest and with each algorithm, and measure

* **experts error**: the squared error of every fused-experts module's output against the float
  experts on the same calls (the quantized model's own routed inputs), so only the experts' weights
  differ; the ratio to round-to-nearest's is the experts' share of what the algorithm removes;
* **logits error**: relative squared error of the logits against the float model;
* the quantization seconds.

Random weights and random tokens: the ratios say the expert stage works on every layout (top-k and
dense routing, fused and separate gate/up, transposed, biased), not what a trained model gains.

    python bench/moe_experts.py                       # every MoE template, gptq / gptaq / qronos
    python bench/moe_experts.py --types mixtral gpt_oss --algorithms gptq
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "moe_experts.json"


def calibration(model, n: int = 4, seq: int = 32, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    return [{"input_ids": torch.randint(0, vocab, (2, seq), generator=g)} for _ in range(n)]


def experts_output_error(model, reference, batches) -> float:
    """Squared error of every fused-experts module's output against ``reference``'s (float) module of
    the same name, on the calls the quantized model makes on ``batches``."""
    import torch

    from quark.torch.quantization.fused_experts import fused_experts_modules
    from quark.torch.testing.calls import record_calls

    modules = dict(fused_experts_modules(model))
    names = {id(m): n for n, m in modules.items()}
    total = 0.0
    with torch.no_grad():
        for m, args, kwargs in record_calls(model, modules.values(), batches):
            float_module = reference.get_submodule(names[id(m)])
            total += float((m(*args, **kwargs).float() - float_module(*args, **kwargs).float()).pow(2).sum())
    return total


def run_type(model_type: str, scheme: str, algorithms: list[str]) -> dict:
    import torch

    from quark.torch import LLMTemplate
    from quark.torch.quantization.api import ModelQuantizer
    from quark.torch.quantization.fused_experts import fused_experts_modules
    from quark.torch.testing.tiny_models import build_model

    reference = build_model(model_type)
    batches = calibration(reference)
    with torch.no_grad():
        ref_logits = [reference(**b).logits for b in batches]
    row: dict = {"model_type": model_type, "cells": {}}
    for algorithm in ["none", *algorithms]:
        model = build_model(model_type)
        config = LLMTemplate.get(model_type).get_config(scheme, algorithm=None if algorithm == "none" else algorithm)
        t0 = time.perf_counter()
        ModelQuantizer(config).quantize_model(model, batches, progress=False)
        seconds = time.perf_counter() - t0
        row["experts_modules"] = len(fused_experts_modules(model))
        with torch.no_grad():
            logits_err = sum(float((model(**b).logits - r).pow(2).sum()) for b, r in zip(batches, ref_logits)) / sum(
                float(r.pow(2).sum()) for r in ref_logits)
        row["cells"][algorithm] = {"experts_error": experts_output_error(model, reference, batches),
                                   "logits_error": logits_err, "seconds": round(seconds, 2)}
    rtn = row["cells"]["none"]["experts_error"]
    for cell in row["cells"].values():
        cell["experts_ratio"] = cell["experts_error"] / rtn if rtn else float("nan")
    return row


def main(argv: list[str] | None = None) -> int:
    import platform

    import torch

    from quark.torch.testing import tiny_models
    from quark.torch.testing.tiny_models import build_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=None, help="model types (default: every MoE template)")
    parser.add_argument("--algorithms", nargs="+", default=["gptq", "gptaq", "qronos"])
    parser.add_argument("--scheme", default="int4_wo_32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    from quark.torch.quantization.fused_experts import find_fused_experts

    types = args.types or [t for t in tiny_models.CASES if find_fused_experts(build_model(t, device="meta"))]
    rows = []
    for t in types:
        rows.append(run_type(t, args.scheme, args.algorithms))
        print(f"{t}: " + ", ".join(f"{a} {c['experts_ratio']:.3f}" for a, c in rows[-1]["cells"].items()), flush=True)
    header = ["model type", "experts modules"] + [f"{a} experts error / RTN" for a in args.algorithms] + \
        ["RTN logits error"] + [f"{a} logits error" for a in args.algorithms] + ["seconds (RTN / " + " / ".join(args.algorithms) + ")"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        c = r["cells"]
        cols = [f"`{r['model_type']}`", str(r["experts_modules"])]
        cols += [f"{c[a]['experts_ratio']:.3f}" for a in args.algorithms]
        cols += [f"{c['none']['logits_error']:.2e}"] + [f"{c[a]['logits_error']:.2e}" for a in args.algorithms]
        cols += [" / ".join(f"{c[a]['seconds']:.1f}" for a in ["none", *args.algorithms])]
        lines.append("| " + " | ".join(cols) + " |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"scheme": args.scheme, "torch": torch.__version__, "cpu": platform.processor(),
                                    "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
