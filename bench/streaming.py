"""Peak memory and time of the streamed flow against the in-memory flow.

The streamed flow, ``ModelQuantizer(config).direct_quantize_checkpoint(src, dst, dataloader=batches)``,
quantizes a float Hugging Face safetensors folder one decoder block at a time from disk. The
in-memory flow is ``AutoModelForCausalLM.from_pretrained(src)`` + ``quantize_model`` +
``export_safetensors``. Models (``--model``, repeatable; default both):

* ``synthetic-8b``: a Llama-3-8B-shaped checkpoint of random bf16 weights (hidden 4096, 32 layers,
  intermediate 14336, vocab 128256, 32 heads / 8 KV heads, untied lm_head; about 16 GB), written once
  tensor by tensor into shards of about ``--shard-gb`` GB under ``--cache`` (the model is never
  built). ``--layers N`` writes (and runs) an N-layer version. Calibration: ``--calib-batches``
  (default 8) x ``--seq-len`` (default 512) seeded random token ids. Streamed flow only (the
  in-memory flow would not fit in RAM).
* ``smollm2``: the bundled SmolLM2-135M-Instruct, loaded from its GGUF file as the project loads it
  (``load_model_and_tokenizer``, float32, the CLI's default dtype) and saved once as a safetensors
  folder under ``--cache``. Calibration per the shared protocol (``quark.torch.evaluation.
  calibration_dataloader``: the first windows of ``wikitext-2/valid.txt``; default 32 x 512). Both
  flows run, and their outputs are compared tensor by tensor (``torch.equal`` and byte for byte).

Recipe: ``--template llama``, ``--scheme int4_wo_64``, ``--algorithm gptq``. Every measured run is
a fresh subprocess (``--worker``), one at a time, with ``torch.set_num_threads(--threads)``: its
peak RSS is ``ru_maxrss`` of that process (so it includes the Python / torch / transformers
baseline and the calibration batches; the JSON also holds the RSS just before the flow and the peak
sampled during it). Time per block: the mean, over the decoder blocks, of the time from the
block store's ``enter`` (the streamed flow: load from the shards) to its ``leave`` with
``done=True`` (the streamed flow: write and free), measured by wrapping those methods in the worker.
The quantized outputs go to a temporary folder (``--workdir``) that is removed once measured. The
page cache is not dropped: a checkpoint that was just written, or read by the previous run, is read
from memory where it fits.

    python bench/streaming.py [--model synthetic-8b] [--model smollm2] [--layers 32] [--calib-batches N]
                              [--seq-len 512] [--scheme int4_wo_64] [--algorithm gptq] [--threads N]
                              [--cache ~/.cache/quark-bench] [--workdir DIR] [--repeat 1] [--out FILE]
    python bench/streaming.py --model synthetic-8b --layers 1 --calib-batches 2 --seq-len 128  # quick
    python bench/streaming.py --check-writer   # the synthetic writer on a tiny shape, loaded by transformers
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quark.torch.utils.memory import release_free_memory, resident_bytes  # noqa: E402

GB = 1e9
MARKER = ".quark-bench-complete"
MODELS = ("synthetic-8b", "smollm2")
DEFAULT_CALIB = {"synthetic-8b": 8, "smollm2": 32}  # smollm2: the shared protocol's 32 windows

#: Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B config.json)
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}


# -- the synthetic checkpoint ----------------------------------------------------------------------
def synthetic_shape(args: argparse.Namespace) -> dict[str, int]:
    shape = dict(LLAMA3_8B)
    for key, value in (("num_hidden_layers", args.layers), ("hidden_size", args.hidden_size),
                       ("intermediate_size", args.intermediate_size), ("vocab_size", args.vocab_size),
                       ("num_attention_heads", args.heads), ("num_key_value_heads", args.kv_heads)):
        if value is not None:
            shape[key] = value
    return shape


def synthetic_name(shape: dict[str, int], seed: int) -> str:
    layers = shape["num_hidden_layers"]
    if {k: v for k, v in shape.items() if k != "num_hidden_layers"} == \
            {k: v for k, v in LLAMA3_8B.items() if k != "num_hidden_layers"}:
        return f"synthetic-llama3-8b-{layers}layers-bf16-seed{seed}"
    return (f"synthetic-llama-h{shape['hidden_size']}-i{shape['intermediate_size']}-v{shape['vocab_size']}"
            f"-a{shape['num_attention_heads']}-kv{shape['num_key_value_heads']}-{layers}layers-bf16-seed{seed}")


def llama_config(shape: dict[str, int]):
    from transformers import LlamaConfig

    return LlamaConfig(
        **shape,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=128000 if shape["vocab_size"] > 128001 else 1,
        eos_token_id=128001 if shape["vocab_size"] > 128001 else 2,
        dtype="bfloat16",
    )


def synthetic_tensors(shape: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """LlamaForCausalLM's state-dict names and shapes, in its order."""
    h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors += [
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return tensors


def check_names_against_model(config: Any, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    """The names and shapes are LlamaForCausalLM's state dict (built on ``meta``: no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    if expected != dict(tensors):
        missing = sorted(set(expected) - {n for n, _ in tensors})
        extra = sorted({n for n, _ in tensors} - set(expected))
        raise RuntimeError(f"synthetic names differ from LlamaForCausalLM's: missing {missing[:5]}, extra {extra[:5]}")


def random_tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Norm weights are ones; matrices normal * 0.02 in bf16, generated in row chunks (no full-size
    float32 temporary), from a generator of their own (each tensor reproducible alone)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(shape, dtype=torch.bfloat16)
    step = max(1, (1 << 24) // shape[1])
    for r in range(0, shape[0], step):
        rows = min(step, shape[0] - r)
        t[r : r + rows] = (torch.randn((rows, shape[1]), generator=g) * 0.02).to(torch.bfloat16)
    return t


def is_complete(folder: Path, spec: dict[str, Any]) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == spec
    except (OSError, json.JSONDecodeError):
        return False


def write_synthetic(folder: Path, shape: dict[str, int], seed: int, shard_bytes: int) -> None:
    """Write the checkpoint tensor by tensor, one shard (about ``shard_bytes``) in memory at a time,
    into ``<folder>.partial``; config.json, index, then the marker last, then rename into place."""
    from safetensors.torch import save_file

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.mkdir(parents=True)
    config = llama_config(shape)
    tensors = synthetic_tensors(shape)
    check_names_against_model(config, tensors)
    config.save_pretrained(partial)

    shards: list[list[tuple[int, str, tuple[int, ...]]]] = [[]]
    size = 0
    for k, (name, shp) in enumerate(tensors):
        nbytes = 2 * math.prod(shp)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((k, name, shp))
        size += nbytes
    n, total, weight_map = len(shards), 0, {}
    t0 = time.perf_counter()
    for j, shard in enumerate(shards, start=1):
        fname = f"model-{j:05d}-of-{n:05d}.safetensors"
        data = {name: random_tensor(shp, seed * 1_000_003 + k) for k, name, shp in shard}
        save_file(data, str(partial / fname), metadata={"format": "pt"})
        for name, t in data.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        del data
        gc.collect()
        print(f"  wrote {fname} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (partial / MARKER).write_text(json.dumps(synthetic_spec(shape, seed, shard_bytes)) + "\n")
    partial.rename(folder)


def synthetic_spec(shape: dict[str, int], seed: int, shard_bytes: int) -> dict[str, Any]:
    return {"kind": "synthetic", "shape": shape, "seed": seed, "shard_bytes": shard_bytes}


def check_writer(args: argparse.Namespace) -> int:
    """Write a tiny synthetic checkpoint (2 layers, hidden 256, several shards) and load it with
    transformers: no missing, unexpected or mismatched keys, every value as in the files."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    shape = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 1000,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    with tempfile.TemporaryDirectory(prefix="quark-bench-streaming-check-") as tmp:
        folder = Path(tmp) / synthetic_name(shape, args.seed)
        write_synthetic(folder, shape, args.seed, shard_bytes=600_000)  # several shards
        assert is_complete(folder, synthetic_spec(shape, args.seed, 600_000))
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype="auto")
        bad = {k: v for k, v in info.items() if v}
        if bad:
            raise RuntimeError(f"transformers loading info: {bad}")
        state = model.state_dict()
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        for name, fname in index.items():
            with safe_open(str(folder / fname), framework="pt") as f:
                if not torch.equal(f.get_tensor(name), state[name]):
                    raise RuntimeError(f"{name}: loaded value differs from the file")
        assert set(index) == set(state), "index and state dict differ"
        assert all(v.dtype == torch.bfloat16 for v in state.values())
        with torch.no_grad():
            logits = model(torch.randint(0, shape["vocab_size"], (1, 16))).logits
        assert torch.isfinite(logits).all()
        n_shards = len(set(index.values()))
    print(f"writer check: {len(index)} tensors in {n_shards} shards loaded by AutoModelForCausalLM.from_pretrained "
          "with no missing / unexpected / mismatched keys, values equal, dtype bf16, finite logits")
    return 0


# -- SmolLM2 ---------------------------------------------------------------------------------------
def smollm2_spec() -> dict[str, Any]:
    from quark.torch.utils.model_loading import default_model_path

    gguf = Path(default_model_path())
    return {"kind": "smollm2", "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "dtype": "float32"}


def write_smollm2(folder: Path, spec: dict[str, Any]) -> None:
    """The bundled GGUF model as the project loads it (dense float32, GGUF marker dropped), saved with
    ``save_pretrained`` together with its tokenizer."""
    from quark.torch.utils.model_loading import load_model_and_tokenizer

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    model, tokenizer = load_model_and_tokenizer(None, device="cpu", dtype=torch.float32)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / MARKER).write_text(json.dumps(spec) + "\n")
    partial.rename(folder)


def smollm2_calibration(n: int, seq_len: int) -> torch.Tensor:
    """The shared protocol's calibration windows, tokenized by the GGUF's tokenizer (as the CLI)."""
    from transformers import AutoTokenizer

    from quark.torch.evaluation import calibration_dataloader
    from quark.torch.utils.model_loading import default_model_path

    gguf = Path(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return torch.cat([b["input_ids"] for b in calibration_dataloader(tokenizer, n, seq_len)])


# -- the measured runs (one subprocess each) ------------------------------------------------------
class BlockTimer:
    """Wraps the block stores' ``enter`` / ``leave`` (the class methods, in this process only): per
    block, the time from ``enter`` to ``leave(done=True)``, and the time inside each of the two."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.blocks: list[dict[str, float]] = []
        self._enter_s: dict[int, float] = {}

    def install(self) -> None:
        from quark.torch.quantization.driver import BlockStore
        from quark.torch.quantization.streamed import DiskBlockStore

        for cls in (BlockStore, DiskBlockStore):
            if "enter" in vars(cls):
                cls.enter = self._wrap_enter(vars(cls)["enter"])
            if "leave" in vars(cls):
                cls.leave = self._wrap_leave(vars(cls)["leave"])

    def _wrap_enter(self, enter: Any) -> Any:
        def timed(store: Any, index: int, block: Any) -> None:
            t0 = time.perf_counter()
            enter(store, index, block)
            self.started[index] = t0
            self._enter_s[index] = time.perf_counter() - t0

        return timed

    def _wrap_leave(self, leave: Any) -> Any:
        def timed(store: Any, index: int, block: Any, done: bool) -> None:
            t0 = time.perf_counter()
            leave(store, index, block, done)
            t1 = time.perf_counter()
            if done and index in self.started:
                self.blocks.append({"index": index, "seconds": t1 - self.started.pop(index),
                                    "enter_s": self._enter_s.pop(index, 0.0), "leave_s": t1 - t0})

        return timed


class StatusPeaks:
    """Peaks of the resident set (``total``, as :class:`quark.torch.utils.memory.PeakResident`) and of
    its two parts (``/proc/self/status``), sampled by one thread: anonymous (heap: tensors the process
    allocated) and file-backed (pages of memory-mapped files that the process touched: the shared
    libraries, and the checkpoint's shards where tensors stay views of them; the kernel can drop such
    pages under pressure). Both count in ``ru_maxrss``. Zero where the file cannot be read."""

    def __init__(self, interval: float = 0.01) -> None:
        import threading

        self.interval, self.total, self.anon, self.file = interval, 0, 0, 0
        self.start: tuple[int, int] | None = None  # (anon, file) at entry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        try:
            with open("/proc/self/status") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile")))
        except OSError:
            return
        self.total = max(self.total, int(fields.get("VmRSS", "0 kB").split()[0]) * 1024)
        self.anon = max(self.anon, int(fields.get("RssAnon", "0 kB").split()[0]) * 1024)
        self.file = max(self.file, int(fields.get("RssFile", "0 kB").split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> StatusPeaks:
        self.sample()
        self.start = (self.anon, self.file)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def run_worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    kind = spec["kind"]
    if kind == "prepare-synthetic":
        write_synthetic(Path(spec["folder"]), spec["spec"]["shape"], spec["spec"]["seed"], spec["spec"]["shard_bytes"])
        return 0
    if kind == "prepare-smollm2":
        write_smollm2(Path(spec["folder"]), spec["spec"])
        return 0
    torch.set_num_threads(spec["threads"])
    from quark.torch import LLMTemplate, ModelQuantizer, export_safetensors

    ids = torch.load(spec["calib"], weights_only=True)
    batches = [{"input_ids": ids[i : i + 1]} for i in range(ids.shape[0])]
    config = LLMTemplate.get(spec["template"]).get_config(spec["scheme"], algorithm=spec["algorithm"] or None)
    timer = BlockTimer()
    timer.install()
    src, dst, device, progress = spec["src"], spec["dst"], spec["device"], spec["progress"]
    phases: dict[str, float] = {}
    gc.collect()
    release_free_memory()
    before = resident_bytes()
    with StatusPeaks(interval=0.01) as parts:
        t0 = time.perf_counter()
        if kind == "in-memory":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", local_files_only=True)
            phases["load_s"] = time.perf_counter() - t0
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            ModelQuantizer(config).quantize_model(model, batches, device=device, progress=progress)
            phases["quantize_s"] = time.perf_counter() - t0 - phases["load_s"]
            export_safetensors(model, dst)
            phases["export_s"] = time.perf_counter() - t0 - phases["load_s"] - phases["quantize_s"]
        elif kind == "streamed":
            dtype = json.loads((Path(src) / "config.json").read_text()).get("dtype")
            ModelQuantizer(config).direct_quantize_checkpoint(src, dst, dataloader=batches, device=device,
                                                              progress=progress)
        else:
            raise ValueError(f"unknown worker kind {kind!r}")
        wall = time.perf_counter() - t0
    scale = 1 if sys.platform == "darwin" else 1024
    result = {
        "flow": kind,
        "wall_s": wall,
        "phases": phases,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
        "rss_before_bytes": before,
        "peak_rss_during_flow_bytes": parts.total,
        "peak_rss_anon_bytes": parts.anon,
        "peak_rss_file_bytes": parts.file,
        "rss_anon_before_bytes": parts.start[0] if parts.start else 0,
        "rss_file_before_bytes": parts.start[1] if parts.start else 0,
        "blocks": timer.blocks,
        "threads": torch.get_num_threads(),
        "dtype": dtype,
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def call_worker(spec: dict[str, Any], work: Path) -> dict[str, Any] | None:
    """Run ``spec`` in a fresh Python process (sequentially: never two at once); its result."""
    path = work / f"spec-{time.monotonic_ns()}.json"
    result = path.with_suffix(".result.json")
    spec = {**spec, "result": str(result)}
    path.write_text(json.dumps(spec, indent=2))
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)], check=True)
    return json.loads(result.read_text()) if result.exists() else None


# -- the cells -------------------------------------------------------------------------------------
def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def compare_outputs(a: Path, b: Path) -> dict[str, Any]:
    """Every tensor of the two safetensors folders, by name: same names, dtypes, shapes, values
    (``torch.equal``) and bytes."""
    from safetensors import safe_open

    def names(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                found.update({k: f for k in h.keys()})
        return found

    na, nb = names(a), names(b)
    common = sorted(set(na) & set(nb))
    differ = []
    for k in common:
        with safe_open(str(na[k]), framework="pt") as fa, safe_open(str(nb[k]), framework="pt") as fb:
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
        same = ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb)
        if same:  # and bit for bit (torch.equal takes -0.0 == 0.0)
            same = torch.equal(ta.contiguous().reshape(-1).view(torch.uint8), tb.contiguous().reshape(-1).view(torch.uint8))
        if not same:
            differ.append(k)
    only_a, only_b = sorted(set(na) - set(nb)), sorted(set(nb) - set(na))
    return {"equal": not differ and not only_a and not only_b, "tensors_compared": len(common),
            "differing": differ[:20], "n_differing": len(differ), "only_in_memory": only_a[:20],
            "only_streamed": only_b[:20]}


def summarize(run: dict[str, Any], src_bytes: int, out_bytes: int) -> dict[str, Any]:
    secs = [b["seconds"] for b in run["blocks"]]
    run = dict(run)
    run.update({
        "checkpoint_bytes": src_bytes,
        "output_bytes": out_bytes,
        "peak_rss_per_checkpoint": run["peak_rss_bytes"] / src_bytes,
        "n_blocks": len(secs),
        "block_mean_s": sum(secs) / len(secs) if secs else None,
        "block_median_s": sorted(secs)[len(secs) // 2] if secs else None,
        "block_max_s": max(secs) if secs else None,
        "block_enter_mean_s": sum(b["enter_s"] for b in run["blocks"]) / len(secs) if secs else None,
        "block_leave_mean_s": sum(b["leave_s"] for b in run["blocks"]) / len(secs) if secs else None,
        "outside_blocks_s": run["wall_s"] - sum(secs),
    })
    return run


#: the numbers of a run that ``--repeat`` reports as the median over the repetitions
MEDIAN_KEYS = ("wall_s", "peak_rss_bytes", "peak_rss_per_checkpoint", "peak_rss_during_flow_bytes",
               "peak_rss_anon_bytes", "peak_rss_file_bytes", "block_mean_s", "block_median_s", "block_max_s",
               "block_enter_mean_s", "block_leave_mean_s", "outside_blocks_s")


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the repetitions of a run: the median of each of :data:`MEDIAN_KEYS`, every run kept
    under ``repetitions``."""
    import statistics

    row = dict(runs[0])
    row["repeats"] = len(runs)
    if len(runs) > 1:
        for key in MEDIAN_KEYS:
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        row["repetitions"] = runs
    return row


def measure(flow: str, src: Path, calib: Path, work: Path, args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    dst = work / f"out-{flow}-{time.monotonic_ns()}"
    spec = {"kind": flow, "src": str(src), "dst": str(dst), "calib": str(calib), "template": args.template,
            "scheme": args.scheme, "algorithm": args.algorithm, "threads": args.threads, "device": args.device,
            "progress": args.progress}
    print(f"-- {flow} on {src.name}", file=sys.stderr, flush=True)
    run = call_worker(spec, work)
    return summarize(run, folder_bytes(src), folder_bytes(dst)), dst


def bench_synthetic(args: argparse.Namespace, cache: Path, work: Path) -> list[dict[str, Any]]:
    shape = synthetic_shape(args)
    spec = synthetic_spec(shape, args.seed, int(args.shard_gb * GB))
    folder = cache / synthetic_name(shape, args.seed)
    if not is_complete(folder, spec):
        print(f"-- writing {folder} (once)", file=sys.stderr, flush=True)
        call_worker({"kind": "prepare-synthetic", "folder": str(folder), "spec": spec}, work)
    n = args.calib_batches or DEFAULT_CALIB["synthetic-8b"]
    g = torch.Generator().manual_seed(args.seed)
    calib = work / "calib-synthetic.pt"
    torch.save(torch.randint(0, shape["vocab_size"], (n, args.seq_len), generator=g), calib)
    runs = []
    for _ in range(args.repeat):
        run, dst = measure("streamed", folder, calib, work, args)
        shutil.rmtree(dst, ignore_errors=True)
        runs.append(run)
    run = aggregate(runs)
    layers = shape["num_hidden_layers"]
    if synthetic_name(shape, args.seed).startswith("synthetic-llama3-8b"):
        label = f"synthetic Llama-3-8B shape, {layers} layer{'s' if layers != 1 else ''}, bf16"
    else:
        label = f"synthetic llama {shape}, bf16"
    run.update({"model": "synthetic-8b", "label": label, "checkpoint": str(folder), "layers": layers,
                "calibration": f"{n} x {args.seq_len} random token ids (seed {args.seed})", "equal": None})
    return [run]


def bench_smollm2(args: argparse.Namespace, cache: Path, work: Path) -> list[dict[str, Any]]:
    spec = smollm2_spec()
    folder = cache / "smollm2-135m-instruct-fp32"
    if not is_complete(folder, spec):
        print(f"-- writing {folder} (once)", file=sys.stderr, flush=True)
        call_worker({"kind": "prepare-smollm2", "folder": str(folder), "spec": spec}, work)
    n = args.calib_batches or DEFAULT_CALIB["smollm2"]
    calib = work / "calib-smollm2.pt"
    torch.save(smollm2_calibration(n, args.seq_len), calib)
    flows: dict[str, list[dict[str, Any]]] = {"in-memory": [], "streamed": []}
    outs: list[Path] = []
    for rep in range(args.repeat):  # interleaved: drifting machine load hits both flows alike
        for flow, measured in flows.items():
            run, dst = measure(flow, folder, calib, work, args)
            measured.append(run)
            if rep == 0:
                outs.append(dst)  # compared below
            else:
                shutil.rmtree(dst, ignore_errors=True)
    comparison = compare_outputs(*outs)
    for d in outs:
        shutil.rmtree(d, ignore_errors=True)
    runs = [aggregate(measured) for measured in flows.values()]
    for run in runs:
        run.update({"model": "smollm2", "label": "SmolLM2-135M-Instruct, float32", "checkpoint": str(folder),
                    "calibration": f"{n} x {args.seq_len} tokens of wikitext-2/valid.txt (shared protocol)",
                    "equal": comparison["equal"], "comparison": comparison})
    return runs


# -- report ----------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_bytes"] = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) * 1024
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except (OSError, StopIteration):
        pass
    return info


def markdown(result: dict[str, Any]) -> str:
    def f(x: float | None, digits: int = 2) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    recipe = result["recipe"]
    lines = [
        "| model | flow | recipe | checkpoint (GB) | peak RSS (GB) | peak RSS / checkpoint | wall time (s) | "
        "time per block (s) | equal tensors |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        equal = "-" if r["equal"] is None else ("yes" if r["equal"] else "NO")
        lines.append(
            f"| {r['label']} | {r['flow']} | {recipe} | {r['checkpoint_bytes'] / GB:.2f} | "
            f"{r['peak_rss_bytes'] / GB:.2f} | {f(r['peak_rss_per_checkpoint'])} | {r['wall_s']:.1f} | "
            f"{f(r['block_mean_s'])} | {equal} |"
        )
    ratios = result.get("smollm2_ratios")
    if ratios:
        lines.append(f"\nSmolLM2 streamed / in-memory: peak RSS x{ratios['peak_rss']:.2f}, "
                     f"wall time x{ratios['wall_time']:.2f}.")
    m = result["machine"]
    medians = f" Medians of {result['repeat']} runs each." if result["repeat"] > 1 else ""
    lines.append(
        f"\nGB = 1e9 bytes. Peak RSS: ru_maxrss of the run's own fresh process (includes the Python / torch / "
        f"transformers baseline). Time per block: mean over the blocks, store enter to leave (streamed: load + "
        f"quantize + write).{medians} "
        f"{m['cpus_usable']} CPUs, {result['threads']} torch threads, torch {m['torch']}, "
        f"device {result['device'] or 'cpu'}.")
    for r in result["rows"]:
        if r["flow"] == "streamed":
            lines.append(f"- {r['label']}: calibration {r['calibration']}.")
    for r in result["rows"]:
        lines.append(
            f"- {r['label']}, {r['flow']}: RSS {r['rss_before_bytes'] / GB:.2f} GB before the flow; peak anonymous "
            f"{r['peak_rss_anon_bytes'] / GB:.2f} GB ({r['rss_anon_before_bytes'] / GB:.2f} before), peak file-backed "
            f"{r['peak_rss_file_bytes'] / GB:.2f} GB ({r['rss_file_before_bytes'] / GB:.2f} before: shared libraries; "
            f"the rest: mapped shards); blocks {r['n_blocks']}, per block {f(r['block_enter_mean_s'], 3)} s in the "
            f"store's enter, {f(r['block_leave_mean_s'], 3)} s in its leave; {r['outside_blocks_s']:.1f} s outside "
            f"the blocks; output {r['output_bytes'] / GB:.3f} GB.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=MODELS, help="repeatable; default: both")
    ap.add_argument("--layers", type=int, default=None, help="synthetic-8b: decoder layers (default 32)")
    ap.add_argument("--calib-batches", type=int, default=None,
                    help="calibration batches (default: 8 for synthetic-8b, 32 for smollm2)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration batch")
    ap.add_argument("--template", default="llama")
    ap.add_argument("--scheme", default="int4_wo_64")
    ap.add_argument("--algorithm", default="gptq", help="comma-separated algorithms ('' for none)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--device", default=None, help="compute device (default: cpu)")
    ap.add_argument("--cache", default="~/.cache/quark-bench", help="where the float checkpoints are written once")
    ap.add_argument("--workdir", default=None, help="parent of the temporary folder for the quantized outputs")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="synthetic checkpoint shard size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each flow (each in a fresh process, flows interleaved); the table shows medians")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    ap.add_argument("--check-writer", action="store_true",
                    help="check the synthetic writer on a tiny shape with transformers' loader, then exit")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "streaming.json"))
    # the synthetic shape, for checks on small models
    for opt in ("--hidden-size", "--intermediate-size", "--vocab-size", "--heads", "--kv-heads"):
        ap.add_argument(opt, type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.worker:
        return run_worker(args.worker)
    if args.check_writer:
        return check_writer(args)
    args.algorithm = [a for a in args.algorithm.split(",") if a]
    models = args.model or list(MODELS)
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    if repo == cache.resolve() or repo in cache.resolve().parents:
        ap.error(f"--cache {cache} is inside the repository: give a folder outside it")
    work = Path(tempfile.mkdtemp(prefix="quark-bench-streaming-", dir=args.workdir))
    rows: list[dict[str, Any]] = []
    try:
        for name in dict.fromkeys(models):
            rows += (bench_synthetic if name == "synthetic-8b" else bench_smollm2)(args, cache, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    recipe = f"{args.scheme}" + (f" + {'+'.join(args.algorithm)}" if args.algorithm else "")
    result: dict[str, Any] = {"recipe": recipe, "template": args.template, "threads": args.threads,
                              "repeat": args.repeat, "device": args.device, "machine": machine_info(args.threads),
                              "rows": rows}
    smol = {r["flow"]: r for r in rows if r["model"] == "smollm2"}
    if len(smol) == 2:
        result["smollm2_ratios"] = {
            "peak_rss": smol["streamed"]["peak_rss_bytes"] / smol["in-memory"]["peak_rss_bytes"],
            "wall_time": smol["streamed"]["wall_s"] / smol["in-memory"]["wall_s"],
        }
    md = markdown(result)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(md + "\n")
    return 0 if all(r["equal"] is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
