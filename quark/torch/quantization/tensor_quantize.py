"""Spec-aware quantization of one tensor: the bridge from a ``QTensorConfig`` to ``numerics``.

A spec says *what* (dtype, granularity, scale representation); this module turns it into scale /
zero-point tensors (:class:`QParams`) and calls the format kernels.  Everything computes in
float32; outputs keep the input's dtype and device; finite input never produces inf.

Granularity, on the tensor viewed as ``[M, K]`` (all leading dims flattened, K the last dim):

- ``per_tensor``: one scale, ``QParams.scale`` shape ``[]``.
- ``per_channel``: ``ch_axis=0`` is one scale per row (a ``[N, K]`` weight's output channels, an
  activation's tokens), scale shape ``x.shape[:-1]``; ``ch_axis=-1`` (the last axis) is one
  scale per column, shape ``[K]``.
- ``per_group``: groups of ``group_size`` consecutive elements along the last dim, scale shape
  ``[*x.shape[:-1], K / group_size]``.

Scales (min-max, NaN-propagating: a NaN in a group makes that group's scale, hence the whole
group, NaN; with given static qparams NaN stays where it is; a zero scale -- an all-zero group, or
a stored block scale that rounds to 0 -- gives exact zeros):

- integers: signed symmetric ``max(amax / ((qmax - qmin) / 2), 2^-23)`` (FORMATS.md 2a.1: amax/7.5
  for int4, amax/127.5 for int8; unsigned symmetric: zero point ``2^(bits-1)``, scale
  ``amax / (2^(bits-1) - 1)``); asymmetric per :func:`numerics.asymmetric_qparams`, the zero point
  computed from the final (possibly rounded) scale.
- fp8 / fp6 / fp4: ``amax / fmt.max_value``.
- ``scale_type`` then rounds the scale: ``float`` to the input's dtype, ``float32`` not at all,
  ``float16``/``bfloat16`` by a cast (clamped to the finite range), ``pof2`` up to a power of two,
  ``float8_e5m3`` to unsigned e5m3 (AMD fp4).  ``float8_e8m0fnu`` selects OCP MX (numerics.mx)
  instead: the scale is the MX shared power of two (``scale_calculation_mode``, default "even")
  of each group -- blocks of ``group_size`` (default 32) for per_group or no qscheme, otherwise
  the spec's granularity.
- ``dtype=mx`` (element type in ``mx_element_dtype``) is always OCP MX over blocks of
  ``group_size`` (default 32) along the last dim; ``QParams.scale`` holds the powers of two
  (``numerics.encode(scale, E8M0)`` gives the E8M0 codes).  ``mx6``/``mx9``/``bfp16`` are the
  shared-exponent formats, whose ``QParams.scale`` is the grid step of each micro-block
  (``[*x.shape[:-1], K / micro_block]``).
- ``float16``/``bfloat16`` dtypes are plain casts (no qparams).

Two stages (a list of two specs):

- progressive (second spec not ``is_scale_quant``), e.g. int4_fp8 (FORMATS.md 2a.4): the second
  stage quantizes the first stage's codes ``c`` (its quantized values before they are multiplied back
  by its scale ``s1``: fp8 values up to 448), and the result is multiplied by ``s1``:
  ``x_hat = fl(fl(q * s2) * s1)``.  The second stage's qparams are therefore in code units (int4_fp8:
  ``s2 = max|c_row| / 7.5``); the codes are the second stage's.  The first stage must be a small
  float format (the one progressive scheme's).
- scale quantization (second spec ``is_scale_quant``), e.g. nvfp4 / amdfp4_global: the first
  stage's per-group scales ``s`` are quantized per tensor by the second spec against a float32
  global scale ``g = amax(s) / fmt2.max_value``: ``stored = round_fmt2(s / g)``.  The qparams
  are ``[QParams(stored), QParams(g)]`` (what export writes as ``weight_scale`` and
  ``weight_scale_2``) and the element scale is ``stored * g``.  A ``None`` entry in a qparams list
  is computed from ``x`` (e.g. nvfp4 activations: static ``g``, dynamic block scales).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from .config.type import Dtype, QSchemeType, RoundType, ScaleType, ZeroPointType
from .numerics import integer as nint
from .numerics import minifloat as nfp
from .numerics import mx as nmx
from .numerics import shared_exponent as nse
from .numerics._chunk import Scratch, run_chunked
from .numerics.mx import absmax

__all__ = [
    "QParams",
    "compute_qparams",
    "fake_quantize",
    "quantize",
    "dequantize",
    "scale_quant_global_scale",
]

_FLOAT_DTYPES = {
    Dtype.fp8_e4m3: nfp.FP8_E4M3,
    Dtype.fp8_e5m2: nfp.FP8_E5M2,
    Dtype.fp8_e5m3: nfp.UE5M3,
    Dtype.fp6_e2m3: nfp.FP6_E2M3,
    Dtype.fp6_e3m2: nfp.FP6_E3M2,
    Dtype.fp4: nfp.FP4_E2M1,
}
_CAST_DTYPES = {Dtype.float16: torch.float16, Dtype.bfloat16: torch.bfloat16}
_SCALE_CASTS = {ScaleType.float16: torch.float16, ScaleType.bfloat16: torch.bfloat16}


@dataclass
class QParams:
    """Quantization parameters of one stage: ``value = (code - zero_point) * scale``.

    ``scale`` is float32 in the natural shape of the granularity (module doc); ``zero_point`` is
    int32 (or float32 for ``ZeroPointType.float32``) of the same shape, None when symmetric.
    """

    scale: torch.Tensor | None
    zero_point: torch.Tensor | None = None


SpecLike = Any  # a QTensorConfig (or any object with its attribute names)
Specs = Union[SpecLike, Sequence[SpecLike]]
QParamsLike = Union[QParams, Sequence[Union[QParams, None]], None]


# ---------------------------------------------------------------------------------------------
# spec interpretation
# ---------------------------------------------------------------------------------------------
def _get(spec: SpecLike, name: str, default: Any = None) -> Any:
    value = getattr(spec, name, None)
    return default if value is None else value


def _enum(enum: type, spec: SpecLike, name: str) -> Any:
    value = getattr(spec, name, None)
    return None if value is None else enum.parse(value, name)


_SCALE_FORMATS = {
    "e8m0": ScaleType.float8_e8m0fnu,
    "e5m3": ScaleType.float8_e5m3,
    "float32": ScaleType.float32,
    "float16": ScaleType.float16,
    "bfloat16": ScaleType.bfloat16,
}


def _scale_type(spec: SpecLike) -> ScaleType | None:
    """``scale_type``, or the one ``scale_format`` implies (QTensorConfig already resolves this)."""
    st = _enum(ScaleType, spec, "scale_type")
    fmt = getattr(spec, "scale_format", None)
    return st if st is not None or fmt is None else _SCALE_FORMATS.get(str(fmt))


@dataclass(frozen=True)
class _Kind:
    """What a spec means numerically."""

    family: str  # "int" | "fp" | "mx" | "shared" | "cast"
    fmt: Any = None  # FloatFormat, MXElement, SharedExponentFormat or torch dtype
    qmin: int = 0
    qmax: int = 0
    symmetric: bool = True


def _kind(spec: SpecLike) -> _Kind:
    dtype = Dtype.parse(spec.dtype, "dtype")
    scale_type = _scale_type(spec)
    if dtype is Dtype.mx:
        elem = _enum(Dtype, spec, "mx_element_dtype")
        if elem is None:
            raise ValueError("dtype=mx needs mx_element_dtype (the element format, e.g. fp4)")
        return _Kind("mx", nmx.mx_element(elem))
    if dtype in nse.SHARED_EXPONENT_FORMATS:
        return _Kind("shared", nse.shared_exponent_format(dtype))
    if dtype in _CAST_DTYPES:
        return _Kind("cast", _CAST_DTYPES[dtype])
    if scale_type is ScaleType.float8_e8m0fnu:
        return _Kind("mx", nmx.mx_element(dtype))
    if dtype.is_integer:
        signed = not dtype.is_unsigned
        qmin, qmax = nint.int_range(dtype.bits, signed)
        symmetric = _get(spec, "symmetric", signed)
        return _Kind("int", None, qmin, qmax, bool(symmetric))
    if dtype in _FLOAT_DTYPES:
        return _Kind("fp", _FLOAT_DTYPES[dtype])
    raise ValueError(f"dtype={dtype.value} cannot quantize a tensor by itself")


def _round_method(spec: SpecLike) -> RoundType:
    return _enum(RoundType, spec, "round_method") or RoundType.half_even


@dataclass(frozen=True)
class _Layout:
    """``x`` as a 2-D view whose rows (``dim=1``) or columns (``dim=0``) are the scale groups.

    Internally qparams are kept "param-shaped" ([R, 1], [1, C] or [1, 1]) to broadcast against
    the view; :class:`QParams` handed out use the natural ``scale_shape``.
    """

    view: torch.Tensor
    dim: int | None  # reduced dim of the view; None: the whole tensor
    scale_shape: tuple[int, ...]

    def param(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.to(device=self.view.device)
        if self.dim is None:
            return t.reshape(1, 1)
        return t.reshape(-1, 1) if self.dim == 1 else t.reshape(1, -1)

    def natural(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(self.scale_shape)

    def to_param(self, qp: QParams) -> QParams:
        return QParams(self.param(qp.scale), self.param(qp.zero_point))

    def to_natural(self, qp: QParams) -> QParams:
        return QParams(self.natural(qp.scale), self.natural(qp.zero_point))


def _layout(x: torch.Tensor, spec: SpecLike, kind: _Kind) -> _Layout:
    k = x.shape[-1] if x.dim() else 1
    lead = tuple(x.shape[:-1])
    rows = x.reshape(-1, k)
    if kind.family == "shared":
        fmt = kind.fmt
        nmx.block_view(x, fmt.block_size, "block size")  # clear error when it does not divide
        return _Layout(x.reshape(-1, fmt.micro_block), 1, lead + (k // fmt.micro_block,))
    qscheme = _enum(QSchemeType, spec, "qscheme")
    group = _get(spec, "group_size")
    if kind.family == "mx" and (qscheme in (None, QSchemeType.per_group) or Dtype.parse(spec.dtype, "dtype") is Dtype.mx):
        # OCP MX: blocks along the last dim (dtype=mx always; an e8m0 scale_type unless the spec
        # asks for another granularity, which then gets the MX power-of-two scale rule)
        qscheme, group = QSchemeType.per_group, group or nmx.MX_BLOCK_SIZE
    if qscheme is None or qscheme is QSchemeType.per_tensor:
        return _Layout(rows, None, ())
    if qscheme is QSchemeType.per_channel:
        axis = _get(spec, "ch_axis", 0)
        if x.dim() <= 1:
            return _Layout(x.reshape(-1, 1), 1, (k,))
        if axis == 0:
            return _Layout(rows, 1, lead)
        if axis in (-1, x.dim() - 1):
            return _Layout(rows, 0, (k,))
        raise ValueError(
            f"per_channel ch_axis={axis} on a tensor of shape {tuple(x.shape)}: use 0 (per row of the "
            "[-1, K] view: output channel / token) or -1 (per last-dim index)"
        )
    if qscheme is QSchemeType.per_group:
        if not group or k % group:
            raise ValueError(
                f"per_group group_size={group} must divide the last dim K={k} (tensor shape {tuple(x.shape)})"
            )
        return _Layout(x.reshape(-1, group), 1, lead + (k // group,))
    raise NotImplementedError(f"qscheme={qscheme.value} is not supported by tensor_quantize")


# ---------------------------------------------------------------------------------------------
# scales
# ---------------------------------------------------------------------------------------------
def _round_scale(scale: torch.Tensor, spec: SpecLike, model_dtype: torch.dtype) -> torch.Tensor:
    """Apply ``scale_type`` (how the scale is stored) to a float32 scale."""
    st = _scale_type(spec)
    if st is None or st is ScaleType.float32:
        return scale
    if st is ScaleType.float:
        if model_dtype in (torch.float16, torch.bfloat16):
            return scale.clamp(max=torch.finfo(model_dtype).max).to(model_dtype).float()
        return scale
    if st in _SCALE_CASTS:
        target = _SCALE_CASTS[st]
        return scale.clamp(max=torch.finfo(target).max).to(target).float()
    if st is ScaleType.pof2:
        # Up to the next power of two: a nonzero mantissa carries into the exponent.
        up = ((scale.float().view(torch.int32) + 0x007FFFFF) & 0x7F800000).view(torch.float32)
        return torch.where(torch.isfinite(scale), up, scale)
    if st is ScaleType.float8_e5m3:
        return nfp.round_to_format(scale, nfp.UE5M3)
    raise ValueError(f"scale_type={st.value} is not a cast of a float scale")


def _zero_point_type(spec: SpecLike) -> ZeroPointType:
    return _enum(ZeroPointType, spec, "zero_point_type") or ZeroPointType.int32


def _absmax(lay: _Layout, scratch: Scratch | None) -> torch.Tensor:
    return absmax(lay.view, lay.dim, scratch=scratch)


def _minmax(lay: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    if lay.dim is None:
        lo, hi = torch.aminmax(lay.view)
        return lo.float().reshape(1, 1), hi.float().reshape(1, 1)
    return lay.view.amin(lay.dim, keepdim=True).float(), lay.view.amax(lay.dim, keepdim=True).float()


def _stats(
    lay: _Layout, spec: SpecLike, kind: _Kind, model_dtype: torch.dtype,
    round_scale: bool = True, scratch: Scratch | None = None,
) -> QParams:
    """Min-max qparams (param-shaped) of the groups of ``lay``: the one place scales are derived."""
    if kind.family == "cast":
        return QParams(None)
    if kind.family == "mx":
        mode = getattr(spec, "scale_calculation_mode", None)
        return QParams(nmx.mx_scale_from_amax(_absmax(lay, scratch), kind.fmt, mode))
    rnd = (lambda s: _round_scale(s, spec, model_dtype)) if round_scale else (lambda s: s)
    if kind.family == "fp":
        return QParams(rnd(_absmax(lay, scratch) / kind.fmt.max_value))
    if kind.symmetric:
        amax = _absmax(lay, scratch)
        if kind.qmin >= 0:  # unsigned symmetric: the grid is centred on 2^(bits-1)
            mid = (kind.qmax + 1) // 2
            scale = rnd(amax.float() / (kind.qmax - mid))
            return QParams(scale, torch.full_like(scale, mid, dtype=torch.int32))
        return QParams(rnd(nint.symmetric_scale(amax, kind.qmin, kind.qmax)))
    lo, hi = _minmax(lay)
    scale = rnd(nint.asymmetric_qparams(lo, hi, kind.qmin, kind.qmax)[0])
    return QParams(scale, nint.zero_point_from_scale(lo, scale, kind.qmin, kind.qmax, _zero_point_type(spec)))


# ---------------------------------------------------------------------------------------------
# one stage (qparams param-shaped)
# ---------------------------------------------------------------------------------------------
def _element_scale(kind: _Kind, scale: torch.Tensor) -> torch.Tensor:
    """What an element code multiplies (MXINT8 codes carry an implicit 2^-6)."""
    if kind.family == "mx" and kind.fmt.is_int:
        return scale * 2.0**-6
    return scale


def _float_format(kind: _Kind) -> nfp.FloatFormat | None:
    if kind.family == "fp":
        return kind.fmt
    if kind.family == "mx" and not kind.fmt.is_int:
        return kind.fmt.fmt
    return None


def _int_grid(kind: _Kind, zero_point: torch.Tensor | None) -> tuple[int, int, torch.Tensor | None]:
    if kind.family == "int":
        return kind.qmin, kind.qmax, zero_point
    if kind.family == "shared":
        return kind.fmt.qmin, kind.fmt.qmax, None
    return -nmx.MXINT8_QMAX, nmx.MXINT8_QMAX, None  # MXINT8: symmetric int8


def _fake_view(view, spec, kind, qp, out=None, scratch=None):
    """Fake-quantize a 2-D ``view`` with param-shaped ``qp`` (into ``out`` when given)."""
    method = _round_method(spec)
    scale = _element_scale(kind, qp.scale)
    fmt = _float_format(kind)
    if fmt is not None:
        return nfp.fake_quantize_fp(view, scale, fmt, method, out=out, scratch=scratch)
    qmin, qmax, zp = _int_grid(kind, qp.zero_point)
    return nint.fake_quantize_int(view, scale, zp, qmin, qmax, method, out=out, scratch=scratch,
                                  divide=kind.family != "int")


def _shared_view(x: torch.Tensor, kind: _Kind, qp: QParams) -> tuple[torch.Tensor, QParams]:
    """Shared-exponent steps are per micro-block: expand them per element on a [blocks, block]
    view (a broadcast over a micro-block of 2 would be slow)."""
    block, micro = kind.fmt.block_size, kind.fmt.micro_block
    view = x.reshape(-1, block)
    return view, QParams(qp.scale.reshape(view.shape[0], -1).repeat_interleave(micro, dim=1))


def _fake_one(x: torch.Tensor, spec: SpecLike, qp: QParams | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``qp`` natural-shaped, or None: computed from ``x`` chunk by chunk in the same pass."""
    kind = _kind(spec)
    if qp is not None and qp.scale is None:
        qp = None
    if kind.family == "cast":
        res = x.to(kind.fmt).to(x.dtype)
        return res if out is None else out.copy_(res)
    if kind.family == "shared" and qp is None:
        res = nse.shared_fake_quantize(x, kind.fmt, _round_method(spec))
        return res if out is None else out.copy_(res)
    lay = _layout(x, spec, kind)
    out_view = None if out is None else out.view(lay.view.shape)
    if qp is not None:
        pq = lay.to_param(qp)
        view = lay.view
        if kind.family == "shared":  # (the dynamic shared kernel cleans bfp16's NaN/inf in its own pass)
            view, pq = _shared_view(_finite_if_bfp(x, kind), kind, pq)
            out_view = None if out is None else out.view(view.shape)
        return _fake_view(view, spec, kind, pq, out_view).view(x.shape)
    if lay.dim != 1:  # one scale for everything, or per column: reduce first, then one pass
        return _fake_view(lay.view, spec, kind, _stats(lay, spec, kind, x.dtype), out_view).view(x.shape)

    def kernel(xc, oc, scratch):  # groups are rows: scales and elements in one pass
        sub = _Layout(xc, 1, ())
        _fake_view(xc, spec, kind, _stats(sub, spec, kind, x.dtype, scratch=scratch), oc, scratch)

    return run_chunked(kernel, lay.view, [], out=out_view).view(x.shape)


def _compute_one(x: torch.Tensor, spec: SpecLike) -> QParams:
    kind = _kind(spec)
    if kind.family == "shared":
        exps, micro = nse.shared_exponents(x, kind.fmt)
        return QParams(nse.ulp_from_exponents(exps, micro, kind.fmt))
    lay = _layout(x, spec, kind)
    return lay.to_natural(_stats(lay, spec, kind, x.dtype))


def _finite_if_bfp(x: torch.Tensor, kind: _Kind) -> torch.Tensor:
    """BFP16 (``overflow_step``) counts NaN and inf as 0 (FORMATS.md 2a.5); other formats keep them."""
    if kind.family == "shared" and kind.fmt.overflow_step:
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return x


def _quantize_one(x: torch.Tensor, spec: SpecLike, qp: QParams) -> torch.Tensor:
    kind = _kind(spec)
    x = _finite_if_bfp(x, kind)
    if kind.family == "cast":
        return x.to(kind.fmt)
    lay = _layout(x, spec, kind)
    pq = lay.to_param(qp)
    scale = _element_scale(kind, pq.scale)
    method = _round_method(spec)
    fmt = _float_format(kind)
    if fmt is not None:
        return nfp.encode(lay.view.float() / nint.safe_scale(scale), fmt, method).view(x.shape)
    qmin, qmax, zp = _int_grid(kind, pq.zero_point)
    return nint.quantize_int(lay.view, scale, zp, qmin, qmax, method, divide=kind.family != "int").view(x.shape)


def _dequantize_one(codes: torch.Tensor, spec: SpecLike, qp: QParams, dtype: torch.dtype) -> torch.Tensor:
    kind = _kind(spec)
    if kind.family == "cast":
        return codes.to(dtype)
    lay = _layout(codes, spec, kind)
    pq = lay.to_param(qp)
    scale = _element_scale(kind, pq.scale)
    fmt = _float_format(kind)
    if fmt is not None:
        return (nfp.decode(lay.view, fmt) * scale).to(dtype).view(codes.shape)
    _, _, zp = _int_grid(kind, pq.zero_point)
    return nint.dequantize_int(lay.view, scale, zp, dtype).view(codes.shape)


def _check_one(spec: SpecLike, qparams: Any) -> None:
    if qparams is not None and not isinstance(qparams, QParams):
        raise TypeError(f"qparams for a single spec must be a QParams or None, got {type(qparams).__name__}")


# ---------------------------------------------------------------------------------------------
# two stages
# ---------------------------------------------------------------------------------------------
def _two(specs: Specs) -> tuple[SpecLike, SpecLike] | None:
    if isinstance(specs, (list, tuple)):
        if len(specs) == 1:
            return None
        if len(specs) != 2:
            raise ValueError(f"a two-stage spec is a list of exactly two specs, got {len(specs)}")
        return specs[0], specs[1]
    return None


def _single(specs: Specs) -> SpecLike:
    return specs[0] if isinstance(specs, (list, tuple)) else specs


def _stage_qparams(qparams: QParamsLike) -> tuple[QParams | None, QParams | None]:
    if qparams is None:
        return None, None
    if isinstance(qparams, QParams) or len(qparams) != 2:
        raise TypeError("qparams of a two-stage spec must be a list of two (QParams or None)")
    return qparams[0], qparams[1]


def _scale_format(spec2: SpecLike) -> nfp.FloatFormat:
    kind = _kind(spec2)
    if kind.family != "fp":
        raise ValueError(
            "scale quantization stores the scales in a small float format (fp8_e4m3, fp8_e5m3, ...); "
            f"second stage dtype={Dtype.parse(spec2.dtype, 'dtype').value} is not one"
        )
    return kind.fmt


def _first_stage_max(first: SpecLike) -> float:
    kind = _kind(first)
    if kind.family == "fp":
        return kind.fmt.max_value
    if kind.family == "int" and kind.symmetric and kind.qmin < 0:
        return (kind.qmax - kind.qmin) / 2  # the symmetric grid's amax / scale (FORMATS.md 2a.1)
    raise ValueError("scale quantization needs a symmetric integer or a small-float first stage")


def scale_quant_global_scale(amax: torch.Tensor, specs: Sequence[SpecLike]) -> torch.Tensor:
    """Global (second-stage) scale of a scale-quant pair from the tensor's absolute maximum.

    ``g = (amax / fmt1.max) / fmt2.max``: the same float32 value as ``amax(s) / fmt2.max`` over
    the first stage's group scales ``s = amax_group / fmt1.max`` (rounding is monotonic).  For
    observers of a static global scale (nvfp4 activations).
    """
    first, second = specs
    return (amax.float() / _first_stage_max(first)) / _scale_format(second).max_value


def _scale_quant(
    x: torch.Tensor, first: SpecLike, second: SpecLike, q1: QParams | None, q2: QParams | None,
    fake: bool,
) -> Any:
    """Scale quantization: with ``fake`` the fake-quantized tensor, else the (natural) qparams."""
    fmt2 = _scale_format(second)
    kind = _kind(first)
    if kind.family not in ("fp", "int"):
        raise ValueError("scale quantization needs a per-group/channel integer or small-float first stage")
    lay = _layout(x, first, kind)
    method2 = _round_method(second)
    if q2 is None:
        q2 = QParams(scale_quant_global_scale(absmax(lay.view), (first, second)).reshape(()))
    g = q2.scale.float().reshape(1, 1).to(x.device)
    if q1 is not None:
        return _fake_view(lay.view, first, kind, _effective(lay.to_param(q1), g)).view(x.shape) if fake else [q1, q2]

    def stored_scale(sub: _Layout, scratch: Scratch | None) -> QParams:
        raw = _stats(sub, first, kind, x.dtype, round_scale=False, scratch=scratch)
        return QParams(nfp.round_to_format(raw.scale / nint.safe_scale(g), fmt2, method2), raw.zero_point)

    if not fake:
        return [lay.to_natural(stored_scale(lay, None)), q2]
    if lay.dim != 1:
        return _fake_view(lay.view, first, kind, _effective(stored_scale(lay, None), g)).view(x.shape)

    def kernel(xc, oc, scratch):
        sub = _Layout(xc, 1, ())
        _fake_view(xc, first, kind, _effective(stored_scale(sub, scratch), g), oc, scratch)

    return run_chunked(kernel, lay.view, []).view(x.shape)


def _first_codes(x: torch.Tensor, first: SpecLike, q1: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Progressive pairs: the first stage's codes as float32 values shaped like ``x``, ``c =
    fmt(clamp(fl(x / s1)))`` (a division, FORMATS.md 2a.3), and ``s1`` broadcastable to ``x``."""
    kind = _kind(first)
    if kind.family != "fp":
        raise ValueError(
            "a progressive (two-stage) spec needs a small-float first stage, e.g. fp8_e4m3 for int4_fp8; "
            f"got dtype={Dtype.parse(first.dtype, 'dtype').value}"
        )
    lay = _layout(x, first, kind)
    s1 = lay.param(q1.scale).float()
    c = nfp.fake_quantize_fp(lay.view.float() / nint.safe_scale(s1), torch.ones_like(s1), kind.fmt,
                             _round_method(first))
    return c.view(x.shape), _per_element(lay, s1, x.shape)


def _per_element(lay: _Layout, param: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A param-shaped scale of ``lay`` broadcastable to the tensor of ``shape`` it was laid out from."""
    if lay.dim is None:
        return param.reshape(())
    return param.expand(lay.view.shape).reshape(shape)


def _times_first_scale(values: torch.Tensor, s1: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fl(values * s1)`` in float32, as ``dtype`` (the last step of a progressive pair)."""
    return torch.mul(values.float(), s1).to(dtype)


def _effective(pq1: QParams, g: torch.Tensor) -> QParams:
    """Element scale of a scale-quant pair: the stored scale times the global scale."""
    return QParams(pq1.scale * g, pq1.zero_point)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _empty_qparams(x: torch.Tensor, spec: Specs) -> QParams | list[QParams]:
    """Zero scales of the natural shape for a tensor with no elements (e.g. an expert no token reached)."""
    pair = _two(spec)
    specs = pair if pair is not None else (_single(spec),)
    out = []
    for sp in specs:
        kind = _kind(sp)
        if kind.family in ("cast", "shared") or getattr(sp, "is_scale_quant", False):
            shape: tuple[int, ...] = ()
        else:
            shape = _layout(x, sp, kind).scale_shape
        out.append(QParams(torch.zeros(shape, device=x.device)))
    return out if pair is not None else out[0]


def compute_qparams(x: torch.Tensor, spec: Specs) -> QParams | list[QParams]:
    """Min-max qparams of ``x`` for ``spec`` (a list of qparams, one per stage, for two specs)."""
    x = x.detach()
    if x.numel() == 0:
        return _empty_qparams(x, spec)
    pair = _two(spec)
    if pair is None:
        return _compute_one(x, _single(spec))
    first, second = pair
    if getattr(second, "is_scale_quant", False):
        return _scale_quant(x, first, second, None, None, fake=False)
    q1 = _compute_one(x, first)
    return [q1, _compute_one(_first_codes(x, first, q1)[0], second)]


def row_fake_quantizer(spec: Specs, qparams: QParams) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function ``f(v)`` equal to ``fake_quantize(v[:, None], spec, qparams).reshape(-1)`` for a
    vector ``v`` of ``rows`` values, where ``qparams`` hold one scale (and zero point) per row: the
    parameters are prepared once for many calls (GPTQ quantizes a weight one column at a time with
    the same per-row grid). None when the spec is not a one-stage integer format (callers use
    :func:`fake_quantize`)."""
    if _two(spec) is not None:
        return None
    spec = _single(spec)
    kind = _kind(spec)
    if kind.family != "int" or qparams is None or qparams.scale is None:
        return None
    scale = _element_scale(kind, qparams.scale).detach().reshape(-1)
    zero_point = None if qparams.zero_point is None else qparams.zero_point.detach().reshape(-1)
    return nint.fake_quantizer_int(scale, zero_point, kind.qmin, kind.qmax, _round_method(spec))


def fake_quantize(x: torch.Tensor, spec: Specs, qparams: QParamsLike = None) -> torch.Tensor:
    """Quantize-dequantize ``x``; qparams None (or None entries, or a None scale) are computed from
    ``x`` (dynamic), per group and in the same pass as the elements.  Not differentiable: the
    result never requires grad (wrap it in a straight-through estimator for training)."""
    x = x.detach()
    if x.numel() == 0:
        return x.clone()
    pair = _two(spec)
    if pair is None:
        _check_one(spec, qparams)
        return _fake_one(x, _single(spec), qparams)
    first, second = pair
    q1, q2 = _stage_qparams(qparams)
    if getattr(second, "is_scale_quant", False):
        return _scale_quant(x, first, second, q1, q2, fake=True)
    q1 = q1 if q1 is not None and q1.scale is not None else _compute_one(x, first)
    c, s1 = _first_codes(x, first, q1)
    return _times_first_scale(_fake_one(c, second, q2, out=c), s1, x.dtype)  # in place on the fresh codes


def quantize(x: torch.Tensor, spec: Specs, qparams: QParamsLike = None) -> torch.Tensor:
    """Element codes of ``x``: integer codes (int8/uint8/int32), minifloat codes (uint8), MXINT8 and
    shared-exponent mantissas (int8), or the cast tensor for float16/bfloat16.

    For two specs these are the codes of the last stage that quantizes elements (the second for
    progressive, the first for scale quantization).
    """
    x = x.detach()
    pair = _two(spec)
    if pair is None:
        spec = _single(spec)
        _check_one(spec, qparams)
        if qparams is None or qparams.scale is None:
            qparams = _compute_one(x, spec)
        return _quantize_one(x, spec, qparams)
    first, second = pair
    q1, q2 = _stage_qparams(qparams)
    if getattr(second, "is_scale_quant", False):
        if q1 is None or q2 is None:
            q1, q2 = _scale_quant(x, first, second, q1, q2, fake=False)
        g = q2.scale.float().reshape(())
        return _quantize_one(x, first, QParams(q1.scale * g, q1.zero_point))
    q1 = q1 if q1 is not None and q1.scale is not None else _compute_one(x, first)
    c, _ = _first_codes(x, first, q1)
    return _quantize_one(c, second, q2 if q2 is not None and q2.scale is not None else _compute_one(c, second))


def dequantize(
    codes: torch.Tensor, spec: Specs, qparams: QParamsLike, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Values of ``codes`` as ``dtype`` (what :func:`fake_quantize` returns, for the same qparams)."""
    codes = codes.detach()
    pair = _two(spec)
    if pair is None:
        spec = _single(spec)
        _check_one(spec, qparams)
        return _dequantize_one(codes, spec, qparams, dtype)
    first, second = pair
    q1, q2 = _stage_qparams(qparams)
    if q1 is None or q2 is None:
        raise ValueError("dequantize of a two-stage spec needs both stages' qparams")
    if getattr(second, "is_scale_quant", False):
        g = q2.scale.float().reshape(())
        return _dequantize_one(codes, first, QParams(q1.scale * g, q1.zero_point), dtype)
    lay = _layout(codes, first, _kind(first))
    s1 = _per_element(lay, lay.param(q1.scale).float(), codes.shape)
    return _times_first_scale(_dequantize_one(codes, second, q2, torch.float32), s1, dtype)
