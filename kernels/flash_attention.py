"""Fused (causal) flash attention in Pallas: forward and backward, FlashAttention-2 style.

Shape glossary
  B    batch                        H    heads
  T    sequence length (queries == keys/values for the fused path)
  D    head dim                     Dp   D zero-padded to a power of two >= 16
  bq   query rows per block         bk   key rows per block
  Tp   T padded up to a multiple of both block sizes
  nq   Tp // bq (query blocks)      nk   Tp // bk (key blocks)
  lse  per-row logsumexp of the scaled scores, [B, H, Tp, 1] float32
  delta  rowsum(dO * O), [B, H, Tp, 1] float32 (backward only)

The public layout is `[B, T, H, D]`. The GPU kernels (and the interpreter's
default) read and write it as it is, heads a squeezed block dimension; the TPU
kernels see `[B, H, Tp, Dp]` ("heads major"), so that every block's last two
dims are (rows, head dim), which is what the TPU tiling rules want. Transposes
and pads, where needed, live in XLA and are linear in T. `flash_attention_qkv`
takes q, k and v as one `[B, T, H + 2 KVH, D]` array (the model's fused qkv
projection), which the GPU kernels read in place: their BlockSpecs start at
heads 0, H and H + KVH. With one K/V head per query head they also write its
gradient in place: dK/dV into the k and v slots of one [B, T, 3, H, D] buffer,
then dQ into its q slot (`_pallas(into=...)`), so XLA neither slices nor
concatenates anything around them.

Algorithm (https://arxiv.org/abs/2307.08691)
  forward: one `[bq, Dp]` query block walks the key blocks left to right with
    an online softmax: a running row max `m`, a running denominator `l` and an
    unnormalised float32 accumulator `acc`. Causal: key blocks entirely above
    the diagonal are never visited. The only things written are O and
    lse = m + log(l), which is all the backward needs to rebuild P block by
    block. No `[T, T]` array exists anywhere.
  backward (jax.custom_vjp; `jax.grad` cannot differentiate a pallas_call that
    uses `pl.program_id`, it fails with a bare AssertionError):
    1. delta kernel, grid (B, H, nq): delta = rowsum(dO * O).
    2. dK/dV: a key block walks the query blocks at or below the diagonal,
       rebuilding P = exp(S - lse) and accumulating dV += P^T dO and
       dK += dS^T Q with dS = P * (dP - delta).
    3. dQ: a query block walks the key blocks like the forward and accumulates
       dQ += dS K.
    Two separate passes (rather than one with atomic adds to dQ) keep every
    output block owned by exactly one program, which is simple and portable.

Two kernel families run those three block updates (`_attend`,
`_accumulate_dkdv`, `_accumulate_dq`, shared by both):
  loop (Triton, and the interpreter by default), grid (B, H, blocks): each
    program holds one block and loops (`fori_loop`) over the other side's
    blocks, which its BlockSpec hands it whole (`[Tp, Dp]` per (b, h)); the
    loop bounds skip the blocks above the diagonal.
  streamed (Mosaic TPU), grid (B, H, blocks, reduced blocks): the last axis is
    a sequential ("arbitrary") reduction; K/V (and Q/dO/lse/delta in dK/dV)
    arrive one block per step, the accumulators live in VMEM scratch,
    initialised on the first step and written out on the last. VMEM holds a
    few tiles whatever T is, so any sequence length compiles. Blocks above
    the diagonal are neither computed (`pl.when`) nor fetched: their index
    maps clamp to the last visible block, and the pipeline does not copy a
    block whose index did not change.

Attention dropout drops entries of the normalised probabilities exactly like
`kernels.reference.reference_attention`: the keep bit of `p[b, h, i, j]` is
`kernels.dropout.keep_mask(row_hash(seed, b, h, i), j, rate)` with global
indices, and the kernels call those very functions, so forward and backward
regenerate the same bits block by block. The denominator `l` (and so lse)
is the undropped one; only what multiplies V (forward) or comes out of dO V^T
(backward) is masked and scaled by 1/(1 - rate). With `dropout_rate == 0` the
hash is not even traced (a Python-level branch).

Platforms. `interpret=None` defers the choice to lowering time through
`jax.lax.platform_dependent`: CPU (and unknown platforms) run the Pallas
interpreter, CUDA/ROCm lower through Triton (JAX 0.10.2 defaults GPU Pallas to
Mosaic GPU, which rejects some of the ops used here; passing
`plgpu.CompilerParams` selects Triton), TPU lowers through Mosaic TPU. So
`jax.jit(f).lower(lowering_platforms=("cuda",))` from a CPU-only machine
builds the real Triton kernel, which is how the tests prove that the GPU and
TPU kernels lower (and, with `haiku_gpt.aot.targets`, compile). Per-platform
tiles (`BlockSizes`; always clamped to the padded sequence length):
  interpret (CPU): 128/128: every grid step costs interpreter overhead, so big
                   blocks are cheap.
  Triton (GPU):    `triton_tiles`, by compute capability, dtype, Dp and pass
                   (forward; backward), chosen so shared memory fits and no
                   kernel spills registers.
                   Triton needs power-of-two block shapes, hence the padding.
  Mosaic (TPU):    `_tpu_block_sizes`: the largest square tile of 512, 256 or
                   128 whose dK/dV working set (`tpu_vmem_bytes`) stays under
                   half the generation's scoped VMEM (16 MiB on v4/v5e/v5p,
                   32 MiB on v6e).
The device kind comes from this process's devices, or from `compiling_for`
when compiling ahead of time for hardware that is not here. Numerics of both
families are tested in interpret mode (`_streamed=True` interprets the TPU
family), which runs the same kernel bodies.

Families. `family="auto"` is all of the above. `family="mosaic_gpu"` hands the
call to `kernels.flash_attention_mgpu`, an opt-in Hopper family in Pallas
Mosaic GPU (wgmma, TMA), with the same masks and dropout bits.

Fall-back: when q and k/v lengths differ (decode / chunked prefill) this calls
`reference_attention` (causal mask bottom-right aligned) instead of the kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int, UInt32

from haiku_gpt.kernels.families import check_kernel_family, is_hopper
from haiku_gpt.kernels.dropout import keep_mask, keep_threshold, row_hash
from haiku_gpt.kernels.reference import MASK_VALUE, default_scale, reference_attention, segment_spans, split_qkv

MAX_HEAD_DIM = 256  # the GPU tiles are tuned up to a padded head_dim of 256

# ---------------------------------------------------------------------------
# Static configuration
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    """Everything static about one call (hashable: a custom_vjp nondiff arg)."""

    causal: bool
    sm_scale: float
    dropout_rate: float
    block_q: int | None
    block_k: int | None
    interpret: bool | None
    debug_poison: bool
    streamed: bool | None = None  # interpreter only: run the TPU (grid-streamed) kernels
    qkv_heads: tuple[int, int] | None = None  # (H, KVH): q, k and v are one [B, T, H + 2 KVH, D] array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters of one compiled kernel family.

    `num_warps` and `num_stages` are Triton's (GPU only). `vmem_limit_bytes` is
    the scoped VMEM the Mosaic TPU kernels may use (TPU only).
    """

    block_q: int
    block_k: int
    num_warps: int | None = None
    num_stages: int | None = None
    vmem_limit_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class _Backend:
    """How to build the pallas_calls for one platform.

    `streamed`: K/V (and Q/dO in the dK/dV pass) arrive block by block through
    a reduction ("arbitrary") grid axis, with VMEM scratch accumulators (TPU).
    Otherwise one program loops over the blocks itself (Triton: its grid has no
    sequential axis, and scratch buffers do not exist).
    """

    name: str  # "interpret" | "triton" | "mosaic_tpu"
    interpret: bool
    streamed: bool
    # The layout the kernels read and write q/k/v/o and their gradients in. False: the public
    # [B, T, H, D] itself (token-major), heads a squeezed block dimension, so XLA neither
    # transposes nor (when T and D need no padding) copies anything around the kernels.
    # True: [B, H, T, D] (heads-major), transposed in XLA: Mosaic TPU tiles a block's last two
    # dimensions, which must then be (rows, head dim).
    heads_major: bool

    def compiler_params(self, sizes: BlockSizes, reduction_axis: bool):
        if self.name == "triton":
            return plgpu.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages)
        if self.name == "mosaic_tpu":
            # Every output block belongs to one (b, h, block) program; the last
            # axis of a streamed kernel walks the blocks it reduces over.
            semantics = ("parallel",) * 3 + (("arbitrary",) if reduction_axis else ())
            return pltpu.CompilerParams(dimension_semantics=semantics,
                                        vmem_limit_bytes=sizes.vmem_limit_bytes)
        return None

    def seed_spec(self) -> pl.BlockSpec:
        # The dropout seed and batch offset are a (2,) uint32 operand. TPU wants
        # scalars in SMEM; Triton and the interpreter take it as an ordinary block.
        if self.name == "mosaic_tpu":
            return pl.BlockSpec(memory_space=pltpu.SMEM)
        return pl.BlockSpec((2,), lambda *_: (0,))


_INTERPRET = _Backend("interpret", interpret=True, streamed=False, heads_major=False)  # runs Triton's kernels
_INTERPRET_STREAMED = _Backend("interpret", interpret=True, streamed=True, heads_major=True)  # runs the TPU's
_TRITON = _Backend("triton", interpret=False, streamed=False, heads_major=False)
_MOSAIC_TPU = _Backend("mosaic_tpu", interpret=False, streamed=True, heads_major=True)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Block sizes and padded sizes for one call on one backend."""

    seq_len: int  # T, the real length (keys at or past it are masked)
    head_dim: int  # D
    block_q: int  # bq
    block_k: int  # bk
    seq_padded: int  # Tp
    head_dim_padded: int  # Dp

    @property
    def num_q_blocks(self) -> int:  # nq
        return self.seq_padded // self.block_q

    @property
    def num_k_blocks(self) -> int:  # nk
        return self.seq_padded // self.block_k


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# ---------------------------------------------------------------------------
# Block sizes per platform, device, head_dim and dtype
# ---------------------------------------------------------------------------

_device_kind_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flash_attention_device_kind", default=None)


@contextlib.contextmanager
def compiling_for(device_kind: str):
    """Pick block sizes for `device_kind` (e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite")
    while tracing in this context: for ahead-of-time compilation on another machine."""
    token = _device_kind_override.set(device_kind)
    try:
        yield
    finally:
        _device_kind_override.reset(token)


def _device_kind(platform: str) -> str:
    """The kind of device being compiled for: the override, else this process's devices."""
    kind = _device_kind_override.get()
    if kind is not None:
        return kind
    try:
        if jax.default_backend() == platform:
            return jax.devices()[0].device_kind
    except RuntimeError:
        pass
    return ""


# Scoped VMEM the Mosaic compiler allows a kernel by default, per TPU generation
# (device_kind substrings; the first match wins), and physical VMEM per core.
_TPU_SCOPED_VMEM = (("v6", 32 << 20), ("v5 lite", 16 << 20), ("v5e", 16 << 20), ("v5", 16 << 20),
                    ("v4", 16 << 20))
_TPU_DEFAULT_SCOPED_VMEM = 16 << 20


def tpu_vmem_bytes(block_q: int, block_k: int, head_dim_padded: int, itemsize: int) -> int:
    """VMEM of the largest streamed TPU kernel (dK/dV) for these tiles, in bytes.

    Inputs and outputs are double-buffered by the pipeline; [rows, 1] blocks
    occupy 128 lanes; the [bq, bk] float32 temporaries are S, P, dP and dS.
    """
    lanes = 128
    rows_q = block_q * head_dim_padded * itemsize  # one [bq, Dp] block
    rows_k = block_k * head_dim_padded * itemsize
    stats = block_q * lanes * 4  # lse or delta, [bq, 1] float32
    pipelined = 2 * (2 * rows_q + 2 * stats + 2 * rows_k + 2 * rows_k)  # q, do, lse, delta, k, v, dk, dv
    scratch = 2 * block_k * head_dim_padded * 4  # dk, dv accumulators
    temporaries = 4 * block_q * block_k * 4
    return pipelined + scratch + temporaries


def _tpu_block_sizes(device_kind: str, head_dim_padded: int, dtype) -> BlockSizes:
    """The largest square tile (512, 256, 128) whose dK/dV VMEM stays under half the scope."""
    kind = device_kind.lower()
    scoped = next((size for key, size in _TPU_SCOPED_VMEM if key in kind), _TPU_DEFAULT_SCOPED_VMEM)
    itemsize = jnp.dtype(dtype).itemsize
    for block in (512, 256, 128):
        if tpu_vmem_bytes(block, block, head_dim_padded, itemsize) <= scoped // 2:
            return BlockSizes(block, block, vmem_limit_bytes=scoped)
    return BlockSizes(128, 128, vmem_limit_bytes=scoped)


# Triton tiles: (block_q, block_k, num_warps, num_stages) per padded head_dim, one tuple for both
# passes or a pair (forward kernel; delta, dK/dV and dQ kernels). Every entry compiles with no
# register spills and within shared memory (ptxas on the deviceless A100 / H100 compiles, with
# and without dropout: docs/kernels.md's compile matrix).
# float32 (precision HIGHEST) dots are IEEE FMA loops on CUDA cores, not tensor cores: each
# thread holds its whole slice of both operands, so the tiles are small or the warps many.
_TRITON_FLOAT32 = {16: (64, 64, 8, 2), 32: (32, 32, 8, 2), 64: (32, 32, 8, 2), 128: (16, 16, 8, 2),
                   256: (32, 16, 8, 2)}  # 16x16 spilled 8 bytes in dK/dV on H100 at 65536 with dropout
_TRITON_16BIT = {  # bfloat16/float16 on tensor cores: wgmma on Hopper (sm_90), mma.sync on Ampere (sm_80)
    9: {16: (64, 128, 8, 2), 32: (64, 128, 8, 2), 64: (64, 64, 4, 3), 128: (64, 64, 8, 2), 256: (64, 32, 8, 2)},
    8: {16: (128, 128, 8, 2), 32: (64, 64, 4, 2), 64: (64, 32, 8, 2), 128: (128, 64, 8, 2), 256: (64, 32, 8, 2)},
}
_FORWARD, _BACKWARD = 0, 1  # the two passes' tiles in a (forward, backward) pair


def _gpu_generation(device_kind: str) -> int:
    """Compute capability major the tiles are chosen for: 9 for Hopper, else 8 (Ampere's
    tiles, which also compile, unspilled, everywhere newer)."""
    return 9 if is_hopper(device_kind) else 8


def triton_tiles(device_kind: str, head_dim_padded: int, dtype, backward: bool) -> tuple[int, int, int, int]:
    """(block_q, block_k, num_warps, num_stages) of one pass's Triton kernels on `device_kind`."""
    if jnp.dtype(dtype) == jnp.float32:  # CUDA-core FMA dots: the same tiles on every generation
        tiles = _TRITON_FLOAT32[head_dim_padded]
    else:
        tiles = _TRITON_16BIT[_gpu_generation(device_kind)][head_dim_padded]
    return tiles[_BACKWARD if backward else _FORWARD] if isinstance(tiles[0], tuple) else tiles


def _block_sizes(backend: _Backend, head_dim_padded: int, dtype, backward: bool) -> BlockSizes:
    if backend.name == "triton":
        block_q, block_k, num_warps, num_stages = triton_tiles(_device_kind("gpu"), head_dim_padded, dtype,
                                                               backward)
        return BlockSizes(block_q, block_k, num_warps=num_warps, num_stages=num_stages)
    if backend.name == "mosaic_tpu":
        return _tpu_block_sizes(_device_kind("tpu"), head_dim_padded, dtype)
    # Interpreter: every grid step and loop iteration costs Python-level
    # overhead, so big blocks are cheap.
    return BlockSizes(128, 128)


def _geometry(backend: _Backend, opts: _Options, seq_len: int, head_dim: int, dtype,
              backward: bool = False) -> tuple[_Geometry, BlockSizes]:
    """One pass's blocks and padding (the forward and the backward pad on their own: only o and lse,
    unpadded, go from one to the other)."""
    head_dim_padded = max(16, _next_pow2(head_dim))
    sizes = _block_sizes(backend, head_dim_padded, dtype, backward)
    # A block never needs to be longer than the sequence rounded up to a power
    # of two (>= 16: Triton's dot needs every dim >= 16).
    cap = max(16, _next_pow2(seq_len))
    block_q = min(opts.block_q or sizes.block_q, cap)
    block_k = min(opts.block_k or sizes.block_k, cap)
    multiple = math.lcm(block_q, block_k)
    seq_padded = pl.cdiv(seq_len, multiple) * multiple
    geom = _Geometry(seq_len, head_dim, block_q, block_k, seq_padded, head_dim_padded)
    return geom, dataclasses.replace(sizes, block_q=block_q, block_k=block_k)


# ---------------------------------------------------------------------------
# In-kernel helpers
# ---------------------------------------------------------------------------


def _precision(dtype) -> lax.Precision | None:
    # float32 inputs get true float32 matmuls (Triton would otherwise use TF32);
    # bfloat16 inputs use the native bf16 x bf16 -> f32 path.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b):
    """a @ b with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                           precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _dot_nt(a, b):
    """a @ b.T, expressed as a contraction so no transpose op is emitted."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                           precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a.T @ b, expressed as a contraction so no transpose op is emitted."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                           precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _positions(block_index, block_size: int, axis: int):
    """Global row (axis 0, shape [n, 1]) or column (axis 1, shape [1, n]) indices.

    2-D iotas: TPU vector layouts are 2-D, and [n, 1] x [1, m] broadcasts give
    the [bq, bk] masks without any reshape.
    """
    shape = (block_size, 1) if axis == 0 else (1, block_size)
    return block_index * block_size + lax.broadcasted_iota(jnp.int32, shape, axis)


def _score_mask(q_pos, k_pos, *, causal: bool, seq_len: int, seq_padded: int, segs=None):
    """Which of the [bq, bk] scores are real: key not padding, (causal) not in the future and (segment ids,
    `segs` = (query ids, key ids) shaped like q_pos and k_pos) in the query's own segment."""
    mask = None
    if seq_padded != seq_len:  # padded keys exist only then
        mask = k_pos < seq_len
    if causal:
        below = k_pos <= q_pos
        mask = below if mask is None else mask & below
    if segs is not None:
        same = segs[0] == segs[1]
        mask = same if mask is None else mask & same
    return mask


def _last_k_block(qi, causal: bool, geom: _Geometry):
    """Index of the last key block query block `qi` sees: it holds a real key and,
    causal, is not entirely above the diagonal."""
    last = pl.cdiv(geom.seq_len, geom.block_k) - 1
    if causal:
        last = jnp.minimum(last, pl.cdiv((qi + 1) * geom.block_q, geom.block_k) - 1)
    return last


def _first_q_block(kj, causal: bool, geom: _Geometry):
    """Index of the first query block that sees key block `kj` (causal: its diagonal)."""
    return lax.div(kj * geom.block_k, geom.block_q) if causal else 0


def _last_q_block(geom: _Geometry) -> int:
    """Query blocks after this one hold only padding rows."""
    return pl.cdiv(geom.seq_len, geom.block_q) - 1


def _row_hasher(seed_ref, dropout_rate: float) -> Callable:
    """q_pos -> the dropout row hash of this program's (batch, head) rows (None without dropout).

    Reads the program ids where it is called: at a kernel's top level, since the
    interpreter cannot evaluate `pl.program_id` inside a loop body.
    """
    if dropout_rate == 0.0:
        return lambda q_pos: None
    # seed_ref = [seed, batch offset]: the offset of this device's rows under shard_map.
    seed, b, h = seed_ref[0], pl.program_id(0).astype(jnp.uint32) + seed_ref[1], pl.program_id(1)
    return lambda q_pos: row_hash(seed, b, h, q_pos)


# ---------------------------------------------------------------------------
# The three block updates every kernel is built from. Shapes: q, do [bq, Dp];
# k, v [bk, Dp]; lse, delta [bq, 1]; q_pos [bq, 1]; k_pos [1, bk].
# ---------------------------------------------------------------------------


def _attend(q, k, v, carry, q_pos, k_pos, row, *, sm_scale: float, causal: bool,
            dropout_rate: float, geom: _Geometry, segs=None):
    """Fold one key block into the online softmax state (acc [bq, Dp], m [bq, 1], l [bq, 1])."""
    acc, m_prev, l_prev = carry
    s = _dot_nt(q, k) * sm_scale  # [bq, bk] float32 scores
    mask = _score_mask(q_pos, k_pos, causal=causal, seq_len=geom.seq_len,
                       seq_padded=geom.seq_padded, segs=segs)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    # Online softmax: rescale what was accumulated under the old max.
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    correction = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)  # unnormalised probabilities
    l_new = correction * l_prev + jnp.sum(p, axis=1, keepdims=True)
    if dropout_rate > 0.0:
        # The denominator above saw every probability; only V's weights drop.
        keep = keep_mask(row, k_pos, dropout_rate)
        p = jnp.where(keep, p * (1.0 / (1.0 - dropout_rate)), 0.0)
    return correction * acc + _dot(p.astype(v.dtype), v), m_new, l_new


def _probs_and_dscores(q, k, v, do, lse, delta, q_pos, k_pos, row, *, sm_scale: float,
                       causal: bool, dropout_rate: float, geom: _Geometry, transposed: bool = False, segs=None):
    """Rebuild one [bq, bk] tile of P from lse and return (P as applied to V, dS).

    dS is the gradient w.r.t. the *unscaled* scores q.k, i.e. already times sm_scale.
    `transposed`: the [bk, bq] tiles P^T and dS^T instead, with lse, delta and q_pos
    given as [1, bq] rows and k_pos as a [bk, 1] column (every other step is
    elementwise, so only the two dots change).
    """
    s = (_dot_nt(k, q) if transposed else _dot_nt(q, k)) * sm_scale
    mask = _score_mask(q_pos, k_pos, causal=causal, seq_len=geom.seq_len,
                       seq_padded=geom.seq_padded, segs=segs)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp(s - lse)  # exact softmax probabilities (masked ones are 0)
    dp = _dot_nt(v, do) if transposed else _dot_nt(do, v)  # w.r.t. the probabilities that multiplied V
    p_applied = p
    if dropout_rate > 0.0:
        keep = keep_mask(row, k_pos, dropout_rate)
        scale = 1.0 / (1.0 - dropout_rate)
        p_applied = jnp.where(keep, p * scale, 0.0)
        dp = jnp.where(keep, dp * scale, 0.0)
    ds = p * (dp - delta) * sm_scale
    return p_applied, ds


def _accumulate_dkdv(q, k, v, do, lse, delta, carry, q_pos, k_pos, row, *, transposed: bool = False,
                     **static):
    """dV += P^T dO and dK += dS^T Q for one query block (carry: dk, dv [bk, Dp] float32).

    `transposed` (see `_probs_and_dscores`) builds P^T and dS^T directly, so both
    products are plain `a @ b`: on Hopper, `a.T @ b` of a tile held in registers
    makes ptxas serialize the dK/dV kernel's wgmma instructions.
    """
    dk, dv = carry
    p, ds = _probs_and_dscores(q, k, v, do, lse, delta, q_pos, k_pos, row, transposed=transposed,
                               **static)
    if transposed:
        return dk + _dot(ds.astype(q.dtype), q), dv + _dot(p.astype(do.dtype), do)
    return dk + _dot_tn(ds.astype(q.dtype), q), dv + _dot_tn(p.astype(do.dtype), do)


def _accumulate_dq(q, k, v, do, lse, delta, dq, q_pos, k_pos, row, **static):
    """dQ += dS K for one key block (dq: [bq, Dp] float32)."""
    _, ds = _probs_and_dscores(q, k, v, do, lse, delta, q_pos, k_pos, row, **static)
    return dq + _dot(ds.astype(k.dtype), k)


# ---------------------------------------------------------------------------
# Loop kernels (Triton, interpreter). Ref shapes are per program (the
# BlockSpecs squeeze B and H); grid (B, H, blocks). With segment ids
# (`segmented`), three more refs follow v_ref (see `_SegmentRefs`).
# ---------------------------------------------------------------------------


def _split_refs(refs, segmented: bool, outputs: int):
    """(segment refs or None, the output refs) from a kernel's refs after its q/k/v-like inputs."""
    segs, outs = refs[:len(refs) - outputs], refs[len(refs) - outputs:]
    return (segs if segmented else None), outs


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, *refs, geom: _Geometry, segmented: bool = False, **static):
    # q_ref, o_ref: [bq, Dp] this program's query block
    # k_ref, v_ref: [Tp, Dp] all keys/values of this (batch, head)
    # lse_ref:      [bq, 1]
    # segmented: q_seg [bq, 1], k_seg [1, Tp], q_first/q_last [bq, 1] (the span of each row's segment)
    seg_refs, (o_ref, lse_ref) = _split_refs(refs, segmented, 2)
    qi, bk = pl.program_id(2), geom.block_k
    row_of = _row_hasher(seed_ref, static["dropout_rate"])
    q = q_ref[...]
    q_pos = _positions(qi, geom.block_q, axis=0)
    row = row_of(q_pos)  # reused for every key block
    first, last = 0, _last_k_block(qi, static["causal"], geom)
    if segmented:
        q_seg, k_seg_ref, q_first_ref, q_last_ref = seg_refs
        q_seg = q_seg[...]
        first, last = _segment_key_blocks(q_first_ref[...], q_last_ref[...], first, last, bk)

    def body(kj, carry):
        k, v = k_ref[pl.ds(kj * bk, bk), :], v_ref[pl.ds(kj * bk, bk), :]
        segs = (q_seg, k_seg_ref[:, pl.ds(kj * bk, bk)]) if segmented else None
        return _attend(q, k, v, carry, q_pos, _positions(kj, bk, axis=1), row, geom=geom, segs=segs, **static)

    # Blocks above the diagonal (and padding-only blocks, and with segment ids blocks outside every
    # row's segment) are never visited.
    init = (jnp.zeros((geom.block_q, geom.head_dim_padded), jnp.float32),
            jnp.full((geom.block_q, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((geom.block_q, 1), jnp.float32))
    acc, m, l = lax.fori_loop(first, last + 1, body, init)
    # Every row sees its own key (the diagonal), so l > 0: no 0/0 even for padded rows.
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _segment_key_blocks(row_first, row_last, first, last, block_k: int):
    """Narrow the key blocks [first, last] a query block visits to those holding its rows' segments."""
    return (jnp.maximum(first, lax.div(jnp.min(row_first), block_k)),
            jnp.minimum(last, lax.div(jnp.max(row_last), block_k)))


def _delta_kernel(o_ref, do_ref, delta_ref):
    # o_ref, do_ref: [bq, Dp]; delta_ref: [bq, 1]. delta_i = sum_j P_ij dP_ij = dO_i . O_i
    o = o_ref[...].astype(jnp.float32)
    do = do_ref[...].astype(jnp.float32)
    delta_ref[...] = jnp.sum(o * do, axis=1, keepdims=True)


def _dkdv_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, geom: _Geometry,
                 segmented: bool = False, dkv_out: bool = False, **static):
    # k_ref, v_ref, dk_ref, dv_ref: [bk, Dp] this program's key block
    # q_ref, do_ref: [Tp, Dp]; lse_ref, delta_ref: [Tp, 1] all rows of this (batch, head)
    # segmented: k_seg [bk, 1] (16-bit: transposed) or [1, bk]; q_seg [1, Tp] or [Tp, 1];
    #   k_first/k_last [bk, 1] (the span of each key's segment)
    # dkv_out: one output ref [bk, 2, Dp], the k and v slots of d(qkv) [B, Tp, 3, H, Dp]
    seg_refs, outs = _split_refs(refs, segmented, 1 if dkv_out else 2)
    dk_ref, dv_ref = (outs[0].at[:, 0, :], outs[0].at[:, 1, :]) if dkv_out else outs
    kj, bq = pl.program_id(2), geom.block_q
    row_of = _row_hasher(seed_ref, static["dropout_rate"])
    k, v = k_ref[...], v_ref[...]
    # 16-bit inputs: [bk, bq] tiles (P^T, dS^T), which keep Hopper's wgmma pipelined.
    # float32 keeps [bq, bk]: its CUDA-core dots spill with the transposed form.
    transposed = k.dtype != jnp.float32
    k_pos = _positions(kj, geom.block_k, axis=0 if transposed else 1)
    stats = (lambda x: x.T) if transposed else (lambda x: x)  # lse, delta: [1, bq] rows when transposed
    # Query blocks whose rows can see this key block: causal starts at the
    # diagonal. Query blocks made only of padding rows are skipped.
    first, last = _first_q_block(kj, static["causal"], geom), _last_q_block(geom)
    if segmented:
        k_seg, q_seg_ref, k_first_ref, k_last_ref = seg_refs
        k_seg = k_seg[...]
        first, last = _segment_key_blocks(k_first_ref[...], k_last_ref[...], first, last, bq)

    def body(qi, carry):
        rows = pl.ds(qi * bq, bq)
        q_pos = _positions(qi, bq, axis=1 if transposed else 0)
        segs = None
        if segmented:
            segs = (q_seg_ref[:, rows], k_seg) if transposed else (q_seg_ref[rows, :], k_seg)
        return _accumulate_dkdv(q_ref[rows, :], k, v, do_ref[rows, :], stats(lse_ref[rows, :]),
                                stats(delta_ref[rows, :]), carry, q_pos, k_pos, row_of(q_pos),
                                transposed=transposed, geom=geom, segs=segs, **static)

    zeros = jnp.zeros((geom.block_k, geom.head_dim_padded), jnp.float32)
    dk, dv = lax.fori_loop(first, last + 1, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, geom: _Geometry,
               segmented: bool = False, **static):
    # q_ref, do_ref, dq_ref: [bq, Dp]; lse_ref, delta_ref: [bq, 1] this program's query block
    # k_ref, v_ref: [Tp, Dp] all keys/values of this (batch, head); segment refs as the forward's
    seg_refs, (dq_ref,) = _split_refs(refs, segmented, 1)
    qi, bk = pl.program_id(2), geom.block_k
    row_of = _row_hasher(seed_ref, static["dropout_rate"])
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos = _positions(qi, geom.block_q, axis=0)
    row = row_of(q_pos)
    first, last = 0, _last_k_block(qi, static["causal"], geom)
    if segmented:
        q_seg, k_seg_ref, q_first_ref, q_last_ref = seg_refs
        q_seg = q_seg[...]
        first, last = _segment_key_blocks(q_first_ref[...], q_last_ref[...], first, last, bk)

    def body(kj, dq):
        k, v = k_ref[pl.ds(kj * bk, bk), :], v_ref[pl.ds(kj * bk, bk), :]
        segs = (q_seg, k_seg_ref[:, pl.ds(kj * bk, bk)]) if segmented else None
        return _accumulate_dq(q, k, v, do, lse, delta, dq, q_pos, _positions(kj, bk, axis=1),
                              row, geom=geom, segs=segs, **static)

    dq = lax.fori_loop(first, last + 1, body, jnp.zeros((geom.block_q, geom.head_dim_padded), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


# ---------------------------------------------------------------------------
# Streamed kernels (Mosaic TPU). Grid (B, H, blocks, reduced blocks): the last
# axis is sequential ("arbitrary"); accumulators live in VMEM scratch, are
# initialised on its first step and written out on its last. Blocks a program
# need not see are neither computed (pl.when) nor fetched: their index maps
# clamp to a visible block, and an unchanged block index is not copied again.
# With segment ids two more refs follow the inputs: the query block's ids
# [bq, 1] and the key block's [1, bk] (masked; blocks are skipped by causality).
# ---------------------------------------------------------------------------


def _streamed_forward_kernel(seed_ref, q_ref, k_ref, v_ref, *refs, geom: _Geometry, segmented: bool = False,
                             **static):
    # q_ref, o_ref, acc_ref: [bq, Dp]; k_ref, v_ref: [bk, Dp]; lse_ref, m_ref, l_ref: [bq, 1]
    seg_refs, (o_ref, lse_ref, acc_ref, m_ref, l_ref) = _split_refs(refs, segmented, 5)
    qi, kj = pl.program_id(2), pl.program_id(3)
    row_of = _row_hasher(seed_ref, static["dropout_rate"])

    @pl.when(kj == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)

    @pl.when(kj <= _last_k_block(qi, static["causal"], geom))
    def _step():
        q_pos = _positions(qi, geom.block_q, axis=0)
        segs = (seg_refs[0][...], seg_refs[1][...]) if segmented else None
        acc, m, l = _attend(q_ref[...], k_ref[...], v_ref[...],
                            (acc_ref[...], m_ref[...], l_ref[...]), q_pos,
                            _positions(kj, geom.block_k, axis=1),
                            row_of(q_pos), geom=geom, segs=segs, **static)
        acc_ref[...], m_ref[...], l_ref[...] = acc, m, l

    @pl.when(kj == geom.num_k_blocks - 1)
    def _finish():
        o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)
        lse_ref[...] = m_ref[...] + jnp.log(l_ref[...])


def _streamed_dkdv_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, geom: _Geometry,
                          segmented: bool = False, **static):
    # k_ref, v_ref, dk_ref, dv_ref, dk_acc, dv_acc: [bk, Dp]; q_ref, do_ref: [bq, Dp];
    # lse_ref, delta_ref: [bq, 1]. Grid (B, H, nk, nq): query blocks stream past a key block.
    seg_refs, (dk_ref, dv_ref, dk_acc, dv_acc) = _split_refs(refs, segmented, 4)
    kj, qi = pl.program_id(2), pl.program_id(3)
    row_of = _row_hasher(seed_ref, static["dropout_rate"])

    @pl.when(qi == 0)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    visible = (qi >= _first_q_block(kj, static["causal"], geom)) & (qi <= _last_q_block(geom))

    @pl.when(visible)
    def _step():
        q_pos = _positions(qi, geom.block_q, axis=0)
        segs = (seg_refs[0][...], seg_refs[1][...]) if segmented else None
        dk, dv = _accumulate_dkdv(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...],
                                  delta_ref[...], (dk_acc[...], dv_acc[...]), q_pos,
                                  _positions(kj, geom.block_k, axis=1),
                                  row_of(q_pos),
                                  geom=geom, segs=segs, **static)
        dk_acc[...], dv_acc[...] = dk, dv

    @pl.when(qi == geom.num_q_blocks - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _streamed_dq_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, geom: _Geometry,
                        segmented: bool = False, **static):
    # q_ref, do_ref, dq_ref, dq_acc: [bq, Dp]; lse_ref, delta_ref: [bq, 1]; k_ref, v_ref: [bk, Dp]
    seg_refs, (dq_ref, dq_acc) = _split_refs(refs, segmented, 2)
    qi, kj = pl.program_id(2), pl.program_id(3)
    row_of = _row_hasher(seed_ref, static["dropout_rate"])

    @pl.when(kj == 0)
    def _init():
        dq_acc[...] = jnp.zeros_like(dq_acc)

    @pl.when(kj <= _last_k_block(qi, static["causal"], geom))
    def _step():
        q_pos = _positions(qi, geom.block_q, axis=0)
        segs = (seg_refs[0][...], seg_refs[1][...]) if segmented else None
        dq_acc[...] = _accumulate_dq(q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                     lse_ref[...], delta_ref[...], dq_acc[...], q_pos,
                                     _positions(kj, geom.block_k, axis=1),
                                     row_of(q_pos),
                                     geom=geom, segs=segs, **static)

    @pl.when(kj == geom.num_k_blocks - 1)
    def _finish():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


# ---------------------------------------------------------------------------
# pallas_call plumbing
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Specs:
    """BlockSpecs for one call: q/k/v-shaped arrays in the backend's layout, row statistics heads-major.

    Grids start (B, H, ...). `group` query heads share one K/V head (grouped-query attention):
    query head h reads K/V head h // group, and dK/dV come out per query head (summed in XLA).
    `first`: the head of its array where an operand's heads start (k's and v's in a fused
    [B, T, H + 2 KVH, D] qkv, `_qkv_to_kernel_layout`); 0 for an array of its own.
    """

    heads_major: bool
    group: int = 1

    def _spec(self, block, width, row, head, first: int = 0) -> pl.BlockSpec:
        at = (lambda h: head(h) + first) if first else head
        if self.heads_major:  # [B, H, Tp, width]
            return pl.BlockSpec((None, None, block, width), lambda b, h, *rest: (b, at(h), row(b, h, *rest), 0))
        return pl.BlockSpec((None, block, None, width), lambda b, h, *rest: (b, row(b, h, *rest), at(h), 0))

    def rows(self, block: int, width: int, index: Callable = lambda b, h, i, *_: i, first: int = 0) -> pl.BlockSpec:
        """Block `index(b, h, *grid)` of query head h's rows (q, o, dO, dQ, and the per-head dK/dV)."""
        return self._spec(block, width, index, lambda h: h, first)

    def kv_rows(self, block: int, width: int, index: Callable = lambda b, h, i, *_: i,
                first: int = 0) -> pl.BlockSpec:
        """Block `index(b, h, *grid)` of the rows of the K/V head query head h reads."""
        return self._spec(block, width, index, self._kv_head, first)

    def all_rows(self, seq_padded: int, width: int, kv: bool = False, first: int = 0) -> pl.BlockSpec:
        """All rows of one (batch, head): the kernel slices its own blocks in a loop."""
        return self._spec(seq_padded, width, lambda *_: 0, self._kv_head if kv else (lambda h: h), first)

    def _kv_head(self, h):
        # lax.div: truncating division, which Mosaic TPU lowers without the sign op of `//`.
        return h if self.group == 1 else lax.div(h, self.group)

    @staticmethod
    def stats(block: int, index: Callable = lambda b, h, i, *_: i) -> pl.BlockSpec:
        """Block of rows of lse or delta, [B, H, Tp, 1] (the trailing 1 keeps them 2-D)."""
        return pl.BlockSpec((None, None, block, 1), lambda b, h, *rest: (b, h, index(b, h, *rest), 0))

    @staticmethod
    def all_stats(seq_padded: int) -> pl.BlockSpec:
        return pl.BlockSpec((None, None, seq_padded, 1), lambda b, h, *_: (b, h, 0, 0))


def _pallas(backend: _Backend, opts: _Options, kernel: Callable, *, name: str, grid,
            sizes: BlockSizes, in_specs, out_specs, out_shapes, inputs, seed=None,
            scratch_shapes=(), into=None):
    """pallas_call with the backend's seed spec and compiler params.

    `into`: a buffer the (one) output is written into in place (input_output_aliases): the kernel writes
    its blocks and the rest keeps what it held (the dQ pass fills the q heads of the d(qkv) that the
    dK/dV pass wrote). With `opts.debug_poison` every other output starts as a NaN-filled buffer,
    aliased the same way, so any element that no program writes stays NaN and the tests' NaN checks
    catch it. (Without aliasing an unwritten output element is whatever the allocator left there, often
    0, which a test could not tell apart.) The kernel never sees these buffers' input refs.
    """
    operands = [*([] if seed is None else [seed]), *inputs]
    in_specs = [*([] if seed is None else [backend.seed_spec()]), *in_specs]
    starts = [into] if into is not None else [
        jnp.full(shape.shape, jnp.nan, shape.dtype) if opts.debug_poison else None for shape in out_shapes]
    num_in, aliases = len(operands), {}
    for n, (start, spec) in enumerate(zip(starts, out_specs)):
        if start is not None:
            aliases[len(operands)] = n
            operands.append(start)
            in_specs.append(spec)
    if aliases:
        body = kernel

        def kernel(*refs):  # drop the aliased inputs' refs: the outputs are their buffers
            return body(*refs[:num_in], *refs[num_in + len(aliases):])

    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shapes,
        scratch_shapes=scratch_shapes,
        input_output_aliases=aliases,
        compiler_params=backend.compiler_params(sizes, reduction_axis=len(grid) == 4),
        interpret=backend.interpret,
        name=name,
    )(*operands)


def _vmem(shape) -> Any:
    return pltpu.VMEM(shape, jnp.float32)


def _to_kernel_layout(x, geom: _Geometry, heads_major: bool):
    """[B, T, H, D] -> the kernels' layout, zero padded to [.., Tp, .., Dp] where the tiles need it (zeros are
    exact: they add 0 to dots). Token-major with nothing to pad, it is `x` itself: no copy."""
    pad = ((0, 0), (0, geom.seq_padded - geom.seq_len), (0, 0), (0, geom.head_dim_padded - geom.head_dim))
    if any(after for _, after in pad):
        x = jnp.pad(x, pad)
    return jnp.swapaxes(x, 1, 2) if heads_major else x


def _qkv_to_kernel_layout(q, k, v, geom: _Geometry, backend: _Backend, opts: _Options):
    """q, k, v in the kernels' layout and the head each one's heads start at. With `opts.qkv_heads` all
    three are one fused [B, T, H + 2 KVH, D] array, which the kernels read in place (starting at heads 0,
    H and H + KVH) when the layout needs no copy anyway (token-major, nothing to pad); otherwise it is
    sliced first."""
    if opts.qkv_heads is None:
        return tuple(_to_kernel_layout(x, geom, backend.heads_major) for x in (q, k, v)), (0, 0, 0)
    heads, kv_heads = opts.qkv_heads
    firsts = (0, heads, heads + kv_heads)
    padded = (geom.seq_padded, geom.head_dim_padded) != (geom.seq_len, geom.head_dim)
    if not backend.heads_major and not padded:
        return (q, k, v), firsts
    q, k, v = (x[:, :, first:first + n] for x, first, n in zip((q, k, v), firsts, (heads, kv_heads, kv_heads)))
    return tuple(_to_kernel_layout(x, geom, backend.heads_major) for x in (q, k, v)), (0, 0, 0)


def _kernel_shape(geom: _Geometry, batch: int, heads: int, heads_major: bool) -> tuple[int, ...]:
    """The shape of a q-like array (o, dQ, per-head dK/dV) in the kernels' layout."""
    if heads_major:
        return (batch, heads, geom.seq_padded, geom.head_dim_padded)
    return (batch, geom.seq_padded, heads, geom.head_dim_padded)


def _heads(q, k, opts: _Options) -> tuple[int, int]:
    """(H, KVH): from q and k, or from `opts.qkv_heads` when they are one fused array."""
    return opts.qkv_heads or (q.shape[2], k.shape[2])


def _from_kernel_layout(x, geom: _Geometry, heads_major: bool):
    """The kernels' layout -> [B, T, H, D], the padding cut off."""
    if heads_major:
        x = jnp.swapaxes(x, 1, 2)
    if (geom.seq_padded, geom.head_dim_padded) != (geom.seq_len, geom.head_dim):
        x = x[:, :geom.seq_len, :, :geom.head_dim]
    return x


def _rows_to_kernel_layout(x, geom: _Geometry):
    """[B, H, T] -> [B, H, Tp, 1] (the trailing 1 keeps row statistics 2-D)."""
    if geom.seq_padded != geom.seq_len:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, geom.seq_padded - geom.seq_len)))
    return x[..., None]


def _sum_groups(x, kv_heads: int):
    """dK or dV per query head, [B, T, H, D] float32 -> summed over each K/V head's group, [B, T, KVH, D]."""
    batch, seq, heads, head_dim = x.shape
    return x.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim).sum(axis=3)


@dataclasses.dataclass(frozen=True)
class _Segments:
    """Segment ids in the kernels' layouts, [B, Tp] padded with each row's last id: as columns [B, Tp, 1]
    (`ids`, and the first and last position holding each position's id, which bound the blocks a block
    visits) and as rows [B, 1, Tp] (`ids_row`). The trailing or middle 1 keeps every block 2-D."""

    ids: jax.Array
    ids_row: jax.Array
    first: jax.Array
    last: jax.Array

    @staticmethod
    def build(segment_ids, geom: _Geometry) -> _Segments:
        ids = segment_ids.astype(jnp.int32)
        if geom.seq_padded != geom.seq_len:
            ids = jnp.pad(ids, ((0, 0), (0, geom.seq_padded - geom.seq_len)), mode="edge")
        first, last = segment_spans(ids)
        return _Segments(ids[..., None], ids[:, None, :], first[..., None], last[..., None])


def _column(block: int, index: Callable = lambda b, h, i, *_: i) -> pl.BlockSpec:
    """Block of a [B, Tp, 1] segment array: [block, 1]."""
    return pl.BlockSpec((None, block, 1), lambda b, h, *rest: (b, index(b, h, *rest), 0))


def _row(block: int, index: Callable = lambda b, h, i, *_: i) -> pl.BlockSpec:
    """Block of a [B, 1, Tp] segment array: [1, block]."""
    return pl.BlockSpec((None, 1, block), lambda b, h, *rest: (b, 0, index(b, h, *rest)))


def _forward_on(backend: _Backend, opts: _Options, q, k, v, seed, segment_ids=None):
    """O [B, T, H, D] and lse [B, H, T] on one backend."""
    batch, seq_len, _, head_dim = q.shape
    heads, kv_heads = _heads(q, k, opts)
    geom, sizes = _geometry(backend, opts, seq_len, head_dim, q.dtype)
    specs = _Specs(backend.heads_major, heads // kv_heads)
    (qp, kp, vp), (q0, k0, v0) = _qkv_to_kernel_layout(q, k, v, geom, backend, opts)
    bq, bk, dp = geom.block_q, geom.block_k, geom.head_dim_padded
    static = dict(sm_scale=opts.sm_scale, causal=opts.causal, dropout_rate=opts.dropout_rate,
                  geom=geom)
    inputs, seg_specs = [qp, kp, vp], []
    if segment_ids is not None:
        segs = _Segments.build(segment_ids, geom)
        static["segmented"] = True
        if backend.streamed:
            keys = lambda b, h, i, j: jnp.minimum(j, _last_k_block(i, opts.causal, geom))
            inputs, seg_specs = inputs + [segs.ids, segs.ids_row], [_column(bq), _row(bk, keys)]
        else:
            inputs += [segs.ids, segs.ids_row, segs.first, segs.last]
            seg_specs = [_column(bq), _row(geom.seq_padded, lambda *_: 0), _column(bq), _column(bq)]
    common = dict(name="flash_attention_forward", sizes=sizes, out_specs=[specs.rows(bq, dp), specs.stats(bq)],
                  seed=seed, inputs=inputs,
                  out_shapes=[jax.ShapeDtypeStruct(_kernel_shape(geom, batch, heads, backend.heads_major), q.dtype),
                              jax.ShapeDtypeStruct((batch, heads, geom.seq_padded, 1), jnp.float32)])
    if backend.streamed:
        keys = lambda b, h, i, j: jnp.minimum(j, _last_k_block(i, opts.causal, geom))
        o, lse = _pallas(
            backend, opts, functools.partial(_streamed_forward_kernel, **static),
            grid=(batch, heads, geom.num_q_blocks, geom.num_k_blocks),
            in_specs=[specs.rows(bq, dp, first=q0), specs.kv_rows(bk, dp, keys, k0), specs.kv_rows(bk, dp, keys, v0),
                      *seg_specs],
            scratch_shapes=[_vmem((bq, dp)), _vmem((bq, 1)), _vmem((bq, 1))], **common)
    else:
        o, lse = _pallas(
            backend, opts, functools.partial(_forward_kernel, **static),
            grid=(batch, heads, geom.num_q_blocks),
            in_specs=[specs.rows(bq, dp, first=q0), specs.all_rows(geom.seq_padded, dp, kv=True, first=k0),
                      specs.all_rows(geom.seq_padded, dp, kv=True, first=v0), *seg_specs], **common)
    return _from_kernel_layout(o, geom, backend.heads_major), lse[:, :, :seq_len, 0]


def _dkdv_on(backend: _Backend, opts: _Options, geom: _Geometry, sizes: BlockSizes, specs: _Specs, seed,
             qp, kp, vp, firsts, dop, lsep, delta, segs: _Segments | None, dkv_out: bool = False):
    """dK, dV in kernel layout, one per query head: per key block, over the query blocks that see it.
    `firsts`: the heads where q's, k's and v's heads start in qp, kp, vp (`_qkv_to_kernel_layout`).
    `dkv_out` (loop kernels, one K/V head per query head): one array instead, d(qkv) as
    [B, Tp, 3, H, Dp] with its k and v slots written and its q slot left for `_dq_on(into=...)`."""
    bq, bk, dp, tp = geom.block_q, geom.block_k, geom.head_dim_padded, geom.seq_padded
    static = dict(sm_scale=opts.sm_scale, causal=opts.causal, dropout_rate=opts.dropout_rate,
                  geom=geom)
    # Grouped K/V heads: each query head's share comes out in float32 and XLA sums the group.
    out_dtype = kp.dtype if specs.group == 1 else jnp.float32
    # Grid (B, H, nk, nq) when streamed: query blocks outside [first, last] clamp to the range.
    last = _last_q_block(geom)
    queries = lambda b, h, j, i: jnp.minimum(
        jnp.maximum(i, jnp.minimum(_first_q_block(j, opts.causal, geom), last)), last)
    keys = lambda b, h, j, i: j
    inputs, seg_specs = [qp, kp, vp, dop, lsep, delta], []
    if segs is not None:
        static["segmented"] = True
        if backend.streamed:
            inputs, seg_specs = inputs + [segs.ids, segs.ids_row], [_column(bq, queries), _row(bk, keys)]
        elif kp.dtype != jnp.float32:  # the kernel's transposed [bk, bq] tiles: key ids a column
            inputs += [segs.ids, segs.ids_row, segs.first, segs.last]
            seg_specs = [_column(bk), _row(tp, lambda *_: 0), _column(bk), _column(bk)]
        else:
            inputs += [segs.ids_row, segs.ids, segs.first, segs.last]
            seg_specs = [_row(bk), _column(tp, lambda *_: 0), _column(bk), _column(bk)]
    q0, k0, v0 = firsts
    shape = _kernel_shape(geom, qp.shape[0], lsep.shape[1], backend.heads_major)
    common = dict(name="flash_attention_dkdv", sizes=sizes, seed=seed, inputs=inputs,
                  out_shapes=[jax.ShapeDtypeStruct(shape, out_dtype)] * 2)
    out_specs = [specs.rows(bk, dp), specs.rows(bk, dp)]
    if dkv_out:  # the k and v slots (elements 1 and 2 of the 3) of this head's rows
        static["dkv_out"] = True
        batch, heads = qp.shape[0], lsep.shape[1]
        common["out_shapes"] = [jax.ShapeDtypeStruct((batch, tp, 3, heads, dp), out_dtype)]
        out_specs = [pl.BlockSpec((None, bk, pl.Element(2), None, dp), lambda b, h, j: (b, j, 1, h, 0))]
    if backend.streamed:
        return _pallas(
            backend, opts, functools.partial(_streamed_dkdv_kernel, **static),
            grid=(qp.shape[0], lsep.shape[1], geom.num_k_blocks, geom.num_q_blocks),
            in_specs=[specs.rows(bq, dp, queries, q0), specs.kv_rows(bk, dp, keys, k0),
                      specs.kv_rows(bk, dp, keys, v0), specs.rows(bq, dp, queries),
                      specs.stats(bq, queries), specs.stats(bq, queries), *seg_specs],
            out_specs=[specs.rows(bk, dp, keys), specs.rows(bk, dp, keys)],
            scratch_shapes=[_vmem((bk, dp)), _vmem((bk, dp))], **common)
    return _pallas(
        backend, opts, functools.partial(_dkdv_kernel, **static),
        grid=(qp.shape[0], lsep.shape[1], geom.num_k_blocks),
        in_specs=[specs.all_rows(tp, dp, first=q0), specs.kv_rows(bk, dp, first=k0), specs.kv_rows(bk, dp, first=v0),
                  specs.all_rows(tp, dp), specs.all_stats(tp), specs.all_stats(tp), *seg_specs],
        out_specs=out_specs, **common)


def _dq_on(backend: _Backend, opts: _Options, geom: _Geometry, sizes: BlockSizes, specs: _Specs, seed,
           qp, kp, vp, firsts, dop, lsep, delta, segs: _Segments | None, into=None):
    """dQ in kernel layout: per query block, over the key blocks it sees (like the forward). `into`: the
    d(qkv) [B, Tp, 3, H, Dp] of `_dkdv_on(dkv_out=True)`, whose q slot it writes in place (loop kernels)."""
    bq, bk, dp, tp = geom.block_q, geom.block_k, geom.head_dim_padded, geom.seq_padded
    static = dict(sm_scale=opts.sm_scale, causal=opts.causal, dropout_rate=opts.dropout_rate,
                  geom=geom)
    rows = [specs.rows(bq, dp), specs.stats(bq), specs.stats(bq)]  # do, lse, delta
    keys = lambda b, h, i, j: jnp.minimum(j, _last_k_block(i, opts.causal, geom))
    inputs = [qp, kp, vp, dop, lsep, delta]
    if segs is not None:
        static["segmented"] = True
        if backend.streamed:
            inputs, rows = inputs + [segs.ids, segs.ids_row], rows + [_column(bq), _row(bk, keys)]
        else:
            inputs += [segs.ids, segs.ids_row, segs.first, segs.last]
            rows += [_column(bq), _row(tp, lambda *_: 0), _column(bq), _column(bq)]
    q0, k0, v0 = firsts
    shape = _kernel_shape(geom, qp.shape[0], lsep.shape[1], backend.heads_major)
    common = dict(name="flash_attention_dq", sizes=sizes, seed=seed,
                  inputs=inputs, out_specs=[specs.rows(bq, dp)],
                  out_shapes=[jax.ShapeDtypeStruct(shape, qp.dtype)])
    if into is not None:  # the q slot (element 0 of the 3) of this head's rows
        common.update(into=into, out_shapes=[jax.ShapeDtypeStruct(into.shape, into.dtype)],
                      out_specs=[pl.BlockSpec((None, bq, None, None, dp), lambda b, h, i: (b, i, 0, h, 0))])
    if backend.streamed:
        (dq,) = _pallas(
            backend, opts, functools.partial(_streamed_dq_kernel, **static),
            grid=(qp.shape[0], lsep.shape[1], geom.num_q_blocks, geom.num_k_blocks),
            in_specs=[specs.rows(bq, dp, first=q0), specs.kv_rows(bk, dp, keys, k0), specs.kv_rows(bk, dp, keys, v0),
                      *rows],
            scratch_shapes=[_vmem((bq, dp))], **common)
    else:
        (dq,) = _pallas(
            backend, opts, functools.partial(_dq_kernel, **static),
            grid=(qp.shape[0], lsep.shape[1], geom.num_q_blocks),
            in_specs=[specs.rows(bq, dp, first=q0), specs.all_rows(tp, dp, kv=True, first=k0),
                      specs.all_rows(tp, dp, kv=True, first=v0), *rows],
            **common)
    return dq


def _backward_on(backend: _Backend, opts: _Options, q, k, v, seed, segment_ids, o, lse, do):
    """(dQ [B, T, H, D], dK, dV [B, T, KVH, D]) on one backend; with `opts.qkv_heads`, d(qkv)
    [B, T, H + 2 KVH, D]."""
    batch, seq_len, _, head_dim = q.shape
    heads, kv_heads = _heads(q, k, opts)
    geom, sizes = _geometry(backend, opts, seq_len, head_dim, q.dtype, backward=True)
    specs = _Specs(backend.heads_major, heads // kv_heads)
    (qp, kp, vp), firsts = _qkv_to_kernel_layout(q, k, v, geom, backend, opts)
    op, dop = (_to_kernel_layout(x, geom, backend.heads_major) for x in (o, do))
    lsep = _rows_to_kernel_layout(lse, geom)
    bq, dp = geom.block_q, geom.head_dim_padded
    (delta,) = _pallas(
        backend, opts, _delta_kernel, name="flash_attention_delta",
        grid=(batch, heads, geom.num_q_blocks), sizes=sizes,
        in_specs=[specs.rows(bq, dp), specs.rows(bq, dp)], out_specs=[specs.stats(bq)],
        out_shapes=[jax.ShapeDtypeStruct((batch, heads, geom.seq_padded, 1), jnp.float32)],
        inputs=[op, dop])
    segs = None if segment_ids is None else _Segments.build(segment_ids, geom)
    args = (backend, opts, geom, sizes, specs, seed, qp, kp, vp, firsts, dop, lsep, delta, segs)
    if firsts != (0, 0, 0) and kv_heads == heads:
        # q, k and v read in place: dK and dV, then dQ, are written in place into d(qkv) [B, T, 3, H, D].
        (dkv,) = _dkdv_on(*args, dkv_out=True)
        return _dq_on(*args, into=dkv).reshape(q.shape)
    dk, dv = _dkdv_on(*args)
    dq = _dq_on(*args)
    dq, dk, dv = (_from_kernel_layout(x, geom, backend.heads_major) for x in (dq, dk, dv))
    if kv_heads != heads:
        dk, dv = (_sum_groups(x, kv_heads).astype(k.dtype) for x in (dk, dv))
    return (dq, dk, dv) if opts.qkv_heads is None else jnp.concatenate([dq, dk, dv], axis=2)


def _per_platform(opts: _Options, fn: Callable, *args):
    """Call `fn(backend, opts, *args)` with the backend of the platform being lowered for.

    `lax.platform_dependent` lowers only the branch of the target platform, so
    a CPU process can still lower the Triton and Mosaic TPU kernels.
    """
    branch = lambda backend: functools.partial(fn, backend, opts)
    interpreter = _INTERPRET_STREAMED if opts.streamed else _INTERPRET
    if opts.interpret:
        return branch(interpreter)(*args)
    compiled = dict(cuda=branch(_TRITON), rocm=branch(_TRITON), tpu=branch(_MOSAIC_TPU))
    if opts.interpret is None:  # interpreter on CPU and any other platform
        return lax.platform_dependent(*args, cpu=branch(interpreter), default=branch(interpreter),
                                      **compiled)
    return lax.platform_dependent(*args, **compiled)  # interpret=False: no CPU branch


# ---------------------------------------------------------------------------
# custom_vjp
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, seed, segment_ids, opts: _Options):
    return _per_platform(opts, _forward_on, q, k, v, seed, segment_ids)[0]


def _flash_fwd(q, k, v, seed, segment_ids, opts: _Options):
    o, lse = _per_platform(opts, _forward_on, q, k, v, seed, segment_ids)
    return o, (q, k, v, seed, segment_ids, o, lse)  # residuals are O(B T H D), never O(T^2)


def _flash_bwd(opts: _Options, residuals, do):
    q, k, v, seed, segment_ids, o, lse = residuals
    dq, dk, dv = _per_platform(opts, _backward_on, q, k, v, seed, segment_ids, o, lse, do)
    return dq, dk, dv, None, None  # the integer seed and segment ids have no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_qkv(qkv, seed, segment_ids, opts: _Options):
    """`_flash` of one fused [B, T, H + 2 KVH, D] array (`opts.qkv_heads`): its cotangent is one array too."""
    return _per_platform(opts, _forward_on, qkv, qkv, qkv, seed, segment_ids)[0]


def _flash_qkv_fwd(qkv, seed, segment_ids, opts: _Options):
    o, lse = _per_platform(opts, _forward_on, qkv, qkv, qkv, seed, segment_ids)
    return o, (qkv, seed, segment_ids, o, lse)


def _flash_qkv_bwd(opts: _Options, residuals, do):
    qkv, seed, segment_ids, o, lse = residuals
    return _per_platform(opts, _backward_on, qkv, qkv, qkv, seed, segment_ids, o, lse, do), None, None


_flash_qkv.defvjp(_flash_qkv_fwd, _flash_qkv_bwd)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def flash_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Int[Array, ""] | UInt32[Array, ""] | int | None = None,
    segment_ids: Int[Array, "batch q_len"] | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    family: str = "auto",
    _debug_poison: bool = False,
    _streamed: bool = False,
    _qkv: Float[Array, "batch q_len qkv_heads head_dim"] | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """softmax(q k^T * sm_scale [+ causal mask]) v as a fused Pallas kernel, differentiable.

    Args:
      q: `[batch, seq, heads, head_dim]`; k, v: `[batch, seq, kv_heads, head_dim]`,
        kv_heads dividing heads (grouped-query attention: query head h reads K/V
        head h // (heads // kv_heads); kv_heads == heads is multi-head attention).
        One floating dtype (float32 or bfloat16; accumulation is float32, the
        output has the input dtype). Any seq length and head_dim (padded inside
        only where the tiles need it; padding is masked or zero).
      causal: mask keys after the query position.
      sm_scale: score scale, default `1/sqrt(head_dim)`.
      dropout_rate: attention-dropout rate in [0, 1); bit-compatible with
        `reference_attention` for the same `dropout_seed`.
      dropout_seed: int or int32/uint32 scalar array, required when dropping.
      segment_ids: `[batch, seq]` integers (document masking): a query attends only
        to keys of its own segment, with the causal mask. Key blocks that hold none
        of a query block's segments are skipped like those above the diagonal (on
        Triton and in the interpreter; the TPU kernels mask them). Ids need not be
        sorted or contiguous.
      block_q, block_k: query/key rows per block; default per platform (CPU
        interpreter 128, GPU 64, TPU 128), clamped to the padded length. Must
        be powers of two on GPU (Triton).
      interpret: None = Pallas interpreter on CPU, compiled kernels on GPU/TPU
        (decided at lowering time); True = always interpret; False = never.
      family: "auto" = this module's kernels (Triton on GPU, Mosaic on TPU);
        "mosaic_gpu" = the Hopper family (`kernels.flash_attention_mgpu`: wgmma and
        TMA, 16-bit inputs, head_dim <= 128, the same dropout bits; opt-in until a
        GPU has checked and timed it), compiled for H100/H200 and interpreted on
        the CPU (`interpret=None` decides when tracing); block_q/block_k are its own.
      _debug_poison: start every kernel output as NaN (tests only: catches
        elements a kernel forgets to write).
      _streamed: in the interpreter, run the TPU kernels (K/V streamed through
        the grid) instead of the GPU ones (tests only).
      _qkv: the fused array q, k and v were split from (`flash_attention_qkv`).

    If `q_len != kv_len` (decoding with a prefix) the fused kernel is not used:
    this falls back to `kernels.reference.reference_attention`, whose causal
    mask is bottom-right aligned (query i sits at position kv_len - q_len + i).
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    chex.assert_equal_shape([q, k], dims=(0, 3))
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"flash_attention: k and v have {k.shape[2]} heads, which does not divide the {q.shape[2]} "
                         "query heads (grouped-query attention shares each K/V head among heads // kv_heads "
                         "query heads): use a kv_heads that divides heads")
    chex.assert_type([q, k, v], q.dtype)
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"flash_attention needs floating inputs, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention supports head_dim up to {MAX_HEAD_DIM}, got {q.shape[-1]}: use "
                         "more heads (n_head) for the same width, or attention_impl='reference'")
    keep_threshold(dropout_rate)  # validates 0 <= rate < 1
    if dropout_rate > 0.0 and dropout_seed is None:
        raise ValueError("dropout_rate > 0 needs a dropout_seed")

    if segment_ids is not None and (segment_ids.shape != q.shape[:2] or
                                    not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"flash_attention: segment_ids must be integers shaped [batch, seq] = {q.shape[:2]}, "
                         f"got {segment_ids.dtype}{list(segment_ids.shape)}")
    if q.shape[1] != k.shape[1]:
        # Decode / prefix fall-back: with one (or a few) query rows there is
        # nothing to tile, and the kernel assumes q_len == kv_len.
        return reference_attention(q, k, v, causal=causal, sm_scale=sm_scale,
                                   dropout_rate=dropout_rate, dropout_seed=dropout_seed, segment_ids=segment_ids)

    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block is not None and (not isinstance(block, int) or block < 8 or block % 8):
            raise ValueError(f"{name} must be a positive multiple of 8, got {block!r}")
    check_kernel_family("pallas", family)
    opts = _Options(causal=bool(causal), sm_scale=default_scale(q.shape[-1], sm_scale),
                    dropout_rate=float(dropout_rate), block_q=block_q, block_k=block_k,
                    interpret=interpret, debug_poison=bool(_debug_poison),
                    streamed=bool(_streamed))
    # The seed travels as a (2,) uint32 operand, [seed, batch offset] (SMEM
    # scalars on TPU). Without dropout it is a dummy that the kernels never read.
    seed = jnp.asarray(dropout_seed if dropout_rate > 0.0 else 0).astype(jnp.uint32)
    seed = jnp.stack([seed, jnp.uint32(0)])
    # flash(*operands, seed, segment_ids): this module's kernels, or the Hopper family's.
    if _qkv is not None and family == "auto":  # the kernels read q, k and v out of _qkv
        opts = dataclasses.replace(opts, qkv_heads=(q.shape[2], k.shape[2]))
        flash, operands = (lambda *args: _flash_qkv(*args, opts)), (_qkv,)
    else:
        flash = _mosaic_gpu(q, opts) if family == "mosaic_gpu" else lambda *args: _flash(*args, opts)
        operands = (q, k, v)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return flash(*operands, seed, segment_ids)
    return _sharded_over_batch(mesh, flash, operands, seed, segment_ids)


def flash_attention_qkv(
    qkv: Float[Array, "batch seq qkv_heads head_dim"],
    kv_heads: int,
    **kwargs: Any,
) -> Float[Array, "batch seq heads head_dim"]:
    """`flash_attention` of the heads of one fused projection: `qkv` is [q heads | k heads | v heads],
    `[B, T, H + 2 KVH, D]` (GPT-2's c_attn output reshaped), `kwargs` flash_attention's keywords.

    Where their layout allows (Triton and the interpreter's GPU kernels, T and D needing no padding) the
    kernels read q, k and v straight out of `qkv` (BlockSpecs starting at heads 0, H and H + KVH), so
    XLA copies nothing out of it (three slices were three copies of the activations a layer); with one
    K/V head per query head they also write the gradient, d(qkv), in place, where XLA concatenated dQ, dK
    and dV. Elsewhere it slices first, and concatenates the gradient.
    """
    q, k, v = split_qkv(qkv, kv_heads)
    return flash_attention(q, k, v, _qkv=qkv, **kwargs)


def _mosaic_gpu(q, opts: _Options) -> Callable:
    """The Hopper family (`kernels.flash_attention_mgpu`) as flash(q, k, v, seed, segment_ids), its
    refusals made first."""
    from haiku_gpt.kernels import flash_attention_mgpu as mgpu  # noqa: PLC0415

    check_kernel_family("pallas", "mosaic_gpu", dtype=jnp.dtype(q.dtype).name, head_dim=q.shape[-1])
    if (opts.block_q, opts.block_k) != (None, None):
        raise ValueError(f"flash_attention(family='mosaic_gpu') tiles by one warpgroup, {mgpu.BLOCK} x "
                         f"{mgpu.BLOCK}: leave block_q and block_k unset")
    return functools.partial(mgpu.attention, causal=opts.causal, sm_scale=opts.sm_scale,
                             dropout_rate=opts.dropout_rate, interpret=_mosaic_gpu_interprets(opts.interpret))


def _mosaic_gpu_interprets(interpret: bool | None) -> bool:
    """Whether the Hopper family runs in its interpreter, decided when tracing (its interpreter's
    ordered callbacks cannot sit in a `lax.platform_dependent` branch): compiled for a Hopper GPU
    (this process's, or `compiling_for`'s), interpreted on a CPU; refused for anything else."""
    if interpret is not None:
        return bool(interpret)
    kind = _device_kind_override.get()
    if kind is None:
        if jax.default_backend() == "cpu":
            return True
        kind = jax.devices()[0].device_kind
    if not is_hopper(kind):
        raise ValueError(f"flash_attention(family='mosaic_gpu') compiles for Hopper GPUs only (H100, H200: wgmma "
                         f"and TMA), and this runs on {kind!r}: use the default kernel family "
                         "(--config.kernel_family=auto)")
    return False


def _sharded_over_batch(mesh, flash: Callable, operands: tuple, seed, segment_ids=None):
    """Under a device mesh (data-parallel training), each device runs the kernel on its batch rows.

    XLA cannot partition a Pallas custom call ("Mosaic kernels cannot be
    automatically partitioned"), so `shard_map` hands every device its own
    `[B / n, T, H, D]` rows, the batch split over all mesh axes as the trainer
    splits it. The batch offset keeps each row's dropout bits those of its
    global batch index, as on one device.
    """
    axes = tuple(mesh.axis_names)
    batch = operands[0].shape[0]
    if batch % mesh.size:
        raise ValueError(f"flash_attention under a mesh of {mesh.size} devices splits the batch over "
                         f"them, and batch {batch} does not divide: use a multiple of {mesh.size}")
    rows = jax.sharding.PartitionSpec(axes)

    def local(operands, seed, segment_ids):  # operands: (q, k, v) or (qkv,), this device's rows
        offset = lax.axis_index(axes).astype(jnp.uint32) * jnp.uint32(operands[0].shape[0])
        return flash(*operands, seed.at[1].add(offset), segment_ids)

    segment_spec = None if segment_ids is None else rows
    in_specs = ((rows,) * len(operands), jax.sharding.PartitionSpec(), segment_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=rows,
                         check_vma=False)(tuple(operands), seed, segment_ids)
