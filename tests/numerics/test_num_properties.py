"""Property tests (hypothesis) over every format family through tensor_quantize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quark.torch.quantization import tensor_quantize as tq
from quark.torch.quantization.numerics import FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2, UE5M3
from quark.torch.quantization.tensor_quantize import compute_qparams, dequantize, fake_quantize, quantize

from .test_num_tensor_quantize import Spec

K = 64
SQ = Spec("fp8_e4m3", "per_tensor", is_scale_quant=True)
FORMATS = {
    "int8_tensor": Spec("int8", "per_tensor", symmetric=True),
    "uint8_channel": Spec("uint8", "per_channel", ch_axis=0, symmetric=False, zero_point_type="int32"),
    "int4_group": Spec("int4", "per_group", group_size=32, symmetric=True),
    "uint4_group_fzp": Spec("uint4", "per_group", group_size=16, symmetric=False, zero_point_type="float32"),
    "int2_column": Spec("int2", "per_channel", ch_axis=-1, symmetric=True, round_method="round"),
    "fp8_e4m3": Spec("fp8_e4m3", "per_tensor"),
    "fp8_e5m2_channel": Spec("fp8_e5m2", "per_channel", ch_axis=0),
    "fp6_e2m3_group": Spec("fp6_e2m3", "per_group", group_size=32),
    "fp6_e3m2_group": Spec("fp6_e3m2", "per_group", group_size=32),
    "fp4_group_fp16": Spec("fp4", "per_group", group_size=32, scale_type="float16"),
    "fp4_group_pof2": Spec("fp4", "per_group", group_size=32, scale_type="pof2"),
    "amdfp4": Spec("fp4", "per_group", group_size=16, scale_type="float8_e5m3"),
    "mxfp4": Spec("mx", "per_group", group_size=32, mx_element_dtype="fp4"),
    "mxfp6_e2m3": Spec("mx", "per_group", group_size=32, mx_element_dtype="fp6_e2m3"),
    "mxfp8_e5m2_floor": Spec("mx", "per_group", mx_element_dtype="fp8_e5m2", scale_calculation_mode="floor"),
    "mxint8_ceil": Spec("mx", "per_group", mx_element_dtype="int8", scale_calculation_mode="ceil"),
    "mx6": Spec("mx6", "per_group"),
    "mx9": Spec("mx9", "per_group"),
    "bfp16": Spec("bfp16", "per_group"),
    "nvfp4": [Spec("fp4", "per_group", group_size=16), SQ],
    "amdfp4_global": [Spec("fp4", "per_group", group_size=16), Spec("fp8_e5m3", "per_tensor", is_scale_quant=True)],
    "int4_fp8": [Spec("fp8_e4m3", "per_tensor"), Spec("int4", "per_channel", ch_axis=0, symmetric=True)],
}
FLOAT_FORMATS = {"fp8_e4m3": FP8_E4M3, "fp8_e5m2": FP8_E5M2, "fp6_e2m3": FP6_E2M3, "fp6_e3m2": FP6_E3M2, "fp4": FP4_E2M1}


@st.composite
def tensors(draw):
    """[rows, 64] float32: per row a magnitude 1e-30 .. 1e30, log-uniform spread within the row,
    some exact zeros and some values on the fp4/fp8 grids and their midpoints (ties)."""
    rows = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    row_exp = draw(st.lists(st.integers(-30, 30), min_size=rows, max_size=rows))
    spread = draw(st.sampled_from([0.0, 1.0, 4.0]))
    rng = np.random.default_rng(seed)
    mag = 10.0 ** (np.array(row_exp)[:, None] + rng.uniform(-spread, 0, (rows, K)))
    x = rng.choice([-1.0, 1.0], (rows, K)) * mag
    x[rng.random((rows, K)) < 0.1] = 0.0
    special = rng.random((rows, K)) < 0.1
    x[special] = rng.choice([0.5, -1.5, 2.5, 3.0, -6.0, 448.0, 7.5, 5.0], special.sum())
    return torch.from_numpy(x.astype(np.float32))


SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None)


@pytest.mark.parametrize("name", FORMATS)
@SETTINGS
@given(x=tensors())
def test_finite_in_finite_out_idempotent_and_consistent(name, x):
    spec = FORMATS[name]
    qp = compute_qparams(x, spec)
    y = fake_quantize(x, spec, qp)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    assert torch.equal(fake_quantize(x, spec), y)  # dynamic == static with the same qparams
    assert torch.equal(fake_quantize(y, spec, qp), y)  # idempotent
    assert torch.equal(dequantize(quantize(x, spec, qp), spec, qp), y)


def _half_step_bound(x: torch.Tensor, spec: Spec, qp) -> tuple[torch.Tensor, torch.Tensor]:
    """(bound, in_range) per element: half a grid step where x is inside the representable range."""
    kind = tq._kind(spec)
    lay = tq._layout(x, spec, kind)
    s = lay.param(qp.scale).expand_as(lay.view).reshape(x.shape).double()
    xd = x.double()
    if kind.family == "int":
        zp = 0.0 if qp.zero_point is None else lay.param(qp.zero_point).expand_as(lay.view).reshape(x.shape).double()
        t = xd / s + (zp if qp.zero_point is not None and qp.zero_point.is_floating_point() else 0.0)
        lo, hi = kind.qmin, kind.qmax
        if qp.zero_point is not None and not qp.zero_point.is_floating_point():
            lo, hi = lo - zp, hi - zp
        return s / 2, (t >= lo) & (t <= hi) & (s > 0)
    fmt = kind.fmt if kind.family == "fp" else kind.fmt.fmt
    t = (xd / s).abs()
    e = torch.floor(torch.log2(t.clamp_min(1e-300))).clamp_min(fmt.emin)
    step = torch.exp2(e - fmt.mbits) * s
    return step / 2, (t <= fmt.max_value) & (s > 0)


@pytest.mark.parametrize("name", ["int8_tensor", "uint8_channel", "int4_group", "uint4_group_fzp", "fp8_e4m3",
                                  "fp8_e5m2_channel", "fp6_e3m2_group", "fp4_group_pof2", "amdfp4", "mxfp4",
                                  "mxfp8_e5m2_floor"])
@SETTINGS
@given(x=tensors())
def test_error_within_half_a_step_inside_the_range(name, x):
    spec = FORMATS[name]
    qp = compute_qparams(x, spec)
    y = fake_quantize(x, spec, qp).double()
    bound, inside = _half_step_bound(x, spec, qp)
    err = (y - x.double()).abs()
    slack = 1e-6 * x.double().abs() + 1e-300  # the float32 products x / s and q * s
    assert bool(((err <= bound * (1 + 1e-6) + slack) | ~inside).all())
    assert int(inside.sum()) > 0 or bool((qp.scale == 0).all())


@pytest.mark.parametrize("name", FORMATS)
@SETTINGS
@given(x=tensors(), where=st.tuples(st.integers(0, 2), st.integers(0, K - 1)))
def test_nan_in_nan_out(name, x, where):
    spec = FORMATS[name]
    r, c = where[0] % x.shape[0], where[1]
    qp = compute_qparams(x, spec)
    x = x.clone()
    x[r, c] = math.nan
    y_static = fake_quantize(x, spec, qp)
    y_dynamic = fake_quantize(x, spec)
    # bfp16 follows the reference (FORMATS.md 2a.5): NaN counts as 0
    expected = 0.0 if name == "bfp16" else math.nan
    for y in (y_static, y_dynamic):
        assert math.isnan(y[r, c].item()) if math.isnan(expected) else y[r, c].item() == expected
    assert not torch.isinf(y_dynamic).any() and not torch.isinf(y_static).any()


def test_ue5m3_scale_rounding_never_zero_for_normal_groups():
    x = torch.full((1, 16), 1e-3)
    qp = compute_qparams(x, FORMATS["amdfp4"])
    assert qp.scale.item() == float(torch.tensor(1e-3 / 6)) or qp.scale.item() > 0
    assert qp.scale.item() == round(1e-3 / 6 / 2**-17) * 2**-17  # a subnormal of ue5m3
    assert UE5M3.min_subnormal == 2**-17
