"""``bench/algorithms.py``'s bookkeeping: cells merge by (scheme, algorithm, dtype), and a dtype's gap
closed is measured against the RTN and unquantized cells of the same dtype."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_algorithms", ROOT / "bench" / "algorithms.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def cell(scheme, algorithm, ppl, dtype=None, **extra):
    c = {"scheme": scheme, "algorithm": algorithm, "ppl": ppl, "quant_s": 10.0, "quant_cpu_s": 20.0, "eval_s": 5.0,
         "peak_rss_gb": 1.0, "threads": 2, "date": "2026-12-03 07:00", **extra}
    if dtype is not None:
        c["dtype"] = dtype
    return c


def test_merge_keys_on_dtype_and_old_cells_are_float32():
    bench = load_bench()
    results = [cell("int4_wo_64", "gptq", 33.0)]  # recorded before --dtype: float32
    results = bench.merge(results, cell("int4_wo_64", "gptq", 34.0, "bfloat16"))
    assert [r["ppl"] for r in results] == [33.0, 34.0]
    results = bench.merge(results, cell("int4_wo_64", "gptq", 32.0, "float32"))  # replaces the old cell
    assert sorted(r["ppl"] for r in results) == [32.0, 34.0]


def test_gap_closed_uses_the_same_dtype():
    bench = load_bench()
    results = [
        cell("fp32", "none", 20.0), cell("int4_wo_64", "none", 30.0), cell("int4_wo_64", "gptq", 24.0),
        cell("fp32", "none", 21.0, "bfloat16"), cell("int4_wo_64", "none", 31.0, "bfloat16"),
        cell("int4_wo_64", "gptq", 26.0, "bfloat16"),
    ]
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): line.split("|")[4].strip()
            for line in bench.markdown(results).splitlines() if line.startswith("| ") and "---" not in line}
    assert rows[("int4_wo_64", "gptq", "24.00")] == "60%"  # (30 - 24) / (30 - 20)
    assert rows[("int4_wo_64 (bfloat16)", "gptq", "26.00")] == "50%"  # (31 - 26) / (31 - 21)
    assert ("unquantized (bfloat16)", "none", "21.00") in rows


def test_cpu_description_names_the_first_processor_and_its_widest_simd():
    bench = load_bench()
    first = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 23\nmodel\t\t: 1\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
    second = "processor\t: 1\nmodel name\t: Other\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: avx2 avx512f\n"
    assert bench.cpu_description(first + "\n" + second) == "AMD EPYC, family 23 model 1, avx2"
    assert bench.cpu_description(second) == "Other, family 25 model 17, avx512f"
    assert bench.cpu_description("") == "?"
