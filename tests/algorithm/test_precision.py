"""Reduced precision of searches and cross terms (quark.torch.algorithm.precision)."""

import pytest
import torch

from quark.torch.algorithm import precision
from quark.torch.algorithm.hessian_solver import Gram
from quark.torch.algorithm.scaling import ScaleEvaluator, Site, SiteData
from quark.torch.quantization.config.algo_configs import (
    AutoSmoothQuantConfig,
    AWQConfig,
    GPTAQConfig,
    QronosConfig,
    ScalingPair,
)
from quark.torch.quantization.config.config import QLayerConfig, Uint4PerGroupSpec
from quark.torch.quantization.modules import QuantLinear
from quark.torch.utils.linear import linear


@pytest.mark.parametrize("config,field", [(AWQConfig, "search_dtype"), (AutoSmoothQuantConfig, "search_dtype"),
                                          (GPTAQConfig, "cross_term_dtype"), (QronosConfig, "cross_term_dtype")])
def test_configs_reject_an_unknown_dtype(config, field):
    # searches only rank candidates: bfloat16 where it is native; cross terms: float32 unless asked
    assert getattr(config(), field) == ("auto" if field == "search_dtype" else "float32")
    with pytest.raises(ValueError, match=rf"{config.__name__}\.{field}='float16'; allowed: 'auto', 'float32', 'bfloat16'"):
        config(**{field: "float16"})


def test_resolve(monkeypatch):
    assert precision.resolve("float32", "cpu", torch.float32) is None
    assert precision.resolve("bfloat16", "cpu", torch.float32) is torch.bfloat16
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert precision.resolve("auto", "cpu", torch.float32) is torch.bfloat16
    assert precision.resolve("auto", "cpu", torch.float16) is None  # never float16 -> bfloat16
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert precision.resolve("auto", "cpu", torch.float32) is None  # bfloat16 would be emulated
    assert precision.resolve("auto", "meta", torch.float32) is None
    with pytest.raises(ValueError, match="allowed"):
        precision.resolve("half", "cpu", torch.float32)


def test_linear_follows_autocast():
    x, w = torch.randn(64, 256), torch.randn(512, 256)  # big enough for the oneDNN float32 path
    assert linear(x, w).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (x.bfloat16().double() @ w.bfloat16().double().T).bfloat16(), rtol=2 ** -7, atol=1e-4)


def test_bfloat16_cross_term_rounds_inputs_and_products_only():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3000, 96, generator=g), torch.randn(3000, 80, generator=g)
    exact, reduced = Gram(), Gram(torch.bfloat16)
    for lo in range(0, 3000, 500):  # gathered until 2048 tokens: products of rows 0-1999 and 2000-2999
        exact.add_batch(a[lo:lo + 500], b[lo:lo + 500])
        reduced.add_batch(a[lo:lo + 500], b[lo:lo + 500])
    ab, bb = a.bfloat16().double(), b.bfloat16().double()
    p1, p2 = ab[:2000].T @ bb[:2000], ab[2000:].T @ bb[2000:]
    # each flushed product is rounded once to bfloat16's 8 significant bits (at most 2^-8 of it)
    err = (reduced.value.double() - (p1 + p2) * 2 / 3000).abs()
    bound = (p1.abs() + p2.abs()) * 2 / 3000 * 2 ** -8
    assert (err <= bound * 1.001 + 1e-7).all()
    assert (err > bound / 4).any()  # and not more precisely: the products did round
    assert not torch.equal(reduced.value, exact.value)
    rel = ((reduced.value - exact.value).norm() / exact.value.norm()).item()
    assert rel < 4e-3


def _site() -> tuple[Site, SiteData, dict]:
    torch.manual_seed(0)
    layer = QuantLinear(256, 384, False, QLayerConfig(weight=Uint4PerGroupSpec(group_size=64).to_quantization_spec()))
    torch.nn.init.normal_(layer.weight, std=0.05)
    x = torch.randn(2048, 256) * torch.linspace(0.2, 4.0, 256)
    site = Site(ScalingPair(prev_op="norm", layers=["fc"]), prev=torch.nn.Identity(), layers={"fc": layer}, inspect=None)
    return site, SiteData(), {"fc": x}


def test_bfloat16_search_ranks_candidates_like_float32():
    site, data, samples = _site()
    absmean = samples["fc"].abs().mean(0)
    candidates = [absmean.pow(i / 10) / absmean.pow(i / 10).mean() for i in range(10)]
    with ScaleEvaluator(site, data, samples, search_dtype="float32") as ev:
        exact = [ev(s) for s in candidates]
    with ScaleEvaluator(site, data, samples, search_dtype="bfloat16") as ev:
        assert ev.autocast is torch.bfloat16
        reduced = [ev(s) for s in candidates]
    assert reduced != exact  # the candidates did run in bfloat16
    for e, r in zip(exact, reduced):
        assert r == pytest.approx(e, rel=0.01)
    assert min(range(10), key=reduced.__getitem__) == min(range(10), key=exact.__getitem__)
    assert site.layers["fc"].weight.dtype == torch.float32
