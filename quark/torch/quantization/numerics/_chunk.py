"""Row-chunked execution of fused elementwise pipelines (internal).

A fake-quantize is a short chain of elementwise ops (divide by the scale, round, clamp, multiply
back).  Run eagerly on a whole tensor, every intermediate is a fresh tensor of the input's size, and
on the CPU each such allocation costs as much as the arithmetic (the pages are new to the process).
So on the CPU the chain runs on slices of about ``CHUNK_ELEMS`` elements along dim 0, in place on
the output and on a few chunk-sized scratch buffers reused from chunk to chunk: the only full-size
allocation is the output, and the working set stays in cache.

The chunks are spread over a small pool of worker threads, each running its ops with one
intra-op thread (the ops release the GIL).  Letting every op fork and join torch's OpenMP team
instead costs a barrier per op, and a barrier waits for the slowest thread: on a busy machine,
where a thread loses its core for a scheduler time slice at a time, a chain of a few hundred
small parallel regions then ran 10-100x slower than one ``clone()``; with independent workers the
slowdown stays proportional to the load.  ``QUARK_NUMERICS_THREADS=0`` turns the pool off (plain
loop, torch's own intra-op parallelism); a positive value sets the number of workers.

Other devices have a caching allocator and a launch cost per op, so they run the chain once on the
whole tensor.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

CHUNK_ELEMS = 1 << 20
MAX_WORKERS = 8  # past this the GIL (held while an op is dispatched) becomes the bottleneck


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
    t = torch.as_tensor(value, device=like.device).detach()
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


# --------------------------------------------------------------------------------------------
# worker pool
# --------------------------------------------------------------------------------------------
_state = threading.local()  # .worker: this thread is a pool worker
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None
_pool_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _pool, _pool_key
    _pool, _pool_key = None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _wanted_workers() -> tuple[int, int]:
    """(workers, intra-op threads per worker) for the current torch thread setting."""
    env = os.environ.get("QUARK_NUMERICS_THREADS")
    threads = torch.get_num_threads()
    workers = int(env) if env not in (None, "") else min(threads, MAX_WORKERS)
    if workers <= 1:
        return 0, threads
    return workers, max(1, threads // workers)


def _get_pool() -> ThreadPoolExecutor | None:
    global _pool, _pool_key
    key = _wanted_workers()
    if key[0] == 0:
        return None
    with _pool_lock:
        if _pool is not None and _pool_key == key:
            return _pool
        if _pool is not None:
            _pool.shutdown(wait=False)
        workers, per_worker = key
        ready = threading.Barrier(workers + 1)
        main_threads = torch.get_num_threads()

        def init() -> None:
            _state.worker = True
            torch.get_num_threads()  # torch's lazy per-thread init first, so it cannot undo the next line
            torch.set_num_threads(per_worker)  # OpenMP's thread count is per calling thread
            ready.wait()

        pool = ThreadPoolExecutor(workers, thread_name_prefix="quark-numerics", initializer=init)
        for _ in range(workers):
            pool.submit(int)  # start every worker now (each runs ``init``) ...
        ready.wait()
        torch.set_num_threads(main_threads)  # ... then restore the process-wide default they changed
        _pool, _pool_key = pool, key
        return pool


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
    that is itself running on a chunk passes its ``scratch`` on (and is never chunked again).
    No autograd: inputs are detached.
    """
    x = x.detach()
    params = [None if p is None else p.detach() for p in params]
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    slices = [slice(None)] if scratch is not None else _row_slices(x)
    if len(slices) == 1:
        fn(x, out, scratch or Scratch(x.device), *params)
        return out
    rows = x.shape[0]

    def chunk(sl: slice, scr: Scratch) -> None:
        fn(x[sl], out[sl], scr, *[p[sl] if p is not None and p.dim() and p.shape[0] == rows else p for p in params])

    pool = None if getattr(_state, "worker", False) else _get_pool()
    if pool is None:
        local = Scratch(x.device)
        for sl in slices:
            chunk(sl, local)
        return out
    per_thread = threading.local()  # one Scratch per worker for this call

    def work(sl: slice) -> None:
        scr = getattr(per_thread, "scratch", None)
        if scr is None:
            scr = per_thread.scratch = Scratch(x.device)
        with torch.no_grad():
            chunk(sl, scr)

    for _ in pool.map(work, slices):
        pass
    return out


def start(
    x: torch.Tensor, out: torch.Tensor, scratch: Scratch, divisor: torch.Tensor | None = None,
    multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 working buffer holding ``x / divisor`` or ``x * multiplier`` (``out`` itself when it is
    float32)."""
    buf = out if out.dtype == torch.float32 else scratch.get(0, x.shape, torch.float32)
    if divisor is not None:
        torch.div(x, divisor, out=buf)
    elif multiplier is not None:
        torch.mul(x, multiplier, out=buf)
    elif buf is not x:
        buf.copy_(x)
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
