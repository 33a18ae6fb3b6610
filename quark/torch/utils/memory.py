"""Returning freed host memory to the operating system between calibration blocks.

glibc's allocator keeps freed heap pages for reuse. The block loop frees and allocates
activation-sized buffers (tens of MB) for every block, and the fragments it leaves behind are not
reused exactly, so without a trim the process RSS grows by about one block's weights per block
(measured on SmolLM2: +0.4 GB over 30 blocks for W8A8 calibration; with a trim after each block the
peak stays within 0.13 GB of the loaded model). ``malloc_trim(0)`` gives the free pages back.

Trimming has a price: the next block allocates the same buffers again and faults every returned page
back in (SmolLM2 GPTAQ: about 120k page faults, 0.3 s of system time per block). Freed pages that the
next block reuses do not raise the peak; only the creep does. :class:`BlockTrimmer` therefore trims
only once the resident size has grown by more than a slack since the block after the last trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_free_memory() -> bool:
    """Give freed heap memory back to the OS (glibc); returns whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_bytes() -> int | None:
    """The process's resident set size (Linux ``/proc/self/statm``), None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=1)
def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


class BlockTrimmer:
    """Called after every block of a loop: gives freed memory back (:func:`release_free_memory`) once
    the resident size exceeds, by more than ``slack`` bytes, what it was after the first block since
    the last trim (that block's freed buffers are what the next ones reuse). Where the resident size
    cannot be read, trims after every block."""

    #: growth tolerated before a trim (the fragmentation creep is about 15 MB per SmolLM2 block)
    SLACK_BYTES = 64 << 20

    def __init__(self, slack: int | None = None) -> None:
        self.slack = self.SLACK_BYTES if slack is None else slack
        self.level: int | None = None
        self.trims = 0

    def after_block(self) -> bool:
        """Trim if due; returns whether it trimmed."""
        rss = resident_bytes()
        if rss is not None and (self.level is None or rss <= self.level + self.slack):
            if self.level is None:
                self.level = rss
            return False
        release_free_memory()
        self.level = None
        self.trims += 1
        return True


class PeakResident:
    """The largest resident size (:func:`resident_bytes`) seen while the ``with`` body runs, sampled
    by a thread every ``interval`` seconds (and at entry and exit): unlike ``ru_maxrss`` it leaves out
    what the process held before (e.g. loading a model). ``start`` is the size at entry. Where the
    resident size cannot be read, both are the process's ``ru_maxrss`` (Unix) or 0."""

    def __init__(self, interval: float = 0.01) -> None:
        import threading

        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        rss = resident_bytes()
        if rss is not None:
            return rss
        try:
            import resource
        except ImportError:  # not Unix
            return 0
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> PeakResident:
        self.start = self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())
