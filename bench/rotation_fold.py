"""Why rotation followed by round-to-nearest hurts 4-bit weights on SmolLM2: the norm folding.

R1 rotation first folds each RMSNorm's weight ``g`` into the linears it feeds (``W <- W diag(g)``).
On SmolLM2 the attention-sink token carries a huge normalised value on a channel whose ``g`` is
small; unfolded, that column's rounding error is multiplied by the small ``g``, folded it is not.
This script measures it on weight-only RTN (no calibration), one fresh model per variant:

- ``none``: plain RTN;
- ``fold``: norms folded into q/k/v and gate/up, then RTN (the float model is unchanged);
- ``fold, column kept``: as ``fold``, but the folded weights' column ``--channel`` stays in float;
- ``rotation``: the template's rotation (R1 + R2), then RTN.

Also printed: per layer, the channel with the largest ``|x / rms(x)|`` on the first token, its norm
weight, and k_proj's (``--probe``) relative output error on that token and (median) on the others, unfolded /
folded / rotated.

    python bench/rotation_fold.py                          # int4_wo_64, 8 evaluation windows
    python bench/rotation_fold.py --scheme mxfp4_weight_only --windows 40

Writes ``bench/results/rotation_fold.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from quark.torch import LLMTemplate  # noqa: E402
from quark.torch.algorithm.rotation import ALGORITHM as ROTATION  # noqa: E402
from quark.torch.algorithm.rotation import StreamModule, fold_norm  # noqa: E402
from quark.torch.evaluation import calibration_dataloader, evaluate_shared_protocol  # noqa: E402
from quark.torch.quantization.config.config import first_stage  # noqa: E402
from quark.torch.quantization.driver import find_decoder_layers, get_submodule  # noqa: E402
from quark.torch.quantization.hadamard import hadamard_matrix  # noqa: E402
from quark.torch.quantization.tensor_quantize import fake_quantize  # noqa: E402
from quark.torch.utils.model_loading import load_model_and_tokenizer  # noqa: E402

VARIANTS = ("none", "fold", "fold, column kept", "rotation")


#: module roles (norms, the linears they feed, o/down projections): the llama template's rotation config
ROLES = LLMTemplate.get("llama").algorithm_configs["rotation"]


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return find_decoder_layers(model, ROLES.model_decoder_layers or None)[1]


def reading(layer: torch.nn.Module) -> list[tuple[torch.nn.Module, list[torch.nn.Linear]]]:
    """(norm, the linears it feeds) for a block, by the template's rotation roles."""
    return [(get_submodule(layer, ROLES.attn_norm), [get_submodule(layer, n) for n in ROLES.attn_inputs]),
            (get_submodule(layer, ROLES.mlp_norm), [get_submodule(layer, n) for n in ROLES.mlp_inputs])]


@torch.no_grad()
def rtn_variant(variant: str, scheme: str, channel: int, windows: int) -> float:
    model, tokenizer = load_model_and_tokenizer()
    if not 0 <= channel < model.config.hidden_size:
        raise SystemExit(f"--channel {channel}: must be in [0, {model.config.hidden_size}) (the hidden size)")
    template = LLMTemplate.get("llama")
    spec = template.get_config(scheme).global_quant_config.weight
    if variant == "rotation":
        ROTATION.prepare_model(model, copy.deepcopy(ROLES))
    for layer in blocks(model):
        inputs = []
        for norm, linears in reading(layer):
            if variant in ("fold", "fold, column kept"):
                fold_norm(norm, [StreamModule(lin, type(lin).__name__, False) for lin in linears])
            inputs += linears
        for lin in inputs + [get_submodule(layer, ROLES.o_proj), get_submodule(layer, ROLES.down_proj)]:
            w = lin.weight.detach().clone()
            q = fake_quantize(w, spec)
            if variant == "fold, column kept" and any(lin is x for x in inputs):
                q[:, channel] = w[:, channel]
            lin.weight.copy_(q)
    return evaluate_shared_protocol(model, tokenizer, num_windows=windows, progress=False)


@torch.no_grad()
def sink_errors(scheme: str, layers: list[int], probe: str) -> list[dict]:
    """Per layer: the first token's largest normalised channel, its norm weight, and ``probe``'s relative
    output error on that token / the others' median, for unfolded, folded and rotated weights."""
    model, tokenizer = load_model_and_tokenizer()
    spec = first_stage(LLMTemplate.get("llama").get_config(scheme).global_quant_config.weight)
    ids = next(iter(calibration_dataloader(tokenizer, 1, 512)))["input_ids"]
    caught: dict[int, torch.Tensor] = {}
    hooks = [get_submodule(blocks(model)[i], ROLES.attn_norm).register_forward_hook(
        lambda m, a, o, i=i: caught.__setitem__(i, a[0][0].double())) for i in layers]
    model(ids)
    for h in hooks:
        h.remove()
    hidden = model.config.hidden_size
    rot = hadamard_matrix(hidden).double()
    rot = rot / rot[0].norm()
    rows = []
    for i in layers:
        layer = blocks(model)[i]
        g = get_submodule(layer, ROLES.attn_norm).weight.double()
        x = caught[i]
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        w = get_submodule(layer, probe).weight.double()
        ref = (xn * g) @ w.T
        effective = {
            "unfolded": fake_quantize(w.float(), spec).double() * g,
            "folded": fake_quantize((w * g).float(), spec).double(),
            "rotated": fake_quantize((w * g @ rot).float(), spec).double() @ rot.T,
        }
        row = {"layer": i, "channel": int(xn[0].abs().argmax()), "value": round(float(xn[0].abs().max()), 2)}
        row["norm_weight"] = round(float(g[row["channel"]]), 4)
        for name, weff in effective.items():
            rel = ((xn @ weff.T - ref).norm(dim=-1) / ref.norm(dim=-1))
            row[name] = [round(float(rel[0]), 4), round(float(rel[1:].median()), 4)]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="int4_wo_64", help="a weight-only scheme")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows (shared protocol: 40)")
    parser.add_argument("--channel", type=int, default=507, help="the column kept in float (SmolLM2's sink channel)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5, 11, 20, 29])
    parser.add_argument("--probe", default="self_attn.k_proj", choices=ROLES.attn_inputs,
                        help="the attention input whose error on the first token is tabulated")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rotation_fold.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ppl = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        ppl[variant] = rtn_variant(variant, args.scheme, args.channel, args.windows)
        print(f"{variant}: ppl {ppl[variant]:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = sink_errors(args.scheme, args.layers, args.probe)

    lines = [f"RTN {args.scheme}, {args.windows} evaluation windows", "", "| variant | ppl |", "| --- | ---: |"]
    lines += [f"| {v} | {p:.2f} |" for v, p in ppl.items()]
    lines += ["", f"{args.probe} relative output error, first token / median of the others",
              "", "| layer | channel | abs(x/rms) | norm weight | unfolded | folded | rotated |",
              "| ---: | ---: | ---: | ---: | --- | --- | --- |"]
    lines += [f"| {r['layer']} | {r['channel']} | {r['value']} | {r['norm_weight']} | "
              + " | ".join(f"{r[k][0]:.3f} / {r[k][1]:.3f}" for k in ("unfolded", "folded", "rotated")) + " |"
              for r in rows]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"scheme": args.scheme, "windows": args.windows, "channel": args.channel,
                                    "ppl": ppl, "sink_errors": rows,
                                    "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
