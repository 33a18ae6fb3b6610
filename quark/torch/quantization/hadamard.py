"""Hadamard matrices of (almost) any order, and a fast orthogonal transform built from them.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``; ``H / sqrt(n)`` is
orthogonal and spreads every coordinate evenly over all others, which is what rotation-based
quantization wants (QuaRot, arXiv:2404.00456). Orders other than 1 and 2 must be multiples of 4.

Constructions (no tables):

- **Sylvester**: ``H_2k = [[H_k, H_k], [H_k, -H_k]]``, i.e. powers of two;
- **Paley I**: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``;
- **Paley II**: order ``2 (q + 1)`` for a prime power ``q ≡ 1 (mod 4)``;
- **Kronecker products** ``H_a ⊗ H_b`` of the above.

Paley needs the quadratic character of GF(q); for prime powers ``q = p^k`` (k > 1) the field is
built as polynomials over GF(p) modulo an irreducible polynomial of degree k. An order is written
``n = m · 2^j`` with the smallest *core* ``m`` that one of the constructions reaches (e.g.
576 = 36 · 16 with Paley II, q = 17; 1536 = 12 · 128 with Paley I, q = 11). Orders that none of
them reaches (the smallest are 92, 116, 156, 172, 184, 188 ...) raise a ``ValueError`` naming the
order; known Hadamard matrices of those orders come from other constructions (Williamson ...)
that are not implemented here.

:class:`HadamardTransform` applies ``x @ Q`` with ``Q = D (H_m ⊗ H_2^j) / sqrt(n)`` (``D`` an
optional random ±1 diagonal) without forming the n×n matrix: the last dimension is viewed as a
grid of small factors and each factor is applied along its own axis, so the cost per element is
the sum of the factor sizes instead of n.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

#: largest power-of-two factor applied as one dense matmul; bigger ones are split (Sylvester is a
#: Kronecker product of smaller Sylvester matrices)
_MAX_FACTOR = 128


# -- finite fields ---------------------------------------------------------------------------------
def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k`` and p prime, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """``a mod f`` over GF(p); polynomials are coefficient lists, lowest degree first, f monic."""
    a = list(a)
    k = len(f) - 1
    for i in range(len(a) - 1, k - 1, -1):
        c = a[i]
        if c:
            for j in range(k + 1):
                a[i - k + j] = (a[i - k + j] - c * f[j]) % p
    return (a + [0] * k)[:k]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (trial division)."""
    def monic(deg: int) -> list[list[int]]:
        out = []
        for code in range(p**deg):
            coeffs = [(code // p**i) % p for i in range(deg)]
            out.append(coeffs + [1])
        return out

    divisors = [g for d in range(1, k // 2 + 1) for g in monic(d)]
    for f in monic(k):
        if all(any(_poly_mod(f, g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


@functools.lru_cache(maxsize=32)
def _jacobsthal(q: int) -> torch.Tensor:
    """The Jacobsthal matrix ``Q[a, b] = χ(a - b)`` of GF(q) (χ: quadratic character), int64.

    Elements are indexed by their coefficients over GF(p) read as base-p digits.
    """
    pk = _prime_power(q)
    assert pk is not None and pk[0] != 2, q
    p, k = pk
    f = _irreducible(p, k) if k > 1 else [0, 1]
    digits = [[(e // p**i) % p for i in range(k)] for e in range(q)]

    def square(a: list[int]) -> list[int]:
        prod = [0] * (2 * k - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(a):
                prod[i + j] = (prod[i + j] + x * y) % p
        return _poly_mod(prod, f, p)

    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    for e in range(1, q):
        s = square(digits[e])
        chi[sum(c * p**i for i, c in enumerate(s))] = 1
    d = torch.tensor(digits, dtype=torch.int64)  # (q, k)
    diff = (d[:, None, :] - d[None, :, :]) % p  # digits of a - b
    index = (diff * torch.tensor([p**i for i in range(k)], dtype=torch.int64)).sum(-1)
    return chi[index]


# -- constructions ---------------------------------------------------------------------------------
def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q ≡ 3 (mod 4): ``I + [[0, 1ᵀ], [-1, Q]]`` (Q is antisymmetric)."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = -1
    c[1:, 1:] = _jacobsthal(q)
    return c + torch.eye(n, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1), q ≡ 1 (mod 4): in the symmetric conference matrix ``[[0, 1ᵀ], [1, Q]]``
    replace 0 by ``[[1, -1], [-1, -1]]`` and ±1 by ``±[[1, 1], [1, -1]]``."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    one = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    return torch.kron(c, one) + torch.kron(torch.eye(n, dtype=torch.int64), zero)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int64)
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@functools.cache
def _recipe(m: int) -> tuple | None:
    """How to build a Hadamard matrix of order ``m`` with Paley, Sylvester and Kronecker products:
    ``("sylvester", m)``, ``("paley1", q)``, ``("paley2", q)``, ``("kron", a, b)`` or None."""
    if _is_pow2(m):
        return ("sylvester", m)
    if m % 4:
        return None
    pk = _prime_power(m - 1)
    if pk and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    pk = _prime_power(m // 2 - 1)
    if pk and (m // 2 - 1) % 4 == 1:
        return ("paley2", m // 2 - 1)
    for a in range(2, math.isqrt(m) + 1):
        if m % a == 0 and _recipe(a) and _recipe(m // a):
            return ("kron", a, m // a)
    return None


def _build(recipe: tuple) -> torch.Tensor:
    kind = recipe[0]
    if kind == "sylvester":
        return _sylvester(recipe[1])
    if kind == "paley1":
        return _paley1(recipe[1])
    if kind == "paley2":
        return _paley2(recipe[1])
    return torch.kron(_build(_recipe(recipe[1])), _build(_recipe(recipe[2])))


def describe(recipe: tuple) -> str:
    """A readable name of a construction, e.g. ``'Paley II (q=17)'``."""
    kind = recipe[0]
    if kind == "sylvester":
        return f"Sylvester ({recipe[1]})"
    if kind == "kron":
        return f"{describe(_recipe(recipe[1]))} ⊗ {describe(_recipe(recipe[2]))}"
    return f"Paley {'I' if kind == 'paley1' else 'II'} (q={recipe[1]})"


def factorization(n: int) -> tuple[int, int]:
    """``(m, 2^j)`` with ``n = m · 2^j`` and ``m`` the smallest constructible core (1 for powers of
    two). Raises ``ValueError`` naming ``n`` when no construction reaches it."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got {n!r}")
    pow2 = n & -n
    m, p = n // pow2, pow2
    while p >= 1:
        if _recipe(m):
            return m, p
        m, p = m * 2, p // 2
    if n > 2 and n % 4:
        why = "orders other than 1 and 2 must be multiples of 4"
    else:
        why = "no Sylvester / Paley I / Paley II / Kronecker construction reaches it"
    raise ValueError(f"no Hadamard matrix of order {n}: {why}")


def construction(n: int) -> str:
    """How order ``n`` is built, e.g. ``construction(576) == 'Paley II (q=17) ⊗ Sylvester (16)'``."""
    m, p = factorization(n)
    if m == 1:
        return describe(("sylvester", p))
    core = describe(_recipe(m))
    return core if p == 1 else f"{core} ⊗ Sylvester ({p})"


def is_constructible(n: int) -> bool:
    try:
        factorization(n)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _factor(m: int) -> torch.Tensor:
    return _build(_recipe(m))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.int64, device: torch.device | str | None = None) -> torch.Tensor:
    """A Hadamard matrix of order ``n``: entries ±1, ``H @ H.T == n * I`` exactly (not normalised)."""
    factors = _kron_factors(n)
    h = factors[0].clone()  # the factors are cached: never hand one out
    for f in factors[1:]:
        h = torch.kron(h, f)
    return h.to(dtype=dtype, device=device)


def _kron_factors(n: int) -> list[torch.Tensor]:
    """Small int64 matrices whose Kronecker product (in order) is :func:`hadamard_matrix` (n): the
    core, then the power of two split into near-equal Sylvester pieces of at most
    ``_MAX_FACTOR`` (one piece when the whole order is that small)."""
    m, p = factorization(n)
    if n <= _MAX_FACTOR:
        return [_factor(m) if p == 1 else torch.kron(_factor(m), _factor(p))]
    bits = p.bit_length() - 1
    pieces = -(-bits // (_MAX_FACTOR.bit_length() - 1))  # ceil
    sizes = [2 ** (bits // pieces + (i < bits % pieces)) for i in range(pieces)]
    return ([_factor(m)] if m > 1 else []) + [_factor(s) for s in sizes]


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded random ±1 vector of length n (the diagonal of ``D`` in ``D H``)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(dtype)


# -- the transform ---------------------------------------------------------------------------------
class HadamardTransform(nn.Module):
    """``x -> x @ Q`` along the last dimension, ``Q = diag(signs) H / sqrt(n)`` orthogonal.

    ``H`` is held as its small Kronecker factors (±1, exact in any dtype); ``signs`` (random ±1,
    optional) is a buffer too, so the module follows ``.to(device)``. Buffers are not persistent:
    the transform is rebuilt from its order, never loaded.
    """

    def __init__(self, n: int, signs: torch.Tensor | None = None) -> None:
        super().__init__()
        self.n = n
        factors = _kron_factors(n)
        self.sizes = [f.shape[0] for f in factors]
        for i, f in enumerate(factors):
            self.register_buffer(f"factor{i}", f.to(torch.float32), persistent=False)
        if signs is not None and signs.shape != (n,):
            raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
        self.register_buffer("signs", None if signs is None else signs.to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"Hadamard transform of order {self.n} got a last dimension of {x.shape[-1]}")
        # half / bfloat16 inputs are transformed in float32 (the sums would lose bits otherwise)
        compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        y = x.to(compute)
        if self.signs is not None:
            y = y * self.signs.to(y.device, compute)
        lead = y.shape[:-1]
        y = y.reshape(*lead, *self.sizes)
        axes = len(self.sizes)
        # x @ (A ⊗ B ⊗ ...) == contracting each grid axis with its factor's first index
        for i in range(axes):
            f = getattr(self, f"factor{i}").to(y.device, compute)
            axis = len(lead) + i
            y = (y.movedim(axis, -1) @ f).movedim(-1, axis)
        y = y.reshape(*lead, self.n) * (1.0 / math.sqrt(self.n))
        return y.to(x.dtype)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense orthogonal ``Q`` (for tests and small sizes)."""
        return self(torch.eye(self.n, dtype=torch.float64, device=self.factor0.device)).to(dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, factors={self.sizes}, random={self.signs is not None}"


class MeanPreservingTransform(nn.Module):
    """``x -> x Q G``: a :class:`HadamardTransform` ``Q`` followed by the Householder reflection ``G``
    that sends ``u Q`` back to ``u``, the unit all-ones direction ``u = 1 / sqrt(n)``.

    The product is orthogonal and maps ``u`` to itself, hence also the mean-zero subspace ``u⊥`` to
    itself: a residual stream whose vectors have zero mean keeps zero mean after the rotation, which
    is what lets a LayerNorm (mean subtraction) commute with it (see :mod:`quark.torch.algorithm.rotation`).
    ``G = I - 2 w wᵀ / wᵀw`` with ``w = u Q - u`` is a rank-one change of the identity, so the
    transform stays fast. With random signs in ``Q`` (``D H / sqrt(n)``), ``u Q`` has spread-out
    entries and ``Q G`` stays nearly as flat as ``Q`` (largest entry about ``3-4 / sqrt(n)`` for
    n = 64 ... 1536); without them ``u Q`` is concentrated (``H 1`` is one row's worth) and a few
    entries grow to ``sqrt(n) / 2`` times a Hadamard entry, so callers should pass a transform with
    signs.
    """

    def __init__(self, base: HadamardTransform) -> None:
        super().__init__()
        self.base = base
        self.n = base.n
        u = torch.full((1, base.n), base.n ** -0.5, dtype=torch.float64, device=base.factor0.device)
        w = (base(u) - u)[0]
        # u Q == u already: G is the identity
        self.register_buffer("w", w if w.norm() > 1e-9 else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.w is None:
            return y
        compute = y.dtype if y.dtype in (torch.float32, torch.float64) else torch.float32
        w = self.w.to(y.device, compute)
        z = y.to(compute)
        z = z - (z @ w).mul_(2.0 / float(w @ w)).unsqueeze(-1) * w
        return z.to(x.dtype)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense orthogonal ``Q G`` (for tests and small sizes)."""
        return self(torch.eye(self.n, dtype=torch.float64, device=self.base.factor0.device)).to(dtype)

    def extra_repr(self) -> str:
        return "keeps the all-ones direction"
