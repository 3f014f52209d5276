"""Process and compiler set-up for the machine the run is on."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import glob
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


# --- which accelerator platforms JAX should try ----------------------------------------------------

_NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")  # the files JAX itself looks for
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPUs attached through vfio (v5e, v6e) show up as Google PCI devices
# libtpu's start-up on a machine without a TPU: with these it stays silent (it otherwise prints a
# TPU_WORKER_HOSTNAMES error and host-bounds warnings) and compile-only topologies still work.
# ALLOW_MULTIPLE_LIBTPU_LOAD: without a TPU there is nothing for /tmp/libtpu_lockfile to guard, and
# without it a second process that compiles for a TPU target fails with "libtpu multi-process lockfile".
QUIET_LIBTPU_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def has_nvidia_gpu() -> bool:
    """An NVIDIA GPU's device files exist (the test JAX's CUDA backend makes)."""
    return any(os.path.exists(path) for path in _NVIDIA_DEVICE_FILES) or bool(glob.glob("/dev/nvidia[0-9]*"))


def has_tpu() -> bool:
    """A TPU is attached: /dev/accel* (v2-v4, v5p) or a Google PCI device (v5e, v6e through vfio)."""
    if glob.glob("/dev/accel*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor, encoding="ascii") as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def has_amd_gpu() -> bool:
    return os.path.exists("/dev/kfd")


def quiet_absent_accelerators() -> None:
    """Environment defaults that keep JAX's GPU and TPU plugins quiet where their hardware is absent.

    No NVIDIA GPU: skip the CUDA plugin's cuDNN/CUDA version check (it raises, and JAX logs a
    traceback, when the libraries are missing; without a GPU JAX skips the CUDA backend anyway).
    No TPU: `QUIET_LIBTPU_ENV`. Values the user set are kept; a machine with the hardware is untouched.
    Must run before JAX discovers its plugins (the first `jax.devices()` or compile).
    """
    if not has_nvidia_gpu():
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    if not has_tpu():
        for name, value in QUIET_LIBTPU_ENV.items():
            os.environ.setdefault(name, value)


def accelerator_platform() -> str:
    """'gpu', 'tpu' or 'cpu': the backend this process's JAX will pick, told without starting JAX.

    From JAX_PLATFORMS when set, else from the device files. A config file calls this while it
    loads, which is before `jax.distributed.initialize`: that must run before anything starts
    JAX's backend (`jax.default_backend()` would), or a multi-process run fails to start.
    """
    chosen = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if chosen:
        return {"cuda": "gpu", "rocm": "gpu"}.get(chosen, chosen)
    if has_nvidia_gpu() or has_amd_gpu():
        return "gpu"
    return "tpu" if has_tpu() else "cpu"


def select_platforms() -> str | None:
    """Set JAX_PLATFORMS=cpu on a machine without any accelerator, when the user has not set it.

    With the `aot` extra installed (libtpu and the CUDA plugin, for compiling for hardware that is
    not here), JAX would otherwise initialise both plugins at start-up on every machine: the CUDA
    plugin logs a cuDNN traceback, libtpu prints worker-hostname errors, and both cost start-up time.
    Where an NVIDIA GPU, a TPU or an AMD GPU is present nothing changes: JAX picks the backend as it
    always does (only the absent platform is kept quiet, see `quiet_absent_accelerators`).
    Compile-only targets (`haiku_gpt.aot.targets`) work with JAX_PLATFORMS=cpu: they load the plugins
    themselves. Call before `import jax`. Returns the value set, or None when nothing was set.
    """
    quiet_absent_accelerators()
    if "JAX_PLATFORMS" in os.environ:  # the user's choice, even an empty one (JAX's automatic choice)
        return None
    if has_nvidia_gpu() or has_tpu() or has_amd_gpu():
        return None
    os.environ["JAX_PLATFORMS"] = "cpu"
    return "cpu"


# Python's cyclic collector runs after this many new container objects (700 by default).
GC_FIRST_GENERATION_THRESHOLD = 50_000


def collect_garbage_less_often() -> None:
    """Run Python's cyclic garbage collector less often. Importing JAX and tracing, lowering and
    compiling a model allocate millions of objects, and each full collection walks every one still
    alive (jaxprs, MLIR modules, the imported modules). A first-generation threshold of 50,000 made
    start-up measurably faster: a 20-step run of configs/tiny.py 4.1 -> 3.8 s, configs/shakespeare_char.py
    to its first evaluation 11.8 -> 11.1 s (2-core CPU). The memory held back is a few MB."""
    gc.set_threshold(GC_FIRST_GENERATION_THRESHOLD, 20, 100)


def set_up_process() -> str:
    """A run's start-up, before JAX starts: pick the platforms (`select_platforms`), collect garbage
    less often (`collect_garbage_less_often`), then tune glibc's allocator (`tune_allocator`) only where
    the run is on the CPU. The tuning was measured to help only XLA's CPU runtime, whose steps allocate
    their scratch memory on the host; a GPU or TPU run keeps glibc's defaults (no reason to hold every
    freed host byte for the process's lifetime). Returns the platform, 'cpu', 'gpu' or 'tpu'
    (`accelerator_platform`)."""
    select_platforms()
    collect_garbage_less_often()
    platform = accelerator_platform()
    if platform == "cpu":
        tune_allocator()
    return platform


# --- memory available to a run --------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _host_available_bytes() -> int | None:
    available = None
    try:
        import psutil  # noqa: PLC0415 (optional)
        available = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    # A container's cgroup limit applies on top of the machine's memory.
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None and limit < 1 << 60:
            room = limit - (_read_int(usage_file) or 0)
            available = room if available is None else min(available, room)
            break
    return available


def available_memory(device) -> tuple[int | None, str]:
    """(bytes available to this run on `device` (a jax.Device), where the number comes from)."""
    if device.platform == "cpu":
        return _host_available_bytes(), "available host memory"
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 (backends without memory stats)
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind} memory limit"
    return None, "unknown"
