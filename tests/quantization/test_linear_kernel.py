"""quark.torch.utils.linear: the oneDNN float32 kernel where it applies, F.linear everywhere else."""

import pytest
import torch
import torch.nn.functional as F

from quark.torch.utils import linear as lin

needs_onednn = pytest.mark.skipif(not lin._ONEDNN, reason="this torch build has no oneDNN linear")


def _reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@needs_onednn
@pytest.mark.parametrize("layout", ["2d", "3d", "transposed input", "transposed weight"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_large_products_use_onednn_and_match_float64(layout, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, 576, generator=g)
    w = torch.randn(1200, 576, generator=g)
    b = torch.randn(1200, generator=g) if with_bias else None
    if layout == "2d":
        x = x.reshape(-1, 576)
    elif layout == "transposed input":
        x = x.transpose(0, 1)
    elif layout == "transposed weight":
        w = w.T.contiguous().T
    assert lin._onednn_applies(x, w, b)
    y = lin.linear(x, w, b)
    ref = _reference(x, w, b)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_strided_weight_rows_stay_on_f_linear():
    """oneDNN's path for a weight whose rows are strided (``w[::2]``) takes seconds."""
    x, w = torch.randn(1200, 576), torch.randn(2400, 576)[::2]
    assert not lin._onednn_applies(x, w, None)
    assert torch.equal(lin.linear(x, w), F.linear(x, w))


def test_strided_bias_stays_on_f_linear():
    """oneDNN reads a strided bias (``b[::2]``) as a contiguous one: the outputs would be wrong."""
    x, w, b = torch.randn(1200, 576), torch.randn(1200, 576), torch.randn(2400)[::2]
    assert not lin._onednn_applies(x, w, b)
    assert torch.equal(lin.linear(x, w, b), F.linear(x, w, b))


def test_small_products_and_other_dtypes_are_f_linear_exactly():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(8, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    assert not lin._onednn_applies(x, w, b)  # 16k multiply-adds: under MIN_MACS
    assert torch.equal(lin.linear(x, w, b), F.linear(x, w, b))
    xb, wb = torch.randn(64, 2048, generator=g).bfloat16(), torch.randn(2048, 2048, generator=g).bfloat16()
    assert not lin._onednn_applies(xb, wb, None)
    assert torch.equal(lin.linear(xb, wb), F.linear(xb, wb))


def test_gradients_fall_back_to_f_linear():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 576, generator=g)
    w = torch.randn(1200, 576, generator=g, requires_grad=True)
    assert not lin._onednn_applies(x, w, None)
    y = lin.linear(x, w)
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(1200, 576), rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # no gradient wanted: the fast path is allowed again
        assert lin._onednn_applies(x, w, None) == lin._ONEDNN


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("false", False), ("1", True)])
def test_environment_switch(monkeypatch, value, on):
    monkeypatch.setenv("QUARK_ONEDNN_LINEAR", value)
    assert lin._available() == (on and torch.backends.mkldnn.is_available())
