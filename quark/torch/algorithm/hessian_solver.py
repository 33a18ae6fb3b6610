"""The GPTQ solver, shared by GPTQ, GPTAQ and Qronos: model-agnostic linear algebra on one weight.

Nothing here knows about blocks or modules. It provides

* :class:`Gram`: running ``2/N * sum_t a_t^T b_t`` over calibration tokens (the Hessian
  ``H = 2 X^T X`` of the layer-wise loss when ``a = b = X``, or a cross term of two streams);
* :func:`damp` and :func:`inverse_cholesky`: the damped Hessian and the upper Cholesky factor ``U``
  of its inverse (``H^-1 = U^T U``), the only form of ``H^-1`` the column updates need;
* :class:`ColumnQuantizer`: a weight's quantization grid (any format ``tensor_quantize`` knows),
  applied one input column at a time with the qparams fixed per group;
* :func:`solve`: the column loop with lazy batch updates (Frantar et al. 2022, Algorithm 1), with an
  optional extra term for GPTAQ;
* :func:`quantize_weight`: damping, act-order permutation, solve, un-permute.

Weights are ``[rows, n]`` (output x input features); "columns" are input features. The solver
works in float32; ``H^-1`` falls back to float64 when the float32 factorisation fails.

Groups and qparams. Element ``(r, c)`` of a weight is quantized with the qparams of its group, so
quantizing one column is a per-row fake-quantization with that column's group qparams. A grouped
single-stage format (int/uint per group, MX, AMD fp4, MX6/MX9/BFP16 blocks) computes a group's
qparams (min-max) when the solver first reaches one of its columns, from the group's current values
(after the updates of every column quantized before); with ``static_groups`` (and for every format
whose qparams span a whole row or tensor: per-channel, per-tensor, two-stage) all qparams are
computed up front from the original weight. With act-order the groups stay the natural contiguous
ones (the storage format has no group index), whatever the processing order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quark.torch.quantization.config.type import Dtype, QSchemeType, ScaleType
from quark.torch.quantization.numerics import shared_exponent as nse
from quark.torch.quantization.numerics.mx import MX_BLOCK_SIZE
from quark.torch.quantization.tensor_quantize import (
    QParams,
    compute_qparams,
    fake_quantize,
    row_fake_quantizer,
)

#: processing-order column indices -> their current values ``[rows, len]``
Current = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def _gather_columns(src: torch.Tensor, columns: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``src[:, columns]`` of a 2-D ``src``: ``torch.gather`` with the index broadcast over the rows
    (a stride-0 view, nothing materialised): on the CPU about 2x faster than ``index_select`` and 4x
    faster than advanced indexing at these shapes (bench/solver_kernels.py)."""
    return torch.gather(src, 1, columns.expand(src.shape[0], -1), out=out)


def _put(dst: torch.Tensor, src: torch.Tensor, columns: torch.Tensor | None) -> None:
    """``dst = src[:, columns]`` (all columns when None), into ``dst``'s memory."""
    if columns is None:
        dst.copy_(src)
    elif src.dtype == dst.dtype:
        _gather_columns(src, columns, out=dst)
    else:
        dst.copy_(_gather_columns(src, columns))


class Gram:
    """Running ``2/N sum_t a_t^T b_t`` over the ``N`` tokens seen so far (float32).

    ``add_batch(x)`` accumulates the Hessian ``2/N X^T X``; ``add_batch(a, b)`` a cross term such
    as GPTAQ's ``(X - X~)^T X~``. Every Gram uses the same normalisation, so ratios of them (the
    solver only uses ``H^-1`` times a cross term) do not depend on ``N``.
    """

    #: batches are gathered (copied into one reused buffer) until this many tokens, then
    #: accumulated with one matrix product: a [features, 512] x [512, features] product runs at
    #: about half the speed of a 2048-token one on CPU BLAS for features ~ 500
    FLUSH_TOKENS = 2048

    def __init__(self, compute_dtype: torch.dtype | None = None, upper: bool = False) -> None:
        #: dtype of the products (None: float32). The sum is float32 either way; bfloat16 rounds the
        #: inputs and each flushed product to 8 significant bits (relative error up to 2^-8), which is
        #: fine for a cross term that only corrects (GPTAQ's D, Qronos's drift term) but not for a
        #: Hessian, whose Cholesky factorisation needs it positive definite
        self.compute_dtype = compute_dtype
        #: only the upper triangle (diagonal included) of a square cross term is wanted: it is
        #: accumulated by row panels as a Hessian is, and :attr:`value` is zero below the diagonal
        self.upper = upper
        self._value: torch.Tensor | None = None
        self.tokens = 0
        self._a: torch.Tensor | None = None  # the gathering buffers [FLUSH_TOKENS, features]
        self._b: torch.Tensor | None = None  # (cross terms only)
        self._fill = 0
        self._lower_stale = False  # panels accumulated into the upper triangle only, not mirrored yet

    @property
    def value(self) -> torch.Tensor | None:
        self._flush()
        if self.upper and self._value is not None:
            self._value.triu_()  # the diagonal panels also computed some entries below it
        self._mirror()
        self._a = self._b = None  # the buffers are only needed while batches arrive
        return self._value

    def take(self) -> torch.Tensor | None:
        """:attr:`value`, handed over: the accumulator lets go of it (a solver may then change it in
        place and free it when done, one n x n matrix less)."""
        value = self.value
        self._value = None
        return value

    def _mirror(self) -> None:
        """Copy the upper triangle onto the lower one (exactly: a Hessian must be symmetric)."""
        if self._lower_stale and not self.upper:
            upper = self._value.triu(1)
            self._value.triu_().add_(upper.T)
            self._lower_stale = False

    def add_batch(self, a: torch.Tensor, b: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> None:
        """Accumulate the tokens of ``a`` (and ``b``: a cross term), ``[..., features]``; ``columns``
        takes those features of both, in that order (a permutation: the Gram comes out permuted)."""
        a = a.reshape(-1, a.shape[-1])
        b = None if b is None else b.reshape(-1, b.shape[-1])
        if b is not None and a.shape[0] != b.shape[0]:
            raise ValueError(f"the two streams have {a.shape[0]} and {b.shape[0]} tokens")
        if columns is not None:
            columns = columns.to(a.device)
        m = a.shape[0]
        if m >= self.FLUSH_TOKENS:  # big enough on its own: no gathering
            self._flush()
            if columns is not None:
                a, b = _gather_columns(a, columns), None if b is None else _gather_columns(b, columns)
            self._accumulate(a.float(), None if b is None else b.float())
            return
        if self._fill + m > self.FLUSH_TOKENS:
            self._flush()
        if self._a is None:
            self._a = torch.empty(self.FLUSH_TOKENS, a.shape[1], dtype=torch.float32, device=a.device)
        rows = slice(self._fill, self._fill + m)
        _put(self._a[rows], a, columns)
        if b is not None or self._b is not None:
            if self._b is None:  # the first cross term: the earlier rows were symmetric ones
                self._b = torch.empty(self.FLUSH_TOKENS, (a if b is None else b).shape[1], dtype=torch.float32,
                                      device=a.device)
                if self._fill:
                    self._b[:self._fill].copy_(self._a[:self._fill])
            _put(self._b[rows], a if b is None else b, columns)
        self._fill += m

    def _flush(self) -> None:
        if self._fill:
            m, self._fill = self._fill, 0
            self._accumulate(self._a[:m], None if self._b is None else self._b[:m])

    #: a symmetric Gram (or an upper one) this wide or wider is accumulated as row panels of its
    #: upper triangle (the lower one of a symmetric Gram is mirrored once, when read)
    PANEL_MIN_FEATURES = 384
    #: panels are at least this many rows (at most 8 panels): thinner panels multiply less
    #: efficiently. Against 3 panels, a 576-wide Hessian in 0.89 of the time, a 1536-wide one in 0.90
    #: (2 threads, ``bench/solver_kernels.py``)
    PANEL_ROWS = 96

    def _panel_edges(self, n: int) -> list[int]:
        k = max(2, min(8, n // self.PANEL_ROWS))
        return [round(i * n / k) for i in range(k + 1)]

    def _accumulate(self, a: torch.Tensor, b: torch.Tensor | None) -> None:
        m, n = a.shape
        if self.upper and (b is None or b.shape[1] != n):
            raise ValueError(f"an upper Gram needs square cross terms, got widths {n} and "
                             f"{None if b is None else b.shape[1]}")
        if self._value is None:
            self._value = torch.zeros(n, n if b is None else b.shape[1], dtype=torch.float32, device=a.device)
        total = self.tokens + m
        value, alpha = self._value.mul_(self.tokens / total), 2.0 / total
        b_ = a if b is None else b
        reduced = self.compute_dtype is not None and self.compute_dtype != torch.float32
        if reduced:
            a, b_ = a.to(self.compute_dtype), b_.to(self.compute_dtype)
        if (b is None or self.upper) and n >= self.PANEL_MIN_FEATURES:
            edges = self._panel_edges(n)
            for lo, hi in zip(edges, edges[1:]):
                if reduced:
                    value[lo:hi, lo:].add_(torch.mm(a[:, lo:hi].T, b_[:, lo:]).float(), alpha=alpha)
                else:
                    value[lo:hi, lo:].addmm_(a[:, lo:hi].T, b_[:, lo:], alpha=alpha)
            self._lower_stale = b is None
        else:
            self._mirror()  # a full product updates both triangles: they must be complete first
            if reduced:
                value.add_(torch.mm(a.T, b_).float(), alpha=alpha)
            else:
                value.addmm_(a.T, b_, alpha=alpha)
        self.tokens = total


# ---------------------------------------------------------------------------------------------
# Hessian inverse
# ---------------------------------------------------------------------------------------------
def damp(H: torch.Tensor, percent: float, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``H + percent * mean(diag H) * I`` with dead inputs (zero diagonal: the feature was always 0)
    given a unit diagonal; returns the damped copy (``inplace``: ``H`` itself, changed) and the dead
    mask (their weights are irrelevant to the loss and get zeroed by :func:`quantize_weight`)."""
    H = H if inplace else H.clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(percent * diag.mean())
    return H, dead


def _lower_inverse(L: torch.Tensor, leaf: int = 256, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of the lower-triangular ``L`` by halves, ``[[A, 0], [C, B]]^-1 = [[A^-1, 0],
    [-B^-1 C A^-1, B^-1]]``: a third of the multiply-adds of a triangular solve against the identity,
    in matrix products. The halves are written into ``out`` (zeros, or a new matrix) in place: besides
    ``L`` and the result, one quarter-size product is alive at a time."""
    n = L.shape[0]
    if out is None:
        out = torch.zeros_like(L)
    if n <= leaf:
        out.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False))
        return out
    h = n // 2
    _lower_inverse(L[:h, :h], leaf, out[:h, :h])
    _lower_inverse(L[h:, h:], leaf, out[h:, h:])
    # products of contiguous copies: the same kernels, so the same bits, as on separate matrices
    C = out[h:, h:].contiguous() @ L[h:, :h]
    torch.mm(C, out[:h, :h].contiguous(), out=out[h:, :h]).neg_()
    return out


def inverse_cholesky(H: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Upper-triangular ``U`` with ``H^-1 = U^T U`` (float32; computed in float64 when float32
    Cholesky fails). Row ``j`` of ``U`` divided by ``U[j, j]`` is row ``j`` of the inverse Hessian of
    columns ``j..n-1`` after eliminating the earlier ones: the GPTQ update direction.

    One factorisation and one triangular inverse: with ``J`` the order reversal, the Cholesky factor
    ``L`` of ``J H J`` gives ``H = R R^T`` with ``R = J L J`` upper, so ``H^-1 = R^-T R^-1`` and
    ``U = R^-1 = J L^-1 J`` (the unique such factor with a positive diagonal). Half the work of
    factorising, inverting and factorising the inverse again, and closer to the float64 result.

    ``H`` given as a one-element list is taken over (the list is emptied): the caller then holds no
    reference to it and every intermediate is freed as soon as it is used, so at most three n x n
    matrices are alive (what bounds the memory of quantizing a wide layer: 0.8 GB each at 14336 inputs)."""
    if isinstance(H, list):
        H = H.pop()
    for dtype in (torch.float32, torch.float64):
        L, info = torch.linalg.cholesky_ex(H.to(dtype).flip(0, 1))
        if info.item() != 0:
            continue
        inverse = _lower_inverse(L)
        del L
        U = inverse.flip(0, 1)
        del inverse
        if torch.isfinite(U).all():
            return U.float()
    raise torch.linalg.LinAlgError(
        "the damped Hessian is not positive definite even in float64: raise damp_percent"
    )


#: triangular products below this size are plain matrix products (splitting does not pay)
TRIANGULAR_LEAF = 384


def strict_upper_abt(A: torch.Tensor, B: torch.Tensor, leaf: int = TRIANGULAR_LEAF) -> torch.Tensor:
    """``triu(A B^T, 1)`` for upper-triangular ``A`` and ``B`` (``n x n``), by halves: the
    below-diagonal block is never formed, and the diagonal blocks recurse. A third of the multiply-adds
    of the full product (1536 wide, with :func:`upper_mm`: 118 -> 52 ms, ``bench/solver_kernels.py``)."""
    n = A.shape[0]
    if n <= leaf:
        return torch.triu(A @ B.T, 1)
    h = n // 2
    out = torch.empty_like(A)
    out[h:, :h] = 0
    out[:h, :h] = strict_upper_abt(A[:h, :h], B[:h, :h], leaf)
    out[:h, :h].add_(torch.triu(A[:h, h:] @ B[:h, h:].T, 1))
    torch.mm(A[:h, h:], B[h:, h:].T, out=out[:h, h:])
    out[h:, h:] = strict_upper_abt(A[h:, h:], B[h:, h:], leaf)
    return out


def upper_mm(T: torch.Tensor, U: torch.Tensor, leaf: int = TRIANGULAR_LEAF) -> torch.Tensor:
    """``T U`` for upper-triangular ``T`` and ``U`` (an upper-triangular result), by halves: a third
    of the multiply-adds of the full product."""
    n = T.shape[0]
    if n <= leaf:
        return T @ U
    h = n // 2
    out = torch.empty_like(T)
    out[h:, :h] = 0
    out[:h, :h] = upper_mm(T[:h, :h], U[:h, :h], leaf)
    out[h:, h:] = upper_mm(T[h:, h:], U[h:, h:], leaf)
    torch.mm(T[:h, :h], U[:h, h:], out=out[:h, h:])
    out[:h, h:].addmm_(T[:h, h:], U[h:, h:])
    return out


# ---------------------------------------------------------------------------------------------
# quantizing one column with fixed per-group qparams
# ---------------------------------------------------------------------------------------------
def _stages(spec) -> list:
    return list(spec) if isinstance(spec, (list, tuple)) else [spec]


def _stage_group(stage, in_features: int) -> int:
    """Columns that share one qparam of this stage: the group, MX block, or the whole row."""
    qscheme = stage.qscheme
    is_mx = stage.dtype is Dtype.mx or stage.scale_type is ScaleType.float8_e8m0fnu
    if qscheme is QSchemeType.per_group or (is_mx and qscheme is None):
        return stage.group_size or MX_BLOCK_SIZE
    if qscheme is QSchemeType.per_channel and stage.ch_axis not in (0, None):
        raise NotImplementedError("GPTQ needs weight qparams per output row (ch_axis=0), per group or per tensor")
    return in_features


def _per_row(stage):
    """The same format with one qparam per row: what quantizing a single column needs."""
    return stage.with_changes(qscheme=QSchemeType.per_channel, ch_axis=0, group_size=None)


def _column_params(stage, qp: QParams, group: int, rows: int, width: int, in_features: int) -> QParams:
    """Per-row qparams ``[rows]`` of ``group`` from a stage's natural qparams."""

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if t.dim() == 0 or t.numel() == 1:
            return t.reshape(1).expand(rows)
        if width < in_features:  # per group: [rows, groups]
            return t.reshape(rows, -1)[:, group]
        return t.reshape(rows)

    return QParams(pick(qp.scale), pick(qp.zero_point))


def _cat_qparams(parts: list[QParams], dim: int) -> QParams:
    zps = [p.zero_point for p in parts]
    return QParams(
        torch.cat([p.scale for p in parts], dim),
        None if any(z is None for z in zps) else torch.cat(zps, dim),
    )


#: elements of the candidate weights :func:`search_clipped_qparams` evaluates at once (rows are chunked)
SEARCH_ELEMENTS = 1 << 20


def search_clipped_qparams(w: torch.Tensor, spec, importance: torch.Tensor, steps: int,
                           lowest: float) -> QParams:
    """Min-max qparams of ``s * w`` for ``s`` in ``1, ..., lowest`` (``steps + 1`` values), chosen per
    qparam element (per row and group) to minimise ``sum_j importance_j (Q(w) - w)^2`` over the
    elements it covers (the first ``s`` on ties): clipping the range trades the outliers' error for a
    finer grid on the rest. ``importance`` (``[n]``, e.g. ``diag H``) weights each input column by how
    much its error costs. One-stage specs only; the result is a valid set of natural qparams for
    ``spec``. Qparams per row or group are searched for every ``s`` at once (rows in chunks of about
    :data:`SEARCH_ELEMENTS` candidate elements)."""
    rows, n = w.shape
    best = compute_qparams(w, spec)
    k = best.scale.numel()
    if steps <= 0 or (k != 1 and k % rows):
        return best
    factors = [1.0 - i * (1.0 - lowest) / steps for i in range(steps + 1)]
    weights = importance[None, :]

    def losses(x: torch.Tensor, qp: QParams, per_row: int) -> torch.Tensor:
        """Per qparam element, the weighted error of quantizing ``x`` [r, n] with ``qp``."""
        err = (fake_quantize(x, spec, qp) - x).square_().mul_(weights)
        return err.sum().reshape(1) if per_row == 0 else err.reshape(x.shape[0] * per_row, -1).sum(-1)

    if k == 1:  # one qparam for the whole tensor: one candidate at a time
        best_loss = losses(w, best, 0)
        for f in factors[1:]:
            qp = compute_qparams(w * f, spec)
            cur = losses(w, qp, 0)
            if bool(cur < best_loss):
                best, best_loss = qp, cur
        return best
    per_row, S = k // rows, len(factors)
    scales_of = torch.tensor(factors, dtype=w.dtype, device=w.device)
    chunk = max(1, SEARCH_ELEMENTS // (S * n))
    scales, zero_points = [], []
    for r0 in range(0, rows, chunk):
        wc = w[r0:r0 + chunk]
        m = wc.shape[0]
        qp = compute_qparams((wc[None] * scales_of[:, None, None]).reshape(S * m, n), spec)  # [S * m, ...] natural
        pick = losses(wc.repeat(S, 1), qp, per_row).reshape(S, m * per_row).argmin(0)[None]  # first minimum
        scales.append(qp.scale.reshape(S, m * per_row).gather(0, pick).reshape(-1))
        if qp.zero_point is not None:
            zero_points.append(qp.zero_point.reshape(S, m * per_row).gather(0, pick).reshape(-1))
    return QParams(torch.cat(scales).reshape(best.scale.shape),
                   torch.cat(zero_points).reshape(best.zero_point.shape) if zero_points else None)


class ColumnQuantizer:
    """The quantization grid of a weight (or of several weights stacked along rows that share one
    Hessian, e.g. q/k/v), applied one column at a time.

    Args:
        spec: the layer's weight spec (a ``QTensorConfig`` or a two-stage list).
        weight: the original weight ``[rows, n]``, natural column order (stacked layers: concatenated).
        row_splits: rows of each stacked layer (tensor-wide qparams are per layer); None: one layer.
        static_groups: compute every group's qparams up front from ``weight``.
        importance: ``[n]`` column weights (``diag H``) for the clipping search; with ``clip_steps``
            > 0 every one-stage qparam is chosen by :func:`search_clipped_qparams` instead of min-max.

    ``__call__(col, values, current)`` fake-quantizes ``values`` (column ``col``, natural index);
    ``current(cols)`` gives the current values of natural columns not yet quantized (used when a
    group's qparams are computed). :meth:`qparams` returns each layer's natural qparams.
    """

    def __init__(self, spec, weight: torch.Tensor, row_splits: list[int] | None = None,
                 static_groups: bool = False, importance: torch.Tensor | None = None, clip_steps: int = 0,
                 clip_min: float = 0.6) -> None:
        rows, n = weight.shape
        self.spec = spec
        one_stage = not isinstance(spec, (list, tuple))
        self.clip = (importance.float(), clip_steps, clip_min) if importance is not None and clip_steps > 0 and one_stage else None
        self.splits = list(row_splits) if row_splits else [rows]
        if sum(self.splits) != rows:
            raise ValueError(f"row_splits {self.splits} do not add up to {rows} rows")
        self.rows, self.n = rows, n
        stages = _stages(spec)
        first = stages[0]
        if first.dtype in (Dtype.float16, Dtype.bfloat16):
            raise NotImplementedError(f"weight dtype {first.dtype.value} is a plain cast: nothing to solve for")
        shared = first.dtype.value in nse.SHARED_EXPONENT_FORMATS
        # shared-exponent steps live per micro-block and dtype=mx is always blocked: such formats
        # quantize a column inside a tile of its group; the others through a per-row spec
        self.tile = shared or first.dtype is Dtype.mx
        scale_quant = len(stages) == 2 and stages[1].is_scale_quant
        if shared:
            self.width = nse.shared_exponent_format(first.dtype).block_size
        else:
            self.width = min(_stage_group(s, n) for s in (stages[:1] if scale_quant else stages))
        if n % self.width:
            raise ValueError(f"group width {self.width} does not divide the {n} input features")
        # one-stage grouped formats take their qparams when reached; the rest up front
        self.dynamic = len(stages) == 1 and self.width < n and not static_groups
        self.stages = stages
        self.scale_quant = scale_quant
        # quantizing one column: a per-row version of the spec (or the spec itself, on a tile)
        if self.tile:
            self.column_spec = spec
        elif scale_quant:
            self.column_spec = _per_row(first)
        else:
            per_row = [_per_row(s) for s in stages]
            self.column_spec = per_row[0] if len(per_row) == 1 else per_row
        n_groups = n // self.width
        self._column_qp: list = [None] * n_groups  # per group: what fake_quantize needs per column
        self._group_qp: list[QParams | None] = [None] * n_groups  # dynamic: natural qparams of the group
        self._column_fn: list = [None] * n_groups  # per group: the prepared column fake-quantizer
        self._layer_qp: list | None = None  # up front: each layer's natural qparams
        if not self.dynamic:
            self._layer_qp = [self._qparams(w, slice(None)) for w in weight.float().split(self.splits, 0)]
            for g in range(n_groups):
                self._column_qp[g] = self._upfront_column(g)

    # -- qparams ---------------------------------------------------------------------------------
    def _qparams(self, w: torch.Tensor, cols: slice) -> QParams:
        """Natural qparams of ``w`` (natural columns ``cols``): min-max, or the clipping search."""
        if self.clip is None:
            return compute_qparams(w, self.spec)
        importance, steps, lowest = self.clip
        return search_clipped_qparams(w, self.spec, importance[cols].to(w.device), steps, lowest)

    def _upfront_column(self, g: int):
        if self.tile:  # natural qparams [rows, n / micro]: slice the group's part, stack rows
            parts = []
            for qp in self._layer_qp:
                per = qp.scale.shape[-1] // (self.n // self.width)
                parts.append(QParams(qp.scale[..., g * per:(g + 1) * per]))
            return _cat_qparams(parts, 0)
        per_layer = []
        for qp, rows in zip(self._layer_qp, self.splits):
            if self.scale_quant:  # element scale = stored group scale * global scale
                q1, q2 = qp
                col = _column_params(self.stages[0], q1, g, rows, self.width, self.n)
                per_layer.append([QParams(col.scale * q2.scale.float().reshape(()), col.zero_point)])
            else:
                widths = [_stage_group(s, self.n) for s in self.stages]
                qps = [qp] if len(self.stages) == 1 else qp
                per_layer.append([
                    _column_params(s, q, g * self.width // w if w < self.n else 0, rows, w, self.n)
                    for s, q, w in zip(self.stages, qps, widths)
                ])
        stacked = [_cat_qparams([layer[i] for layer in per_layer], 0) for i in range(len(per_layer[0]))]
        return stacked[0] if len(stacked) == 1 else stacked

    def _compute_group(self, g: int, current: Current) -> None:
        tile = current(torch.arange(g * self.width, (g + 1) * self.width))
        qp = self._qparams(tile, slice(g * self.width, (g + 1) * self.width))  # [rows, 1] (or [rows, block / micro])
        self._group_qp[g] = qp
        self._column_qp[g] = qp if self.tile else QParams(
            qp.scale.reshape(self.rows), None if qp.zero_point is None else qp.zero_point.reshape(self.rows)
        )

    def __call__(self, col: int, values: torch.Tensor, current: Current) -> torch.Tensor:
        g = col // self.width
        if self._column_qp[g] is None:
            self._compute_group(g, current)
        if self.tile:  # the group's layout (micro-blocks, MX blocks): quantize a tile of the column
            tile = values[:, None].expand(self.rows, self.width).contiguous()
            return fake_quantize(tile, self.spec, self._column_qp[g])[:, col - g * self.width]
        return self._group_fn(g)(values)

    def _group_fn(self, g: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The prepared fake-quantizer of one column of group ``g`` (its qparams computed)."""
        fn = self._column_fn[g]
        if fn is None:
            qp = self._column_qp[g]
            fn = row_fake_quantizer(self.column_spec, qp) if isinstance(qp, QParams) else None
            if fn is None:
                def fn(v: torch.Tensor, qp=qp) -> torch.Tensor:
                    return fake_quantize(v[:, None], self.column_spec, qp).reshape(-1)
            self._column_fn[g] = fn
        return fn

    def column_functions(self, order: list[int] | None = None) -> list[Callable[[torch.Tensor], torch.Tensor]] | None:
        """When every qparam is fixed up front (not a tile format): per processing position, the
        function quantizing that column's values, for the columns in ``order`` (natural indices;
        None: natural order). The solver then skips :meth:`__call__`'s dispatch on every column.
        None otherwise."""
        if self.dynamic or self.tile:
            return None
        fns = [self._group_fn(g) for g in range(self.n // self.width)]
        return [fns[c // self.width] for c in (range(self.n) if order is None else order)]

    def qparams(self) -> list:
        """Each stacked layer's qparams in ``tensor_quantize``'s natural shapes."""
        if self._layer_qp is not None:
            return self._layer_qp
        missing = [g for g, qp in enumerate(self._group_qp) if qp is None]
        if missing:
            raise RuntimeError(f"groups {missing[:4]}... were never reached by the solver")
        full = _cat_qparams(self._group_qp, -1)
        out = []
        for scale, zp in zip(full.scale.split(self.splits, 0),
                             [None] * len(self.splits) if full.zero_point is None else full.zero_point.split(self.splits, 0)):
            out.append(QParams(scale, zp))
        return out


# ---------------------------------------------------------------------------------------------
# the column loop
# ---------------------------------------------------------------------------------------------
class _Pending:
    """The lazy block being processed: the updates its quantized columns owe the later columns,
    not applied yet past the block, so that :meth:`current` can still give exact values of any
    unquantized column.

    ``block`` holds the block's columns as rows; a quantized column's row keeps the value it had
    when it was quantized (what GPTAQ's term multiplies), the later rows are updated in place.
    ``S[k]`` holds column ``k``'s error ``w - q`` (and, with GPTAQ's term, its value), ``M`` the
    update directions of :func:`solve`."""

    def __init__(self, W: torch.Tensor, M: torch.Tensor, i1: int, i2: int, S: torch.Tensor,
                 block: torch.Tensor) -> None:
        self.W, self.M, self.i1, self.i2, self.S, self.block = W, M, i1, i2, S, block
        self.done = 0

    def current(self, cols: torch.Tensor) -> torch.Tensor:
        """Up-to-date values ``[rows, len(cols)]`` of not-yet-quantized columns (processing order):
        in-block ones from the block being updated, later ones with this block's pending update."""
        cols = cols.to(self.W.device)
        vals = self.W[:, cols]
        inside = (cols >= self.i1) & (cols < self.i2)
        if bool(inside.any()):
            vals[:, inside] = self.block[cols[inside] - self.i1].T
        later = cols >= self.i2
        if self.done and bool(later.any()):
            c, d = cols[later], self.done
            S = self.S[:d].reshape(-1, self.S.shape[-1])
            vals[:, later] += S.T @ self.M[self.i1:self.i1 + d][:, :, c].reshape(S.shape[0], -1)
        return vals


def update_directions(U: torch.Tensor, P: torch.Tensor | None = None) -> torch.Tensor:
    """``M [n, c, n]`` of :func:`solve`: ``M[j, 0] = -U[j] / U[j, j]`` (what column ``j``'s error
    ``w_j - q_j`` adds to the later columns), and with GPTAQ's ``P``, ``M[j, 1] = P[j]`` (what its
    value ``w_j`` adds)."""
    if P is None:  # one n x n result, no stacked copy
        return (U / U.diagonal()[:, None]).neg_().unsqueeze(1)
    M = torch.stack([U / U.diagonal()[:, None], P], 1)
    M[:, 0].neg_()
    return M


def solve(
    W: torch.Tensor,
    U: torch.Tensor,
    quantize: Callable[[int, torch.Tensor, Current], torch.Tensor],
    block_size: int = 128,
    P: torch.Tensor | None = None,
    start: int = 0,
    Q: torch.Tensor | None = None,
    M: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPTQ's column loop on ``W`` (processing order; the columns past each lazy block absorb its
    updates in place) with ``H^-1 = U^T U``.

    Column ``j`` is quantized to ``q = quantize(j, w_j, current)`` and the later columns absorb its
    error: ``W[:, j+1:] -= (w_j - q) / U[j, j] * U[j, j+1:]`` (the optimal update of the remaining
    weights, Frantar et al. 2022 eq. 2 with the Cholesky form of sec. 3.3). ``P`` (GPTAQ) adds
    ``W[:, j+1:] += w_j * P[j, j+1:]`` with ``w_j`` the column's value when it is quantized.
    Updates to columns past the current lazy block of ``block_size`` columns are applied once per
    block as one matrix product. Columns before ``start`` are left as given (their results are
    ``Q[:, :start]``). ``M``: the directions already computed from ``U`` and ``P``
    (:func:`update_directions`; ``U`` and ``P`` are then not used). Returns ``Q``, the quantized weight.

    Per column the loop runs the quantizer, one subtraction and one product: the column's error and
    value sit next to each other (``S[k]``, ``[c, rows]``) and both updates of the later columns of
    the block are one rank-``c`` product with the precomputed directions (:func:`update_directions`;
    the column loop's cost is the number of small operations, not their arithmetic).
    """
    rows, n = W.shape
    Q = torch.zeros_like(W) if Q is None else Q
    M = update_directions(U, P) if M is None else M
    c = M.shape[1]
    for i1 in range(start, n, block_size):
        i2 = min(i1 + block_size, n)
        b = i2 - i1
        S = torch.empty(b, c, rows, dtype=W.dtype, device=W.device)
        if c == 2:  # the block's columns as rows, each next to its error
            Wt = S[:, 1]
            Wt.copy_(W[:, i1:i2].T)
        else:
            Wt = W[:, i1:i2].T.contiguous()
        lazy = _Pending(W, M, i1, i2, S, Wt)
        # every view the loop needs, made in one call each (view creation is a good part of its cost)
        values, errors, pairs = Wt.unbind(0), S[:, 0].unbind(0), S.unbind(0)
        directions = M[i1:i2, :, i1:i2].transpose(1, 2).unbind(0)  # [b, c] each
        qs = []
        for k in range(b):
            lazy.done = k
            w = values[k]  # not changed from here on: the later updates touch rows k+1.. only
            q = quantize(i1 + k, w, lazy.current)
            qs.append(q)
            torch.sub(w, q, out=errors[k])
            if k + 1 < b:
                Wt[k + 1:].addmm_(directions[k][k + 1:], pairs[k])
        Q[:, i1:i2] = torch.stack(qs, 1)
        if i2 < n:
            W[:, i2:].addmm_(S.reshape(b * c, rows).T, M[i1:i2, :, i2:].reshape(b * c, n - i2))
    return Q


@dataclass
class Solution:
    """What :func:`quantize_weight` returns: the quantized weight and each layer's qparams."""

    Q: torch.Tensor
    qparams: list


def quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor | list[torch.Tensor],
    spec,
    damp_percent: float = 0.01,
    block_size: int = 128,
    desc_act: bool = False,
    static_groups: bool = False,
    row_splits: list[int] | None = None,
    residual: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    clip_steps: int = 0,
    clip_min: float = 0.6,
    zero_dead: bool = True,
) -> Solution:
    """GPTQ-quantize ``W`` ``[rows, n]`` for the Hessian ``H`` ``[n, n]`` (Frantar et al. 2022).

    ``desc_act`` processes columns by decreasing ``diag(H)`` (act-order). ``residual(U, perm)``
    returns the extra term ``P`` of :func:`solve` in processing order (GPTAQ); ``perm`` is None
    without act-order. ``clip_steps`` > 0 chooses every group's qparams by a clipping search weighted
    by ``diag H`` (:func:`search_clipped_qparams`) instead of min-max. Returns the fake-quantized weight
    (natural order) and the qparams with which ``fake_quantize`` of it reproduces it, per stacked layer.
    ``zero_dead``: inputs that were zero on every calibration token get zero weights; off, they are
    rounded (a MoE expert saw only some tokens: an input dead on those may not be dead on others).
    ``H`` given as a one-element list (``[gram.take()]``) is taken over: damped in place and freed as
    soon as it is factorised.
    """
    W = W.detach().float().clone()
    owned = isinstance(H, list)
    if owned:
        H = H.pop()
    H, dead = damp(H.float(), damp_percent, inplace=owned)
    if zero_dead:
        W[:, dead] = 0
    # a copy of the diagonal: a view would keep the damped H alive through the solve
    quantizer = ColumnQuantizer(spec, W, row_splits, static_groups, importance=torch.diagonal(H).clone(),
                                clip_steps=clip_steps, clip_min=clip_min)
    perm = torch.argsort(torch.diagonal(H), descending=True) if desc_act else None
    order = None if perm is None else perm.tolist()
    fixed = quantizer.column_functions(order)
    if perm is not None:  # one reordering at a time, each freeing its input (peak: two n x n matrices)
        W = W[:, perm]
        H = H[perm]
        H = H[:, perm]
        inv = torch.argsort(perm)
    if fixed is not None:  # qparams fixed up front: no dispatch, no current values needed

        def quantize(j: int, w: torch.Tensor, _current: Current) -> torch.Tensor:
            return fixed[j](w)
    elif perm is not None:

        def quantize(j: int, w: torch.Tensor, current: Current) -> torch.Tensor:
            return quantizer(order[j], w, lambda cols: current(inv[cols.to(inv.device)]))
    else:
        quantize = quantizer
    holder = [H]
    del H
    U = inverse_cholesky(holder)
    P = residual(U, perm) if residual is not None else None
    M = update_directions(U, P)
    del U, P
    Q = solve(W, None, quantize, block_size, M=M)
    if perm is not None:
        Q = Q[:, inv]
    return Solution(Q, quantizer.qparams())
