"""The Hopper family of the flash-attention kernel: Pallas Mosaic GPU (wgmma, TMA), opt-in.

`flash_attention(..., family="mosaic_gpu")` runs these kernels instead of the Triton family on a CUDA
GPU; the CPU runs the same kernel bodies in JAX's Mosaic GPU interpreter. Same inputs, outputs and
masks as `kernels.flash_attention`; the differences are listed under "Scope" below.

Shape glossary
  B    batch                        H    query heads      KVH  K/V heads (H % KVH == 0)
  T    sequence length (queries == keys/values)            G    H // KVH, query heads per K/V head
  D    head dim                     Dp   D zero-padded to a multiple of 64 (one 128-byte swizzled row)
  BLOCK  rows of every tile: 64, one warpgroup's wgmma M (bq == bk == BLOCK)
  Tp   T padded up to a multiple of BLOCK (only when T is not one already)
  nq   Tp // BLOCK
  lse  base-2 logsumexp of each row's scaled scores, [B, H, Tp] float32 (seq minor: one TMA per block)
  delta  rowsum(dO * O), [B, H, Tp] float32 (backward only, one XLA fusion)
  spans  [B, 2, nq] int32 (segment ids only): the first and last tile holding a position of one of
       tile i's documents, the tiles tile i walks (XLA, from `reference.segment_spans`)

Layout: q/k/v/o and their gradients stay `[B, T, H, D]`; a TMA copy reads one `[BLOCK, Dp]` tile of
one head straight from it (rows strided by H*Dp), so XLA transposes nothing and pads only when T or D
needs it.

Algorithm (FlashAttention-2, https://arxiv.org/abs/2307.08691, on Hopper's instructions). Every
kernel is one warpgroup (128 threads) per program; every matmul is a `plgpu.wgmma` from swizzled
shared memory (or registers for the left operand) into a float32 accumulator; tiles of the side a
program walks are double-buffered: the TMA copy of block j+1 is in flight while block j is computed.
  forward, grid (nq, H, B): a query tile walks the key tiles left to right with an online softmax in
    base 2 (scores times sm_scale * log2(e), `exp2`), keeps O's float32 accumulator in registers, and
    writes O and lse. Key tiles wholly above the diagonal are never loaded, nor (segment ids) those
    outside the span of the query tile's documents; only the diagonal tile, a tile holding padding
    keys, and (with segment ids) every visited tile build a mask.
  backward:
    1. delta = rowsum(dO * O) in XLA.
    2. dK/dV, grid (nk, KVH, B): a key tile walks, for each of its G query heads, the query tiles at
       or below the diagonal (with segment ids, only those in the span of its documents), rebuilding
       Pᵀ = exp2(Sᵀ - lse) from Sᵀ = K Qᵀ (the transposed scores, so lse and delta broadcast along
       columns), then dV += Pᵀ dO, dPᵀ = V dOᵀ,
       dSᵀ = Pᵀ (dPᵀ - delta), dK += dSᵀ Q. The G heads of a group are summed in the accumulators:
       K/V are never repeated and dK/dV need no reduction afterwards.
    3. dQ, grid (nq, H, B): a query tile walks the key tiles the forward walks: S = Q Kᵀ,
       P = exp2(S - lse), dP = dO Vᵀ, dS = P (dP - delta), dQ += dS K.

Masks. A masked score is MASK_VALUE (finite), never -inf: a row whose first visited tile holds none of
its keys (segment ids) gets m = MASK_VALUE and p = 1 there, which its first real score wipes out
(alpha = exp2(MASK_VALUE - m) = 0); every row has at least one real key, itself.

Scope: bfloat16 and float16 (wgmma's 16-bit inputs; float32 stays on the Triton family); head_dim up
to 128 (at 256 the dK/dV kernel's two accumulators alone would take 256 registers a thread); causal or
not; grouped-query heads; segment ids (tiles outside a tile's documents skipped, the rest masked);
attention dropout with the reference's bits (XLA hashes each query row once, [B, H, Tp]; the kernels
finish the hash with the key positions); any length. Tiles are one warpgroup of 64 x 64, not yet
measured on a GPU (docs/kernels.md); no GPU has run this family yet, which is why it is opt-in.

Platforms: the compiled kernels lower for CUDA only (sm_90a: wgmma and TMA are Hopper's); on any
other platform the kernels run in the Mosaic GPU interpreter (`mosaic_gpu_interpret`), which is
how the CPU tests check their numerics against a float64 reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from haiku_gpt.kernels import mosaic_gpu_interpret
from haiku_gpt.kernels.dropout import keep_mask, row_hash
from haiku_gpt.kernels.reference import MASK_VALUE, segment_spans

BLOCK = 64  # one warpgroup's wgmma tile rows (M = 64); queries and keys alike
HEAD_DIM_MULTIPLE = 64  # a 128-byte swizzled row of a 16-bit dtype
LOG2E = math.log2(math.e)
_SWIZZLE = 128  # bytes
_TRANSFORMS = (plgpu.TilingTransform((8, _SWIZZLE // 2)), plgpu.SwizzleTransform(_SWIZZLE))
_ROWS = plgpu.Layout.WGMMA.reduce(1)  # a [BLOCK] vector along an accumulator's rows
_COLS = plgpu.Layout.WGMMA.reduce(0)  # ... along its columns


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: a custom_vjp nondiff arg)."""

    causal: bool
    sm_scale: float
    seq_len: int  # T; keys at or past it are padding
    group: int  # G
    segmented: bool
    dropout_rate: float
    interpret: bool  # run the kernels in the Mosaic GPU interpreter (CPU) instead of compiling them


# ---------------------------------------------------------------------------
# In-kernel helpers
# ---------------------------------------------------------------------------


def _laid_out(x, layout, st: _Static):
    """`plgpu.layout_cast`: the compiled kernels need registers' layouts named (the interpreter has
    no lowering for the cast and needs none)."""
    return x if st.interpret else plgpu.layout_cast(x, layout)


def _full(shape, value, layout, st: _Static):
    return _laid_out(jnp.full(shape, value, jnp.float32), layout, st)


def _iota(dim: int, st: _Static):
    """Tile-local row (dim 0) or column (dim 1) indices of a [BLOCK, BLOCK] accumulator: a [BLOCK] vector
    broadcast (a vector's registers, 2 a thread along rows, 16 along columns, not a tile's 32)."""
    layout = None if st.interpret else (_ROWS, _COLS)[dim]
    return lax.broadcast_in_dim(plgpu.broadcasted_iota(jnp.int32, (BLOCK,), 0, layout=layout), (BLOCK, BLOCK), [dim])


def _load_vector(smem, layout, st: _Static):
    if st.interpret:
        return smem[...]
    return plgpu.load(smem, (), layout=layout)


def _tile_mask(row_base, col_base, st: _Static, *, key_padding: bool = False, segs=None,
               transposed: bool = False):
    """[BLOCK, BLOCK] bool: which scores of a tile are real. Rows are queries and columns keys, or the
    other way round when `transposed` (the dK/dV pass's Sᵀ). `segs`: (row ids, column ids) vectors.
    `key_padding`: mask the keys at or past T (the forward's; in the backward a padding key's K and V
    are zero, so it adds nothing to dQ, and its own dK/dV rows are cut off)."""
    rows, cols = _iota(0, st) + row_base, _iota(1, st) + col_base
    q_pos, k_pos = (cols, rows) if transposed else (rows, cols)
    mask = None
    if key_padding:
        mask = k_pos < st.seq_len
    if st.causal:
        below = k_pos <= q_pos
        mask = below if mask is None else mask & below
    if segs is not None:
        row_ids, col_ids = segs
        same = (lax.broadcast_in_dim(row_ids, (BLOCK, BLOCK), [0]) ==
                lax.broadcast_in_dim(col_ids, (BLOCK, BLOCK), [1]))
        mask = same if mask is None else mask & same
    return mask


def _keep(row_hashes, row_axis: int, key_pos, st: _Static):
    """The attention-dropout keep bits of a tile: `kernels.dropout.keep_mask` of the queries' row hashes
    (a [BLOCK] vector laid along the tile's axis `row_axis`: 0 for S, 1 for Sᵀ) and the keys' global
    positions `key_pos` ([BLOCK, BLOCK]): the very bits `reference_attention` draws."""
    rows = lax.broadcast_in_dim(row_hashes, (BLOCK, BLOCK), [row_axis])
    return keep_mask(rows, key_pos, st.dropout_rate)


def _dropped(keep, x, st: _Static):
    """x where kept, scaled by 1 / (1 - rate); 0 where dropped."""
    return jnp.where(keep, x * (1.0 / (1.0 - st.dropout_rate)), 0.0)


def _waited_vector(needed: bool, smem, barrier, layout, st: _Static):
    """A [BLOCK] vector from SMEM once its copy has landed (None where the kernel does not need it)."""
    if not needed:
        return None
    plgpu.barrier_wait(barrier)
    return _load_vector(smem, layout, st)


@dataclasses.dataclass(frozen=True)
class _KeyTile:
    """The double-buffered K/V tiles a query tile walks (forward, dQ), in SMEM with their barriers (and,
    with segment ids, the keys' ids)."""

    k_smem: object
    v_smem: object
    kseg_smem: object
    k_bars: object
    v_bars: object
    seg_bars: object

    def fetch(self, k_ref, v_ref, seg_ref, b, kvh, st: _Static, j, slot) -> None:
        """Start the TMA copies of key tile j of (batch b, K/V head kvh) into `slot`."""
        rows = pl.ds(j * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], self.k_smem.at[slot], self.k_bars.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], self.v_smem.at[slot], self.v_bars.at[slot])
        if st.segmented:
            plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], self.kseg_smem.at[slot], self.seg_bars.at[slot])

    def scores(self, q_smem, q_ids, q_base, j, slot, st: _Static, *, masked: bool, key_padding: bool = False):
        """Key tile j's masked base-2 scores S * sm_scale * log2(e), [BLOCK, BLOCK]."""
        plgpu.barrier_wait(self.k_bars.at[slot])
        s = _matmul(q_smem, _transposed(self.k_smem.at[slot]), (BLOCK, BLOCK)) * (st.sm_scale * LOG2E)
        if not masked:
            return s
        segs = None
        if st.segmented:
            segs = (q_ids, _waited_vector(True, self.kseg_smem.at[slot], self.seg_bars.at[slot], _COLS, st))
        return _apply(_tile_mask(q_base, j * BLOCK, st, key_padding=key_padding, segs=segs), s)


def _apply(mask, scores):
    """Masked scores become MASK_VALUE (no mask: the tile is traced but never run, an empty part)."""
    return scores if mask is None else jnp.where(mask, scores, MASK_VALUE)


def _matmul(lhs, rhs, shape):
    """lhs @ rhs into a fresh float32 accumulator of `shape` (operands: SMEM refs, possibly
    transposed views, or an array in registers for lhs)."""
    def run(acc_ref):
        plgpu.wgmma(acc_ref, lhs, rhs)
        return acc_ref[...]
    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _matmul_acc(acc, lhs, rhs, st: _Static):
    """acc + lhs @ rhs. Compiled, wgmma accumulates into `acc`'s registers in place (`pl.run_state`);
    the interpreter has no rule for run_state, so there it is a fresh product added to acc."""
    if st.interpret:
        return acc + _matmul(lhs, rhs, acc.shape)

    def run(acc_ref):
        plgpu.wgmma(acc_ref, lhs, rhs)
    return pl.run_state(run)(plgpu.ACC.init(acc))


def _transposed(smem):
    return plgpu.transpose_ref(smem, (1, 0))


def _walk(parts, end, carry, *, fetch: Callable):
    """carry = step(j, slot, carry) for the tiles of consecutive parts [(lo, hi, step)], slot = j % 2,
    with tile j + 1's TMA copies (`fetch(j + 1, slot)`, while j + 1 < end) issued before tile j is
    computed, so that each copy overlaps the previous tile's compute; `_first_fetch` issues the first's.
    A slot is refilled only after the step that read it has finished (its wgmmas waited). Parts let the
    tiles that need no mask skip building one."""
    for lo, hi, step in parts:
        def body(j, carry, step=step):
            @pl.when(j + 1 < end)
            def _():
                fetch(j + 1, lax.rem(j + 1, 2))
            return step(j, lax.rem(j, 2), carry)
        carry = lax.fori_loop(lo, hi, body, carry)
    return carry


def _first_fetch(start, end, fetch: Callable) -> None:
    """Issue the walk's first tile's copies (tile `start`, slot start % 2)."""
    @pl.when(start < end)
    def _():
        fetch(start, lax.rem(start, 2))


def _store_tile(smem, value, ref) -> None:
    """value -> SMEM -> one tile of ref (a TMA copy), waited for at the kernel's end."""
    smem[...] = value.astype(smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, ref)


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, span_ref, hash_ref, o_ref, lse_ref,
                    q_smem, k_smem, v_smem, qseg_smem, kseg_smem, hash_smem, lse_smem,
                    q_bars, k_bars, v_bars, seg_bars, hash_bars, *, st: _Static, seq_padded: int):
    # q_ref [B, Tp, H, Dp]; k_ref, v_ref [B, Tp, KVH, Dp]; seg_ref [B, Tp] int32 and span_ref [B, 2, nq]
    # int32 (read if segmented: the ids, and the tiles each tile walks); hash_ref [B, H, Tp] uint32, the
    # queries' dropout row hashes (read if dropping). o_ref like q_ref;
    # lse_ref [B, H, Tp]. SMEM: q [BLOCK, Dp] (reused for O), k/v [2, BLOCK, Dp], ids [BLOCK] /
    # [2, BLOCK], hashes and lse [BLOCK]. Barriers, one per copy: (q, q's ids), k, v, k's ids per
    # slot, (the hashes, -).
    qi, h, b = lax.axis_index("q"), lax.axis_index("heads"), lax.axis_index("batch")
    kvh = lax.div(h, jnp.int32(st.group))
    q_base = qi * BLOCK
    dp = q_smem.shape[-1]
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, BLOCK), h], q_smem, q_bars.at[0])
    if st.segmented:
        plgpu.copy_gmem_to_smem(seg_ref.at[b, pl.ds(q_base, BLOCK)], qseg_smem, q_bars.at[1])
    if st.dropout_rate:
        plgpu.copy_gmem_to_smem(hash_ref.at[b, h, pl.ds(q_base, BLOCK)], hash_smem, hash_bars.at[0])

    key_tile = _KeyTile(k_smem, v_smem, kseg_smem, k_bars, v_bars, seg_bars)
    fetch = functools.partial(key_tile.fetch, k_ref, v_ref, seg_ref, b, kvh, st)

    plgpu.barrier_wait(q_bars.at[0])
    q_ids = _waited_vector(st.segmented, qseg_smem, q_bars.at[1], _ROWS, st)
    hashes = _waited_vector(st.dropout_rate > 0, hash_smem, hash_bars.at[0], _ROWS, st)

    def step(j, slot, carry, *, masked: bool):
        acc, m, l = carry
        s = key_tile.scores(q_smem, q_ids, q_base, j, slot, st, masked=masked,
                            key_padding=seq_padded != st.seq_len)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        if st.dropout_rate:  # l above saw every probability; only V's weights drop
            p = _dropped(_keep(hashes, 0, _iota(1, st) + j * BLOCK, st), p, st)
        plgpu.barrier_wait(v_bars.at[slot])
        acc = _matmul_acc(acc, p.astype(q_smem.dtype), v_smem.at[slot], st)
        return acc, m_new, l

    start, first_masked, end = _key_tiles(qi, st, seq_padded, span_ref, b)
    carry = (_full((BLOCK, dp), 0.0, plgpu.Layout.WGMMA, st), _full((BLOCK,), -jnp.inf, _ROWS, st),
             _full((BLOCK,), 0.0, _ROWS, st))
    _first_fetch(start, end, fetch)
    acc, m, l = _walk([(start, first_masked, functools.partial(step, masked=False)),
                       (first_masked, end, functools.partial(step, masked=True))], end, carry, fetch=fetch)

    # Q's tile is free now: O leaves through it.
    _store_tile(q_smem, acc / lax.broadcast_in_dim(l, acc.shape, [0]), o_ref.at[b, pl.ds(q_base, BLOCK), h])
    _store_tile(lse_smem, m + jnp.log(l) * LOG2E, lse_ref.at[b, h, pl.ds(q_base, BLOCK)])
    plgpu.wait_smem_to_gmem(0)


def _key_tiles(qi, st: _Static, seq_padded: int, span_ref, b, key_padding: bool = True):
    """(first tile, first tile that needs a mask, end of the tiles) that query tile `qi` visits."""
    nk = seq_padded // BLOCK
    end = qi + 1 if st.causal else nk
    if st.segmented:  # every tile masked; only the tiles holding this tile's segments visited
        start, end = _segment_tiles(span_ref, b, qi, 0, end)
        return start, start, end
    if st.causal:
        return 0, qi, end  # the diagonal tile (which also holds every padding key a real row could see)
    return 0, (nk - 1 if key_padding and seq_padded != st.seq_len else nk), end


def _segment_tiles(span_ref, b, i, start, end):
    """Narrow the tiles [start, end) that tile i walks to those holding its positions' segments: a tile
    outside them is all MASK_VALUE, so it is never loaded (queries and keys share the ids, so one
    span serves the forward and dQ, keys over queries, and dK/dV, queries over keys)."""
    return jnp.maximum(start, span_ref[b, 0, i]), jnp.minimum(end, span_ref[b, 1, i] + 1)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


def _dkdv_kernel(q_ref, k_ref, v_ref, seg_ref, span_ref, hash_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                 k_smem, v_smem, q_smem, do_smem, kseg_smem, qseg_smem, hash_smem, lse_smem, delta_smem,
                 kv_bars, kseg_bars, q_bars, qseg_bars, hash_bars, do_bars, lse_bars, delta_bars, *,
                 st: _Static, seq_padded: int):
    # Inputs as the forward's, plus do_ref like q_ref and delta_ref like lse_ref; dk_ref, dv_ref like
    # k_ref. SMEM: k, v [BLOCK, Dp] (reused for dK, dV), q, do [2, BLOCK, Dp], ids [BLOCK] / [2, BLOCK],
    # hashes, lse, delta [2, BLOCK]. Barriers, one per copy: (k, v), (k's ids, -), and per slot q, its
    # ids, its hashes, do, lse, delta.
    kj, g, b = lax.axis_index("k"), lax.axis_index("heads"), lax.axis_index("batch")
    k_base = kj * BLOCK
    rows = pl.ds(k_base, BLOCK)
    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, g], k_smem, kv_bars.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[b, rows, g], v_smem, kv_bars.at[1])
    nq = seq_padded // BLOCK
    first, end = (kj if st.causal else 0), nq  # the query tiles that see this key tile
    if st.segmented:
        first, end = _segment_tiles(span_ref, b, kj, first, end)
    n = end - first  # query tiles per head; the walk covers the group's G heads, n tiles each

    def fetch(t, slot):
        h = g * st.group + lax.div(t, n)
        cols = pl.ds((first + lax.rem(t, n)) * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(q_ref.at[b, cols, h], q_smem.at[slot], q_bars.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, cols, h], do_smem.at[slot], do_bars.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, cols], lse_smem.at[slot], lse_bars.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, cols], delta_smem.at[slot], delta_bars.at[slot])
        if st.segmented:
            plgpu.copy_gmem_to_smem(seg_ref.at[b, cols], qseg_smem.at[slot], qseg_bars.at[slot])
        if st.dropout_rate:
            plgpu.copy_gmem_to_smem(hash_ref.at[b, h, cols], hash_smem.at[slot], hash_bars.at[slot])

    _first_fetch(0, st.group * n, fetch)
    if st.segmented:
        plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], kseg_smem, kseg_bars.at[0])
    plgpu.barrier_wait(kv_bars.at[0])
    plgpu.barrier_wait(kv_bars.at[1])
    k_ids = _waited_vector(st.segmented, kseg_smem, kseg_bars.at[0], _ROWS, st)
    scale = st.sm_scale * LOG2E
    dtype = k_smem.dtype

    def step(t, slot, carry, *, masked: bool):
        dk, dv = carry
        plgpu.barrier_wait(q_bars.at[slot])
        s_t = _matmul(k_smem, _transposed(q_smem.at[slot]), (BLOCK, BLOCK)) * scale  # Sᵀ: keys x queries
        if masked:
            segs = None
            if st.segmented:
                segs = (k_ids, _waited_vector(True, qseg_smem.at[slot], qseg_bars.at[slot], _COLS, st))
            q_base = (first + lax.rem(t, n)) * BLOCK
            s_t = _apply(_tile_mask(k_base, q_base, st, segs=segs, transposed=True), s_t)
        plgpu.barrier_wait(lse_bars.at[slot])
        p_t = jnp.exp2(s_t - lax.broadcast_in_dim(_load_vector(lse_smem.at[slot], _COLS, st), s_t.shape, [1]))
        plgpu.barrier_wait(do_bars.at[slot])
        dp_t = _matmul(v_smem, _transposed(do_smem.at[slot]), (BLOCK, BLOCK))
        p_applied = p_t  # Pᵀ as it multiplied V in the forward
        if st.dropout_rate:  # dPᵀ becomes the gradient w.r.t. the undropped probabilities
            plgpu.barrier_wait(hash_bars.at[slot])
            keep = _keep(_load_vector(hash_smem.at[slot], _COLS, st), 1, _iota(0, st) + k_base, st)
            p_applied, dp_t = _dropped(keep, p_t, st), _dropped(keep, dp_t, st)
        plgpu.barrier_wait(delta_bars.at[slot])
        delta = _load_vector(delta_smem.at[slot], _COLS, st)
        # Both products' left operands are cast before either runs: the fewest [BLOCK, BLOCK] tiles live
        # beside the two accumulators (at head_dim 128 they alone take 128 of 255 registers).
        ds_t = (p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))).astype(dtype)
        p_applied = p_applied.astype(dtype)
        dv = _matmul_acc(dv, p_applied, do_smem.at[slot], st)
        dk = _matmul_acc(dk, ds_t, q_smem.at[slot], st)
        return dk, dv

    dp = k_smem.shape[-1]
    zeros = lambda: _full((BLOCK, dp), 0.0, plgpu.Layout.WGMMA, st)  # noqa: E731
    unmasked, masked = functools.partial(step, masked=False), functools.partial(step, masked=True)
    walked = st.group * n
    if st.segmented or not st.causal:  # every tile masked (segments) or none (padding needs no mask here)
        parts = lambda t0: [(t0, t0 + n, masked if st.segmented else unmasked)]  # noqa: E731
    else:  # causal: each head's first query tile is the diagonal one
        parts = lambda t0: [(t0, t0 + 1, masked), (t0 + 1, t0 + n, unmasked)]  # noqa: E731
    dk, dv = lax.fori_loop(0, st.group, lambda i, c: _walk(parts(i * n), walked, c, fetch=fetch), (zeros(), zeros()))

    _store_tile(k_smem, dk * st.sm_scale, dk_ref.at[b, rows, g])
    _store_tile(v_smem, dv, dv_ref.at[b, rows, g])
    plgpu.wait_smem_to_gmem(0)


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, span_ref, hash_ref, do_ref, lse_ref, delta_ref, dq_ref,
               q_smem, do_smem, k_smem, v_smem, qseg_smem, kseg_smem, hash_smem, lse_smem, delta_smem,
               q_bars, stat_bars, qseg_bars, k_bars, v_bars, seg_bars, *, st: _Static, seq_padded: int):
    # As the forward's, plus do_ref, delta_ref; dq_ref like q_ref. SMEM: q, do [BLOCK, Dp] (q reused for
    # dQ), k, v [2, BLOCK, Dp], ids [BLOCK] / [2, BLOCK], hashes, lse, delta [BLOCK]. Barriers, one per
    # copy: (q, do), (lse, delta), (q's ids, q's hashes), and per slot k, v, k's ids.
    qi, h, b = lax.axis_index("q"), lax.axis_index("heads"), lax.axis_index("batch")
    kvh = lax.div(h, jnp.int32(st.group))
    q_base = qi * BLOCK
    rows = pl.ds(q_base, BLOCK)
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, q_bars.at[0])
    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem, q_bars.at[1])
    plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem, stat_bars.at[0])
    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem, stat_bars.at[1])
    if st.segmented:
        plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], qseg_smem, qseg_bars.at[0])
    if st.dropout_rate:
        plgpu.copy_gmem_to_smem(hash_ref.at[b, h, rows], hash_smem, qseg_bars.at[1])

    key_tile = _KeyTile(k_smem, v_smem, kseg_smem, k_bars, v_bars, seg_bars)
    fetch = functools.partial(key_tile.fetch, k_ref, v_ref, seg_ref, b, kvh, st)

    start, first_masked, end = _key_tiles(qi, st, seq_padded, span_ref, b, key_padding=False)
    _first_fetch(start, end, fetch)
    for bars in (q_bars, stat_bars):
        plgpu.barrier_wait(bars.at[0])
        plgpu.barrier_wait(bars.at[1])
    lse = _load_vector(lse_smem, _ROWS, st)
    delta = _load_vector(delta_smem, _ROWS, st)
    q_ids = _waited_vector(st.segmented, qseg_smem, qseg_bars.at[0], _ROWS, st)
    hashes = _waited_vector(st.dropout_rate > 0, hash_smem, qseg_bars.at[1], _ROWS, st)

    def step(j, slot, dq, *, masked: bool):
        s = key_tile.scores(q_smem, q_ids, q_base, j, slot, st, masked=masked)
        p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
        plgpu.barrier_wait(v_bars.at[slot])
        dp = _matmul(do_smem, _transposed(v_smem.at[slot]), (BLOCK, BLOCK))
        if st.dropout_rate:
            dp = _dropped(_keep(hashes, 0, _iota(1, st) + j * BLOCK, st), dp, st)
        ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
        return _matmul_acc(dq, ds.astype(q_smem.dtype), k_smem.at[slot], st)

    dq = _walk([(start, first_masked, functools.partial(step, masked=False)),
                (first_masked, end, functools.partial(step, masked=True))], end,
               _full((BLOCK, q_smem.shape[-1]), 0.0, plgpu.Layout.WGMMA, st), fetch=fetch)
    _store_tile(q_smem, dq * st.sm_scale, dq_ref.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------


def _kernel(body: Callable, *, name: str, out_type, scratch, grid, grid_names, interpret: bool):
    params = mosaic_gpu_interpret.params() if interpret else None
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
                        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=params,
                        kernel_name=name)


def _smem_tiles(dtype, dp: int, slots: int | None = None):
    shape = (BLOCK, dp) if slots is None else (slots, BLOCK, dp)
    return plgpu.SMEM(shape, dtype, transforms=_TRANSFORMS)


def _vectors(dtype, slots: int | None = None):
    """SMEM for one tile's [BLOCK] row statistics, ids or hashes (per slot when `slots`)."""
    return plgpu.SMEM((BLOCK,) if slots is None else (slots, BLOCK), dtype)


def _barriers(n: int):
    """n pairs of barriers (one per double-buffer slot, or one per tile loaded once)."""
    return [plgpu.Barrier(num_barriers=2) for _ in range(n)]


def _pad(x, seq_padded: int, head_dim_padded: int):
    """[B, T, h, D] -> [B, Tp, h, Dp], zeros; untouched when nothing needs padding."""
    t, d = x.shape[1], x.shape[3]
    if (t, d) == (seq_padded, head_dim_padded):
        return x
    return jnp.pad(x, ((0, 0), (0, seq_padded - t), (0, 0), (0, head_dim_padded - d)))


def _padded_sizes(seq_len: int, head_dim: int) -> tuple[int, int]:
    return (pl.cdiv(seq_len, BLOCK) * BLOCK,
            pl.cdiv(head_dim, HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE)


def _mask_inputs(st: _Static, segment_ids, seed, batch: int, heads: int, seq_padded: int):
    """The kernels' mask inputs (segment ids [B, Tp] int32, padding keys taking the row's last id, which the
    key mask removes; each tile's segment span [B, 2, nq] int32: the first and last tile holding a position
    of one of its segments; dropout row hashes [B, H, Tp] uint32 of seed = [seed, batch offset]), each a
    dummy that no kernel reads when unused."""
    seg = hashes = jnp.zeros((1, 1), jnp.int32)
    spans = jnp.zeros((1, 2, 1), jnp.int32)
    if st.segmented:
        seg = segment_ids.astype(jnp.int32)
        if seg.shape[1] != seq_padded:
            seg = jnp.pad(seg, ((0, 0), (0, seq_padded - seg.shape[1])), mode="edge")
        tiles = lambda x: x.reshape(batch, seq_padded // BLOCK, BLOCK)  # noqa: E731
        first, last = segment_spans(seg)
        spans = jnp.stack([tiles(first).min(axis=2), tiles(last).max(axis=2)], axis=1) // BLOCK
    if st.dropout_rate:
        b = jnp.arange(batch, dtype=jnp.uint32)[:, None, None] + seed[1]
        h = jnp.arange(heads, dtype=jnp.uint32)[None, :, None]
        hashes = row_hash(seed[0], b, h, jnp.arange(seq_padded, dtype=jnp.uint32)[None, None, :])
    return seg, spans, hashes


def _forward(st: _Static, q, k, v, masks):
    batch, seq_len, heads, head_dim = q.shape
    tp, dp = _padded_sizes(seq_len, head_dim)
    qp, kp, vp = (_pad(x, tp, dp) for x in (q, k, v))
    o, lse = _kernel(
        functools.partial(_forward_kernel, st=st, seq_padded=tp), name="flash_attention_mgpu_fwd",
        out_type=(jax.ShapeDtypeStruct(qp.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, tp), jnp.float32)),
        scratch=[_smem_tiles(q.dtype, dp), _smem_tiles(q.dtype, dp, 2), _smem_tiles(q.dtype, dp, 2),
                 _vectors(jnp.int32), _vectors(jnp.int32, 2), _vectors(jnp.uint32), _vectors(jnp.float32),
                 *_barriers(5)],
        grid=(tp // BLOCK, heads, batch), grid_names=("q", "heads", "batch"), interpret=st.interpret,
    )(qp, kp, vp, *masks)
    return o[:, :seq_len, :, :head_dim], lse


def _backward(st: _Static, q, k, v, masks, o, lse, do):
    """(dQ [B, T, H, D], dK, dV [B, T, KVH, D]) from the forward's o and lse ([B, H, Tp])."""
    batch, seq_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    tp, dp = _padded_sizes(seq_len, head_dim)
    qp, kp, vp, dop = (_pad(x, tp, dp) for x in (q, k, v, do))
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, tp - seq_len)))
    inputs = (qp, kp, vp, *masks, dop, lse, delta)
    dk, dv = _kernel(
        functools.partial(_dkdv_kernel, st=st, seq_padded=tp), name="flash_attention_mgpu_dkdv",
        out_type=(jax.ShapeDtypeStruct(kp.shape, k.dtype),) * 2,
        scratch=[_smem_tiles(q.dtype, dp), _smem_tiles(q.dtype, dp), _smem_tiles(q.dtype, dp, 2),
                 _smem_tiles(q.dtype, dp, 2), _vectors(jnp.int32), _vectors(jnp.int32, 2),
                 _vectors(jnp.uint32, 2), _vectors(jnp.float32, 2), _vectors(jnp.float32, 2), *_barriers(8)],
        grid=(tp // BLOCK, kv_heads, batch), grid_names=("k", "heads", "batch"), interpret=st.interpret,
    )(*inputs)
    (dq,) = _kernel(
        functools.partial(_dq_kernel, st=st, seq_padded=tp), name="flash_attention_mgpu_dq",
        out_type=(jax.ShapeDtypeStruct(qp.shape, q.dtype),),
        scratch=[_smem_tiles(q.dtype, dp), _smem_tiles(q.dtype, dp), _smem_tiles(q.dtype, dp, 2),
                 _smem_tiles(q.dtype, dp, 2), _vectors(jnp.int32), _vectors(jnp.int32, 2), _vectors(jnp.uint32),
                 _vectors(jnp.float32), _vectors(jnp.float32), *_barriers(6)],
        grid=(tp // BLOCK, heads, batch), grid_names=("q", "heads", "batch"), interpret=st.interpret,
    )(*inputs)
    cut = lambda x: x[:, :seq_len, :, :head_dim]  # noqa: E731
    return cut(dq), cut(dk), cut(dv)


# ---------------------------------------------------------------------------
# custom_vjp and the public function
# ---------------------------------------------------------------------------


def attention(q, k, v, seed, segment_ids=None, *, causal: bool = True, sm_scale: float,
              dropout_rate: float = 0.0, interpret: bool):
    """softmax(q kᵀ sm_scale [+ masks]) v with the Hopper kernels, attention dropout drawn as
    `reference_attention` draws it. q [B, T, H, D]; k, v [B, T, KVH, D]; seed: [seed, batch offset]
    uint32 (read when dropping); segment_ids [B, T] or None (the argument order of
    `kernels.flash_attention`'s own kernels). `interpret`: the Mosaic GPU interpreter
    (CPU) or compiled kernels (CUDA, sm_90), decided by the caller when tracing: the interpreter's
    ordered callbacks cannot sit in a `lax.platform_dependent` branch. Inputs are checked by
    `kernels.flash_attention.flash_attention`."""
    batch, seq_len, heads, _ = q.shape
    st = _Static(causal=bool(causal), sm_scale=float(sm_scale), seq_len=seq_len, group=heads // k.shape[2],
                 segmented=segment_ids is not None, dropout_rate=float(dropout_rate), interpret=bool(interpret))
    masks = _mask_inputs(st, segment_ids, seed, batch, heads, _padded_sizes(seq_len, q.shape[3])[0])
    return _flash(q, k, v, masks, st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, masks, st: _Static):
    return _forward(st, q, k, v, masks)[0]


def _flash_fwd(q, k, v, masks, st: _Static):
    o, lse = _forward(st, q, k, v, masks)
    return o, (q, k, v, masks, o, lse)  # O(B T H D), never O(T^2)


def _flash_bwd(st: _Static, residuals, do):
    dq, dk, dv = _backward(st, *residuals, do)
    return dq, dk, dv, None  # the integer mask inputs have no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)
