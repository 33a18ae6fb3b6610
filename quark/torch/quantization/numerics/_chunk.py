"""Row-chunked execution of fused elementwise pipelines (internal).

A fake-quantize is a short chain of elementwise ops (divide by the scale, round, clamp, multiply
back).  Run eagerly on a whole tensor, every intermediate is a fresh tensor of the input's size, and
on the CPU each such allocation costs as much as the arithmetic (the pages are new to the process).
So on the CPU the chain runs on slices of about ``CHUNK_ELEMS`` elements along dim 0, in place on
the output and on a few chunk-sized scratch buffers that are reused from chunk to chunk: the only
full-size allocation is the output, and the working set stays in cache.  Other devices have a
caching allocator and a launch cost per op, so they run the chain once on the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

CHUNK_ELEMS = 1 << 20


class Scratch:
    """Reusable flat buffers, one per ``slot``, handed out as views of the requested shape."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def get(self, slot: int, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self._bufs.get((slot, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=self.device)
            self._bufs[(slot, dtype)] = buf
        return buf[:n].view(shape)


def as_param(value: torch.Tensor | float | int, like: torch.Tensor) -> torch.Tensor:
    """A float32 tensor on ``like``'s device with ``like.dim()`` dims (leading 1s), broadcastable to it.

    Parameters are never 0-d so that type promotion with a low-precision ``x`` yields float32.
    """
    t = torch.as_tensor(value, device=like.device)
    if t.dtype != torch.float32:
        t = t.float()
    if t.dim() > max(like.dim(), 1):
        raise ValueError(f"parameter of shape {tuple(t.shape)} does not broadcast to {tuple(like.shape)}")
    return t.reshape((1,) * (max(like.dim(), 1) - t.dim()) + tuple(t.shape))


def _row_slices(x: torch.Tensor) -> list[slice]:
    if x.device.type != "cpu" or x.dim() == 0 or x.numel() <= 2 * CHUNK_ELEMS:
        return [slice(None)]
    rows = x.shape[0]
    step = max(1, CHUNK_ELEMS // max(1, x.numel() // rows))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def run_chunked(
    fn: Callable[..., None],
    x: torch.Tensor,
    params: Sequence[torch.Tensor | None],
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """Apply ``fn(x_chunk, out_chunk, scratch, *param_chunks)`` over row chunks of ``x``; return ``out``.

    ``fn`` must write its result into ``out_chunk`` (it may use it as float32 working space when its
    dtype is float32) and may take temporaries from ``scratch`` (a :class:`Scratch`).  ``params``
    are tensors with ``x.dim()`` dims broadcastable to ``x`` (or None); those whose dim 0 equals
    ``x``'s are sliced along with it.  ``out`` may be ``x`` itself (an in-place update).  A caller
    that is itself running on a chunk passes its ``scratch`` on.
    """
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    scratch = scratch or Scratch(x.device)
    slices = _row_slices(x)
    if len(slices) == 1:
        fn(x, out, scratch, *params)
        return out
    rows = x.shape[0]
    for sl in slices:
        chunk_params = [p[sl] if p is not None and p.dim() and p.shape[0] == rows else p for p in params]
        fn(x[sl], out[sl], scratch, *chunk_params)
    return out


def start(x: torch.Tensor, out: torch.Tensor, scratch: Scratch, divisor: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 working buffer holding ``x / divisor`` (``out`` itself when it is float32)."""
    buf = out if out.dtype == torch.float32 else scratch.get(0, x.shape, torch.float32)
    if divisor is None:
        if buf is not x:
            buf.copy_(x)
    else:
        torch.div(x, divisor, out=buf)
    return buf


def finish(buf: torch.Tensor, out: torch.Tensor, multiplier: torch.Tensor | None = None) -> None:
    """Write ``buf * multiplier`` into ``out`` (casting to its dtype)."""
    if multiplier is None:
        if buf is not out:
            out.copy_(buf)
    elif buf is out:
        buf.mul_(multiplier)
    else:
        torch.mul(buf, multiplier, out=out)
