"""Quantization algorithms on SmolLM2-135M under the shared protocol: perplexity, time, memory.

Every cell (scheme x algorithm list) runs in a fresh subprocess: load the model, build
``LLMTemplate.get(template).get_config(scheme, algorithm=[...])``, quantize with
``ModelQuantizer`` on the protocol's calibration windows (32 x 512 tokens of wikitext-2 valid),
evaluate the shared protocol (40 x 512 tokens of wiki.test.raw). Recorded per cell: perplexity,
quantization wall seconds, its CPU seconds, evaluation seconds, peak RSS of the cell's process (``ru_maxrss``,
which includes the model load). ``none`` is round-to-nearest (no algorithm); ``a+b`` runs
``algorithm=["a", "b"]``; scheme ``fp32`` evaluates the unquantized model.

Results are merged by (scheme, algorithm, dtype) into ``bench/results/algorithms.json`` (so separate runs
accumulate) and the whole table is rewritten to ``bench/results/algorithms.md`` and printed.

    python bench/algorithms.py --schemes int4_wo_64 mxfp4 --algorithms none gptq gptaq qronos
    python bench/algorithms.py --schemes int4_wo_64 --algorithms rotation+gptq --threads 2
    python bench/algorithms.py --schemes int8 --algorithms "rotation(r4=true)+smoothquant"

An item ``name(field=value,...)`` overrides fields of the template's config for that algorithm.

Timings on a shared machine are noisy: compare cells measured in the same run (the table keeps
each cell's date and thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
UINT4_G32_NOTE = (
    "SmolLM2's bundled weights were stored as GGUF Q4_1 (uint4, groups of 32): uint4 g32 results are flattered."
)


def run_cell(scheme: str, algorithm: str, template: str, threads: int | None, samples: int, seq_len: int,
             windows: int, dtype: str = "float32", device: str = "cpu", model_path: str | None = None) -> dict:
    """One cell, in this process (called in a subprocess by :func:`main`). ``device``: where the model
    is loaded, quantized and evaluated; ``model_path``: a GGUF file or HF directory (None: SmolLM2)."""
    sys.path.insert(0, str(ROOT))
    import torch

    if threads:
        torch.set_num_threads(threads)
    from quark.torch import LLMTemplate
    from quark.torch.evaluation import calibration_dataloader, evaluate_shared_protocol
    from quark.torch.quantization.api import ModelQuantizer
    from quark.torch.utils.memory import PeakResident
    from quark.torch.utils.model_loading import load_model_and_tokenizer

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    on_cpu = torch.device(device).type == "cpu"
    gflops = gemm_gflops() if on_cpu else None

    def sync() -> None:
        if not on_cpu and hasattr(torch, device.split(":")[0]):
            getattr(torch, device.split(":")[0]).synchronize()

    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_path, device=device, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - t0
    quant_s = quant_cpu = 0.0
    rss = None
    from quark.torch.utils.model_loading import model_size_bytes

    float_bytes = model_size_bytes(model)
    hidden = model.config.hidden_size
    if scheme != "fp32":
        algos, overrides = parse_algorithms(algorithm, LLMTemplate.get(template))
        config = LLMTemplate.get(template).get_config(scheme, algorithm=algos, algo_configs=overrides or None)
        calib = calibration_dataloader(tokenizer, samples, seq_len)
        t0, c0 = time.perf_counter(), cpu()
        with PeakResident(interval=0.02) as rss:
            ModelQuantizer(config).quantize_model(model, calib, device=device, progress=False)
            sync()
        quant_s, quant_cpu = time.perf_counter() - t0, cpu() - c0
    t0 = time.perf_counter()
    ppl = evaluate_shared_protocol(model, tokenizer, num_windows=windows, seq_len=seq_len, progress=False)
    sync()
    eval_s = time.perf_counter() - t0
    return {
        "scheme": scheme,
        "algorithm": algorithm,
        "dtype": dtype,
        "ppl": ppl,
        "quant_s": round(quant_s, 1),
        "quant_cpu_s": round(quant_cpu, 1),
        "eval_s": round(eval_s, 1),
        "load_s": round(load_s, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        # while quantizing: process RSS before, peak, and the goal's budget (1.3 x the float model
        # + one block's calibration activations: samples x seq_len x hidden float32)
        "quant_rss_before_gb": None if rss is None else round(rss.start / 2**30, 3),
        "quant_peak_rss_gb": None if rss is None else round(rss.peak / 2**30, 3),
        "float_model_gb": round(float_bytes / 2**30, 3),
        "rss_budget_gb": round((1.3 * float_bytes + samples * seq_len * hidden * 4) / 2**30, 3),
        "threads": torch.get_num_threads(),
        "gemm_gflops": gflops,
        "device": device if on_cpu or not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "device_peak_gb": None if on_cpu or not torch.cuda.is_available()
        else round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "calibration": f"{samples}x{seq_len}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu": cpu_description(),
    }


def cpu_description(cpuinfo: str | None = None) -> str:
    """The host's CPU as Linux names it, with its x86 family/model and widest float SIMD: the GEMM
    gauge has ranged 56-416 GFLOPS on "this" 2-core VM, and a family-23 model-1 EPYC (Zen 1: AVX2
    with 128-bit FMA units, about 64-96 GFLOPS float32 on 2 cores at 2-3 GHz) cannot reach the
    upper half of that range at any hour. ``cpuinfo``: that file's text (None: read it); "" where it is
    missing (not Linux)."""
    text = cpuinfo
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip() and fields:
            break  # the first processor is enough
    flags = set(fields.get("flags", "").split())
    simd = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "")
    parts = [fields.get("model name", "?")]
    if "cpu family" in fields:
        parts.append(f"family {fields['cpu family']} model {fields.get('model', '?')}")
    if simd:
        parts.append(simd)
    return ", ".join(parts)


def gemm_gflops(seconds: float = 1.0) -> float:
    """The machine's float32 matrix-product speed right now (a [2048, 576] x [576, 1536] product,
    the shape of an MLP projection on 4 calibration sequences, repeated for about ``seconds``), so
    that cells measured on different days or under different load can be compared."""
    import torch

    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return round(2 * 2048 * 576 * 1536 * reps / (time.perf_counter() - t0) / 1e9, 1)


def parse_algorithms(spec: str, template) -> tuple[list[str] | None, dict]:
    """``"none"`` -> RTN; ``"rotation(r4=true)+smoothquant"`` -> the algorithm list and, for items with
    fields in parentheses, the template's config with those fields changed
    (:func:`~quark.torch.quantization.config.algo_configs.with_field_overrides`)."""
    import re

    from quark.torch.quantization.config.algo_configs import with_field_overrides

    if spec == "none":
        return None, {}
    names, assignments = [], []
    for item in spec.split("+"):
        m = re.fullmatch(r"(\w+)(?:\((.*)\))?", item.strip())
        if m is None:
            raise SystemExit(f"--algorithms: cannot parse {item!r}; use name or name(field=value,...)")
        names.append(m.group(1))
        assignments += [f"{m.group(1)}.{pair}" for pair in (m.group(2) or "").split(",") if pair]
    return names, with_field_overrides(template.algorithm_configs, assignments)


def load_results(path: Path) -> list[dict]:
    if path.exists():
        return json.loads(path.read_text())
    return []


def _dtype(r: dict) -> str:
    return r.get("dtype", "float32")  # cells recorded before --dtype existed ran in float32


def merge(results: list[dict], cell: dict) -> list[dict]:
    key = (cell["scheme"], cell["algorithm"], _dtype(cell))
    return [r for r in results if (r["scheme"], r["algorithm"], _dtype(r)) != key] + [cell]


def markdown(results: list[dict]) -> str:
    """The table, one row per cell, with each scheme's RTN (``none``) perplexity as the reference."""
    rtn = {(r["scheme"], _dtype(r)): r["ppl"] for r in results if r["algorithm"] == "none"}
    unquantized = {_dtype(r): r["ppl"] for r in results if r["scheme"] == "fp32"}
    lines = [
        "| scheme | algorithm | ppl | gap closed vs RTN | quantize s | quantize CPU s | eval s | peak RSS GB "
        "| quantize peak RSS GB (budget) | threads | GEMM GFLOPS | date |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    order = sorted(results, key=lambda r: (r["scheme"] != "fp32", r["scheme"], _dtype(r) != "float32", _dtype(r),
                                           r["algorithm"] != "none", r["algorithm"]))
    for r in order:
        closed = ""
        base, fp32 = rtn.get((r["scheme"], _dtype(r))), unquantized.get(_dtype(r))
        if fp32 is not None and base is not None and r["algorithm"] != "none" and base != fp32:
            closed = f"{100 * (base - r['ppl']) / (base - fp32):.0f}%"
        label = r["scheme"] if _dtype(r) == "float32" else f"{r['scheme']} ({_dtype(r)})"
        if r["scheme"] == "fp32" and _dtype(r) != "float32":
            label = f"unquantized ({_dtype(r)})"
        if not str(r.get("device", "cpu")).startswith("cpu"):
            label += f" on {r['device']}"
        lines.append(
            f"| {label} | {r['algorithm']} | {r['ppl']:.2f} | {closed} | {r['quant_s']:.0f} | "
            f"{r.get('quant_cpu_s', float('nan')):.0f} | {r['eval_s']:.0f} | "
            f"{r['peak_rss_gb']:.2f} | {_rss(r)} | {r['threads']} | {r.get('gemm_gflops') or ''} | {r['date']} |"
        )
    notes = ["", "Shared protocol: calibration 32 x 512 tokens of wikitext-2 valid, ppl over 40 x 512 tokens of "
             "wiki.test.raw. Gap closed = (RTN - ppl) / (RTN - fp32). Times are wall seconds on a shared machine; "
             "quantize CPU s (user + system time of the cell's process) is less sensitive to other load. Peak RSS GB is "
             "the cell's whole-process maximum (it includes loading the GGUF file); quantize peak RSS is sampled while "
             "quantizing (VmRSS every 20 ms), against the budget in parentheses: RSS before quantizing (runtime + float "
             "model) + 0.3 x float model + one block's calibration activations (the goal's 1.3 x model + activations). "
             "GEMM GFLOPS: float32 matrix-product speed measured at the start of the cell with its thread count "
             "(it has ranged 56-416 GFLOPS on this 2-core VM, which also runs on different host CPUs: each cell's JSON "
             "records its `cpu`; compare times with both in mind). A scheme marked "
             "(bfloat16) loaded, calibrated and evaluated the model in that dtype (`--dtype`); its gap is measured "
             "against the RTN and unquantized cells of the same dtype."]
    if any(r["scheme"].startswith("uint4") and r["scheme"].endswith("_32") for r in results):
        notes.append(UINT4_G32_NOTE)
    return "\n".join(lines + notes) + "\n"


def _rss(r: dict) -> str:
    """Peak RSS while quantizing and its budget: the RSS before quantizing (Python, torch, tokenizer
    and the float model) + 0.3 x the float model + one block's calibration activations, i.e. the
    goal's 1.3 x model + activations on top of the process's own baseline."""
    if r.get("quant_peak_rss_gb") is None:
        return ""
    extra = r["rss_budget_gb"] - r["float_model_gb"]  # 0.3 x model + activations
    budget = r["quant_rss_before_gb"] + extra
    mark = "" if r["quant_peak_rss_gb"] <= budget else " over"
    return f"{r['quant_peak_rss_gb']:.2f} ({budget:.2f}{mark})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemes", nargs="+", default=["int4_wo_64", "mxfp4"])
    parser.add_argument("--algorithms", nargs="+", default=["none", "gptq", "gptaq", "qronos"],
                        help="algorithm names; 'none' = RTN; 'a+b' = algorithm=['a', 'b']; 'a(field=value)' overrides a field")
    parser.add_argument("--template", default="llama")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: torch's)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype the model is loaded, calibrated and evaluated in")
    parser.add_argument("--device", default="cpu", help="where each cell loads, quantizes and evaluates (cpu, cuda, ...)")
    parser.add_argument("--model", default=None, help="a GGUF file or HF directory (default: the bundled SmolLM2)")
    parser.add_argument("--out", type=Path, default=RESULTS / "algorithms.json")
    parser.add_argument("--cell", nargs=2, metavar=("SCHEME", "ALGORITHM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.cell:
        cell = run_cell(*args.cell, args.template, args.threads, args.samples, args.seq_len, args.windows, args.dtype,
                        args.device, args.model)
        print("CELL " + json.dumps(cell), flush=True)
        return 0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(args.out)
    cells = [(s, a) for s in args.schemes for a in (["none"] if s == "fp32" else args.algorithms)]
    for scheme, algorithm in cells:
        cmd = [sys.executable, __file__, "--cell", scheme, algorithm, "--template", args.template,
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--windows", str(args.windows),
               "--dtype", args.dtype, "--device", args.device]
        if args.model:
            cmd += ["--model", args.model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"== {scheme} / {algorithm} ({args.dtype})", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CELL ")]
        if proc.returncode != 0 or not lines:
            print(f"   failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            continue
        cell = json.loads(lines[-1][5:])
        print(f"   ppl {cell['ppl']:.2f}, quantize {cell['quant_s']:.0f} s, peak RSS {cell['peak_rss_gb']:.2f} GB",
              flush=True)
        results = merge(results, cell)
        args.out.write_text(json.dumps(results, indent=1))
        args.out.with_suffix(".md").write_text(markdown(results))
    table = markdown(results)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
