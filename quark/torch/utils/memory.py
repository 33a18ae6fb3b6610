"""Returning freed host memory to the operating system between calibration blocks.

glibc's allocator keeps freed heap pages for reuse. The block loop frees and allocates
activation-sized buffers (tens of MB) for every block, and the fragments it leaves behind are not
reused exactly, so without a trim the process RSS grows by about one block's weights per block
(measured on SmolLM2: +0.4 GB over 30 blocks for W8A8 calibration; with a trim after each block the
peak stays within 0.13 GB of the loaded model). ``malloc_trim(0)`` gives the free pages back.
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
