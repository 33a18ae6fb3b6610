"""RoundType modes on hand-picked values (ties, the 0.49999997 trap, specials)."""

import math

import pytest
import torch

from quark.torch.quantization.config.type import RoundType
from quark.torch.quantization.numerics import round_tensor, round_tensor_

ALMOST_HALF = 0.49999997  # float32 nextafter(0.5, 0): floor(x + 0.5) would give 1
X = [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, ALMOST_HALF, -ALMOST_HALF, 2.4999998, 1.0000001, -3.7, 8388609.0]


@pytest.mark.parametrize(
    "method, expected",
    [
        (RoundType.half_even, [-2, -2, -0.0, 0, 2, 2, 0, -0.0, 2, 1, -4, 8388609]),
        (RoundType.round, [-3, -2, -1, 1, 2, 3, 0, -0.0, 2, 1, -4, 8388609]),
        (RoundType.floor, [-3, -2, -1, 0, 1, 2, 0, -1, 2, 1, -4, 8388609]),
    ],
)
def test_round_modes(method, expected):
    x = torch.tensor(X, dtype=torch.float32)
    assert round_tensor(x, method).tolist() == expected
    assert x.tolist() == torch.tensor(X, dtype=torch.float32).tolist()  # out of place


@pytest.mark.parametrize("method", list(RoundType))
def test_specials_pass_through(method):
    y = round_tensor_(torch.tensor([math.inf, -math.inf, math.nan]), method)
    assert y[0] == math.inf and y[1] == -math.inf and math.isnan(y[2])


def test_default_and_string_method():
    x = torch.tensor([0.5, 1.5])
    assert round_tensor(x).tolist() == [0, 2]
    assert round_tensor(x, "round").tolist() == [1, 2]
    with pytest.raises(ValueError, match="round_method"):
        round_tensor(x, "nearest")
