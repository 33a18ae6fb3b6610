"""Architecture coverage: every registered template quantizes, exports and reloads a tiny model.

For each model type (``LLMTemplate.list_available()``) and column (builds, int4, fp8+kv, mxfp4, awq,
gptq, gptaq, qronos, smoothquant, autosmoothquant, rotation, export, reimport, transformers) one cell: pass / fail (reason) / n/a (reason); what each column
checks is described in :mod:`quark.torch.testing.coverage`. Prints the table, merges the rows by model
type into ``bench/results/coverage.json`` (so a ``--types`` run updates only its rows) and, with
``--write-docs``, regenerates ``docs/architectures.md`` from that file.

    python bench/coverage.py --write-docs          # every model type (single thread, a few minutes)
    python bench/coverage.py --quick               # the CI subset (tests/test_coverage.py)
    python bench/coverage.py --types llama qwen3_moe --columns int4 export reimport transformers

Every cell catches its own exceptions: one architecture never stops the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "coverage.json"
DOCS = ROOT / "docs" / "architectures.md"


def main(argv: list[str] | None = None) -> int:
    import torch
    import transformers

    from quark.torch import LLMTemplate
    from quark.torch.testing import coverage

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", help="model types to run (default: every registered one)")
    parser.add_argument("--quick", action="store_true", help=f"the CI subset: {', '.join(coverage.QUICK_TYPES)}")
    parser.add_argument("--columns", nargs="+", choices=coverage.COLUMNS, default=list(coverage.COLUMNS))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--write-docs", action="store_true", help=f"regenerate {DOCS.relative_to(ROOT)}")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON (rows merged by model type)")
    parser.add_argument("--fresh", action="store_true", help="replace the results file instead of merging")
    parser.add_argument("--verbose", action="store_true", help="keep library log messages and warnings")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if not args.verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # from_pretrained's "Loading weights" bars
        logging.getLogger("quark").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")

    available = LLMTemplate.list_available()
    types = list(coverage.QUICK_TYPES) if args.quick else args.types or available
    unknown = [t for t in types if t not in available]
    if unknown:
        parser.error(f"unknown model types {unknown}; available: {', '.join(available)}")
    columns = tuple(c for c in coverage.COLUMNS if c in args.columns or c == "builds")

    listing = coverage.remote_listing()
    rows = []
    start = time.perf_counter()
    for t in types:
        row = coverage.run_type(t, columns, listing)
        row["date"] = datetime.date.today().isoformat()
        rows.append(row)
        bad = [f"{c}={row['cells'][c]['status']}" for c in row["cells"] if row["cells"][c]["status"] != "pass"]
        print(f"{t:18s} {row['seconds']:7.1f}s  {'all pass' if not bad else ' '.join(bad)}", flush=True)
    wall = round(time.perf_counter() - start, 1)

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "wall_seconds": wall,
        "types_run": types,
        "columns": list(columns),
    }
    merged: dict[str, dict] = {}
    if args.output.exists() and not args.fresh:
        try:
            old = json.loads(args.output.read_text())
            merged = {r["model_type"]: r for r in old.get("rows", [])}
            if old.get("meta", {}).get("full_run"):
                meta["full_run"] = old["meta"]["full_run"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            merged = {}
    if set(types) == set(available) and columns == coverage.COLUMNS:
        meta["full_run"] = {"date": meta["date"], "wall_seconds": wall, "threads": args.threads}
    merged.update({r["model_type"]: r for r in rows})
    all_rows = [merged[t] for t in available if t in merged]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # one line per pattern row / cell: readable diffs without a 400 kB file
    lines = ['{"meta": ' + json.dumps(meta, default=str) + ', "rows": [']
    for i, r in enumerate(all_rows):
        head = {k: v for k, v in r.items() if k not in ("cells", "patterns")}
        lines.append("{" + json.dumps(head, default=str)[1:-1] + ', "cells": {')
        lines.append(",\n".join(f" {json.dumps(c)}: {json.dumps(v, default=str)}" for c, v in r["cells"].items()))
        lines.append('}, "patterns": [')
        lines.append(",\n".join(" " + json.dumps(p) for p in r["patterns"]))
        lines.append("]}" + ("," if i < len(all_rows) - 1 else ""))
    lines.append("]}")
    args.output.write_text("\n".join(lines) + "\n")

    table = coverage.render_markdown(rows, meta)
    start_at = table.index("| model type | class |")
    print()
    print(table[start_at:table.index("## Pattern match counts")].rstrip())
    print(f"wall time {wall} s for {len(types)} model types; results in {args.output}")
    if args.write_docs:
        DOCS.write_text(coverage.render_markdown(all_rows, _docs_meta(meta, all_rows)))
        print(f"wrote {DOCS}")
    return 0


def _docs_meta(meta: dict, rows: list[dict]) -> dict:
    """The docs describe every row: when some come from an earlier run, say so in the header."""
    dates = sorted({r.get("date", "?") for r in rows})
    if len(dates) > 1:
        return {**meta, "date": f"{dates[0]} .. {dates[-1]} (rows merged from several runs)"}
    return meta


if __name__ == "__main__":
    sys.exit(main())
