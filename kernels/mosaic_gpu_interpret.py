"""Running the Mosaic GPU (Hopper) kernels on a CPU: JAX's Mosaic GPU interpreter, with two fixes.

JAX 0.10.2 ships an interpreter for Pallas Mosaic GPU kernels (`plgpu.kernel(..., interpret=
InterpretGPUParams())`): TMA copies, barriers, wgmma, loops and conditionals run on the CPU, one
thread per warpgroup, so the kernels' numerics can be tested without a GPU. Its wgmma step takes
two operand forms that the attention kernels need and the interpreter, as released, rejects:

  1. a transposed shared-memory operand (`plgpu.transpose_ref(ref, (1, 0))`, the Kᵀ of S = Q Kᵀ):
     the interpreter hands every transform to an indexer helper, which fails with
     "'TransposeTransform' object has no attribute 'indices'";
  2. a left operand in registers (the P of O += P V): it treats the array as an allocation key,
     "Expected shape (5,) but got (64, 64)".

The first fix: `params()` replaces the wgmma rule (in this process, no file is changed) by one that
applies trailing transposes with NumPy after reading the buffer and uses a register operand as it
is.

The second fix is for several devices (a data-parallel mesh of CPU devices). At a kernel's end each
device checks that no barrier is left allocated, but the check reads every device's barriers, so a
device that finishes first (one whose documents let it skip more tiles) finds another's barriers,
still in use, fails, and leaves the others waiting for it forever at the clean-up that follows. The
check now runs once every device has finished (at the interpreter's barrier of all devices), and a
real failure there releases the other devices with an error instead of a hang.

Everything else is JAX's. The interpreter runs wgmma synchronously and TMA waits as no-ops, so it
checks what the kernels compute, not the ordering of their asynchronous copies: that takes a GPU.
Where JAX's internals differ from 0.10.2's (another version), neither fix is applied and the
interpreter runs as released.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

_patched: bool | None = None  # None: not tried yet; False: these internals are not 0.10.2's


def params():
    """The interpreter's parameters for `plgpu.kernel(interpret=...)`, the fixes applied once."""
    from jax._src.pallas.mosaic_gpu.interpret import params as interpret_params  # noqa: PLC0415

    _apply()
    return interpret_params.InterpretGPUParams()


def _apply() -> None:
    global _patched
    if _patched is not None:
        return
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, jaxpr_interpret  # noqa: PLC0415
        from jax._src.pallas.mosaic.interpret import utils as interpret_utils  # noqa: F401, PLC0415
        from jax._src.state import types as state_types  # noqa: F401, PLC0415
        interpreter = jaxpr_interpret.JaxprInterpreter
        _patched = all(hasattr(x, name) for x, name in (
            (interpreter, "_interpret_wgmma_ref_p"), (gpu_callbacks, "wgmma"), (gpu_callbacks, "HostAllocationKey"),
            (gpu_callbacks, "_remove_noop_transforms"), (gpu_callbacks, "_get_shared_memory"),
            (gpu_callbacks, "_assert_no_barriers_allocated"), (gpu_callbacks, "_clean_up_shared_memory")))
        fields = {f.name for f in dataclasses.fields(gpu_callbacks.memory.GPUSharedMemory)}
        _patched = _patched and {"barrier", "clean_up_barrier"} <= fields
    except (ImportError, AttributeError, TypeError):  # another JAX: its interpreter as released
        _patched = False
    if _patched:
        interpreter._interpret_wgmma_ref_p = _interpret_wgmma_ref_p
        gpu_callbacks._assert_no_barriers_allocated = _assert_no_barriers_allocated_once_all_finished


def _assert_no_barriers_allocated_once_all_finished(token):
    """JAX's end-of-kernel check, run once every device's kernel has finished (the interpreter's device
    barrier, a `threading.Barrier` of all devices). The clean-up right after waits at its own barrier of all
    devices, so no device starts its next kernel before every check is done."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # noqa: PLC0415

    memory = gpu_callbacks._get_shared_memory()
    memory.barrier.wait()
    try:
        memory.assert_no_barriers_allocated()
    except AssertionError:
        memory.clean_up_barrier.abort()  # the other devices raise BrokenBarrierError, not hang
        raise
    return token


def _split_transposes(transforms):
    """(the indexing transforms, the permutation of the trailing transposes or None)."""
    from jax._src.state import types as state_types  # noqa: PLC0415

    transforms, perm = list(transforms), None
    while transforms and isinstance(transforms[-1], state_types.TransposeTransform):
        p = transforms.pop().permutation
        perm = p if perm is None else tuple(perm[i] for i in p)
    if any(isinstance(t, state_types.TransposeTransform) for t in transforms):
        raise NotImplementedError("the Mosaic GPU interpreter fix takes transposes only after indexing")
    return tuple(transforms), perm


def _read(memory, key_array, transforms, thread, info):
    from jax._src.pallas.mosaic.interpret import utils as interpret_utils  # noqa: PLC0415
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # noqa: PLC0415

    transforms, perm = _split_transposes(gpu_callbacks._remove_noop_transforms(transforms))
    key = gpu_callbacks.HostAllocationKey.from_array(key_array)
    value, _, _ = memory.get_buffer_content(key, interpret_utils.to_range(jax.tree.map(int, transforms)), thread,
                                            logging_info=info)
    return value if perm is None else np.transpose(value, perm)


def _wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array, acc_transforms,
           acc_dtype, a_allocation_key_as_array, a_transforms, b_allocation_key_as_array, b_transforms,
           a_is_ref: bool, source_info=None):
    """acc += a @ b, as JAX's `gpu_callbacks.wgmma`, with transposed operands and a register lhs."""
    from jax._src.pallas.mosaic.interpret import utils as interpret_utils  # noqa: PLC0415
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # noqa: PLC0415

    memory = gpu_callbacks._get_shared_memory()
    thread = memory.get_global_thread_id(int(device_id), int(thread_id))
    info = interpret_utils.GPULoggingInfo(device_id=int(device_id),
                                          grid_point_coords=tuple(int(x) for x in grid_point_coords),
                                          thread_id=int(thread_id), source_info=source_info)
    a = (_read(memory, a_allocation_key_as_array, a_transforms, thread, info) if a_is_ref
         else np.asarray(a_allocation_key_as_array))
    b = _read(memory, b_allocation_key_as_array, b_transforms, thread, info)
    acc_key = gpu_callbacks.HostAllocationKey.from_array(acc_allocation_key_as_array)
    acc_range = interpret_utils.to_range(jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
    acc, _, _ = memory.get_buffer_content(acc_key, acc_range, thread, logging_info=info)
    memory.store_buffer_content(acc_key, acc_range, acc + np.matmul(a, b, dtype=acc_dtype), thread,
                                logging_info=info)
    return token


def _interpret_wgmma_ref_p(self, eqn, token, get_invals):
    from jax._src import callback  # noqa: PLC0415
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # noqa: PLC0415
    from jax._src.state import types as state_types  # noqa: PLC0415

    acc, a, b, *leaves = get_invals()
    empty = jax.tree.structure([])
    acc_t, a_t, b_t = jax.tree.unflatten(
        jax.tree_util.treedef_tuple(tuple(eqn.params[f"{x}_transforms_tree"] or empty for x in ("acc", "a", "b"))),
        leaves)
    a_is_ref = isinstance(eqn.invars[1].aval, state_types.AbstractRef)
    return callback.io_callback(
        functools.partial(_wgmma, acc_dtype=eqn.invars[0].aval.dtype, a_is_ref=a_is_ref,
                          source_info=eqn.source_info),
        gpu_callbacks.TOKEN_SHAPE_DTYPE, token=token, device_id=self.device_info.device_id,
        grid_point_coords=self.grid_point_coords, thread_id=self.thread_id,
        acc_allocation_key_as_array=acc, acc_transforms=acc_t, a_allocation_key_as_array=a, a_transforms=a_t,
        b_allocation_key_as_array=b, b_transforms=b_t, ordered=True), []
