"""Does quantizing on an accelerator give what quantizing on the CPU gives? Tiny random models, every
algorithm, three placements, one table.

For each case (model type, scheme, algorithm list) the same seeded float model and calibration batches
are quantized three times:

* ``cpu``: everything on the CPU (the reference);
* ``device-arg``: the model is on the CPU and ``quantize_model(..., device=DEVICE)`` moves it to the
  device (the standard flow);
* ``per-block``: the same with ``quant_flow="per_block"``: the model stays on the CPU and one block
  at a time moves to the device (how a model larger than the accelerator is quantized);
* ``on-device``: the model is moved to the device first, calibration batches stay on the CPU.

AWQ and AutoSmoothQuant pick each scale by an argmin over a grid, where any rounding difference may
flip a near-tie; their cases search in float32 (``search_dtype="auto"`` picks bfloat16 on GPUs) so
that the comparison isolates the device.

Recorded per placement: the logits' relative error against the float model (the quantization error),
the relative distance of the logits from the ``cpu`` placement's (float rounding of a different
device: it must be far below the quantization error), whether every parameter and buffer ended where
it should be (the CPU for ``per-block``, the device otherwise), and the quantization seconds. The ``on-device`` model is then exported and re-imported
on the CPU: its logits must equal the device model's moved to the CPU, exactly.

Needs an accelerator; with none it compares the CPU against itself (a smoke test of the script).

    python bench/device_parity.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from moe_experts import calibration  # noqa: E402  (4 x 2 x 32 random tokens, the MoE benchmark's)

RESULTS = ROOT / "bench" / "results" / "device_parity.json"

# (model type, scheme, algorithms or None, extra get_config kwargs)
CASES: list[tuple[str, str, list[str] | None, dict]] = [
    ("llama", "int4_wo_32", None, {}),
    ("llama", "int4_wo_32", ["gptq"], {}),
    ("llama", "int4_wo_32", ["gptaq"], {}),
    ("llama", "int4_wo_32", ["qronos"], {}),
    ("llama", "uint4_wo_32", ["awq"], {"overrides": ["awq.search_dtype=float32"]}),
    ("llama", "int8", ["smoothquant"], {}),
    ("llama", "int8", ["autosmoothquant"], {"overrides": ["autosmoothquant.search_dtype=float32"]}),
    ("llama", "int8", ["rotation", "smoothquant"], {"overrides": ["rotation.r4=true"]}),
    ("llama", "mxfp4", ["rotation", "gptq"], {}),
    ("llama", "fp8", ["gptq"], {"kv_cache_scheme": "fp8"}),
    ("llama", "ptpc_fp8", None, {}),
    ("llama", "nvfp4", None, {}),
    ("mixtral", "int4_wo_32", ["gptq"], {}),
    ("mixtral", "int4_wo_32", ["gptaq"], {}),
    ("gpt_oss", "mxfp4", ["qronos"], {}),
]


def logits(model, batches) -> list:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(**{k: v.to(device) for k, v in b.items()}).logits.float().cpu() for b in batches]


def rel(a: list, b: list) -> float:
    num = sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.double().pow(2).sum()) for y in b)
    return (num / den) ** 0.5


def placements(model) -> set[str]:
    return {str(t.device) for t in list(model.parameters()) + list(model.buffers())}


def run_case(model_type: str, scheme: str, algorithms: list[str] | None, kwargs: dict, device: str) -> dict:
    import torch

    from quark.torch import LLMTemplate, export_safetensors
    from quark.torch.export.api import import_model_from_safetensors
    from quark.torch.quantization.api import ModelQuantizer
    from quark.torch.quantization.config.type import QuantFlow
    from quark.torch.testing.tiny_models import build_model

    reference = build_model(model_type)
    batches = calibration(reference)
    ref = logits(reference, batches)
    from quark.torch.quantization.config.algo_configs import with_field_overrides

    template = LLMTemplate.get(model_type)
    kwargs = dict(kwargs)
    if "overrides" in kwargs:
        kwargs["algo_configs"] = with_field_overrides(template.algorithm_configs, kwargs.pop("overrides"))
    config = template.get_config(scheme, algorithm=algorithms, **kwargs)
    row: dict = {"model_type": model_type, "scheme": scheme, "algorithm": "+".join(algorithms or ["none"])}

    def quantize(model, dev, flow=None):
        cfg = copy.deepcopy(config)
        cfg.quant_flow = flow
        t0 = time.perf_counter()
        ModelQuantizer(cfg).quantize_model(model, batches, device=dev, progress=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    cpu_model = copy.deepcopy(reference)
    row["cpu_s"] = round(quantize(cpu_model, "cpu"), 2)
    cpu_logits = logits(cpu_model, batches)
    row["quant_error"] = rel(cpu_logits, ref)

    for label, flow in (("device_arg", None), ("per_block", QuantFlow.per_block)):
        model = copy.deepcopy(reference)
        row[f"{label}_s"] = round(quantize(model, device, flow), 2)
        row[f"{label}_placement"] = sorted(placements(model))
        row[f"{label}_vs_cpu"] = rel(logits(model, batches), cpu_logits)
        del model

    home_model = copy.deepcopy(reference).to(device)
    row["on_device_s"] = round(quantize(home_model, None), 2)
    row["on_device_placement"] = sorted(placements(home_model))
    device_logits = logits(home_model, batches)
    row["on_device_vs_cpu"] = rel(device_logits, cpu_logits)

    with tempfile.TemporaryDirectory() as tmp:
        export_safetensors(home_model, tmp)
        back = import_model_from_safetensors(None, tmp)
        home_model.to("cpu")
        row["reimport_vs_device_model_on_cpu"] = rel(logits(back, batches), logits(home_model, batches))
    target = torch.device(device)
    if target.type != "cpu" and target.index is None:
        target = torch.device(target.type, 0)  # where .to("cuda") puts tensors
    row["ok"] = (
        row["per_block_placement"] == ["cpu"]
        and row["device_arg_placement"] == row["on_device_placement"] == [str(target)]
        and all(row[f"{p}_vs_cpu"] <= 0.1 * row["quant_error"] for p in ("device_arg", "per_block", "on_device"))
        and row["reimport_vs_device_model_on_cpu"] == 0.0
    )
    return row


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", nargs="*", default=None, help="model types to run (default: all cases)")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    rows = []
    for model_type, scheme, algorithms, kwargs in CASES:
        if args.only and model_type not in args.only:
            continue
        label = f"{model_type} {scheme} {'+'.join(algorithms or ['none'])}"
        try:
            row = run_case(model_type, scheme, algorithms, kwargs, args.device)
        except Exception as exc:  # one broken case must not hide the others
            row = {"model_type": model_type, "scheme": scheme, "algorithm": "+".join(algorithms or ["none"]),
                   "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{label}: FAILED {row['error']}", flush=True)
        rows.append(row)
    header = ("| model | scheme | algorithm | quant error | device-arg vs cpu | per-block vs cpu | on-device vs cpu "
              "| reimport diff | s cpu / device-arg / per-block / on-device | ok |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model_type']} | {r['scheme']} | {r['algorithm']} | {r['error'][:80]} |||||| no |")
            continue
        lines.append(
            f"| {r['model_type']} | {r['scheme']} | {r['algorithm']} | {r['quant_error']:.3e} | "
            f"{r['device_arg_vs_cpu']:.2e} | {r['per_block_vs_cpu']:.2e} | {r['on_device_vs_cpu']:.2e} | "
            f"{r['reimport_vs_device_model_on_cpu']:.1e} | "
            f"{r['cpu_s']} / {r['device_arg_s']} / {r['per_block_s']} / {r['on_device_s']} | {'yes' if r['ok'] else 'no'} |"
        )
    print("\n".join(lines))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else args.device
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} cases ok on {name}; wrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
