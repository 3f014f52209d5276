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

The public layout is `[B, T, H, D]`; the kernels see `[B, H, Tp, Dp]` ("heads
major") so that one (batch, head) pair is a contiguous `[Tp, Dp]` matrix and
every block's last two dims are (rows, head dim), which is what the TPU tiling
rules want. The transposes and pads live in XLA and are linear in T.

Algorithm (https://arxiv.org/abs/2307.08691)
  forward, grid (B, H, nq): one program owns a `[bq, Dp]` query block and walks
    the key blocks left to right with an online softmax: a running row max `m`,
    a running denominator `l` and an unnormalised float32 accumulator `acc`.
    Causal: key blocks entirely above the diagonal are never visited; the loop
    bound comes from the query block index. The only things written are O and
    lse = m + log(l), which is all the backward needs to rebuild P block by
    block. No `[T, T]` array exists anywhere.
  backward (jax.custom_vjp; `jax.grad` cannot differentiate a pallas_call that
    uses `pl.program_id`, it fails with a bare AssertionError):
    1. delta kernel, grid (B, H, nq): delta = rowsum(dO * O).
    2. dK/dV kernel, grid (B, H, nk): a key block walks the query blocks at or
       below the diagonal, rebuilding P = exp(S - lse) and accumulating
       dV += P^T dO and dK += dS^T Q with dS = P * (dP - delta).
    3. dQ kernel, grid (B, H, nq): a query block walks the key blocks like the
       forward and accumulates dQ += dS K.
    Two separate passes (rather than one with atomic adds to dQ) keep every
    output block owned by exactly one program, which is simple and portable.

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
TPU kernels lower. Per-platform defaults for `block_q`/`block_k` (always
clamped to the padded sequence length):
  interpret (CPU): 128/128: every grid step costs interpreter overhead, so big
                   blocks are cheap.
  Triton (GPU):    64/64, num_warps 4 (8 for Dp > 64), num_stages 2. Triton
                   needs power-of-two block shapes, hence the padding.
  Mosaic (TPU):    128/128. K and V of one (batch, head) are a single block
                   resident in VMEM, which bounds T * Dp (fine for a teaching
                   GPT; a production TPU kernel streams K/V through the grid).
Only lowering is tested for GPU/TPU here (no hardware in CI); numerics are
tested in interpret mode, which runs the same kernel bodies.

Fall-back: when q and k/v lengths differ (decode / chunked prefill) this calls
`reference_attention` (causal mask bottom-right aligned) instead of the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int, UInt32

from kernels.dropout import keep_mask, keep_threshold, row_hash
from kernels.reference import default_scale, reference_attention

# A finite "minus infinity" for masked scores: exp(MASK - m) underflows to 0,
# while a masked-only block can never produce inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

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


@dataclasses.dataclass(frozen=True)
class _Backend:
    """How to build a pallas_call for one platform."""

    name: str  # "interpret" | "triton" | "mosaic_tpu"
    default_block: int
    interpret: bool

    def compiler_params(self, head_dim_padded: int):
        if self.name == "triton":
            return plgpu.CompilerParams(num_warps=4 if head_dim_padded <= 64 else 8, num_stages=2)
        if self.name == "mosaic_tpu":
            # Every program writes its own output block: all grid axes are parallel.
            return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
        return None

    def seed_spec(self) -> pl.BlockSpec:
        # The dropout seed is a (1,) uint32 operand. TPU wants scalars in SMEM;
        # Triton and the interpreter take it as an ordinary one-element block.
        if self.name == "mosaic_tpu":
            return pl.BlockSpec(memory_space=pltpu.SMEM)
        return pl.BlockSpec((1,), lambda *_: (0,))


_INTERPRET = _Backend("interpret", default_block=128, interpret=True)
_TRITON = _Backend("triton", default_block=64, interpret=False)
_MOSAIC_TPU = _Backend("mosaic_tpu", default_block=128, interpret=False)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Block sizes and padded sizes for one call on one backend."""

    seq_len: int  # T, the real length (keys at or past it are masked)
    head_dim: int  # D
    block_q: int  # bq
    block_k: int  # bk
    seq_padded: int  # Tp
    head_dim_padded: int  # Dp


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _geometry(backend: _Backend, opts: _Options, seq_len: int, head_dim: int) -> _Geometry:
    # A block never needs to be longer than the sequence rounded up to a power
    # of two (>= 16: Triton's dot needs every dim >= 16).
    cap = max(16, _next_pow2(seq_len))
    block_q = min(opts.block_q or backend.default_block, cap)
    block_k = min(opts.block_k or backend.default_block, cap)
    multiple = math.lcm(block_q, block_k)
    seq_padded = pl.cdiv(seq_len, multiple) * multiple
    return _Geometry(seq_len, head_dim, block_q, block_k, seq_padded, max(16, _next_pow2(head_dim)))


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


def _score_mask(q_pos, k_pos, *, causal: bool, seq_len: int, seq_padded: int):
    """Which of the [bq, bk] scores are real: key not padding and (causal) not in the future."""
    mask = None
    if seq_padded != seq_len:  # padded keys exist only then
        mask = k_pos < seq_len
    if causal:
        below = k_pos <= q_pos
        mask = below if mask is None else mask & below
    return mask


# ---------------------------------------------------------------------------
# Kernels. Ref shapes are per program (the BlockSpecs squeeze B and H).
# ---------------------------------------------------------------------------


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                    sm_scale: float, causal: bool, dropout_rate: float, geom: _Geometry):
    # q_ref, o_ref: [bq, Dp] this program's query block
    # k_ref, v_ref: [Tp, Dp] all keys/values of this (batch, head)
    # lse_ref:      [bq, 1]
    b, h, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = geom.block_q, geom.block_k
    q = q_ref[...]
    q_pos = _positions(qi, bq, axis=0)
    if dropout_rate > 0.0:
        row = row_hash(seed_ref[0], b, h, q_pos)  # [bq, 1], reused for every key block

    def body(kj, carry):
        acc, m_prev, l_prev = carry  # [bq, Dp], [bq, 1], [bq, 1] float32
        k = k_ref[pl.ds(kj * bk, bk), :]
        v = v_ref[pl.ds(kj * bk, bk), :]
        s = _dot_nt(q, k) * sm_scale  # [bq, bk] float32 scores
        k_pos = _positions(kj, bk, axis=1)
        mask = _score_mask(q_pos, k_pos, causal=causal, seq_len=geom.seq_len,
                           seq_padded=geom.seq_padded)
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
        acc = correction * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, l_new

    # Key blocks holding at least one real key; causal: also not past the last
    # query row of this block. Blocks above the diagonal are skipped outright.
    num_k = pl.cdiv(geom.seq_len, bk)
    if causal:
        num_k = jnp.minimum(num_k, pl.cdiv((qi + 1) * bq, bk))
    init = (jnp.zeros((bq, geom.head_dim_padded), jnp.float32),
            jnp.full((bq, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_k, body, init)
    # Every row sees key 0 (in block 0), so l > 0: no 0/0 even for padded rows.
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _delta_kernel(seed_ref, o_ref, do_ref, delta_ref):
    # o_ref, do_ref: [bq, Dp]; delta_ref: [bq, 1]. delta_i = sum_j P_ij dP_ij = dO_i . O_i
    del seed_ref
    o = o_ref[...].astype(jnp.float32)
    do = do_ref[...].astype(jnp.float32)
    delta_ref[...] = jnp.sum(o * do, axis=1, keepdims=True)


def _probs_and_dscores(q, k, v, do, lse, delta, q_pos, k_pos, row, *,
                       sm_scale: float, causal: bool, dropout_rate: float, geom: _Geometry):
    """Rebuild one [bq, bk] tile of P from lse and return (P as applied to V, dS).

    dS is the gradient w.r.t. the *unscaled* scores q.k, i.e. already times sm_scale.
    """
    s = _dot_nt(q, k) * sm_scale
    mask = _score_mask(q_pos, k_pos, causal=causal, seq_len=geom.seq_len,
                       seq_padded=geom.seq_padded)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp(s - lse)  # exact softmax probabilities (masked ones are 0)
    dp = _dot_nt(do, v)  # gradient w.r.t. the probabilities that multiplied V
    p_applied = p
    if dropout_rate > 0.0:
        keep = keep_mask(row, k_pos, dropout_rate)
        scale = 1.0 / (1.0 - dropout_rate)
        p_applied = jnp.where(keep, p * scale, 0.0)
        dp = jnp.where(keep, dp * scale, 0.0)
    ds = p * (dp - delta) * sm_scale
    return p_applied, ds


def _dkdv_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 sm_scale: float, causal: bool, dropout_rate: float, geom: _Geometry):
    # k_ref, v_ref, dk_ref, dv_ref: [bk, Dp] this program's key block
    # q_ref, do_ref: [Tp, Dp]; lse_ref, delta_ref: [Tp, 1] all rows of this (batch, head)
    b, h, kj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = geom.block_q, geom.block_k
    k, v = k_ref[...], v_ref[...]
    k_pos = _positions(kj, bk, axis=1)

    def body(qi, carry):
        dk, dv = carry  # [bk, Dp] float32
        rows = pl.ds(qi * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        q_pos = _positions(qi, bq, axis=0)
        row = row_hash(seed_ref[0], b, h, q_pos) if dropout_rate > 0.0 else None
        p, ds = _probs_and_dscores(q, k, v, do, lse_ref[rows, :], delta_ref[rows, :], q_pos,
                                   k_pos, row, sm_scale=sm_scale, causal=causal,
                                   dropout_rate=dropout_rate, geom=geom)
        dv = dv + _dot_tn(p.astype(do.dtype), do)  # P^T dO
        dk = dk + _dot_tn(ds.astype(q.dtype), q)  # dS^T Q
        return dk, dv

    # Query blocks whose rows can see this key block: causal starts at the
    # diagonal. Query blocks made only of padding rows are skipped.
    first_q = lax.div(kj * bk, bq) if causal else 0
    num_q = pl.cdiv(geom.seq_len, bq)
    zeros = jnp.zeros((bk, geom.head_dim_padded), jnp.float32)
    dk, dv = lax.fori_loop(first_q, num_q, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               sm_scale: float, causal: bool, dropout_rate: float, geom: _Geometry):
    # q_ref, do_ref, dq_ref: [bq, Dp]; lse_ref, delta_ref: [bq, 1] this program's query block
    # k_ref, v_ref: [Tp, Dp] all keys/values of this (batch, head)
    b, h, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = geom.block_q, geom.block_k
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos = _positions(qi, bq, axis=0)
    row = row_hash(seed_ref[0], b, h, q_pos) if dropout_rate > 0.0 else None

    def body(kj, dq):
        k = k_ref[pl.ds(kj * bk, bk), :]
        v = v_ref[pl.ds(kj * bk, bk), :]
        _, ds = _probs_and_dscores(q, k, v, do, lse, delta, q_pos, _positions(kj, bk, axis=1),
                                   row, sm_scale=sm_scale, causal=causal,
                                   dropout_rate=dropout_rate, geom=geom)
        return dq + _dot(ds.astype(k.dtype), k)  # dS K

    num_k = pl.cdiv(geom.seq_len, bk)  # same key range as the forward
    if causal:
        num_k = jnp.minimum(num_k, pl.cdiv((qi + 1) * bq, bk))
    dq = lax.fori_loop(0, num_k, body, jnp.zeros((bq, geom.head_dim_padded), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


# ---------------------------------------------------------------------------
# pallas_call plumbing
# ---------------------------------------------------------------------------


def _rows_spec(block: int, head_dim_padded: int) -> pl.BlockSpec:
    """Block `i` of the rows of [B, H, Tp, Dp] (or of [B, H, Tp, 1] with width 1)."""
    return pl.BlockSpec((None, None, block, head_dim_padded), lambda b, h, i: (b, h, i, 0))


def _all_rows_spec(seq_padded: int, head_dim_padded: int) -> pl.BlockSpec:
    """All rows of one (batch, head): the kernel slices its own blocks in a loop."""
    return pl.BlockSpec((None, None, seq_padded, head_dim_padded), lambda b, h, i: (b, h, 0, 0))


def _pallas(backend: _Backend, opts: _Options, kernel: Callable, *, name: str, grid,
            geom: _Geometry, in_specs, out_specs, out_shapes, seed, inputs):
    """pallas_call with the backend's seed spec and compiler params.

    With `opts.debug_poison` every output starts as a NaN-filled buffer that is
    aliased to it (input_output_aliases), so the kernel writes into NaNs in
    place: any element that no program writes stays NaN and the tests' NaN
    checks catch it. (Without aliasing an unwritten output element is whatever
    the allocator left there, often 0, which a test could not tell apart.)
    """
    in_specs = [backend.seed_spec(), *in_specs]
    operands = [seed, *inputs]
    aliases = {}
    if opts.debug_poison:
        num_in = len(operands)
        for n, (shape, spec) in enumerate(zip(out_shapes, out_specs)):
            aliases[len(operands)] = n
            operands.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
            in_specs.append(spec)
        num_poison = len(out_shapes)
        body = kernel

        def kernel(*refs):  # drop the poison input refs: the outputs alias them
            return body(*refs[:num_in], *refs[num_in + num_poison:])

    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shapes,
        input_output_aliases=aliases,
        compiler_params=backend.compiler_params(geom.head_dim_padded),
        interpret=backend.interpret,
        name=name,
    )(*operands)


def _to_kernel_layout(x, geom: _Geometry):
    """[B, T, H, D] -> [B, H, Tp, Dp], zero padded (zeros are exact: they add 0 to dots)."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, geom.seq_padded - geom.seq_len),
                       (0, geom.head_dim_padded - geom.head_dim)))


def _from_kernel_layout(x, geom: _Geometry):
    """[B, H, Tp, Dp] -> [B, T, H, D]."""
    return jnp.swapaxes(x[:, :, :geom.seq_len, :geom.head_dim], 1, 2)


def _rows_to_kernel_layout(x, geom: _Geometry):
    """[B, H, T] -> [B, H, Tp, 1] (the trailing 1 keeps row statistics 2-D)."""
    return jnp.pad(x, ((0, 0), (0, 0), (0, geom.seq_padded - geom.seq_len)))[..., None]


def _forward_on(backend: _Backend, opts: _Options, q, k, v, seed):
    """O [B, T, H, D] and lse [B, H, T] on one backend."""
    batch, seq_len, heads, head_dim = q.shape
    geom = _geometry(backend, opts, seq_len, head_dim)
    qp, kp, vp = (_to_kernel_layout(x, geom) for x in (q, k, v))
    tp, dp = geom.seq_padded, geom.head_dim_padded
    kernel = functools.partial(_forward_kernel, sm_scale=opts.sm_scale, causal=opts.causal,
                               dropout_rate=opts.dropout_rate, geom=geom)
    o, lse = _pallas(
        backend, opts, kernel, name="flash_attention_forward",
        grid=(batch, heads, tp // geom.block_q), geom=geom,
        in_specs=[_rows_spec(geom.block_q, dp), _all_rows_spec(tp, dp), _all_rows_spec(tp, dp)],
        out_specs=[_rows_spec(geom.block_q, dp), _rows_spec(geom.block_q, 1)],
        out_shapes=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                    jax.ShapeDtypeStruct((batch, heads, tp, 1), jnp.float32)],
        seed=seed, inputs=[qp, kp, vp])
    return _from_kernel_layout(o, geom), lse[:, :, :seq_len, 0]


def _backward_on(backend: _Backend, opts: _Options, q, k, v, seed, o, lse, do):
    """(dQ, dK, dV), each [B, T, H, D], on one backend."""
    batch, seq_len, heads, head_dim = q.shape
    geom = _geometry(backend, opts, seq_len, head_dim)
    qp, kp, vp, op, dop = (_to_kernel_layout(x, geom) for x in (q, k, v, o, do))
    lsep = _rows_to_kernel_layout(lse, geom)
    tp, dp, bq, bk = geom.seq_padded, geom.head_dim_padded, geom.block_q, geom.block_k
    static = dict(sm_scale=opts.sm_scale, causal=opts.causal, dropout_rate=opts.dropout_rate,
                  geom=geom)
    row_stats = jax.ShapeDtypeStruct((batch, heads, tp, 1), jnp.float32)

    (delta,) = _pallas(
        backend, opts, _delta_kernel, name="flash_attention_delta",
        grid=(batch, heads, tp // bq), geom=geom,
        in_specs=[_rows_spec(bq, dp), _rows_spec(bq, dp)],
        out_specs=[_rows_spec(bq, 1)], out_shapes=[row_stats],
        seed=seed, inputs=[op, dop])

    dk, dv = _pallas(
        backend, opts, functools.partial(_dkdv_kernel, **static), name="flash_attention_dkdv",
        grid=(batch, heads, tp // bk), geom=geom,
        in_specs=[_all_rows_spec(tp, dp), _rows_spec(bk, dp), _rows_spec(bk, dp),
                  _all_rows_spec(tp, dp), _all_rows_spec(tp, 1), _all_rows_spec(tp, 1)],
        out_specs=[_rows_spec(bk, dp), _rows_spec(bk, dp)],
        out_shapes=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                    jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        seed=seed, inputs=[qp, kp, vp, dop, lsep, delta])

    (dq,) = _pallas(
        backend, opts, functools.partial(_dq_kernel, **static), name="flash_attention_dq",
        grid=(batch, heads, tp // bq), geom=geom,
        in_specs=[_rows_spec(bq, dp), _all_rows_spec(tp, dp), _all_rows_spec(tp, dp),
                  _rows_spec(bq, dp), _rows_spec(bq, 1), _rows_spec(bq, 1)],
        out_specs=[_rows_spec(bq, dp)],
        out_shapes=[jax.ShapeDtypeStruct(qp.shape, q.dtype)],
        seed=seed, inputs=[qp, kp, vp, dop, lsep, delta])

    return tuple(_from_kernel_layout(x, geom) for x in (dq, dk, dv))


def _per_platform(opts: _Options, fn: Callable, *args):
    """Call `fn(backend, opts, *args)` with the backend of the platform being lowered for.

    `lax.platform_dependent` lowers only the branch of the target platform, so
    a CPU process can still lower the Triton and Mosaic TPU kernels.
    """
    branch = lambda backend: functools.partial(fn, backend, opts)
    if opts.interpret:
        return branch(_INTERPRET)(*args)
    compiled = dict(cuda=branch(_TRITON), rocm=branch(_TRITON), tpu=branch(_MOSAIC_TPU))
    if opts.interpret is None:  # interpreter on CPU and any other platform
        return lax.platform_dependent(*args, cpu=branch(_INTERPRET), default=branch(_INTERPRET),
                                      **compiled)
    return lax.platform_dependent(*args, **compiled)  # interpret=False: no CPU branch


# ---------------------------------------------------------------------------
# custom_vjp
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seed, opts: _Options):
    return _per_platform(opts, _forward_on, q, k, v, seed)[0]


def _flash_fwd(q, k, v, seed, opts: _Options):
    o, lse = _per_platform(opts, _forward_on, q, k, v, seed)
    return o, (q, k, v, seed, o, lse)  # residuals are O(B T H D), never O(T^2)


def _flash_bwd(opts: _Options, residuals, do):
    q, k, v, seed, o, lse = residuals
    dq, dk, dv = _per_platform(opts, _backward_on, q, k, v, seed, o, lse, do)
    return dq, dk, dv, None  # the integer seed has no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def flash_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len heads head_dim"],
    v: Float[Array, "batch kv_len heads head_dim"],
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Int[Array, ""] | UInt32[Array, ""] | int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    _debug_poison: bool = False,
) -> Float[Array, "batch q_len heads head_dim"]:
    """softmax(q k^T * sm_scale [+ causal mask]) v as a fused Pallas kernel, differentiable.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`, one floating dtype (float32 or
        bfloat16; accumulation is float32, the output has the input dtype).
        Any seq length and head_dim (padded inside; padding is masked or zero).
      causal: mask keys after the query position.
      sm_scale: score scale, default `1/sqrt(head_dim)`.
      dropout_rate: attention-dropout rate in [0, 1); bit-compatible with
        `reference_attention` for the same `dropout_seed`.
      dropout_seed: int or int32/uint32 scalar array, required when dropping.
      block_q, block_k: query/key rows per block; default per platform (CPU
        interpreter 128, GPU 64, TPU 128), clamped to the padded length. Must
        be powers of two on GPU (Triton).
      interpret: None = Pallas interpreter on CPU, compiled kernels on GPU/TPU
        (decided at lowering time); True = always interpret; False = never.
      _debug_poison: start every kernel output as NaN (tests only: catches
        elements a kernel forgets to write).

    If `q_len != kv_len` (decoding with a prefix) the fused kernel is not used:
    this falls back to `kernels.reference.reference_attention`, whose causal
    mask is bottom-right aligned (query i sits at position kv_len - q_len + i).
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    chex.assert_equal_shape([q, k], dims=(0, 2, 3))
    chex.assert_type([q, k, v], q.dtype)
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"flash_attention needs floating inputs, got {q.dtype}")
    keep_threshold(dropout_rate)  # validates 0 <= rate < 1
    if dropout_rate > 0.0 and dropout_seed is None:
        raise ValueError("dropout_rate > 0 needs a dropout_seed")

    if q.shape[1] != k.shape[1]:
        # Decode / prefix fall-back: with one (or a few) query rows there is
        # nothing to tile, and the kernel assumes q_len == kv_len.
        return reference_attention(q, k, v, causal=causal, sm_scale=sm_scale,
                                   dropout_rate=dropout_rate, dropout_seed=dropout_seed)

    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block is not None and (not isinstance(block, int) or block < 8 or block % 8):
            raise ValueError(f"{name} must be a positive multiple of 8, got {block!r}")
    opts = _Options(causal=bool(causal), sm_scale=default_scale(q.shape[-1], sm_scale),
                    dropout_rate=float(dropout_rate), block_q=block_q, block_k=block_k,
                    interpret=interpret, debug_poison=bool(_debug_poison))
    # The seed travels as a (1,) uint32 operand (an SMEM scalar on TPU). Without
    # dropout it is a dummy that the kernels never read.
    seed = dropout_seed if dropout_rate > 0.0 else 0
    seed = jnp.reshape(jnp.asarray(seed).astype(jnp.uint32), (1,))
    return _flash(q, k, v, seed, opts)
