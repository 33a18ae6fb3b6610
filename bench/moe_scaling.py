"""SmoothQuant, AWQ and AutoSmoothQuant on fused MoE experts, tiny random models: the numbers of
``docs/benchmarks.md`` ("SmoothQuant, AWQ and AutoSmoothQuant on fused MoE experts").

Each row is a case of ``tests/algorithm/test_smoothquant.py`` (the tests pin bounds; this prints the
ratios): the squared logits error of the algorithm against the float model, divided by that of
round-to-nearest, with the case's planted outliers and only the named layers quantized. The survey
runs AWQ (``uint4_wo_32``, the template's own exclusions) on every MoE template's tiny model, with the
experts' clipping search and with it stubbed out.

    python bench/moe_scaling.py            # both tables, about a minute on 2 threads
    python bench/moe_scaling.py --no-survey

Writes ``bench/results/moe_scaling.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def planted_cases() -> list[tuple[str, str, str, str, object, list[str], dict]]:
    """(label, model type, scheme, algorithm, model factory, exclusions, config fields) per row."""
    import test_smoothquant as t

    gate_up = ["*self_attn*", "lm_head", "*experts.down_proj"]
    rows = []
    for mt in ("gpt_oss", "mixtral", "qwen3_moe"):
        for algo in ("smoothquant", "autosmoothquant"):
            rows.append(("MLP norm x40, experts' gate/up (and router), W8A8", mt, "int8", algo,
                         lambda mt=mt: t._moe(mt, boost=40.0), gate_up, {}))
    for mt in ("mixtral", "gpt_oss", "qwen3_moe"):
        for clip in (True, False):
            rows.append((f"MLP norm x10, experts' gate/up (and router), uint4 g32, clipping {'on' if clip else 'off'}",
                         mt, "uint4_wo_32", "awq", lambda mt=mt: t._moe(mt, boost=10.0), gate_up,
                         {"clip_search": clip}))
    for mt in ("mixtral", "qwen3_moe"):
        for algo in ("smoothquant", "autosmoothquant"):
            rows.append(("up rows x20, experts' down, W8A8", mt, "int8", algo,
                         lambda mt=mt: t._boost_up_rows(t._moe(mt), 20.0), t.DOWN_ONLY, {}))
        for clip in (True, False):
            rows.append((f"up rows x20, experts' down, uint4 g32, clipping {'on' if clip else 'off'}", mt,
                         "uint4_wo_32", "awq", lambda mt=mt: t._boost_up_rows(t._moe(mt), 20.0), t.DOWN_ONLY,
                         {"clip_search": clip}))
    for mt in ("mixtral", "qwen3_moe", "gpt_oss"):
        rows.append(("none, experts only, uint4 g32, clipping alone", mt, "uint4_wo_32", "awq", lambda mt=mt: t._moe(mt),
                     ["*self_attn*", "lm_head", "*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj"],
                     {"scaling_layers": t.ATTENTION_ONLY, "scale_expert_down": False}))
    for algo in ("smoothquant", "autosmoothquant"):
        rows.append(("MLP norm x10, everything but attention, W8A8", "qwen3_moe", "int8", algo,
                     lambda: t._moe("qwen3_moe", boost=10.0), ["*self_attn*", "lm_head"], {}))
        rows.append(("MLP norm x40, everything but attention, W8A8", "mixtral", "int8", algo,
                     lambda: t._moe("mixtral", boost=40.0), ["*self_attn*", "lm_head"], {}))
    return rows


def run_planted() -> list[dict]:
    import test_smoothquant as t

    out = []
    for label, mt, scheme, algo, make, exclude, fields in planted_cases():
        errors = t._errors(make, mt, scheme, algo, exclude, fields=fields or None)
        ratio = errors[algo] / errors[None]
        print(f"{label:75s} {mt:10s} {algo:16s} {ratio:.3f}", flush=True)
        out.append({"case": label, "model": mt, "scheme": scheme, "algorithm": algo, "ratio": round(ratio, 4)})
    return out


def run_survey() -> list[dict]:
    import torch

    import quark.torch.algorithm.awq as awq_module
    from quark.torch import LLMTemplate
    from quark.torch.quantization.api import ModelQuantizer
    from quark.torch.testing.tiny_models import CASES, build_model, fused_expert_params

    out = []
    for mt in sorted(CASES):
        reference = build_model(mt)
        if not fused_expert_params(reference):
            continue
        g = torch.Generator().manual_seed(0)
        vocab = reference.config.get_text_config().vocab_size
        batches = [{"input_ids": torch.randint(0, vocab, (2, 32), generator=g)} for _ in range(4)]
        with torch.no_grad():
            ref = [reference(**b).logits for b in batches]
        errors = {}
        for name, algo in (("rtn", None), ("awq", "awq"), ("awq_no_expert_clip", "awq")):
            model = build_model(mt)
            original = awq_module.clip_block_experts
            if name == "awq_no_expert_clip":
                awq_module.clip_block_experts = lambda *a, **k: 0
            try:
                ModelQuantizer(LLMTemplate.get(mt).get_config("uint4_wo_32", algorithm=algo)).quantize_model(
                    model, batches, progress=False)
            finally:
                awq_module.clip_block_experts = original
            with torch.no_grad():
                errors[name] = sum(float((model(**b).logits - r).pow(2).sum()) for b, r in zip(batches, ref))
        row = {"model": mt, "awq_vs_rtn": round(errors["awq"] / errors["rtn"], 4),
               "awq_without_expert_clip_vs_rtn": round(errors["awq_no_expert_clip"] / errors["rtn"], 4),
               "expert_clip_effect": round(errors["awq"] / errors["awq_no_expert_clip"], 4)}
        print(f"{mt:18s} AWQ/RTN {row['awq_vs_rtn']:.3f}  without expert clipping {row['awq_without_expert_clip_vs_rtn']:.3f}"
              f"  clipping's effect {row['expert_clip_effect']:.3f}", flush=True)
        out.append(row)
    return out


def markdown(planted: list[dict], survey: list[dict]) -> str:
    lines = ["| case | model | scheme | algorithm | error / RTN |", "| --- | --- | --- | --- | ---: |"]
    lines += [f"| {r['case']} | {r['model']} | {r['scheme']} | {r['algorithm']} | {r['ratio']:.3f} |" for r in planted]
    if survey:
        lines += ["", "| model | AWQ / RTN | AWQ without expert clipping / RTN | expert clipping's effect |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['model']} | {r['awq_vs_rtn']:.3f} | {r['awq_without_expert_clip_vs_rtn']:.3f} | "
                  f"{r['expert_clip_effect']:.3f} |" for r in survey]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-survey", action="store_true", help="skip the every-MoE-template AWQ survey")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests" / "algorithm"))
    import torch

    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    planted = run_planted()
    survey = [] if args.no_survey else run_survey()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "moe_scaling.json").write_text(json.dumps({"planted": planted, "survey": survey,
                                                         "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    table = markdown(planted, survey)
    (RESULTS / "moe_scaling.md").write_text(table)
    print(table)
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
