"""Observers: estimate quantization parameters of static tensors from calibration statistics.

An observer sees every calibration batch through :meth:`Observer.update` and finally returns
:class:`~quark.torch.quantization.tensor_quantize.QParams` through :meth:`Observer.qparams`. Every
observer reduces what it saw to a *range* ``(lo, hi)`` and hands ``stack([lo, hi])`` to the same
min-max qparams code dynamic quantization uses, so a format's scale math exists in one place
(``tensor_quantize``). The observers differ only in how they choose the range:

- ``PerTensorMinMaxObserver`` / ``PerChannelMinMaxObserver``: running min and max.
- ``PerTensorHistogramObserver``: a histogram of the values; the range minimising the quantization
  error estimated on the histogram (bin centres weighted by counts), through the real format.
- ``PerTensorMSEObserver``: the range minimising the quantization MSE on a uniform reservoir sample
  of the actual values.
- ``PerTensorPercentileObserver``: clip at a percentile (99.99 by default) of the values.
"""

from __future__ import annotations

import torch

from .config.config import QTensorConfig
from .config.type import QSchemeType

#: candidate clipping ratios searched by the histogram and MSE observers
CLIP_RATIOS = torch.linspace(0.30, 1.0, 71, dtype=torch.float64)


def _to_rows(x: torch.Tensor) -> torch.Tensor:
    """View an activation as [rows, features] (features = last dim)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


class Observer:
    """Base class. ``spec`` is the (first-stage or scale-stage) spec whose range is observed."""

    def __init__(self, spec: QTensorConfig) -> None:
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    @property
    def has_data(self) -> bool:
        return self.lo is not None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        lo, hi = self._reduce(x)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = torch.minimum(self.lo, lo)
            self.hi = torch.maximum(self.hi, hi)

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        finite = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
        return finite.amin(), finite.amax()

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError(
                f"{type(self).__name__} saw no data: the layer received no calibration inputs "
                "(is it reached by the calibration batches?)"
            )
        return self.lo, self.hi

    def representative(self) -> torch.Tensor:
        """A tiny tensor whose min-max qparams are this observer's qparams."""
        lo, hi = self.range()
        return torch.stack([lo, hi], dim=-1)

    def qparams(self, spec: QTensorConfig | None = None):
        from .tensor_quantize import compute_qparams

        return compute_qparams(self.representative(), spec or self.spec)


class PlaceholderObserver(Observer):
    """For dynamic specs: nothing is recorded, the quantizer computes qparams per call."""

    def update(self, x: torch.Tensor) -> None:  # noqa: D102
        return None


class PerTensorMinMaxObserver(Observer):
    """Running min / max of the whole tensor."""


class PerChannelMinMaxObserver(Observer):
    """Running min / max per channel: per row of the [rows, features] view for ``ch_axis=0``
    (a weight's output channels), per feature for ``ch_axis=-1`` / the last axis."""

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.nan_to_num(_to_rows(x).float(), nan=0.0, posinf=0.0, neginf=0.0)
        axis = self.spec.ch_axis if self.spec.ch_axis is not None else 0
        dim = 1 if axis == 0 else 0
        return rows.amin(dim=dim), rows.amax(dim=dim)

    def representative(self) -> torch.Tensor:
        lo, hi = self.range()
        pair = torch.stack([lo, hi], dim=1)  # [channels, 2]
        return pair if (self.spec.ch_axis or 0) == 0 else pair.t()


class PerGroupMinMaxObserver(Observer):
    """Per-group specs are weights (static activations per group are refused by the config); the
    weight itself is the representative tensor."""

    def update(self, x: torch.Tensor) -> None:
        self.lo = self.hi = x.detach()

    def representative(self) -> torch.Tensor:
        self.range()
        return self.lo


PerBlockMXObserver = PerGroupMinMaxObserver
PerBlockBFPObserver = PerGroupMinMaxObserver


class _HistogramObserver(Observer):
    """Accumulates a fixed-size histogram over a range that only grows (old counts are re-binned)."""

    bins = 2048

    def __init__(self, spec: QTensorConfig) -> None:
        super().__init__(spec)
        self.hist: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return
        old_lo, old_hi = (self.lo, self.hi) if self.lo is not None else (None, None)
        super().update(x)
        lo, hi = float(self.lo), float(self.hi)
        if hi <= lo:
            hi = lo + 1e-8
        new = torch.histc(x.double(), bins=self.bins, min=lo, max=hi)
        if self.hist is not None:
            if (float(old_lo), float(old_hi)) != (lo, hi):
                # re-bin the old histogram: put each old bin's count at its centre
                edges = torch.linspace(float(old_lo), float(old_hi), self.bins + 1, dtype=torch.float64, device=x.device)
                centres = (edges[:-1] + edges[1:]) / 2
                idx = ((centres - lo) / (hi - lo) * self.bins).long().clamp_(0, self.bins - 1)
                self.hist = torch.zeros_like(new).index_add_(0, idx, self.hist)
            new += self.hist
        self.hist = new

    def _centres(self) -> torch.Tensor:
        lo, hi = float(self.lo), float(self.hi)
        edges = torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64, device=self.hist.device)
        return (edges[:-1] + edges[1:]) / 2


def _best_range(values: torch.Tensor, weights: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor, spec: QTensorConfig):
    """The (lo, hi) among scaled copies of the full range with the least weighted quantization MSE."""
    from .tensor_quantize import compute_qparams, fake_quantize

    best, best_err = (lo, hi), None
    v = values.float()
    for r in CLIP_RATIOS.tolist():
        cand_lo, cand_hi = lo * r, hi * r
        qp = compute_qparams(torch.stack([cand_lo, cand_hi]).float(), spec)
        err = (fake_quantize(v, spec, qp).double() - values.double()).pow(2)
        err = (err * weights).sum() if weights is not None else err.sum()
        if best_err is None or err < best_err:
            best, best_err = (cand_lo, cand_hi), err
    return best


class PerTensorHistogramObserver(_HistogramObserver):
    """Range minimising the quantization error estimated on the histogram (format-aware)."""

    def representative(self) -> torch.Tensor:
        self.range()
        lo, hi = _best_range(self._centres(), self.hist, self.lo.float(), self.hi.float(), self.spec)
        return torch.stack([lo, hi])


class PerTensorPercentileObserver(_HistogramObserver):
    """Clip both tails at ``percentile`` of the observed values."""

    percentile = 99.99

    def representative(self) -> torch.Tensor:
        self.range()
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        tail = (100.0 - self.percentile) / 100.0
        centres = self._centres()
        lo_idx = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=cdf.dtype, device=cdf.device)))
        hi_idx = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=cdf.dtype, device=cdf.device)))
        lo = torch.minimum(centres[min(lo_idx, self.bins - 1)], torch.zeros((), dtype=centres.dtype, device=centres.device))
        hi = torch.maximum(centres[min(hi_idx, self.bins - 1)], torch.zeros((), dtype=centres.dtype, device=centres.device))
        return torch.stack([lo, hi]).float()


class PerTensorMSEObserver(Observer):
    """Range minimising the quantization MSE on a uniform reservoir sample of the observed values."""

    sample_size = 1 << 16

    def __init__(self, spec: QTensorConfig) -> None:
        super().__init__(spec)
        self.sample: torch.Tensor | None = None
        self.seen = 0
        self._gen = torch.Generator().manual_seed(0)

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        flat = x.detach().float().flatten()
        flat = flat[torch.isfinite(flat)]
        n = flat.numel()
        if n == 0:
            return
        # keep a uniform sample of everything seen so far (reservoir sampling, vectorised per batch)
        take = min(n, self.sample_size)
        pick = flat[torch.randperm(n, generator=self._gen)[:take].to(flat.device)]
        if self.sample is None:
            self.sample = pick
        else:
            keep_old = round(self.sample_size * self.seen / (self.seen + n))
            old = self.sample[torch.randperm(self.sample.numel(), generator=self._gen)[:keep_old].to(flat.device)]
            self.sample = torch.cat([old, pick[: self.sample_size - old.numel()]])
        self.seen += n

    def representative(self) -> torch.Tensor:
        self.range()
        lo, hi = _best_range(self.sample, None, self.lo.float(), self.hi.float(), self.spec)
        return torch.stack([lo, hi])


_OBSERVERS = {
    cls.__name__: cls
    for cls in (
        PlaceholderObserver,
        PerTensorMinMaxObserver,
        PerChannelMinMaxObserver,
        PerGroupMinMaxObserver,
        PerTensorHistogramObserver,
        PerTensorPercentileObserver,
        PerTensorMSEObserver,
    )
}
_OBSERVERS["PerBlockMXObserver"] = PerGroupMinMaxObserver
_OBSERVERS["PerBlockBFPObserver"] = PerGroupMinMaxObserver


def make_observer(spec: QTensorConfig) -> Observer:
    """The observer a spec names (min-max of its granularity when it names none)."""
    name = spec.observer_cls
    if name is None:
        name = {
            QSchemeType.per_channel: "PerChannelMinMaxObserver",
            QSchemeType.per_group: "PerGroupMinMaxObserver",
        }.get(spec.qscheme, "PerTensorMinMaxObserver")
    return _OBSERVERS[name](spec)
