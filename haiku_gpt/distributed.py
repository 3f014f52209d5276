"""Data parallelism and multi-host training on JAX's own sharding and distributed runtime.

One device (the common case, and every CPU run): nothing here is used, and the
train step is exactly the single-device one. Several devices: a 1-D mesh over
all of them, axis 'data'; the global batch (`batch_size`) is split along it,
and the jitted functions get NamedSharding in/out shardings (GSPMD inserts the
gradient all-reduce; no pmap). Params and optimizer state are replicated, or
with `config.fsdp=True` sharded along the same axis (ZeRO-3 style): each array
on its largest dimension that the device count divides, replicated when none
does; XLA gathers a parameter where it is used and reduce-scatters its gradient.

Several processes (hosts): `initialize()` starts `jax.distributed` first. Each
process feeds only the rows of the global batch that live on its own devices
(`jax.make_array_from_process_local_data`). Its rows come from the *global*
draw `batch_rng(seed, split, step)`: every process draws the same random window
offsets (a few hundred integers) and gathers the token windows of its own rows
only. So the data of a step, and therefore the losses, do not depend on the
number of processes or devices: a run on 2 hosts x 4 devices sees the batches
of a one-device run with the same `batch_size`, and a checkpoint moves freely
between device counts (orbax reads each array into the layout the new run asks
for). Only process 0 logs and writes metrics; every process writes the shards
of the state its own devices hold into each checkpoint (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from haiku_gpt.errors import UserError

DATA_AXIS = "data"


# --- multi-process start-up -----------------------------------------------------------------------

def quiet_log(message: str) -> None:
    """The log of processes other than process 0: only process 0 prints."""


def cluster_environment() -> str | None:
    """The multi-process launcher this process runs under, if any (what `jax.distributed` auto-detects).

    Only environments with more than one process count: a one-task SLURM job trains like a plain run.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_JOB_ID") and _int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")) > 1:
        return "SLURM"
    if _int(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU (multi-host)"
    return None


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start `jax.distributed` when asked (any argument given) or under a cluster launcher.

    Must run before JAX touches a device. Returns whether this is a multi-process run.
    """
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not explicit and cluster_environment() is None:
        return False
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num_processes={num_processes} must be at least 1.")
    if num_processes == 1 and process_id in (None, 0):
        return False  # one process: nothing to coordinate
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if jax.config.jax_cpu_collectives_implementation is None:
        # Cross-process collectives on CPU (the default in recent JAX; set for older defaults).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, TypeError) as e:
        raise UserError(
            f"cannot start multi-process training ({e}): outside a cluster launcher (SLURM, Open MPI, "
            "Cloud TPU) pass all of --coordinator_address=HOST:PORT (process 0's address, the same on "
            "every process), --num_processes=N and --process_id=0..N-1.") from e
    return True


def is_main_process() -> bool:
    """Process 0 logs, writes metrics (every process writes its own shards of a checkpoint), and prints samples."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """`flag` or-ed over all processes (a signal may reach only one of them); no cost with one process."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        multihost_utils.sync_global_devices(name)


# --- the mesh and the shardings -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataParallel:
    """The 'data' mesh over every device of every process, and how each array is laid out on it."""

    mesh: jax.sharding.Mesh
    fsdp: bool = False

    @property
    def num_shards(self) -> int:
        return self.mesh.shape[DATA_AXIS]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def param_spec(self, shape: tuple[int, ...]) -> PartitionSpec:
        """fsdp: split the largest dimension the device count divides; otherwise (and for scalars) replicate."""
        if not self.fsdp:
            return PartitionSpec()
        n = self.num_shards
        dims = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
        for d in dims:
            if shape[d] >= n and shape[d] % n == 0:
                return PartitionSpec(*(DATA_AXIS if i == d else None for i in range(len(shape))))
        return PartitionSpec()

    def state_shardings(self, abstract_state):
        """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params, optimizer state, step, rng)."""
        return jax.tree.map(lambda x: NamedSharding(self.mesh, self.param_spec(tuple(x.shape))), abstract_state)

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Token batches [..., batch, T]: the batch axis (second to last) split over 'data'."""
        return NamedSharding(self.mesh, PartitionSpec(*([None] * (ndim - 2)), DATA_AXIS, None))

    def describe(self, batch_size: int) -> str:
        n = self.num_shards
        return (f"data parallel over {n} devices ({jax.process_count()} process(es)): global batch "
                f"{batch_size}, {batch_size // n} rows per device; params and optimizer state "
                f"{'sharded (fsdp)' if self.fsdp else 'replicated'}")

    def check_batch_size(self, batch_size: int, accumulation: int = 1) -> None:
        n = self.num_shards
        if batch_size % n:
            up = -(-batch_size // n) * n
            same_tokens = ""
            if accumulation % n == 0:  # nanoGPT's DDP: batch_size rows per device, accumulation / n
                same_tokens = (f"; or, as nanoGPT splits it over {n} GPUs ({batch_size} rows per device, the same "
                               f"tokens per step), --config.batch_size={batch_size * n} "
                               f"--config.gradient_accumulation_steps={accumulation // n}")
            raise UserError(
                f"--config.batch_size={batch_size} is the global batch and must be divisible by the "
                f"{n} devices it is split over: use a multiple of {n}, e.g. --config.batch_size={up}"
                f"{same_tokens}.")

    def local_rows(self, batch_size: int) -> slice:
        """The rows of a global batch of `batch_size` that this process's devices hold."""
        self.check_batch_size(batch_size)
        index_map = self.batch_sharding(2).addressable_devices_indices_map((batch_size, 1))
        rows = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                       for s in index_map.values()})
        start, stop = rows[0][0], rows[-1][1]
        if sum(b - a for a, b in rows) != stop - start:  # jax.make_mesh keeps a process's devices together
            raise RuntimeError(f"this process's devices hold non-contiguous batch rows {rows}")
        return slice(start, stop)

    def global_batch(self, local: np.ndarray, batch_size: int) -> jax.Array:
        """One global array [..., batch_size, T] from this process's rows [..., local_rows, T]."""
        shape = local.shape[:-2] + (batch_size, local.shape[-1])
        return jax.make_array_from_process_local_data(self.batch_sharding(local.ndim), local, shape)

    def put(self, tree, shardings):
        """Lay out full arrays (numpy, or jax arrays on one device) with `shardings` on the mesh."""
        def one(x, sharding):
            if isinstance(x, jax.Array):
                if x.sharding == sharding:
                    return x
                if not x.is_fully_addressable:
                    return jax.device_put(x, sharding)  # already global: reshard
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.tree.map(one, tree, shardings)

    def under_mesh(self, fn: Callable) -> Callable:
        """`fn`, traced with this mesh as JAX's ambient (abstract) mesh.

        Kernels that XLA cannot partition (Pallas flash attention) read it to
        `shard_map` themselves over the batch; everything else is unchanged.
        """
        @functools.wraps(fn)
        def wrapped(*args):
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                return fn(*args)
        return wrapped

    def jit(self, init: Callable, train_steps: Callable, eval_losses: Callable, state_shardings: Any,
            compiler_options: dict | None = None):
        """The run's three jitted functions with in/out shardings (see steps.make_steps)."""
        train_steps, eval_losses = self.under_mesh(train_steps), self.under_mesh(eval_losses)
        params_shardings = state_shardings.params
        batch4, batch3 = self.batch_sharding(4), self.batch_sharding(3)
        init_jit = jax.jit(init, static_argnums=0, out_shardings=state_shardings)
        train_jit = jax.jit(train_steps, donate_argnums=0, in_shardings=(state_shardings, batch4, batch4),
                            out_shardings=(state_shardings, self.replicated), compiler_options=compiler_options)
        eval_jit = jax.jit(eval_losses, in_shardings=(params_shardings, batch3, batch3),
                           out_shardings=self.replicated, compiler_options=compiler_options)
        return init_jit, train_jit, eval_jit


def make_data_parallel(config, mesh: jax.sharding.Mesh | None = None) -> DataParallel | None:
    """The run's mesh, or None on a single device (then nothing is sharded: today's exact code path).

    `mesh`: use this one (another machine's compile-only devices), even with one device.
    The global batch must split evenly over the devices: a UserError says so otherwise.
    """
    if mesh is None:
        n = jax.device_count()
        if n == 1:
            return None
        mesh = jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,))
    parallel = DataParallel(mesh, fsdp=bool(config.get("fsdp", False)))
    parallel.check_batch_size(config.batch_size, config.gradient_accumulation_steps)
    return parallel


__all__ = ["DATA_AXIS", "DataParallel", "any_process", "barrier", "cluster_environment", "initialize",
           "is_main_process", "make_data_parallel"]
