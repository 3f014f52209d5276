"""Named compile-only targets: compile a jitted function for a GPU or TPU that is not here.

    target = parse_target("h100x8")                 # or "a100", "tpu-v5e:2x4", ...
    result = compile_for(target, step, state, batch, in_shardings=..., kernels="flash_attention_")
    result.memory.peak_bytes, result.flops, result.kernels

JAX can build "compile-only" devices for hardware it cannot see
(`jax.experimental.topologies.get_topology_desc`) and XLA then compiles for
them exactly as it would on the real machine: the same HLO passes, the same
Triton/Mosaic kernel compilers, the same buffer assignment. Nothing runs, so
no GPU or TPU is needed, but the `aot` extra must be installed
(`pip install -e '.[aot]'`: libtpu for TPUs, the CUDA PJRT plugin for GPUs).

Glossary
  target         a named machine: platform, generation and device count, e.g. `h100x8`.
  slice          a TPU pod slice, chips per axis: `tpu-v5e:2x4` is 8 v5e chips in a 2x4 torus.
  device         what JAX calls a device: one GPU; one TPU chip (v5e, v5p, v6e), but one
                 TensorCore on v4, whose compile-only topology has no megacore mode (so
                 `tpu-v4:2x2x1` is 4 chips = 8 devices of 16 GiB each).
  compile-only   a device with no runtime behind it: `jit(...).lower(...).compile()` works,
                 executing does not.
  memory         XLA's per-device memory analysis of the compiled program: arguments,
                 outputs, temporaries, aliased (donated) bytes and the peak.
  FLOPs          XLA's cost analysis of the optimized per-device program. TPU: the
                 compiler's own; GPU (whose compiler has none): XLA's generic HLO cost model
                 run over the optimized GPU module. Kernels (custom calls) count 0 on GPU.
  HBM            device memory (per device); VMEM: a TPU core's on-chip vector memory;
  scoped VMEM    the part of VMEM a Mosaic kernel may use (its `vmem_limit_bytes`, else the
                 compiler's default: 16 MiB on v4/v5e/v5p, 32 MiB on v6e, measured).
  kernel         a GPU kernel (Triton or Mosaic GPU from Pallas, or one of XLA's fusions) or a
                 TPU Mosaic kernel, by its name (this package's start with `flash_attention_`).
                 A Mosaic GPU kernel is compiled by the CUDA plugin inside XLA's compile, which
                 dumps its PTX when asked (MOSAIC_GPU_DUMP_PTX, MOSAIC_GPU_DUMP_TO): named by
                 its kernel name (`plgpu.kernel(..., kernel_name=)`, else the body function's
                 name), its PTX entry being `<name>_mosaic_gpu_kernel`.
  registers      per thread, from `ptxas -v` on the PTX XLA generated; spills likewise.
  shared memory  per block: the dynamic shared memory XLA launches the kernel with (its
                 thunk sequence; Triton's is all dynamic) plus ptxas's static `smem`. A
                 Mosaic GPU kernel's dynamic shared memory is set by its own launch, not in
                 the dump: unknown (its threads per block come from the PTX's `.maxntid`).
                 The plugin compiles, and dumps, a kernel once per process: a program whose
                 Mosaic GPU kernel was compiled before in the process is refused for a report.

Targets (per device: HBM, dense bf16 peak; public specs)
  a100, a100xN   NVIDIA A100 SXM4 80GB, sm_80, N = 1..8 in one host; 312 TFLOP/s.
  h100, h100xN   NVIDIA H100 SXM5 80GB, sm_90a, N = 1..8 in one host; 989 TFLOP/s.
  tpu-v4[:AxBxC]   default 2x2x1 (4 chips, 8 TensorCore devices); 32 GiB, 275 TFLOP/s per chip.
  tpu-v5p[:AxBxC]  default 2x2x1 (4 chips); 95 GiB, 459 TFLOP/s per chip.
  tpu-v5e[:AxB]    default 2x2 (4 chips, one host); 16 GiB, 197 TFLOP/s per chip.
  tpu-v6e[:AxB]    default 2x2 (4 chips, one host); 32 GiB, 918 TFLOP/s per chip.
GPU target configs (what XLA would otherwise read from the device) are package
data: `haiku_gpt/aot/gpu_specs/<generation>.txtpb`.

Environment. Importing this module changes nothing. When a target's devices are
first built (`devices`, `compile_for`), it sets defaults that keep JAX's plugins
quiet where their hardware is absent (`haiku_gpt.system.quiet_absent_accelerators`):
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 without an NVIDIA GPU (else the CUDA plugin
refuses to register without cuDNN, and then no CUDA topology exists), and
TPU_SKIP_MDS_QUERY / TPU_WORKER_HOSTNAMES / TPU_ACCELERATOR_TYPE /
ALLOW_MULTIPLE_LIBTPU_LOAD without a TPU (else libtpu prints worker-hostname
errors, and only one process at a time may load it). A program that starts JAX's
backends first (`jax.devices()`) calls `haiku_gpt.system.select_platforms()`
before that, as launch.py does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from haiku_gpt.errors import UserError
from haiku_gpt.system import quiet_absent_accelerators

AOT_FIX = "pip install -e '.[aot]'"
GiB = 1 << 30
MiB = 1 << 20


class TargetError(UserError, ValueError):
    """A target name that does not parse, or a target that cannot be compiled for here."""


class AotUnavailable(UserError, RuntimeError):
    """The `aot` extra (libtpu, the CUDA plugin) is not installed."""


# --- the targets ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Generation:
    """One accelerator generation; memory, FLOP/s and bandwidth are per device."""

    platform: str  # "cuda" | "tpu"
    device_kind: str  # as jax.Device.device_kind reports it
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bandwidth: float  # bytes/s
    devices_per_chip: int = 1
    vmem_bytes: int | None = None  # per TensorCore
    scoped_vmem_bytes: int | None = None  # Mosaic's default limit per kernel
    default_shape: tuple[int, ...] = (1,)
    host_shape: tuple[int, ...] = ()  # TPU chips per host


_GENERATIONS: dict[str, _Generation] = {
    # GPUs: HBM as CUDA reports it (the gpu_specs files' device_memory_size), dense bf16 tensor-core peak.
    "a100": _Generation("cuda", "NVIDIA A100-SXM4-80GB", 85_100_068_864, 312e12, 2.039e12),
    "h100": _Generation("cuda", "NVIDIA H100 80GB HBM3", 85_520_809_984, 989e12, 3.35e12),
    # TPUs (Cloud TPU docs; VMEM as jax.experimental.pallas.tpu's chip table and libtpu's errors say).
    "v4": _Generation("tpu", "TPU v4", 16 * GiB, 137.5e12, 0.6e12, devices_per_chip=2, vmem_bytes=16 * MiB,
                      scoped_vmem_bytes=16 * MiB, default_shape=(2, 2, 1), host_shape=(2, 2, 1)),
    "v5p": _Generation("tpu", "TPU v5", 95 * GiB, 459e12, 2.765e12, vmem_bytes=64 * MiB,
                       scoped_vmem_bytes=16 * MiB, default_shape=(2, 2, 1), host_shape=(2, 2, 1)),
    "v5e": _Generation("tpu", "TPU v5 lite", 16 * GiB, 197e12, 0.819e12, vmem_bytes=128 * MiB,
                       scoped_vmem_bytes=16 * MiB, default_shape=(2, 2), host_shape=(2, 4)),
    "v6e": _Generation("tpu", "TPU v6 lite", 32 * GiB, 918e12, 1.64e12, vmem_bytes=128 * MiB,
                       scoped_vmem_bytes=32 * MiB, default_shape=(2, 2), host_shape=(2, 4)),
}
_LITE_SLICES = ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))  # v5e and v6e
_MAX_GPUS_PER_HOST = 8
_MAX_TPU_AXIS = 16
XLA_DEFAULT_OPTIMIZATION_LEVEL = 3  # DebugOptions.xla_backend_optimization_level when no flag sets it
_GPU_RE = re.compile(r"(a100|h100)(?:x(\d+))?")
_TPU_RE = re.compile(r"tpu-(v4|v5e|v5p|v6e)(?::(\d+(?:x\d+)*))?")
VALID_TARGETS = (
    "a100 or h100 (one GPU) and a100xN or h100xN (N = 1..8 GPUs in one host); tpu-v5e[:S] and "
    "tpu-v6e[:S] with S one of " + ", ".join("x".join(map(str, s)) for s in _LITE_SLICES) + " (default 2x2); "
    f"tpu-v4[:AxBxC] and tpu-v5p[:AxBxC] with A, B, C powers of two up to {_MAX_TPU_AXIS} (default 2x2x1)")


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to compile for. Memory, FLOP/s and bandwidth are per device."""

    name: str  # canonical: "h100", "a100x8", "tpu-v5e:2x4"
    platform: str  # "cuda" | "tpu"
    generation: str  # "a100" | "h100" | "v4" | "v5e" | "v5p" | "v6e"
    device_kind: str
    shape: tuple[int, ...]  # TPU: chips per slice axis; GPU: (number of GPUs,)
    num_chips: int
    num_devices: int
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bandwidth: float
    vmem_bytes: int | None = None
    scoped_vmem_bytes: int | None = None

    @property
    def topology_name(self) -> str:
        """What `get_topology_desc` is asked for: "v5e:2x4" (TPU), "1x1x8" (GPU: slices x hosts x GPUs)."""
        if self.platform == "tpu":
            return f"{self.generation}:{'x'.join(map(str, self.shape))}"
        return f"1x1x{self.num_devices}"

    @property
    def total_hbm_bytes(self) -> int:
        return self.hbm_bytes * self.num_devices


def parse_target(spec: str | Target) -> Target:
    """The Target a name describes (case and surrounding spaces ignored); TargetError (a ValueError) if none."""
    if isinstance(spec, Target):
        return spec
    text = str(spec).strip().lower()
    if match := _GPU_RE.fullmatch(text):
        return _gpu_target(spec, match.group(1), match.group(2))
    if match := _TPU_RE.fullmatch(text):
        return _tpu_target(spec, match.group(1), match.group(2))
    raise _bad_target(spec, "not a known target name")


def _bad_target(spec: object, reason: str) -> TargetError:
    return TargetError(f"invalid target {str(spec)!r} ({reason}): valid targets are {VALID_TARGETS}; "
                       "e.g. --config.target=h100x8 or --config.target=tpu-v5e:2x4.")


def _gpu_target(spec: object, generation: str, count: str | None) -> Target:
    n = int(count) if count is not None else 1
    if not 1 <= n <= _MAX_GPUS_PER_HOST:
        raise _bad_target(spec, f"{n} GPUs: a target is one host with 1 to {_MAX_GPUS_PER_HOST}")
    name = generation if n == 1 else f"{generation}x{n}"
    return _make_target(name, generation, (n,), n)


def _tpu_target(spec: object, generation: str, slice_text: str | None) -> Target:
    gen = _GENERATIONS[generation]
    shape = tuple(int(d) for d in slice_text.split("x")) if slice_text else gen.default_shape
    if reason := _slice_problem(generation, shape):
        raise _bad_target(spec, reason)
    chips = math.prod(shape)
    return _make_target(f"tpu-{generation}:{'x'.join(map(str, shape))}", generation, shape, chips)


def _slice_problem(generation: str, shape: tuple[int, ...]) -> str | None:
    text = "x".join(map(str, shape))
    if generation in ("v5e", "v6e"):
        return None if shape in _LITE_SLICES else f"{generation} has no {text} slice"
    if len(shape) != 3:
        return f"a {generation} slice has three axes, AxBxC, not {text}"
    if any(d < 1 or d > _MAX_TPU_AXIS or d & (d - 1) for d in shape):
        return f"{generation} slice {text}: each axis must be a power of two up to {_MAX_TPU_AXIS}"
    return None


def _make_target(name: str, generation: str, shape: tuple[int, ...], chips: int) -> Target:
    gen = _GENERATIONS[generation]
    return Target(name=name, platform=gen.platform, generation=generation, device_kind=gen.device_kind,
                  shape=shape, num_chips=chips, num_devices=chips * gen.devices_per_chip,
                  hbm_bytes=gen.hbm_bytes, peak_bf16_flops=gen.peak_bf16_flops,
                  hbm_bandwidth=gen.hbm_bandwidth, vmem_bytes=gen.vmem_bytes,
                  scoped_vmem_bytes=gen.scoped_vmem_bytes)


def gpu_spec_text(generation: str) -> str:
    """The GpuTargetConfigProto (text format) shipped for a GPU generation ("a100", "h100")."""
    return resources.files("haiku_gpt.aot").joinpath("gpu_specs", f"{generation}.txtpb").read_text(encoding="utf-8")


# --- the extra, the devices, the mesh -----------------------------------------------------------

_EXTRA_PACKAGES = {"tpu": ("libtpu",), "cuda": ("jax-cuda13-plugin", "jax-cuda13-pjrt")}


def require_aot(target: str | Target) -> None:
    """AotUnavailable (one paragraph, naming the fix) unless the target's compiler is installed."""
    target = parse_target(target)
    packages = _EXTRA_PACKAGES[target.platform]
    missing, stale = [], []
    for package in packages:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        if package.startswith("jax-") and version != importlib.metadata.version("jax"):
            stale.append(f"{package}=={version} with jax=={importlib.metadata.version('jax')}")
    if not missing and not stale:
        return
    what = "libtpu (the TPU compiler)" if target.platform == "tpu" else "JAX's CUDA plugin (the GPU compiler)"
    problem = (f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed" if missing
               else f"the versions do not match ({'; '.join(stale)})")
    raise AotUnavailable(
        f"compiling for {target.name} needs {what}, but {problem}: install the aot extra with `{AOT_FIX}` "
        "(jax[tpu], jax-cuda13-plugin and jax-cuda13-pjrt at the jax version); no GPU or TPU is needed.")


def devices(target: str | Target) -> tuple[Any, ...]:
    """The target's compile-only jax devices (built once per target and process)."""
    target = parse_target(target)
    require_aot(target)
    return _devices(target)


@functools.lru_cache(maxsize=None)
def _devices(target: Target) -> tuple[Any, ...]:
    quiet_absent_accelerators()  # before JAX loads its plugins (not at import: an import has no side effects)
    from jax.experimental import topologies  # noqa: PLC0415

    try:
        if target.platform == "tpu":
            topology = topologies.get_topology_desc(
                topology_name=target.topology_name, platform="tpu", chips_per_host_bounds=_chips_per_host(target))
        else:
            topology = topologies.get_topology_desc(
                topology_name="", platform="cuda", topology=target.topology_name,
                target_config=gpu_spec_text(target.generation))
    except NotImplementedError as e:  # the CUDA plugin did not register
        raise TargetError(
            f"no CUDA compiler for {target.name} ({e}): JAX started before JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 "
            "was set, so its CUDA plugin failed its cuDNN check and did not register; call "
            "haiku_gpt.system.select_platforms() before JAX starts (before jax.devices()).") from e
    found = tuple(topology.devices)
    if len(found) != target.num_devices:
        raise RuntimeError(f"{target.name}: the compile-only topology has {len(found)} devices, "
                           f"expected {target.num_devices}")
    return found


def _chips_per_host(target: Target) -> list[int]:
    """Whole hosts of the generation, or the whole slice when it is smaller (a 1x1 slice is one chip)."""
    host = _GENERATIONS[target.generation].host_shape
    shape = target.shape + (1,) * (3 - len(target.shape))
    host = host + (1,) * (3 - len(host))
    return [min(s, h) for s, h in zip(shape, host)]


def make_mesh(target: str | Target):
    """A 1-D mesh over the target's devices, axis 'data' (haiku_gpt.distributed's DATA_AXIS).

    `haiku_gpt.distributed.DataParallel(make_mesh(target), fsdp=...)` then gives the trainer's shardings.
    """
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import AxisType  # noqa: PLC0415

    from haiku_gpt.distributed import DATA_AXIS  # noqa: PLC0415

    found = devices(target)
    try:  # TPU: devices in the order of the physical torus
        return jax.make_mesh((len(found),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=found)
    except (AssertionError, ValueError, NotImplementedError):  # v4's two devices per chip
        return jax.sharding.Mesh(np.array(found), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(target: str | Target):
    """A NamedSharding that puts a whole copy on every device of the target."""
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

    return NamedSharding(make_mesh(target), PartitionSpec())


# --- compiling ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """XLA's memory analysis of the compiled program, bytes per device."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int  # outputs that reuse a (donated) argument's buffer
    generated_code_bytes: int
    peak_bytes: int
    peak_source: str  # "compiler" (XLA's peak_memory_in_bytes) or "sum" (arguments + outputs + temps - aliased)


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel uses. GPU fields are None on TPU and the other way round."""

    name: str
    platform: str
    registers: int | None = None  # per thread (ptxas)
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    stack_frame_bytes: int | None = None
    dynamic_shared_memory_bytes: int | None = None  # per block, the launch's (XLA's thunk sequence)
    static_shared_memory_bytes: int | None = None  # per block (ptxas)
    threads_per_block: int | None = None
    grid: tuple[int, ...] | None = None
    gpu_arch: str | None = None  # the PTX's .target, e.g. "sm_90a"
    vmem_bytes: int | None = None  # TPU: the scoped VMEM the Mosaic kernel uses
    vmem_limit_bytes: int | None = None  # TPU: the kernel's vmem_limit_bytes (None: the compiler default)
    warnings: tuple[str, ...] = ()  # ptxas performance warnings, or why a number is missing

    @property
    def shared_memory_bytes(self) -> int | None:
        """Per block, static + dynamic; None where the launch's dynamic part is unknown (a GPU kernel outside
        XLA's thunk sequence: Pallas Mosaic GPU's, whose shared memory is nearly all dynamic)."""
        if self.platform == "cuda" and self.dynamic_shared_memory_bytes is None:
            return None
        parts = [b for b in (self.dynamic_shared_memory_bytes, self.static_shared_memory_bytes) if b is not None]
        return sum(parts) if parts else None


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """One program compiled for a target: the executable and what the compiler says about it."""

    target: Target
    compiled: Any  # jax.stages.Compiled (compile-only: it cannot run)
    compile_seconds: float  # XLA's compile (with the kernel compilers), after tracing and lowering
    lower_seconds: float  # tracing and lowering to StableHLO
    memory: MemoryUse
    flops: float | None  # per device
    flops_source: str  # "compiler" | "hlo-cost-model" | "unavailable"
    kernels: tuple[KernelResources, ...] = ()

    def kernel(self, name: str) -> KernelResources:
        """The kernel called `name` (KeyError naming the kernels there are)."""
        for kernel in self.kernels:
            if kernel.name == name:
                return kernel
        raise KeyError(f"no kernel {name!r} in {self.target.name}'s program; kernels: "
                       f"{', '.join(k.name for k in self.kernels) or 'none (pass kernels=True)'}")

    @property
    def fits(self) -> bool:
        """The peak fits the target's per-device HBM (no allowance for the runtime's own use)."""
        return self.memory.peak_bytes <= self.target.hbm_bytes


def compile_for(target: str | Target, fn: Callable, *args: Any, in_shardings: Any = None,
                out_shardings: Any = None, donate_argnums: int | Sequence[int] = (),
                static_argnums: int | Sequence[int] = (), kernels: bool | str = False,
                compiler_options: dict[str, Any] | None = None,
                dump_dir: str | os.PathLike | None = None) -> CompileResult:
    """jit `fn`, lower it for `args` and compile it for `target`.

    args: arrays or jax.ShapeDtypeStructs (pytrees of them; only shapes and dtypes are used).
      Without `in_shardings`, an argument without a sharding of its own is replicated over
      the target's devices (`make_mesh`); build shardings on `make_mesh(target)` to split one.
    kernels: False (none), True (every kernel) or a name prefix such as "flash_attention_":
      which kernels to report. GPU: XLA dumps the module (`xla_dump_to`, a per-compile option)
      to `dump_dir` (kept) or a temporary directory (removed), and ptxas reads its PTX; TPU:
      read from the compiled HLO, no dump needed.
    compiler_options: per-compile XLA options. XLA's default backend optimization level is
      pinned here unless given: the compile reports what the target machine would build, even
      where XLA_FLAGS lowers the level for this host's own (CPU) compiles, as the test suite does.
    The persistent compilation cache is not written (a compile-only executable cannot be loaded).
    """
    import jax  # noqa: PLC0415

    target = parse_target(target)
    require_aot(target)
    statics = _as_tuple(static_argnums)
    prejitted = hasattr(fn, "lower") and in_shardings is None and out_shardings is None
    # A function jitted with its own shardings (the trainer's step) keeps them; otherwise an
    # argument without a sharding is replicated over the target's devices.
    default = None if in_shardings is not None or prejitted else replicated(target)
    abstract = [a if i in statics else _abstract_tree(a, default) for i, a in enumerate(args)]
    jit_kwargs = {k: v for k, v in (("in_shardings", in_shardings), ("out_shardings", out_shardings))
                  if v is not None}
    jitted = fn if prejitted else jax.jit(fn, donate_argnums=donate_argnums, static_argnums=statics,
                                          **jit_kwargs)
    with _dump_directory(target, kernels, dump_dir) as dump, _mosaic_gpu_dumps(target, dump) as dumped_before:
        options = {"xla_backend_optimization_level": XLA_DEFAULT_OPTIMIZATION_LEVEL, **(compiler_options or {})}
        if dump is not None:
            options["xla_dump_to"] = str(dump)
        start = time.perf_counter()
        from haiku_gpt.kernels.flash_attention import compiling_for  # noqa: PLC0415

        with compiling_for(target.device_kind):  # the attention kernel's tiles for this device
            lowered = jitted.lower(*abstract)
        lowered_at = time.perf_counter()
        with _persistent_cache_not_written():
            compiled = lowered.compile(compiler_options=options)
        seconds = time.perf_counter() - lowered_at
        if kernels is not False and dumped_before is not None:
            _require_mosaic_gpu_dumps(compiled.as_text(), dump, dumped_before)
        found = _kernel_resources(target, compiled, dump, kernels) if kernels is not False else ()
    flops, source = _flops(compiled)
    return CompileResult(target=target, compiled=compiled, compile_seconds=seconds,
                         lower_seconds=lowered_at - start, memory=memory_use(compiled), flops=flops, flops_source=source, kernels=found)


def _as_tuple(value: int | Sequence[int]) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


def _abstract_tree(tree: Any, sharding: Any) -> Any:
    import jax  # noqa: PLC0415

    return jax.tree.map(lambda leaf: _abstract(leaf, sharding), tree)


def _abstract(leaf: Any, sharding: Any) -> Any:
    """A ShapeDtypeStruct for an array, a ShapeDtypeStruct or a Python scalar (with `sharding` if it has none)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    if isinstance(leaf, jax.ShapeDtypeStruct):
        if leaf.sharding is not None or sharding is None:
            return leaf
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding, weak_type=leaf.weak_type)
    weak = isinstance(leaf, (bool, int, float, complex))  # a Python scalar: JAX's weak type
    if weak:
        value = jax.numpy.asarray(leaf)
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        value = leaf
    else:
        value = np.asarray(leaf)
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding, weak_type=weak)


@contextlib.contextmanager
def _dump_directory(target: Target, kernels: bool | str, dump_dir: str | os.PathLike | None) -> Iterator[Path | None]:
    """Where XLA dumps the module: `dump_dir`, a temporary directory for GPU kernels, or nowhere."""
    if dump_dir is not None:
        path = Path(dump_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    elif kernels is not False and target.platform == "cuda":
        with tempfile.TemporaryDirectory(prefix=f"haiku_gpt-{target.name}-") as tmp:
            yield Path(tmp)
    else:
        yield None


MOSAIC_GPU_DUMP = "mosaic_gpu"  # the dump's subdirectory for Mosaic GPU kernels' PTX


@contextlib.contextmanager
def _mosaic_gpu_dumps(target: Target, dump: Path | None) -> Iterator[set[Path] | None]:
    """While XLA compiles for a GPU target into `dump`: the CUDA plugin writes each Mosaic GPU kernel's
    PTX (and its MLIR passes, and ptxas' own report) to dump/mosaic_gpu. It reads these variables at
    every compile; the previous values come back after. Yields the PTX files already there (None: no
    GPU dump). The variables are the process's: compile_for is not to be called from several threads
    at once."""
    if dump is None or target.platform != "cuda":
        yield None
        return
    wanted = {"MOSAIC_GPU_DUMP_PTX": "1", "MOSAIC_GPU_DUMP_TO": str(dump / MOSAIC_GPU_DUMP)}
    saved = {name: os.environ.get(name) for name in wanted}
    (dump / MOSAIC_GPU_DUMP).mkdir(exist_ok=True)
    os.environ.update(wanted)
    try:
        yield set((dump / MOSAIC_GPU_DUMP).glob("*.ptx"))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_MOSAIC_GPU_HASH = re.compile(r'custom_call_target="mosaic_gpu_v2".*?kernel_hash = "((?:[^"\\]|\\.)*)"')


def _require_mosaic_gpu_dumps(hlo_text: str, dump: Path, before: set[Path]) -> None:
    """Every distinct Mosaic GPU kernel of the compiled program left its PTX in the dump. The CUDA plugin
    keeps the kernels it compiled for the life of the process and compiles (and dumps) each only once:
    a report without them would pass a "no spills" check by checking nothing."""
    kernels = set(_MOSAIC_GPU_HASH.findall(hlo_text))
    dumped = set((dump / MOSAIC_GPU_DUMP).glob("*.ptx")) - before
    if len(dumped) < len(kernels):
        raise TargetError(
            f"{len(kernels) - len(dumped)} of the program's {len(kernels)} Mosaic GPU kernels were compiled "
            "earlier in this process: the CUDA plugin reuses them without dumping their PTX again, so their "
            "registers and spills cannot be read. Compile each such program in a new process (one run per "
            "target), or pass kernels=False.")


@contextlib.contextmanager
def _persistent_cache_not_written() -> Iterator[None]:
    """Compile-only executables cannot be deserialized: keep them out of JAX's persistent cache.

    JAX writes an entry only when the compile took at least jax_persistent_cache_min_compile_time_secs;
    reading finds nothing for a key that is never written.
    """
    import jax  # noqa: PLC0415

    name = "jax_persistent_cache_min_compile_time_secs"
    old = getattr(jax.config, name)
    jax.config.update(name, float("inf"))
    try:
        yield
    finally:
        jax.config.update(name, old)


def memory_use(compiled: Any) -> MemoryUse:
    """Per-device bytes from `compiled.memory_analysis()`."""
    stats = compiled.memory_analysis()
    if isinstance(stats, (list, tuple)):  # one entry per program in older JAX
        stats = stats[0]
    args, outs = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
    temps, alias = int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes)
    code = int(stats.generated_code_size_in_bytes)
    peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    source = "compiler"
    if peak <= 0:
        peak, source = args + outs + temps - alias, "sum"
    return MemoryUse(argument_bytes=args, output_bytes=outs, temp_bytes=temps, alias_bytes=alias,
                     generated_code_bytes=code, peak_bytes=peak, peak_source=source)


def _flops(compiled: Any) -> tuple[float | None, str]:
    """Per-device FLOPs: the compiler's cost analysis, else XLA's HLO cost model of the optimized module.

    TPU's analysis leaves "flops" out when the program has none outside its kernels (then 0).
    XLA:GPU has no cost analysis (UNIMPLEMENTED), so its optimized module goes through XLA's
    generic HloCostAnalysis, which counts every custom call (a Pallas/Triton kernel, cuDNN) as
    -1 FLOPs, "unknown": those are added back, so kernels count 0 (fusions, Triton GEMMs count).
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if cost:
        return float(cost.get("flops", 0.0)), "compiler"
    try:  # private API, hence guarded: an estimate is not worth a failure
        from jax._src import xla_bridge  # noqa: PLC0415
        from jax._src.lib import _jax  # noqa: PLC0415

        module = compiled.runtime_executable().hlo_modules()[0]
        cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
        custom_calls = len(re.findall(r"\scustom-call\(", module.to_string()))
        return float(cost["flops"]) + custom_calls, "hlo-cost-model"
    except Exception:  # noqa: BLE001
        return None, "unavailable"


# --- the optimized HLO ----------------------------------------------------------------------------

_HLO_INSTRUCTION = re.compile(  # %name = TYPE opcode(operands...: TYPE is dtype[dims]{layout} or a (tuple, ...)
    r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\([^=]*?\)|\w+\[[\d,]*\]\S*)\s+([\w\-]+)\((.*)$", re.MULTILINE)
_HLO_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_HLO_POSITION = re.compile(r"/\*index=\d+\*/")  # marks every fifth element of long tuples and operand lists


@dataclasses.dataclass(frozen=True)
class HloOp:
    """One instruction of an optimized HLO module (fusion bodies included): its opcode, result and operands."""

    name: str
    opcode: str  # "dot", "transpose", "copy", "fusion", "custom-call", ...
    dtype: str  # of the result ("f32", "bf16", ...; a tuple's first element)
    shape: tuple[int, ...]
    operand_dtypes: tuple[str, ...]  # of the instructions it reads (dtypes looked up by name)
    results: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (dtype, shape) of every array it returns (a tuple's all)


def hlo_ops(hlo_text: str) -> list[HloOp]:
    """Every instruction of `compiled.as_text()`, with its operands' dtypes: what to assert on when proving
    that a program has, say, no float32 GEMM (`dot` with two f32 operands) or no transpose."""
    found = []
    hlo_text = _HLO_POSITION.sub("", hlo_text)
    for m in _HLO_INSTRUCTION.finditer(hlo_text):
        results = tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
                        for dtype, dims in _HLO_ARRAY.findall(m.group(2)))
        found.append((m.group(1), m.group(3), *results[0], m.group(4), results))  # a tuple's first element
    dtypes = {name: dtype for name, _, dtype, _, _, _ in found}
    ops = []
    for name, opcode, dtype, shape, rest, results in found:
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        ops.append(HloOp(name, opcode, dtype, shape, tuple(dtypes.get(o, "?") for o in operands), results))
    return ops


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_NOT_KERNELS = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "conditional",
                          "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"})


@dataclasses.dataclass(frozen=True)
class KernelTraffic:
    """One kernel of an optimized HLO module and the memory it moves."""

    name: str  # the instruction's name; a Pallas call's kernel name (as a GPU trace shows it)
    opcode: str  # "fusion", "custom-call", "copy", ...
    launches: int  # per call of the program: a while loop's body counts once per known trip
    bytes: int  # per launch: each operand read whole (an upper bound for a slice), once, plus the result written
    # (whole: an upper bound where a kernel writes part of a buffer in place, an operand it aliases, not read)


def kernel_traffic(hlo_text: str) -> list[KernelTraffic]:
    """The kernels of `compiled.as_text()`: the instructions of the entry computation and of the while loops,
    calls and conditionals it runs (all branches), less bookkeeping (parameters, tuples, bitcasts, constants).
    Device-independent: what a memory-bound step's time follows, read without the hardware."""
    hlo_text = _HLO_POSITION.sub("", hlo_text)
    computations: dict[str, list[re.Match]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current is not None and (m := _HLO_INSTRUCTION.match(line)):
            computations[current].append(m)
    types = {m.group(1): m.group(2) for ms in computations.values() for m in ms}

    def nbytes(hlo_type: str) -> int:
        return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                   for dtype, dims in _HLO_ARRAY.findall(hlo_type))

    kernels, pending = [], [(entry, 1)]
    while pending:
        computation, launches = pending.pop()
        for m in computations.get(computation, ()):
            name, hlo_type, opcode, rest = m.groups()
            if opcode == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                body = re.findall(r"body=%([\w.\-]+)", rest)  # its condition: a scalar compare, not counted
                pending += [(c, launches * (int(trips.group(1)) if trips else 1)) for c in body]
            elif opcode in ("call", "conditional"):
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                called = re.findall(r"(?:to_apply|true_computation|false_computation)=%([\w.\-]+)", rest)
                called += re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
                pending += [(c, launches) for c in called]
            if opcode in _NOT_KERNELS:
                continue
            # An operand that an output aliases is that output's buffer, written in place, not read; an array
            # passed twice is read once.
            operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
            aliased = re.search(r"output_to_operand_aliasing=\{(.*?)\)\}", rest)
            in_place = {int(i) for i in re.findall(r"\((\d+),", aliased.group(1))} if aliased else set()
            read = {o for i, o in enumerate(operands) if i not in in_place}
            pallas = re.search(r'op_name="[^"]*/(\w+)/pallas_call"', rest)
            kernels.append(KernelTraffic(pallas.group(1) if pallas else name, opcode, launches,
                                         nbytes(hlo_type) + sum(nbytes(types.get(o, "")) for o in read)))
    return kernels


# --- kernel resources -----------------------------------------------------------------------------

def _kernel_resources(target: Target, compiled: Any, dump: Path | None,
                      kernels: bool | str) -> tuple[KernelResources, ...]:
    def wanted(name: str) -> bool:
        return kernels is True or (isinstance(kernels, str) and name.startswith(kernels))

    if target.platform == "tpu":
        return tuple(k for k in tpu_kernels(compiled.as_text()) if wanted(k.name))
    assert dump is not None
    return gpu_kernels(dump, wanted)


_TPU_CALL = re.compile(r'^\s*(?:ROOT\s+)?%(\S+)\s*=.*custom_call_target="tpu_custom_call".*$', re.MULTILINE)
_VMEM = "1"  # memory_space of VMEM in the scoped memory configs (0: HBM, 2: SMEM)


def tpu_kernels(hlo_text: str) -> tuple[KernelResources, ...]:
    """Mosaic kernels and their scoped VMEM, read from the compiled HLO (`compiled.as_text()`).

    Each tpu_custom_call's backend_config holds `scoped_memory_configs` (its limit; empty when
    the kernel sets no vmem_limit_bytes) and `used_scoped_memory_configs` (what the compiled
    kernel uses). Both are VMEM address ranges: when XLA keeps other buffers in VMEM the
    kernel's window starts at the limit's offset and the used range ends offset + size
    above 0, so the kernel's own use is that end minus the window's start.
    """
    found: dict[str, KernelResources] = {}
    for match in _TPU_CALL.finditer(hlo_text):
        name = re.sub(r"\.\d+$", "", match.group(1))
        line = match.group(0)
        limit = _scoped_vmem(line, '"scoped_memory_configs":')
        used = _scoped_vmem(line, '"used_scoped_memory_configs":')
        vmem = None if used is None else max(0, sum(used) - (limit[0] if limit else 0))
        kernel = KernelResources(name=name, platform="tpu", vmem_bytes=vmem,
                                 vmem_limit_bytes=limit[1] if limit else None)
        if name not in found or (vmem or 0) > (found[name].vmem_bytes or 0):
            found[name] = kernel
    return tuple(found[name] for name in sorted(found))


def _scoped_vmem(line: str, key: str) -> tuple[int, int] | None:
    """(offset, size) of the VMEM entry of the JSON list after `key` (the first such key), if any."""
    start = line.find(key)
    if start < 0:
        return None
    try:
        entries, _ = json.JSONDecoder().raw_decode(line, start + len(key))
    except ValueError:
        return None
    for entry in entries:
        if str(entry.get("memory_space")) == _VMEM:
            return int(entry.get("offset", 0)), int(entry.get("size", 0))
    return None


_LAUNCH = re.compile(r"\]\s+(\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes")
_ENTRY = re.compile(r"^\.visible \.entry (\S+?)\(", re.MULTILINE)
_PTX_TARGET = re.compile(r"^\.target (sm_\w+)", re.MULTILINE)
_MAX_THREADS = re.compile(r"^\.maxntid (\d+)(?:, (\d+))?(?:, (\d+))?", re.MULTILINE)
MOSAIC_GPU_ENTRY_SUFFIX = "_mosaic_gpu_kernel"  # a Mosaic GPU kernel's PTX entry: <kernel name> + this


def gpu_kernels(dump: Path, wanted: Callable[[str], bool] = lambda name: True) -> tuple[KernelResources, ...]:
    """GPU kernels of an XLA dump: launch shape and dynamic shared memory from the thunk sequence,
    registers, spills, static shared memory and performance warnings from `ptxas -v` on each PTX file.
    Mosaic GPU kernels (PTX in dump/mosaic_gpu) are named by their kernel name; they are not
    in XLA's thunk sequence, so their threads per block come from the PTX's `.maxntid`.
    """
    launches = _launches(dump)
    ptx: dict[str, tuple[Path, str, str, int | None]] = {}  # name -> (file, arch, PTX entry, .maxntid)
    for path in sorted([*dump.glob("*.ptx"), *dump.glob(f"{MOSAIC_GPU_DUMP}/*.ptx")]):
        text = path.read_text(encoding="utf-8", errors="replace")
        arch = _PTX_TARGET.search(text)
        threads = _MAX_THREADS.search(text)
        for entry in _ENTRY.findall(text):
            name = entry.removesuffix(MOSAIC_GPU_ENTRY_SUFFIX) if path.parent.name == MOSAIC_GPU_DUMP else entry
            if wanted(name):
                ptx[name] = (path, arch.group(1) if arch else "", entry,
                             math.prod(int(x) for x in threads.groups() if x) if threads else None)
    files = sorted({(path, arch) for path, arch, _, _ in ptx.values()})
    reports: dict[tuple[Path, str], dict[str, Any]] = {}  # (file, PTX entry) -> report
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for (path, _), report in zip(files, pool.map(lambda f: ptxas_report(*f), files)):
            reports.update({(path, entry): r for entry, r in report.items()})
    kernels = []
    for name in sorted(ptx):
        path, arch, entry, threads = ptx[name]
        report = reports.get((path, entry), {})
        if path.parent.name == MOSAIC_GPU_DUMP:
            kernels.append(_mosaic_gpu_kernel(name, arch, threads, report))
        else:
            kernels.append(_gpu_kernel(name, arch, launches.get(name), report))
    return tuple(kernels)


def _mosaic_gpu_kernel(name: str, arch: str, threads: int | None, report: dict[str, Any]) -> KernelResources:
    """A Mosaic GPU kernel's resources: ptxas' numbers and the PTX's threads per block; its grid and
    dynamic shared memory are its own launch's, which XLA's thunk sequence does not show (unknown)."""
    return dataclasses.replace(_gpu_kernel(name, arch, None, report), threads_per_block=threads)


def _launches(dump: Path) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """kernel name -> (grid, threads per block, dynamic shared memory bytes), from *.thunk_sequence.txt."""
    found: dict[str, tuple[tuple[int, ...], int, int]] = {}
    for path in sorted(dump.glob("*.thunk_sequence.txt")):
        for match in _LAUNCH.finditer(path.read_text(encoding="utf-8", errors="replace")):
            grid = tuple(int(x) for x in match.group(2).split(","))
            threads = math.prod(int(x) for x in match.group(3).split(","))
            found[match.group(1)] = (grid, threads, int(match.group(4)))
    return found


def _gpu_kernel(name: str, arch: str, launch: tuple[tuple[int, ...], int, int] | None,
                report: dict[str, Any]) -> KernelResources:
    warnings = tuple(report.get("warnings", ()))
    if launch is None:
        warnings += ("not in XLA's thunk sequence: launch shape and dynamic shared memory unknown",)
    return KernelResources(
        name=name, platform="cuda", registers=report.get("registers"),
        spill_store_bytes=report.get("spill_store_bytes"), spill_load_bytes=report.get("spill_load_bytes"),
        stack_frame_bytes=report.get("stack_frame_bytes"),
        dynamic_shared_memory_bytes=launch[2] if launch else None,
        static_shared_memory_bytes=report.get("static_shared_memory_bytes"),
        threads_per_block=launch[1] if launch else None, grid=launch[0] if launch else None,
        gpu_arch=arch or None, warnings=warnings)


def find_ptxas() -> str | None:
    """ptxas from $PTXAS, PATH, /usr/local/cuda/bin, or the nvidia-cuda-nvcc wheel."""
    candidates = [os.environ.get("PTXAS"), shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"]
    try:
        import nvidia.cuda_nvcc  # type: ignore  # noqa: PLC0415

        candidates += [str(Path(p) / "bin" / "ptxas") for p in nvidia.cuda_nvcc.__path__]
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


_PTXAS_FUNCTION = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def ptxas_report(ptx: Path, arch: str) -> dict[str, dict[str, Any]]:
    """Per kernel of one PTX file: registers, spills, stack frame, static smem, warnings (`ptxas -v`)."""
    ptxas = find_ptxas()
    entries = _ENTRY.findall(ptx.read_text(encoding="utf-8", errors="replace"))
    if ptxas is None:
        note = "ptxas not found (set $PTXAS, or install the CUDA toolkit): no registers or spills"
        return {name: {"warnings": [note]} for name in entries}
    command = [ptxas, "-v", f"--gpu-name={arch or 'sm_90a'}", str(ptx), "-o", os.devnull]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {name: {"warnings": [f"ptxas failed: {e}"]} for name in entries}
    if run.returncode != 0:
        first = (run.stderr.strip().splitlines() or ["no message"])[0]
        return {name: {"warnings": [f"ptxas failed: {first}"]} for name in entries}
    return _parse_ptxas(run.stderr + run.stdout, entries)


def _parse_ptxas(output: str, entries: Sequence[str]) -> dict[str, dict[str, Any]]:
    reports: dict[str, dict[str, Any]] = {name: {"warnings": []} for name in entries}
    current: str | None = None
    for line in output.splitlines():
        if match := _PTXAS_FUNCTION.search(line):
            current = match.group(1)
            reports.setdefault(current, {"warnings": []})
        elif "warning" in line.lower() or "performance loss" in line.lower():
            named = [n for n in reports if f"'{n}'" in line] or ([current] if current else list(reports))
            for name in named:
                reports[name]["warnings"].append(line.split("info    :")[-1].strip())
        elif current and (match := _PTXAS_FRAME.search(line)):
            stack, stores, loads = map(int, match.groups())
            reports[current].update(stack_frame_bytes=stack, spill_store_bytes=stores, spill_load_bytes=loads)
        elif current and (match := _PTXAS_USED.search(line)):
            reports[current].update(registers=int(match.group(1)),
                                    static_shared_memory_bytes=int(match.group(2) or 0))
    return reports


__all__ = ["AOT_FIX", "AotUnavailable", "CompileResult", "KernelResources", "MemoryUse", "Target", "TargetError",
           "MOSAIC_GPU_DUMP", "VALID_TARGETS", "compile_for", "devices", "find_ptxas", "gpu_kernels", "gpu_spec_text",
           "make_mesh", "memory_use", "parse_target", "ptxas_report", "replicated", "require_aot", "tpu_kernels"]
