"""The GPTQ-family kernels changed for speed, old formulation against new, side by side.

Random data of SmolLM2's shapes (16384 calibration tokens; input widths 576 and 1536), 2 threads by
default, each variant timed as the median of interleaved repeats (the machine is shared and noisy):

* GPTAQ's drift Gram ``D = 2/N sum (x - x~)^T x~``: the full product in natural order, against the
  upper triangle in a random act-order permutation (:class:`quark.torch.algorithm.gptaq.DriftStreams`);
* GPTAQ's term ``triu(D U^T, 1) U``: full products against triangular halves;
* the Hessian ``H = 2/N X~^T X~`` by 3 row panels of its upper triangle, against up to 8;
* the inverse Cholesky factor: factorise, ``cholesky_inverse``, factorise again, against
  :func:`quark.torch.algorithm.hessian_solver.inverse_cholesky`;
* GPTQ's column loop with GPTAQ's term (int4 per group of 64, act-order, qparams fixed up front; the
  weight rows of the stacks that share an input: 3072 = gate + up at 576 wide, 576 = down_proj at 1536):
  per column a division of the error, two rank-1 updates and a quantizer reached through the
  solver's dispatch (:func:`old_solve`), against :func:`quark.torch.algorithm.hessian_solver.solve`
  with the prepared column quantizers;
* the act-order column gathers of a stack's 32 batches (``D`` in the solver's order): ``index_select``
  against ``gather`` with the column index broadcast over the rows.

    python bench/solver_kernels.py --threads 2

Prints a table and writes ``bench/results/solver_kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_ms(fns: dict, repeats: int) -> dict:
    """Median wall milliseconds of each function, the functions interleaved (after one warm-up call each)."""
    for f in fns.values():
        f()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def old_solve(W, U, quantize, block_size: int = 128, P=None):
    """The column loop before it was trimmed (same updates; one more division and one more product per column)."""
    import torch

    n = W.shape[1]
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        Wt = W[:, i1:i2].T.contiguous()
        Qt, err = torch.empty_like(Wt), torch.empty_like(Wt)
        U1, P1 = U[i1:i2, i1:i2], None if P is None else P[i1:i2, i1:i2]
        diag = U1.diagonal().tolist()
        for k in range(i2 - i1):
            w, q = Wt[k], Qt[k]
            q.copy_(quantize(i1 + k, w, None))
            e = torch.sub(w, q, out=err[k]).div_(diag[k])
            if k + 1 < i2 - i1:
                Wt[k + 1:].addr_(U1[k, k + 1:], e, alpha=-1.0)
                if P1 is not None:
                    Wt[k + 1:].addr_(P1[k, k + 1:], w)
        Q[:, i1:i2] = Qt.T
        if i2 < n:
            W[:, i2:].addmm_(err.T, U[i1:i2, i2:], alpha=-1.0)
            if P is not None:
                W[:, i2:].addmm_(Wt.T, P[i1:i2, i2:])
    return Q


def width_rows(n: int, tokens: int, repeats: int, g) -> list[dict]:
    """Old and new kernels at input width ``n``."""
    import torch

    from quark.torch import LLMTemplate
    from quark.torch.algorithm.gptaq import DriftStreams
    from quark.torch.algorithm.hessian_solver import (
        ColumnQuantizer,
        Gram,
        inverse_cholesky,
        solve,
        strict_upper_abt,
        upper_mm,
    )

    xf = [torch.randn(1, 512, n, generator=g) for _ in range(tokens // 512)]
    xq = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xf]
    perm = torch.randperm(n, generator=g)

    def full_d():
        D = Gram()
        for a, b in zip(xq, xf):
            D.add_batch(b - a, a)
        return D.value

    def ordered_d():
        streams = DriftStreams()
        for a, b in zip(xq, xf):
            streams.add_batch(a, b)
        return streams.drift_gram(perm)

    class ThreePanels(Gram):  # the earlier panelling
        def _panel_edges(self, width: int) -> list[int]:
            return [0, width // 3, 2 * width // 3, width]

    def hessian(cls):
        H = cls()
        for a in xq:
            H.add_batch(a)
        return H.value

    X = torch.randn(4 * n, n, generator=g)
    H = X.T @ X / len(X)
    H.diagonal().add_(0.01 * H.diagonal().mean())
    U = inverse_cholesky(H)
    Dp = torch.randn(n, n, generator=g).triu()

    def old_inverse():
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    rows = 3072 if n == 576 else 576
    W = 0.05 * torch.randn(rows, n, generator=g)
    spec = LLMTemplate.get("llama").get_config("int4_wo_64").global_quant_config.weight
    perm = torch.argsort(H.diagonal(), descending=True)
    quantizer = ColumnQuantizer(spec, W, static_groups=True)
    fns = quantizer.column_functions(perm.tolist())
    Wp, Up = W[:, perm].contiguous(), inverse_cholesky(H[perm][:, perm])
    P = 1e-3 * torch.randn(n, n, generator=g).triu(1)

    def dispatched(j, w, _current):  # the ColumnQuantizer call the loop made per column
        return quantizer(perm[j].item(), w, None)

    gathered = torch.empty(512, n)

    def gathers(new: bool):  # the act-order gathers of one stack's quantized-stream batches
        for x in xq:
            if new:
                torch.gather(x[0], 1, perm.expand(512, -1), out=gathered)
            else:
                torch.index_select(x[0], 1, perm, out=gathered)

    t = median_ms({
        "gather old": lambda: gathers(False), "gather new": lambda: gathers(True),
        "loop old": lambda: old_solve(Wp.clone(), Up, dispatched, 128, P),
        "loop new": lambda: solve(Wp.clone(), Up, lambda j, w, _c: fns[j](w), 128, P),
        "D full": full_d, "D upper, act-order": ordered_d,
        "term full": lambda: torch.triu(Dp @ U.T, 1) @ U,
        "term halves": lambda: upper_mm(strict_upper_abt(Dp, U), U),
        "H 3 panels": lambda: hessian(ThreePanels), "H panels": lambda: hessian(Gram),
        "U three steps": old_inverse, "U reversed": lambda: inverse_cholesky(H),
    }, repeats)
    return [{"kernel": what, "width": n, "old_ms": round(t[old], 1), "new_ms": round(t[new], 1),
             "ratio": round(t[new] / t[old], 2)}
            for what, old, new in [("GPTAQ drift Gram D", "D full", "D upper, act-order"),
                                   ("GPTAQ term triu(D U^T, 1) U", "term full", "term halves"),
                                   ("Hessian H (3 -> up to 8 panels)", "H 3 panels", "H panels"),
                                   ("inverse Cholesky factor U", "U three steps", "U reversed"),
                                   (f"column loop with GPTAQ's term, {rows} rows", "loop old", "loop new"),
                                   ("act-order column gathers (index_select -> gather)", "gather old", "gather new")]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.tokens < 512:
        parser.error(f"--repeats must be >= 1 and --tokens >= 512, got {args.repeats} and {args.tokens}")

    import torch

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = [r for n in (576, 1536) for r in width_rows(n, args.tokens, args.repeats, g)]

    print(f"| kernel | width | old ms | new ms | new / old |  ({args.threads} threads, {args.tokens} tokens)")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['kernel']} | {r['width']} | {r['old_ms']} | {r['new_ms']} | {r['ratio']} |")
    out = ROOT / "bench" / "results" / "solver_kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "tokens": args.tokens, "date": time.strftime("%Y-%m-%d %H:%M"),
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
