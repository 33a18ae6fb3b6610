"""Rounding of real values to integers, the one place every format's ``RoundType`` is implemented.

All three modes are exact for every finite float (no ``floor(x + 0.5)`` shortcut, which rounds
``0.49999997`` up in float32); NaN and +-inf pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quark.torch.quantization.config.type import RoundType


def parse_round_method(method: RoundType | str | None) -> RoundType:
    """``None`` means the default of FORMATS.md, round half to even."""
    if method is None:
        return RoundType.half_even
    return RoundType.parse(method, "round_method")  # type: ignore[return-value]


def _round_half_away_(x: torch.Tensor) -> torch.Tensor:
    # Ties away from zero: x = trunc(x) + frac(x) exactly, and trunc(2 * frac) is +-1 exactly
    # when |frac| >= 0.5, else 0.  frac(+-inf) is NaN, so zero it to let infinities through.
    f = torch.frac(x).nan_to_num_(nan=0.0)
    return x.sub_(f).add_(f.mul_(2.0).trunc_())


def rounder_(method: RoundType | str | None = RoundType.half_even) -> Callable[[torch.Tensor], torch.Tensor]:
    """The in-place rounding function of ``method`` (see :func:`round_tensor_`), chosen once for
    callers that round many small tensors (GPTQ's column loop)."""
    method = parse_round_method(method)
    if method is RoundType.half_even:
        return torch.Tensor.round_
    if method is RoundType.floor:
        return torch.Tensor.floor_
    return _round_half_away_


def round_tensor_(x: torch.Tensor, method: RoundType | str | None = RoundType.half_even) -> torch.Tensor:
    """Round ``x`` (a floating-point tensor) to integers in place and return it.

    - ``half_even``: ties to the even integer (IEEE roundTiesToEven, ``torch.round``).
    - ``round``: ties away from zero (C ``round``).
    - ``floor``: towards minus infinity.
    """
    return rounder_(method)(x)


def round_tensor(x: torch.Tensor, method: RoundType | str | None = RoundType.half_even) -> torch.Tensor:
    """Out-of-place :func:`round_tensor_`; keeps ``x``'s dtype."""
    return round_tensor_(x.clone(), method)
