"""Keep freed memory for reuse (CPU).

RSP allocates large temporaries (unfolded patches, responses) on every call. glibc serves
blocks above 32 MB with fresh ``mmap`` pages and returns them on free, so every call pays
a page fault per 4 KB touched — measured here as ~40% of a VGG16 batch of 8. Telling the
allocator to serve them from the heap and keep what is freed makes later calls reuse the
same, already mapped, memory. Process-wide and opt-in: the CLI and the benchmarks call it.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_done = False


def keep_freed_memory(top_pad_mb: int = 1024) -> bool:
    """Make glibc's malloc keep and reuse freed memory; True if it took effect (glibc only)."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim
        ok = ok and libc.mallopt(_M_TOP_PAD, top_pad_mb << 20)
    except (OSError, AttributeError):  # not glibc
        return False
    _done = bool(ok)
    return _done
