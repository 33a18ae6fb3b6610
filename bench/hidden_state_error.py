"""How close a quantized run stays to the float model, a few blocks in: quantize the first ``--blocks``
decoder blocks of SmolLM2 and report the relative squared error of the hidden states they produce
(after the final norm) on held-out windows of wiki.test.raw, and the quantization's wall seconds.

Perplexity after 30 blocks carries float rounding through every block (a different summation order
can move a cell by a few tenths); this measure, taken early and on a few windows, is what tells a
solver change that only rounds differently from one that solves worse: run it for both codes under a
few rounding variants (``--algorithm 'gptaq(block_size=64)'``, ``--threads 1``,
``QUARK_ONEDNN_LINEAR=0``) and compare the ranges. Its timing, run alternately for two checkouts,
gives a same-hour speed ratio of the block loop.

    python bench/hidden_state_error.py --scheme int4_wo_64 --algorithm gptaq --blocks 6 --threads 2

Prints one line and appends it as JSON to ``bench/results/hidden_state_error.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from algorithms import cpu_description, gemm_gflops, parse_algorithms  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="int4_wo_64")
    parser.add_argument("--algorithm", default="gptaq", help="as in bench/algorithms.py: 'a', 'a+b', 'a(field=value)'")
    parser.add_argument("--blocks", type=int, default=6, help="quantize the first N decoder blocks")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of --seq-len tokens")
    parser.add_argument("--template", default="llama")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hidden_state_error.jsonl")
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.windows < 1:
        parser.error(f"--blocks and --windows must be at least 1, got {args.blocks} and {args.windows}")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from quark.torch import LLMTemplate
    from quark.torch.evaluation import calibration_dataloader
    from quark.torch.evaluation.data import test_text, token_windows
    from quark.torch.quantization.api import ModelQuantizer
    from quark.torch.quantization.driver import find_decoder_layers
    from quark.torch.utils.model_loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(dtype=torch.float32)
    _, layers = find_decoder_layers(model)
    if args.blocks > len(layers):
        parser.error(f"--blocks {args.blocks}: the model has {len(layers)} decoder blocks")
    del layers[args.blocks:]
    model.config.num_hidden_layers = args.blocks
    windows = token_windows(tokenizer, test_text(), args.seq_len, args.windows)

    def hidden() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model.model(input_ids=w[None]).last_hidden_state for w in windows]

    reference = hidden()
    template = LLMTemplate.get(args.template)
    algos, overrides = parse_algorithms(args.algorithm, template)
    config = template.get_config(args.scheme, algorithm=algos, algo_configs=overrides or None)
    calib = calibration_dataloader(tokenizer, args.samples, args.seq_len)
    gflops = gemm_gflops()
    t0 = time.perf_counter()
    ModelQuantizer(config).quantize_model(model, calib, progress=False)
    seconds = time.perf_counter() - t0
    got = hidden()
    error = sum(((a.double() - b.double()) ** 2).sum().item() for a, b in zip(got, reference))
    error /= sum((b.double() ** 2).sum().item() for b in reference)
    result = {"scheme": args.scheme, "algorithm": args.algorithm, "blocks": args.blocks, "windows": args.windows,
              "relative_squared_error": round(error, 6), "quantize_s": round(seconds, 1),
              "threads": torch.get_num_threads(), "gemm_gflops": gflops, "cpu": cpu_description(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"{args.scheme} / {args.algorithm}, {args.blocks} blocks: relative squared error {error:.6f} on "
          f"{args.windows} windows; quantized in {seconds:.1f} s ({result['threads']} threads, GEMM {gflops} GFLOPS on {result['cpu']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
