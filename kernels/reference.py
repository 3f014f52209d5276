"""Reference attention: plain einsums with a float32 softmax.

Shape glossary (layout `[batch, seq, heads, head_dim]` throughout):
  B: batch   Tq: query length   Tk: key/value length   D: head dim
  H: query heads   KVH: key/value heads (divides H)   G: H // KVH, the query heads sharing one K/V head

Grouped-query attention (GQA; KVH == 1 is multi-query attention, KVH == H plain multi-head attention):
query head h attends with K/V head h // G. K and V are never repeated to H heads: the queries are
viewed as `[B, KVH, G, Tq, D]` and each K/V head's einsum serves its G query heads at once.

Document masking: `segment_ids` `[B, T]` (self-attention, Tq == Tk == T) label each position's
document; a query sees only the keys of its own segment, on top of the causal mask.

This is the readable definition every other attention path is checked against.
It materialises the `[B, H, Tq, Tk]` scores, which is exactly what the fused
kernel in `flash_attention.py` avoids.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, UInt32

from haiku_gpt.kernels.dropout import dropout_keep_mask


# The fused kernels' finite "minus infinity" for masked scores: exp(MASK_VALUE - m) underflows to 0, while
# a tile whose scores are all masked can never produce inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def default_scale(head_dim: int, sm_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def causal_mask(q_len: int, k_len: int):
    """Bottom-right aligned causal mask: query i sits at position k_len - q_len + i."""
    q_pos = jnp.arange(q_len)[:, None] + (k_len - q_len)
    return jnp.arange(k_len)[None, :] <= q_pos


def kv_group(heads: int, kv_heads: int) -> int:
    """G = heads // kv_heads, the query heads that share one K/V head; ValueError unless kv_heads divides heads."""
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"k and v have {kv_heads} heads, which does not divide the {heads} query heads of q: grouped-query "
            f"attention shares each K/V head among heads // kv_heads query heads (query head h uses K/V head "
            f"h // (heads // kv_heads)), so give k and v a number of heads that divides {heads} (in the model: "
            f"--config.n_kv_head, a divisor of n_head, or 0 for n_head)")
    return heads // kv_heads


def split_qkv(qkv: Float[Array, "B T HKV D"], kv_heads: int) -> tuple[Array, Array, Array]:
    """q [B, T, H, D], k and v [B, T, KVH, D] out of one fused projection's heads, [q | k | v] along axis 2
    (GPT-2's c_attn output reshaped to [B, T, H + 2 KVH, D]); ValueError, naming the fix, if that cannot be."""
    heads = qkv.shape[2] - 2 * kv_heads if qkv.ndim == 4 else 0
    if kv_heads < 1 or heads < 1 or heads % kv_heads:
        raise ValueError(f"qkv must be [B, T, H + 2 KVH, D] with KVH = kv_heads dividing H; got {qkv.shape} with "
                         f"kv_heads={kv_heads}: reshape the fused projection to heads and pass its K/V head count")
    return qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads], qkv[:, :, heads + kv_heads:]


def check_attention_inputs(q, k, v, segment_ids=None) -> int:
    """ValueError for q/k/v (and segment ids) that do not fit together; returns the group size G."""
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Tk, KVH, D], got {k.shape} and {v.shape}")
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, Tq, H, D] and k, v [B, Tk, KVH, D] must agree on B and D, got {q.shape} and "
                         f"{k.shape}")
    if segment_ids is not None:
        batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
        if q_len != k_len or segment_ids.shape != (batch, q_len):
            raise ValueError(
                f"segment_ids label the positions of one self-attention sequence, so they need shape [B, T] = "
                f"{(batch, q_len)} with q and k of the same length T; got segment_ids {segment_ids.shape}, "
                f"q length {q_len}, k length {k_len}. Decoding with a cache attends within one document: "
                "pass segment_ids=None there")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers (e.g. int32), got {segment_ids.dtype}")
    return kv_group(q.shape[2], k.shape[2])


def segment_mask(segment_ids: Int[Array, "B T"], q_start: int, q_end: int, k_end: int) -> Bool[Array, "B Tq Tk"]:
    """Queries q_start..q_end-1 against keys 0..k_end-1: True where both are in the same segment."""
    return segment_ids[:, q_start:q_end, None] == segment_ids[:, None, :k_end]


def segment_spans(segment_ids: Int[Array, "B T"]) -> tuple[Int[Array, "B T"], Int[Array, "B T"]]:
    """For each position, the first and last position holding its segment id (ids need not be sorted nor
    contiguous): the flash kernels' bound on the blocks a block of queries or keys can see. Per row: sort by
    id, mark where the id changes, take each group's min and max position."""

    def row(ids):
        n = ids.shape[0]
        order = jnp.argsort(ids, stable=True)
        sorted_ids = ids[order]
        group = jnp.cumsum(jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                            (sorted_ids[1:] != sorted_ids[:-1]).astype(jnp.int32)]))
        first = jax.ops.segment_min(order, group, num_segments=n)
        last = jax.ops.segment_max(order, group, num_segments=n)
        group_of = jnp.zeros((n,), jnp.int32).at[order].set(group)
        return first[group_of].astype(jnp.int32), last[group_of].astype(jnp.int32)

    return jax.vmap(row)(segment_ids)


def _heads_major(*xs):
    """[B, T, H, D] <-> [B, H, T, D]. The einsums take heads-major operands: every (batch, head)
    matmul then reads contiguous [T, D] slabs (on [B, T, H, D] they ran ~1.3x slower on CPU)."""
    return tuple(x.transpose(0, 2, 1, 3) for x in xs)


def _softmax_attention(q, k, v, mask, sm_scale, dropout_rate, dropout_seed, q_offset, rows_may_be_empty=False):
    """softmax(q k^T) v on heads-major operands, q [B, H, Tq, D] and k, v [B, KVH, Tk, D]; returns [B, H, Tq, D].

    `mask` (True: visible) is [Tq, Tk] or [B, Tq, Tk]. `rows_may_be_empty`: some query row may have no
    visible key (a causal mask of more queries than keys); such rows get all-zero probabilities instead
    of NaN, forward and backward. Causal and segment masks of self-attention always show the diagonal,
    so they skip the two extra passes over the scores this takes.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    compute_dtype = jnp.promote_types(q.dtype, jnp.float32)
    if heads == kv_heads:  # multi-head attention: 4-D einsums, which XLA:CPU runs faster than the grouped 5-D ones
        scores_spec, out_spec = "bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"
    else:  # [B, H, Tq, D] viewed as [B, KVH, G, Tq, D]: query head h = K/V head h // G, member h % G
        scores_spec, out_spec = "bkgqd,bkud->bkgqu", "bkgqu,bkud->bkgqd"
        q = q.reshape(batch, kv_heads, heads // kv_heads, q_len, head_dim)
    scores = jnp.einsum(scores_spec, q, k, preferred_element_type=compute_dtype)
    scores = scores * default_scale(head_dim, sm_scale)
    if mask is not None:
        if mask.ndim == 3:  # [B, Tq, Tk] -> broadcast over the head axes
            mask = mask.reshape(batch, *(1,) * (scores.ndim - 3), q_len, k_len)
        if rows_may_be_empty:  # an empty row's scores become 0 (a finite softmax and gradient), zeroed below
            visible = jnp.any(mask, axis=-1, keepdims=True)
            scores = jnp.where(mask, scores, jnp.where(visible, -jnp.inf, 0.0))
        else:
            scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None and rows_may_be_empty:
        probs = jnp.where(visible, probs, 0.0)
    if dropout_rate > 0.0:
        if dropout_seed is None:
            raise ValueError("dropout_rate > 0 needs a dropout_seed")
        # The keep bit of p[b, h, i, j] hashes the query head h: the same bits with or without GQA.
        keep = dropout_keep_mask(dropout_seed, batch, heads, q_len, k_len, dropout_rate, q_offset)
        keep = keep.reshape(scores.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum(out_spec, probs.astype(v.dtype), v, preferred_element_type=compute_dtype)
    return out.reshape(batch, heads, q_len, head_dim).astype(q.dtype)


def reference_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch k_len kv_heads head_dim"],
    v: Float[Array, "batch k_len kv_heads head_dim"],
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Int[Array, ""] | UInt32[Array, ""] | int | None = None,
    segment_ids: Int[Array, "batch q_len"] | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """softmax(q k^T * sm_scale [+ causal mask] [+ segment mask]) v, with optional hashed dropout.

    With `q_len < k_len` and `causal=True` the queries are the *last* `q_len`
    positions (bottom-right aligned), as in decoding after a prefix. k and v
    may have fewer heads than q (grouped-query attention: KVH dividing H), and
    `segment_ids` (q_len == k_len) confine each query to its own segment.
    """
    check_attention_inputs(q, k, v, segment_ids)
    q_len, k_len = q.shape[1], k.shape[1]
    mask = causal_mask(q_len, k_len) if causal else None
    if segment_ids is not None:
        same = segment_mask(segment_ids, 0, q_len, k_len)
        mask = same if mask is None else mask & same
    out = _softmax_attention(*_heads_major(q, k, v), mask, sm_scale, dropout_rate, dropout_seed, k_len - q_len,
                             rows_may_be_empty=causal and q_len > k_len)
    return _heads_major(out)[0]


def blocked_causal_attention(
    q: Float[Array, "batch seq heads head_dim"],
    k: Float[Array, "batch seq kv_heads head_dim"],
    v: Float[Array, "batch seq kv_heads head_dim"],
    *,
    block_q: int = 64,
    sm_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Int[Array, ""] | UInt32[Array, ""] | int | None = None,
    segment_ids: Int[Array, "batch seq"] | None = None,
) -> Float[Array, "batch seq heads head_dim"]:
    """Causal self-attention, one query block at a time over only the keys it can see.

    Query block [s, s + block_q) attends to keys [0, s + block_q): each block is a
    plain softmax over its whole visible prefix, so no online-softmax rescaling is
    needed and autodiff gives the backward. It computes the same numbers as
    `reference_attention(causal=True)` (dropout bits included: they hash global
    indices; GQA and segment ids alike) while skipping the score blocks above the
    diagonal, about (n + 1) / 2n of the work for n blocks.
    """
    check_attention_inputs(q, k, v, segment_ids)
    seq = q.shape[1]
    q, k, v = _heads_major(q, k, v)
    outs = []
    for start in range(0, seq, block_q):
        end = min(start + block_q, seq)
        mask = causal_mask(end - start, end)
        if segment_ids is not None:
            mask = mask & segment_mask(segment_ids, start, end, end)
        outs.append(_softmax_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end],
                                       mask, sm_scale, dropout_rate, dropout_seed, start))
    return _heads_major(jnp.concatenate(outs, axis=2))[0]


def cached_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k_cache: Float[Array, "batch kv_heads cache_len head_dim"],
    v_cache: Float[Array, "batch kv_heads cache_len head_dim"],
    query_positions: Int[Array, "q_len"],
    *,
    sm_scale: float | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Decode-time attention over a fixed-size KV cache (of KVH heads: grouped-query attention as above).

    Query i sits at absolute position `query_positions[i]` and sees the cache
    slots `0..query_positions[i]`; slots past it (future or not yet written)
    are masked. Every attention implementation uses this for the KV-cached
    sampler: with one query row there is nothing for a fused kernel to fuse.

    The cache is kept heads-major, `[B, KVH, S, D]`, unlike q/k/v: each
    per-(batch, head) matmul then reads a contiguous [S, D] slab. With the
    `[B, S, H, D]` layout XLA transposes the whole cache on every decode step:
    attention ~7x slower at batch 10 on CPU, 13.5 instead of 8.5 ms per step.
    """
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape [B, KVH, S, D], got {k_cache.shape} and "
                         f"{v_cache.shape}")
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = kv_group(heads, kv_heads)
    mask = jnp.arange(k_cache.shape[2])[None, :] <= query_positions[:, None]
    if q_len > 1:  # prefill: the prompt's queries at once
        out = _softmax_attention(_heads_major(q)[0], k_cache, v_cache, mask, sm_scale, 0.0, None, 0)
        return _heads_major(out)[0]
    # One new token per step, the hot path: with the query axis squeezed out XLA runs plain
    # matrix-vector products (matrix-matrix over a group of G query heads) instead of transposing the cache.
    compute_dtype = jnp.promote_types(q.dtype, jnp.float32)
    q = q[:, 0].reshape(batch, kv_heads, group, head_dim)
    scores = jnp.einsum("bkgd,bksd->bkgs", q, k_cache, preferred_element_type=compute_dtype)
    scores = jnp.where(mask[0], scores * default_scale(head_dim, sm_scale), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v_cache, preferred_element_type=compute_dtype)
    return out.reshape(batch, 1, heads, head_dim).astype(q.dtype)
