"""File-to-file quantization throughput and peak memory on a synthetic llama checkpoint.

Writes a llama-shaped checkpoint of random bf16 weights shard by shard (``--params`` parameters,
shards of ``--shard-gb``; the model is never built), then runs
``ModelQuantizer(config).direct_quantize_checkpoint`` on it (``--scheme``, default int4_wo_128) while a
thread samples the process's resident memory (/proc/self/statm, every 10 ms).  Reports
the input read rate (GB/s of input safetensors over the conversion's wall time) and the peak RSS
against the budget of 2 input shards + 1 GiB (absolute, i.e. including the Python / torch /
transformers baseline, and above the baseline measured just before the conversion).

The input was just written, so it is read from the page cache: the rate is the conversion's, not
the disk's.

    python bench/file2file.py [--params 0.3e9] [--shard-gb 0.25] [--scheme int4_wo_128] [--threads 1]
                              [--device cpu] [--workdir DIR] [--out FILE]
    python bench/file2file.py --params 14e9 --shard-gb 2 --workdir /big/disk
"""

from __future__ import annotations

import argparse
import gc
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
from quark.torch.quantization.api import ModelQuantizer  # noqa: E402
from quark.torch.utils.memory import PeakResident, release_free_memory  # noqa: E402

GIB = 2**30
VOCAB = 32000


def release_memory() -> None:
    gc.collect()
    release_free_memory()


def llama_config(params: float):
    """A llama config of about ``params`` parameters: head_dim 128, layers = hidden / 128, GQA 4:1,
    intermediate 3.5 x hidden (multiples of 128, so every int4 group size fits)."""
    from transformers import LlamaConfig

    def kv_heads(heads: int) -> int:  # about heads / 4, dividing heads
        return next(d for d in range(max(1, heads // 4), 0, -1) if heads % d == 0)

    def count(h: int) -> int:
        layers, inter = max(2, h // 128), 128 * round(3.5 * h / 128)
        kv = kv_heads(h // 128) * 128
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
        return layers * per_layer + 2 * VOCAB * h + h

    hidden = min((128 * k for k in range(2, 129)), key=lambda h: abs(count(h) - params))
    heads = hidden // 128
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=128 * round(3.5 * hidden / 128),
        num_hidden_layers=max(2, hidden // 128),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads(heads),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ), count(hidden)


def write_checkpoint(config, folder: Path, shard_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Random bf16 weights in the model's state-dict order, one shard in memory at a time; returns
    (number of shards, largest shard in bytes)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        names = [(k, tuple(v.shape)) for k, v in LlamaForCausalLM(config).state_dict().items()]
    g = torch.Generator().manual_seed(seed)
    weight_map, shards, current, size, total = {}, [], {}, 0, 0

    def flush() -> None:
        nonlocal current, size
        if current:
            path = folder / f"shard-{len(shards) + 1:05d}.tmp"
            save_file(current, str(path), metadata={"format": "pt"})
            shards.append((path, size))
            for k in current:
                weight_map[k] = path.name
            current, size = {}, 0

    for name, shape in names:
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            flush()
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16)
            step = max(1, (1 << 24) // shape[1])
            for r in range(0, shape[0], step):  # rows in chunks: no full-size float32 temporary
                t[r : r + step] = (torch.randn((min(step, shape[0] - r), shape[1]), generator=g) * 0.02).to(torch.bfloat16)
        current[name] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(shards)
    renames = {}
    for i, (path, _) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        path.rename(folder / final)
        renames[path.name] = final
    index = {"metadata": {"total_size": total}, "weight_map": {k: renames[v] for k, v in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return n, max(s for _, s in shards)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    config, n_params = llama_config(args.params)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="quark-bench-f2f-"))
    src, dst = work / "src", work / "dst"
    for p in (src, dst, dst.with_name(dst.name + ".partial")):
        shutil.rmtree(p, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        n_shards, largest = write_checkpoint(config, src, int(args.shard_gb * 1e9))
        write_s = time.perf_counter() - t0
        in_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        release_memory()  # what writing the input left in the allocator: not part of the baseline
        qconfig = LLMTemplate.get("llama").get_config(args.scheme)
        quantizer = ModelQuantizer(qconfig)
        with PeakResident(interval=0.01) as mem:
            t0 = time.perf_counter()
            quantizer.direct_quantize_checkpoint(src, dst, device=args.device, progress=args.progress)
            seconds = time.perf_counter() - t0
        out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
        n_out = len(list(dst.glob("*.safetensors")))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    budget, baseline = 2 * largest + GIB, mem.start
    return {
        "scheme": args.scheme,
        "params": n_params,
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "intermediate": config.intermediate_size,
        "input_shards": n_shards,
        "largest_shard_bytes": largest,
        "input_bytes": in_bytes,
        "output_bytes": out_bytes,
        "output_shards": n_out,
        "write_input_s": round(write_s, 2),
        "seconds": round(seconds, 2),
        "input_gb_per_s": round(in_bytes / 1e9 / seconds, 3),
        "params_per_s": round(n_params / seconds),
        "rss_baseline_bytes": baseline,
        "peak_rss_bytes": mem.peak,
        "peak_rss_above_baseline_bytes": mem.peak - baseline,
        "budget_bytes": budget,
        "within_budget": mem.peak <= budget,
        "within_budget_above_baseline": mem.peak - baseline <= budget,
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def markdown(r: dict) -> str:
    gb = 1e9
    rows = [
        ("scheme", r["scheme"]),
        ("model", f"llama, {r['params'] / 1e9:.2f}B params (hidden {r['hidden']}, {r['layers']} layers), bf16"),
        ("input", f"{r['input_bytes'] / gb:.2f} GB in {r['input_shards']} shards (largest {r['largest_shard_bytes'] / gb:.2f} GB)"),
        ("output", f"{r['output_bytes'] / gb:.2f} GB in {r['output_shards']} shards"),
        ("conversion time", f"{r['seconds']} s ({r['device']}, {r['threads']} torch thread(s))"),
        ("input read rate", f"{r['input_gb_per_s']} GB/s ({r['params_per_s'] / 1e6:.1f} M params/s)"),
        ("RSS before", f"{r['rss_baseline_bytes'] / GIB:.2f} GiB"),
        ("peak RSS", f"{r['peak_rss_bytes'] / GIB:.2f} GiB ({r['peak_rss_above_baseline_bytes'] / GIB:.2f} GiB above)"),
        ("budget: 2 shards + 1 GiB", f"{r['budget_bytes'] / GIB:.2f} GiB"),
        ("within budget", f"{'yes' if r['within_budget'] else 'NO'} (absolute), "
                          f"{'yes' if r['within_budget_above_baseline'] else 'NO'} (above baseline)"),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=0.3e9, help="approximate parameter count (e.g. 14e9)")
    ap.add_argument("--shard-gb", type=float, default=0.25, help="input shard size in GB (transformers uses 5)")
    ap.add_argument("--scheme", default="int4_wo_128", help="weight-only or dynamic scheme (quark schemes)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--progress", action="store_true", help="show the tqdm bar")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "file2file.json"))
    args = ap.parse_args()
    result = run(args)
    md = markdown(result)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(md + "\n")
    return 0 if result["within_budget"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
