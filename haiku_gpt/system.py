"""Process set-up that must happen before JAX does real work."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel.

    XLA's CPU runtime allocates and frees a scratch buffer of tens of MB on
    every call. glibc serves blocks that large with mmap and unmaps them on
    free, so every training step page-faults its scratch memory in again
    (thousands of faults, tens of ms of system time per step for the CPU
    config). Equivalent to `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=16G`,
    without asking the user to set them. Returns False where there is no glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 16 << 30) == 1
    return bool(ok)
