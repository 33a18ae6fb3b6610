"""Export + re-import of SmolLM2-135M for every scheme with a serving format.

For each scheme: quantize the bundled SmolLM2-135M (fp32; static activation scales calibrated on a
few windows of the shared calibration split), export it with ``export_safetensors`` (the AutoAWQ
layout too for the int4/uint4 weight-only schemes), import it back with
``import_model_from_safetensors`` (and, with ``--transformers``, with transformers'
``AutoModelForCausalLM.from_pretrained``), and compare the logits on one test window with the
quantized model's: the relative difference ``||a - b|| / ||b||`` must be below 1e-3 and is 0 for
every format stored exactly.  The safetensors bytes on disk are reported next to the float model's
(written by the same writer).  Note: SmolLM2 ships as GGUF Q4_1 (uint4, g32), so uint4 g32 results
on it are flattered; none of that matters for an exactness check, only for the quantization error
column (relative logit change of the quantized model against the float one).

    python bench/export.py [--only fp8,nvfp4] [--calib 4] [--seq 256] [--no-transformers] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quark.torch import LLMTemplate  # noqa: E402
from quark.torch.evaluation import calibration_dataloader, test_text, token_windows  # noqa: E402
from quark.torch.export.api import export_safetensors, import_model_from_safetensors  # noqa: E402
from quark.torch.export.safetensors_io import write_shards  # noqa: E402
from quark.torch.quantization.api import ModelQuantizer  # noqa: E402
from quark.torch.utils.model_loading import load_model_and_tokenizer  # noqa: E402

#: schemes with a serving layout (mx6 / mx9 / bfp16 have none: fake_quantized only)
SCHEMES = [
    "fp8", "ptpc_fp8", "int8", "int4_wo_32", "int4_wo_64", "int4_wo_per_channel", "uint4_wo_32",
    "uint4_wo_64", "uint4_wo_per_channel", "mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_fp8",
    "mxfp4_mxfp6_e2m3", "nvfp4", "amdfp4", "amdfp4_global16", "int4_fp8",
]
#: SmolLM2's hidden size 576 is not a multiple of 128, so the g128 schemes do not apply to it
AWQ = {"int4_wo_32", "int4_wo_64", "int4_wo_per_channel", "uint4_wo_32", "uint4_wo_64", "uint4_wo_per_channel"}
#: formats whose export is not bit-exact (none: every serving layout stores exactly what the model uses)
INEXACT: set[str] = set()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def run(args: argparse.Namespace) -> dict:
    model, tokenizer = load_model_and_tokenizer()
    ids = token_windows(tokenizer, test_text(), args.seq, 1)
    float_logits = logits(model, ids)
    calib = calibration_dataloader(tokenizer, args.calib, args.seq)
    work = Path(tempfile.mkdtemp(prefix="quark-bench-export-"))
    try:
        float_dir = work / "float"
        float_dir.mkdir()
        seen: set[int] = set()
        unique = []  # tied weights (SmolLM2's lm_head = embed_tokens) once, as transformers writes them
        for k, v in model.state_dict().items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique.append((k, v))
        write_shards(unique, float_dir)
        float_bytes = folder_bytes(float_dir)
        shutil.rmtree(float_dir)
        rows = []
        schemes = [s for s in SCHEMES if not args.only or any(o in s for o in args.only.split(","))]
        for scheme in schemes:
            m = copy.deepcopy(model)
            cfg = LLMTemplate.get("llama").get_config(scheme)
            t0 = time.perf_counter()
            ModelQuantizer(cfg).quantize_model(m, calib if cfg.needs_calibration() else None, progress=False)
            t_quant = time.perf_counter() - t0
            ref = logits(m, ids)
            row = {"scheme": scheme, "quant_error": rel(ref, float_logits), "quantize_s": round(t_quant, 1)}
            out = work / scheme
            t0 = time.perf_counter()
            export_safetensors(m, out, tokenizer=tokenizer)
            row["export_s"] = round(time.perf_counter() - t0, 1)
            row["bytes"] = folder_bytes(out)
            t0 = time.perf_counter()
            back = import_model_from_safetensors(None, out)
            row["import_s"] = round(time.perf_counter() - t0, 1)
            got = logits(back, ids)
            row["rel_diff"] = rel(got, ref)
            row["max_abs_diff"] = (got - ref).abs().max().item()
            del back
            if args.transformers:
                from transformers import AutoModelForCausalLM

                hf = AutoModelForCausalLM.from_pretrained(out)
                row["transformers_rel_diff"] = rel(logits(hf, ids), ref)
                del hf
            shutil.rmtree(out)
            if scheme in AWQ:
                out = work / f"{scheme}-awq"
                export_safetensors(m, out, custom_mode="awq")
                row["awq_bytes"] = folder_bytes(out)
                back = import_model_from_safetensors(None, out)
                row["awq_rel_diff"] = rel(logits(back, ids), ref)
                del back
                shutil.rmtree(out)
            row["ok"] = row["rel_diff"] < 1e-3 and (scheme in INEXACT or row["rel_diff"] == 0.0) and all(
                row.get(k, 0.0) == 0.0 or scheme in INEXACT for k in ("transformers_rel_diff", "awq_rel_diff"))
            rows.append(row)
            print(json.dumps(row), flush=True)
            del m
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 source, loaded in fp32)",
        "tokens": args.seq,
        "calibration_windows": args.calib,
        "float_bytes": float_bytes,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    fb = result["float_bytes"]
    head = ("| scheme | quant. error | rel. diff (quark import) | rel. diff (transformers) | rel. diff (awq) "
            "| MB | vs float | awq MB | export s | import s | ok |")
    lines = [head, "|" + "---|" * 11]

    def f(v: float | None) -> str:
        return "-" if v is None else ("0" if v == 0 else f"{v:.1e}")

    for r in result["rows"]:
        awq_mb = f"{r['awq_bytes'] / 1e6:.1f}" if "awq_bytes" in r else "-"
        lines.append(
            f"| {r['scheme']} | {r['quant_error']:.3f} | {f(r['rel_diff'])} | {f(r.get('transformers_rel_diff'))} | "
            f"{f(r.get('awq_rel_diff'))} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / fb:.3f} | "
            f"{awq_mb} | {r['export_s']} | {r['import_s']} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    lines.append(f"\nfloat (fp32) model: {fb / 1e6:.1f} MB of safetensors.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated substrings of scheme names to run")
    ap.add_argument("--calib", type=int, default=4, help="calibration windows for static activation scales")
    ap.add_argument("--seq", type=int, default=256, help="tokens per calibration / test window")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false",
                    help="skip the transformers from_pretrained check")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "export.json"))
    args = ap.parse_args()
    result = run(args)
    md = markdown(result)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(md + "\n")
    return 0 if all(r["ok"] for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
