"""Process and compiler set-up for the machine the run is on."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
TOP_PAD_BYTES = 64 << 20

CPU_MATMUL_LIBRARIES = ("auto", "ynnpack", "eigen")
# 'auto' keeps YNNPACK up to this many activation elements per micro-batch (tokens x n_embd).
YNNPACK_MAX_ACTIVATIONS = 1 << 20


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel.

    XLA's CPU runtime allocates and frees a scratch buffer of tens of MB on
    every call. glibc serves blocks that large with mmap and unmaps them on
    free, so every training step page-faults its scratch memory in again
    (thousands of faults, tens of ms of system time per step for the CPU
    config): no mmap, no trimming. That alone is not enough: once any other
    computation (the evaluation, a matmul) has run, the heap's layout makes
    the step grow its heap in small pieces again (measured 43 -> 57 ms/iter on
    the CPU recipe); a 64 MB top pad keeps it at 36 ms whatever ran before.
    Equivalent to `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=16G
    MALLOC_TOP_PAD_=64M`, without asking the user to set them. Returns False
    where there is no glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 16 << 30) == 1
    ok &= mallopt(_M_TOP_PAD, TOP_PAD_BYTES) == 1
    return bool(ok)


def fsync_dir(path) -> None:
    """Make renames inside `path` durable (POSIX; Windows has no directory fsync)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cpu_compiler_options(library: str, tokens: int, width: int) -> dict[str, str] | None:
    """XLA compile options for a training or evaluation step on the CPU (None: XLA's defaults).

    JAX 0.10's XLA:CPU hands matmuls (with neighbouring elementwise ops) to
    YNNPACK. Measured on a 2-core AVX2 CPU: it wins on small models (the CPU
    recipe, 768 tokens x 128: 40 vs 50 ms/iter with Eigen), is even on the BPE
    config (3,072 x 128) and loses at the shakespeare_char size (16,384 x 384:
    ~13.3 vs ~11.7 s/iter), where Eigen's matmuls and XLA's own fusions are
    faster. `config.cpu_matmul_library` overrides the 'auto' choice.
    """
    import jax  # noqa: PLC0415  (this module is imported before JAX is configured)

    if jax.default_backend() != "cpu":
        return None
    eigen = library == "eigen" or (library == "auto" and tokens * width > YNNPACK_MAX_ACTIVATIONS)
    return {"xla_cpu_experimental_ynn_fusion_type": ""} if eigen else None
