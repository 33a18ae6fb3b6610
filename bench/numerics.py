"""Fake-quantize throughput of every number format, relative to ``clone()``.

Each format fake-quantizes a 4096x4096 float32 tensor dynamically (qparams computed from the
tensor, as for activations) through ``tensor_quantize.fake_quantize``; the table reports the
median time of several repeats and the throughput as a fraction of a plain ``x.clone()``
run alternately with it (median of the per-pair ratios; 1.0 = as fast as copying the tensor), plus
the best-of ratio and the ratio of CPU time (the work done; robust on a busy machine).  CPU chunks
run on a small worker pool (see ``numerics/_chunk.py``; ``QUARK_NUMERICS_THREADS=0`` disables it).  Results are printed as a markdown
table and written as JSON (``--out``, default ``bench/results/numerics.json``).

    python bench/numerics.py [--size 4096] [--repeats 7] [--only mxfp4,nvfp4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quark.torch.quantization.config import specs as S  # noqa: E402
from quark.torch.quantization.tensor_quantize import fake_quantize  # noqa: E402


def formats() -> dict[str, object]:
    """Benchmark name -> spec (a QTensorConfig or a list of two)."""
    out: dict[str, object] = {}
    for name, cls in (("int8", S.Int8PerTensorSpec), ("uint8", S.Uint8PerTensorSpec),
                      ("int4", S.Int4PerTensorSpec), ("uint4", S.Uint4PerTensorSpec)):
        out[f"{name} per_tensor"] = cls().to_quantization_spec()
    for name, cls in (("int8", S.Int8PerChannelSpec), ("uint8", S.Uint8PerChannelSpec),
                      ("int4", S.Int4PerChannelSpec), ("uint4", S.Uint4PerChannelSpec)):
        out[f"{name} per_channel"] = cls().to_quantization_spec()
    for name, cls in (("int8", S.Int8PerGroupSpec), ("uint8", S.Uint8PerGroupSpec),
                      ("int4", S.Int4PerGroupSpec), ("uint4", S.Uint4PerGroupSpec)):
        out[f"{name} per_group 128"] = cls(group_size=128).to_quantization_spec()
    out["fp8_e4m3 per_tensor"] = S.FP8E4M3PerTensorSpec().to_quantization_spec()
    out["fp8_e5m2 per_tensor"] = S.FP8E5M2PerTensorSpec().to_quantization_spec()
    out["fp8_e4m3 per_channel (ptpc)"] = S.FP8E4M3PerChannelSpec().to_quantization_spec()
    fp6 = S.FP8E4M3PerTensorSpec().to_quantization_spec()
    out["fp6_e2m3 per_tensor"] = fp6.with_changes(dtype="fp6_e2m3")
    out["fp6_e3m2 per_tensor"] = fp6.with_changes(dtype="fp6_e3m2")
    out["fp4 per_group 32 (fp32 scale)"] = S.FP4PerGroupSpec(group_size=32).to_quantization_spec()
    out["mxfp4"] = S.OCP_MXFP4Spec().to_quantization_spec()
    out["mxfp6_e2m3"] = S.OCP_MXFP6E2M3Spec().to_quantization_spec()
    out["mxfp6_e3m2"] = S.OCP_MXFP6E3M2Spec().to_quantization_spec()
    out["mxfp8_e4m3"] = S.OCP_MXFP8E4M3Spec().to_quantization_spec()
    out["mxint8"] = S.OCP_MXINT8Spec().to_quantization_spec()
    out["amdfp4 (e5m3 scale, g16)"] = S.AmdFP4Spec(group_size=16).to_quantization_spec()
    out["nvfp4 (fp4 g16, e4m3 scales)"] = S.ScaleQuantSpec(
        S.FP4PerGroupSpec(group_size=16), S.FP8E4M3PerTensorSpec()).to_quantization_spec()
    out["amdfp4_global16 (e5m3 scales)"] = S.ScaleQuantSpec(
        S.FP4PerGroupSpec(group_size=16),
        S.FP8E4M3PerTensorSpec().to_quantization_spec().with_changes(dtype="fp8_e5m3")).to_quantization_spec()
    out["int4_fp8 (progressive)"] = S.ProgressiveSpec(
        S.FP8E4M3PerTensorSpec(), S.Int4PerChannelSpec()).to_quantization_spec()
    out["mx6"] = S.MX6Spec().to_quantization_spec()
    out["mx9"] = S.MX9Spec().to_quantization_spec()
    out["bfp16"] = S.BFP16Spec().to_quantization_spec()
    return out


def paired_times(fn, ref, repeats: int) -> dict[str, float]:
    """Time ``fn`` and ``ref`` run alternately ``repeats`` times.

    - ``ms`` / ``clone_ms``: median wall times;
    - ``x_clone``: median of the per-pair ratios ``ref / fn`` (a pair shares the machine's load at
      that moment, which keeps the ratio meaningful on a shared machine);
    - ``x_clone_best``: ``min(ref) / min(fn)``, the uncontended speed;
    - ``x_clone_cpu``: the same from process CPU time (all threads): the work done, which other
      processes on the machine hardly change.
    """
    fn()
    ref()
    ts, rs, ratios, tc, rc = [], [], [], [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        ref()
        c1, t1 = time.process_time(), time.perf_counter()
        fn()
        c2, t2 = time.process_time(), time.perf_counter()
        rs.append(t1 - t0)
        ts.append(t2 - t1)
        rc.append(c1 - c0)
        tc.append(c2 - c1)
        ratios.append((t1 - t0) / (t2 - t1))
    return {
        "ms": statistics.median(ts) * 1e3,
        "clone_ms": statistics.median(rs) * 1e3,
        "x_clone": statistics.median(ratios),
        "x_clone_best": min(rs) / min(ts),
        "x_clone_cpu": min(rc) / max(min(tc), 1e-9),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--only", default="", help="comma-separated substrings of format names to run")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "numerics.json"))
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.size, args.size, dtype=torch.float32)
    rows = []
    for name, spec in formats().items():
        if args.only and not any(k.strip() in name for k in args.only.split(",")):
            continue
        rows.append({"format": name, **paired_times(lambda spec=spec: fake_quantize(x, spec), lambda: x.clone(), args.repeats)})
    clone_s = statistics.median(r["clone_ms"] for r in rows) / 1e3 if rows else float("nan")

    print(f"\n{args.size}x{args.size} float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"clone {clone_s * 1e3:.2f} ms (median over the run); each row: median of {args.repeats} "
          "fake-quantize / clone pairs\n")
    print("| format | ms | clone ms | throughput vs clone (median) | best-of | CPU time |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['ms']:.2f} | {r['clone_ms']:.2f} | {r['x_clone']:.2f}x "
              f"| {r['x_clone_best']:.2f}x | {r['x_clone_cpu']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "size": args.size, "dtype": "float32", "repeats": args.repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "clone_ms": clone_s * 1e3, "results": rows,
    }, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
