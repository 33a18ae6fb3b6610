"""Reduced (bfloat16) precision for parts of an algorithm that tolerate it.

Two places use it, each with its own config field taking one of ``DTYPE_CHOICES``:

* ``search_dtype`` (AWQ, AutoSmoothQuant): these choose a scale per scaling pair by evaluating 20
  or so candidates on the block's calibration data and keeping the one with the lowest output error.
  Only the ranking of the candidates matters, not the outputs: the winning scale is folded into the
  weights in the model's precision, and the streams that feed the next block are computed as before.
  So the candidates' forwards may run under bfloat16 autocast (linears with bfloat16 inputs and
  float32 accumulation, 2-3x faster than float32 where bfloat16 matrix units exist: AVX512-BF16 /
  AMX CPUs, recent GPUs). The rounding adds a noise floor to the squared error of about
  ``(2^-9 / e)^2`` of the loss (bfloat16 keeps 8 significant bits: errors up to ``2^-8``, about
  ``2^-9`` on average) for a relative quantization error ``e`` (under 0.5% for 4-bit
  weights, ``e ~ 2^-5``; a few percent for W8A8), nearly the same for every candidate, so it moves
  the losses together and rarely changes the winner; near-ties may flip. The targets stay the
  float outputs. Default ``"auto"`` (its measured speed and accuracy on SmolLM2: docs/benchmarks.md).
* ``cross_term_dtype`` (GPTAQ, Qronos; default ``"float32"``): the products accumulating
  ``X~^T (X - X~)`` (the drift between the float and quantized streams) may run in bfloat16 with a
  float32 sum (:class:`~.hessian_solver.Gram`). Each entry then carries an error up to ``2^-8`` of
  its products, but the solvers multiply the term by ``H^-1``, which magnifies it in the directions
  the calibration data barely excites (their eigenvalues are only the damping): on SmolLM2
  ``int4_wo_64`` bfloat16 made GPTAQ 12% faster and 0.30 ppl worse (32.21 -> 32.51), Qronos 0.43
  worse (32.08 -> 32.50). Hence opt-in. The Hessian ``H = X~^T X~`` always stays float32: rounding
  its entries could make it indefinite.

Values: ``"float32"``, the model's own precision; ``"bfloat16"``; ``"auto"``, bfloat16 when
the weights are float32 and the device multiplies bfloat16 natively (:func:`bfloat16_is_fast`; CPUs
without bfloat16 instructions emulate it, slower than float32), else the model's precision. A half-precision model
is never cast (float16 to bfloat16 would lose precision).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from quark.torch.quantization.config.algo_configs import DTYPE_CHOICES

#: x86 CPU flags (``/proc/cpuinfo``) of instructions that multiply bfloat16 matrices natively
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bfloat16_is_fast(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (so faster than float32): a CUDA GPU
    with bfloat16 support, or a CPU with one of :data:`CPU_BF16_FLAGS` (read from ``/proc/cpuinfo``;
    elsewhere, and on other devices, False: an emulated bfloat16 product is slower than float32).
    A capability, not a timing, so the choice and the results do not depend on the machine's load."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return any(flag in _cpu_flags() for flag in CPU_BF16_FLAGS)
    return False


def resolve(choice: str, device: torch.device | str, model_dtype: torch.dtype) -> torch.dtype | None:
    """The reduced precision that ``choice`` (one of ``DTYPE_CHOICES``) picks for work on ``device``
    with weights / activations of ``model_dtype``: bfloat16, or None for the model's own precision."""
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"precision {choice!r}; allowed: {', '.join(map(repr, DTYPE_CHOICES))}")
    if choice == "float32":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if model_dtype == torch.float32 and bfloat16_is_fast(device) else None


def search_autocast(dtype: torch.dtype | None, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
