"""Where an algorithm's time goes: quantize the first ``--blocks`` decoder blocks of SmolLM2 under
``cProfile`` and print the stages' cumulative seconds and the functions with the most own time.

The per-block cost of the block-wise algorithms is nearly the same for every block, so a few blocks
show the breakdown of a whole run in a fraction of its time (``seconds per block x 30`` is within a
few percent of the full SmolLM2 run measured by ``bench/algorithms.py``). Same calibration data as
the shared protocol (32 x 512 tokens of wikitext-2 valid unless told otherwise); no evaluation.

    python bench/profile_algorithm.py --scheme int4_wo_64 --algorithm gptaq --blocks 4 --threads 2
    python bench/profile_algorithm.py --scheme uint4_wo_64 --algorithm awq --blocks 4 --threads 2

Writes ``bench/results/profile_<scheme>_<algorithm>.json`` (stages, top functions, GEMM GFLOPS).
Stages nest (AWQ's capture pass runs one of the driver's block forwards; the solver holds the column
loop): they do not add up to the total. Profiling adds a little overhead per Python call; compare
runs made the same way.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from algorithms import cpu_description, gemm_gflops, parse_algorithms  # noqa: E402

#: (label, file suffix, function name): stages reported with their cumulative time when they ran
STAGES = [
    ("block forwards of the driver (float / output passes)", "quantization/driver.py", "_run"),
    ("GPTQ-family layer-input passes", "algorithm/gptq.py", "inputs"),
    ("Gram matrices (H, cross terms)", "algorithm/hessian_solver.py", "_accumulate"),
    ("GPTQ-family solver (per stack)", "algorithm/hessian_solver.py", "quantize_weight"),
    ("  column loop", "algorithm/hessian_solver.py", "solve"),
    ("  clipping search of the qparams", "algorithm/hessian_solver.py", "search_clipped_qparams"),
    ("  inverse Cholesky", "algorithm/hessian_solver.py", "inverse_cholesky"),
    ("  GPTAQ term", "algorithm/gptaq.py", "residual"),
    ("scaling: capture pass", "algorithm/scaling.py", "capture"),
    ("scaling: scale search", "algorithm/scaling.py", "search"),
    ("AWQ weight clipping search", "algorithm/awq.py", "clip_layer"),
    ("rotation: prepare model", "algorithm/rotation.py", "prepare_model"),
    ("release freed memory", "utils/memory.py", "release_free_memory"),
    ("torch linear (all callers)", "~", "<built-in method torch._C._nn.linear>"),
    ("oneDNN float32 linear (quark.torch.utils.linear)", "~", "<built-in method torch._ops.mkldnn._linear_pointwise>"),
    ("torch scaled_dot_product_attention", "~", "<built-in method torch._C._nn.scaled_dot_product_attention>"),
]


def stage_times(stats: pstats.Stats) -> list[dict]:
    """Cumulative seconds of each :data:`STAGES` function that ran (recursive calls counted once)."""
    out = []
    for label, suffix, name in STAGES:
        total, calls = 0.0, 0
        for (file, _line, func), (_cc, nc, _tt, ct, _callers) in stats.stats.items():
            if func == name and file.replace("\\", "/").endswith(suffix):
                total += ct
                calls += nc
        if calls:
            out.append({"stage": label, "seconds": round(total, 2), "calls": calls})
    return out


def top_functions(stats: pstats.Stats, k: int) -> list[dict]:
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:k]
    return [{"function": f"{Path(file).name}:{line}({func})" if file != "~" else func,
             "own_s": round(tt, 2), "calls": nc} for (file, line, func), (_cc, nc, tt, _ct, _cl) in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="int4_wo_64")
    parser.add_argument("--algorithm", default="gptaq", help="as in bench/algorithms.py: 'a', 'a+b', 'a(field=value)'")
    parser.add_argument("--blocks", type=int, default=4, help="quantize the first N decoder blocks")
    parser.add_argument("--template", default="llama")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--top", type=int, default=25, help="functions listed by own time")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--pstats", type=Path, default=None, help="also dump the raw cProfile stats here")
    args = parser.parse_args(argv)
    if args.blocks < 1:
        parser.error(f"--blocks must be at least 1, got {args.blocks}")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from quark.torch import LLMTemplate
    from quark.torch.evaluation import calibration_dataloader
    from quark.torch.quantization.api import ModelQuantizer
    from quark.torch.quantization.driver import find_decoder_layers
    from quark.torch.utils.model_loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(dtype=torch.float32)
    _, layers = find_decoder_layers(model)
    total_blocks = len(layers)
    if args.blocks > total_blocks:
        parser.error(f"--blocks {args.blocks}: the model has {total_blocks} decoder blocks")
    del layers[args.blocks:]
    model.config.num_hidden_layers = args.blocks
    template = LLMTemplate.get(args.template)
    algos, overrides = parse_algorithms(args.algorithm, template)
    config = template.get_config(args.scheme, algorithm=algos, algo_configs=overrides or None)
    calib = calibration_dataloader(tokenizer, args.samples, args.seq_len)
    gflops = gemm_gflops()

    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    ModelQuantizer(config).quantize_model(model, calib, progress=False)
    profiler.disable()
    seconds = time.perf_counter() - t0
    stats = pstats.Stats(profiler)
    if args.pstats:
        stats.dump_stats(str(args.pstats))

    result = {
        "scheme": args.scheme, "algorithm": args.algorithm, "blocks": args.blocks,
        "seconds": round(seconds, 2), "seconds_per_block": round(seconds / args.blocks, 3),
        "estimated_full_model_s": round(seconds / args.blocks * total_blocks, 1),
        "threads": torch.get_num_threads(), "gemm_gflops": gflops, "cpu": cpu_description(),
        "calibration": f"{args.samples}x{args.seq_len}", "date": time.strftime("%Y-%m-%d %H:%M"),
        "stages": stage_times(stats), "top_functions": top_functions(stats, args.top),
    }
    print(f"{args.scheme} / {args.algorithm}: {args.blocks} blocks in {seconds:.1f} s "
          f"({seconds / args.blocks:.2f} s per block, about {result['estimated_full_model_s']:.0f} s for all "
          f"{total_blocks}); {result['threads']} threads, GEMM {gflops} GFLOPS on {result['cpu']}")
    print("\n(stages nest: they do not add up to the total)\n| stage | seconds | calls |\n| --- | ---: | ---: |")
    for s in result["stages"]:
        print(f"| {s['stage']} | {s['seconds']:.2f} | {s['calls']} |")
    print("\n| function (own time) | seconds | calls |\n| --- | ---: | ---: |")
    for f in result["top_functions"]:
        print(f"| {f['function']} | {f['own_s']:.2f} | {f['calls']} |")
    out = args.out or ROOT / "bench" / "results" / f"profile_{args.scheme}_{args.algorithm.replace('+', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
