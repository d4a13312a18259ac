"""Keep freed memory for reuse (CPU), or return it at once (to measure peaks).

RSP allocates large temporaries (unfolded patches, responses) on every call. glibc serves
blocks above 32 MB with fresh ``mmap`` pages and returns them on free, so every call pays
a page fault per 4 KB touched — measured here as ~40% of a VGG16 batch of 8. Telling the
allocator to serve them from the heap and keep what is freed makes later calls reuse the
same, already mapped, memory. Process-wide and opt-in: the CLI and the benchmarks call it.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_DEFAULT_MMAP_MAX, _DEFAULT_TOP_PAD = 65536, 128 << 10  # glibc's (mallopt(3))


def _mallopt(*settings: tuple[int, int]) -> bool:
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return all(libc.mallopt(param, value) for param, value in settings)
    except (OSError, AttributeError):  # not glibc
        return False


def keep_freed_memory(top_pad_mb: int = 1024) -> bool:
    """Make glibc's malloc keep and reuse freed memory; True if it took effect (glibc only)."""
    return _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, top_pad_mb << 20))  # -1: never trim


def return_freed_memory(threshold_kb: int = 128) -> bool:
    """The opposite, for measuring (also after ``keep_freed_memory``): blocks from
    ``threshold_kb`` up get their own pages, returned to the system when freed (a fixed
    threshold also stops glibc from raising it to 32 MB as it goes), so the resident set
    follows live memory and its high-water mark is the real peak."""
    return _mallopt((_M_MMAP_MAX, _DEFAULT_MMAP_MAX), (_M_TOP_PAD, _DEFAULT_TOP_PAD),
                    (_M_MMAP_THRESHOLD, threshold_kb << 10), (_M_TRIM_THRESHOLD, threshold_kb << 10))
