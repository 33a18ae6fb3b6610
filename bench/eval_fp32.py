"""fp32 SmolLM2 perplexity under the shared benchmark protocol: the baseline every quantized number
is compared with.

Protocol (shared/data/README.md): tokenize wiki.test.raw as one string (no BOS), take the first 40
non-overlapping windows of 512 tokens, report exp(mean per-window loss).

Usage: python bench/eval_fp32.py [--model PATH] [--device cpu|cuda|...] [--output FILE]
Writes bench/results/eval_fp32.json by default.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a plain checkout too, without `pip install -e .`

import torch  # noqa: E402

from quark.torch.evaluation import evaluate_shared_protocol, shared_data_dir  # noqa: E402
from quark.torch.utils.model_loading import (  # noqa: E402
    default_model_path,
    load_model_and_tokenizer,
    model_size_bytes,
)

REFERENCE_FP32_PPL = 28.74


def main(argv: list[str] | None = None) -> dict:
    """Run the fp32 baseline, print it, write the JSON result and return it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file or HF model directory (default: bundled SmolLM2)")
    parser.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    parser.add_argument("--num-windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "eval_fp32.json")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    model_path = args.model or default_model_path()
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_path, device=args.device, dtype=torch.float32)
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    ppl = evaluate_shared_protocol(
        model, tokenizer, num_windows=args.num_windows, seq_len=args.seq_len, progress=not args.no_progress
    )
    eval_s = time.perf_counter() - start

    result = {
        "model": str(model_path),
        "dtype": "float32",
        "device": str(args.device),
        "data_dir": str(shared_data_dir()),
        "num_windows": args.num_windows,
        "seq_len": args.seq_len,
        "perplexity": ppl,
        "reference_perplexity": REFERENCE_FP32_PPL,
        "model_size_bytes": model_size_bytes(model),
        "load_seconds": round(load_s, 2),
        "eval_seconds": round(eval_s, 2),
        "seconds_per_window": round(eval_s / args.num_windows, 3),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    print(
        f"fp32 perplexity {ppl:.4f} (reference {REFERENCE_FP32_PPL}) on {args.num_windows}x{args.seq_len} "
        f"tokens; load {load_s:.1f}s, eval {eval_s:.1f}s on {args.device}"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
