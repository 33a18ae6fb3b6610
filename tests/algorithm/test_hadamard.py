"""Hadamard matrices: exact orthogonality for every constructible order, the constructions used,
clear errors, and the fast Kronecker-factored transform against the dense matrix."""

import math

import pytest
import torch

from quark.torch.quantization.hadamard import (
    HadamardTransform,
    _jacobsthal,
    construction,
    factorization,
    hadamard_matrix,
    is_constructible,
    random_signs,
)

#: multiples of 4 up to 256 that no Sylvester / Paley / Kronecker construction reaches (Hadamard
#: matrices of these orders exist, from Williamson-type and other constructions)
UNREACHED_UP_TO_256 = [92, 116, 156, 172, 184, 188, 232, 236]
ORDERS = [n for n in range(1, 257) if is_constructible(n)] + [576, 1536]


def test_constructible_orders_up_to_256():
    assert [n for n in range(4, 257, 4) if not is_constructible(n)] == UNREACHED_UP_TO_256
    assert [n for n in range(1, 257) if n % 4 and is_constructible(n)] == [1, 2]


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_is_exact(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.int64 and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    hf = h.double()  # float64 products of ±1 are exact at these sizes (and fast, unlike int64 matmul)
    assert torch.equal(hf @ hf.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize(
    ("n", "how"),
    [
        (1, "Sylvester (1)"),
        (64, "Sylvester (64)"),
        (12, "Paley I (q=11)"),
        (28, "Paley I (q=27)"),  # GF(27) = GF(3)[x] / (irreducible cubic)
        (36, "Paley II (q=17)"),
        (52, "Paley II (q=25)"),  # GF(25)
        (48, "Paley I (q=11) ⊗ Sylvester (4)"),
        (576, "Paley II (q=17) ⊗ Sylvester (16)"),  # SmolLM2 hidden size (576 = 36 * 16; no order-9 matrix exists)
        (1536, "Paley I (q=11) ⊗ Sylvester (128)"),  # SmolLM2 intermediate size
        (11008, "Paley I (q=343) ⊗ Sylvester (32)"),  # Llama-2-7B intermediate size, GF(7^3)
        (14336, "Paley I (q=27) ⊗ Sylvester (512)"),
    ],
)
def test_constructions(n, how):
    assert construction(n) == how
    m, p = factorization(n)
    assert m * p == n and p & (p - 1) == 0


@pytest.mark.parametrize("q", [3, 5, 7, 9, 11, 13, 25, 27, 49, 81, 121, 125])
def test_jacobsthal_matrix(q):
    """Q has zero diagonal, ±1 elsewhere, rows summing to 0 and Q Qᵀ = q I - J: the quadratic
    character of GF(q), prime or prime power, is right."""
    jac = _jacobsthal(q)
    eye, ones = torch.eye(q, dtype=torch.int64), torch.ones(q, q, dtype=torch.int64)
    assert torch.equal(jac.diagonal(), torch.zeros(q, dtype=torch.int64))
    assert torch.equal(jac.abs() + eye, ones)
    assert torch.equal(jac.sum(1), torch.zeros(q, dtype=torch.int64))
    assert torch.equal(jac @ jac.T, q * eye - ones)
    assert torch.equal(jac.T, jac if q % 4 == 1 else -jac)


@pytest.mark.parametrize(("n", "words"), [(3, "multiples of 4"), (6, "multiples of 4"), (10, "multiples of 4"),
                                          (92, "no Sylvester"), (172, "no Sylvester")])
def test_impossible_orders_raise(n, words):
    with pytest.raises(ValueError, match=rf"order {n}:.*{words}"):
        hadamard_matrix(n)
    with pytest.raises(ValueError, match=f"order {n}"):
        HadamardTransform(n)


def test_bad_order_type():
    with pytest.raises(ValueError, match="positive integer"):
        factorization(0)


@pytest.mark.parametrize("n", [1, 2, 12, 48, 128, 256, 576, 1536])
@pytest.mark.parametrize("random", [False, True])
def test_transform_matches_dense(n, random):
    signs = random_signs(n, seed=3) if random else None
    t = HadamardTransform(n, signs)
    q = t.matrix()
    dense = hadamard_matrix(n, torch.float64) / math.sqrt(n)
    if random:
        dense = signs.double()[:, None] * dense
    torch.testing.assert_close(q, dense, rtol=0, atol=1e-14)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(t(x), x @ dense, rtol=0, atol=1e-12)


def test_transform_large_orders_are_factored():
    assert HadamardTransform(1536).sizes == [12, 128]
    assert HadamardTransform(4096).sizes == [64, 64]
    assert HadamardTransform(576).sizes == [36, 16]
    assert HadamardTransform(48).sizes == [48]


def test_transform_dtypes_and_shape_check():
    t = HadamardTransform(48)
    x = torch.randn(4, 48)
    y32 = t(x)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.norm(dim=-1), x.norm(dim=-1))  # orthogonal
    y16 = t(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="order 48 got a last dimension of 12"):
        t(torch.randn(2, 12))


def test_random_signs_are_seeded():
    a, b, c = random_signs(64, 0), random_signs(64, 0), random_signs(64, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) == {-1.0, 1.0}


def test_returned_matrix_is_a_copy():
    h = hadamard_matrix(12)
    h.zero_()
    assert torch.equal(hadamard_matrix(12).abs(), torch.ones(12, 12, dtype=torch.int64))


@pytest.mark.parametrize("n", [12, 48, 64, 576, 1536])
def test_the_mean_preserving_transform_is_orthogonal_keeps_the_ones_direction_and_stays_flat(n):
    """``Q G`` (Hadamard with random signs, then the Householder reflection sending ``u Q`` back to
    ``u``): orthogonal, ``u (Q G) = u``, and its entries stay within 4 / sqrt(n) (measured 2.5-3.9)."""
    from quark.torch.quantization.hadamard import MeanPreservingTransform

    base = HadamardTransform(n, random_signs(n, 0))
    t = MeanPreservingTransform(base)
    m = t.matrix()
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(m @ m.T, eye, atol=1e-12)
    u = torch.full((n,), n ** -0.5, dtype=torch.float64)
    assert torch.allclose(u @ m, u, atol=1e-12) and torch.allclose(m @ u, u, atol=1e-12)
    assert not torch.allclose(u @ base.matrix(), u, atol=1e-3)  # the Hadamard alone moves u
    assert m.abs().max() * n**0.5 < 4.0
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(t(x), x @ m, atol=1e-12)
    assert t(x.float()).dtype == torch.float32
