"""Every template scheme with round-to-nearest (no algorithm) on SmolLM2-135M, shared protocol.

A thin front end to ``bench/algorithms.py`` (same cell runner: one subprocess per scheme, ppl,
quantization seconds, peak RSS) with ``--algorithms none`` and its own result files
(``bench/results/accuracy.{json,md}``)::

    python bench/accuracy.py                      # fp32 + every registered scheme
    python bench/accuracy.py --schemes int8 fp8   # a subset

Reference perplexities on this exact protocol (to meet or beat): fp32 28.74, int8 71.62,
int4_wo_64 41.28, uint4_wo_64 38.15. uint4 g32 is flattered on this model (its weights were
stored as GGUF Q4_1).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import algorithms  # noqa: E402  (bench/algorithms.py)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--schemes" not in argv:
        from quark.torch import LLMTemplate

        seen: set[int] = set()  # aliases (fp4_block16_scale_e4m3 = nvfp4) share one scheme object: run once
        names = [n for n in LLMTemplate.list_schemes() if not (id(LLMTemplate.get_scheme(n)) in seen or seen.add(id(LLMTemplate.get_scheme(n))))]
        argv += ["--schemes", "fp32", *names]
    if "--out" not in argv:
        argv += ["--out", str(algorithms.RESULTS / "accuracy.json")]
    return algorithms.main([*argv, "--algorithms", "none"])


if __name__ == "__main__":
    sys.exit(main())
