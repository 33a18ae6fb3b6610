"""The GPTQ-family kernels changed for speed, old formulation against new, side by side.

Random data of SmolLM2's shapes (16384 calibration tokens; input widths 576 and 1536), 2 threads by
default, each variant timed as the median of interleaved repeats (the machine is shared and noisy):

* GPTAQ's drift Gram ``D = 2/N sum (x - x~)^T x~``: the full product in natural order, against the
  upper triangle in a random act-order permutation (:class:`quark.torch.algorithm.gptaq.DriftStreams`);
* GPTAQ's term ``triu(D U^T, 1) U``: full products against triangular halves;
* the Hessian ``H = 2/N X~^T X~`` by 3 row panels of its upper triangle, against up to 8;
* the inverse Cholesky factor: factorise, ``cholesky_inverse``, factorise again, against
  :func:`quark.torch.algorithm.hessian_solver.inverse_cholesky`.

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


def width_rows(n: int, tokens: int, repeats: int, g) -> list[dict]:
    """Old and new kernels at input width ``n``."""
    import torch

    from quark.torch.algorithm.gptaq import DriftStreams
    from quark.torch.algorithm.hessian_solver import Gram, inverse_cholesky, strict_upper_abt, upper_mm

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

    t = median_ms({
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
                                   ("inverse Cholesky factor U", "U three steps", "U reversed")]]


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
