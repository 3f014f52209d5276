"""Reference attention: plain einsums with a float32 softmax.

Shape glossary (layout `[batch, seq, heads, head_dim]` throughout):
  B: batch   Tq: query length   Tk: key/value length   H: heads   D: head dim

This is the readable definition every other attention path is checked against.
It materialises the `[B, H, Tq, Tk]` scores, which is exactly what the fused
kernel in `flash_attention.py` avoids.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt32

from kernels.dropout import dropout_keep_mask


def default_scale(head_dim: int, sm_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def causal_mask(q_len: int, k_len: int):
    """Bottom-right aligned causal mask: query i sits at position k_len - q_len + i."""
    q_pos = jnp.arange(q_len)[:, None] + (k_len - q_len)
    return jnp.arange(k_len)[None, :] <= q_pos


def _heads_major(*xs):
    """[B, T, H, D] <-> [B, H, T, D]. The einsums take heads-major operands: every (batch, head)
    matmul then reads contiguous [T, D] slabs (on [B, T, H, D] they ran ~1.3x slower on CPU)."""
    return tuple(x.transpose(0, 2, 1, 3) for x in xs)


def _softmax_attention(q, k, v, mask, sm_scale, dropout_rate, dropout_seed, q_offset):
    """softmax(q k^T) v on heads-major [B, H, T, D] operands; returns [B, H, Tq, D]."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    compute_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=compute_dtype)
    scores = scores * default_scale(head_dim, sm_scale)
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0:
        if dropout_seed is None:
            raise ValueError("dropout_rate > 0 needs a dropout_seed")
        keep = dropout_keep_mask(dropout_seed, batch, heads, q_len, k_len, dropout_rate, q_offset)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, preferred_element_type=compute_dtype)
    return out.astype(q.dtype)


def reference_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch k_len heads head_dim"],
    v: Float[Array, "batch k_len heads head_dim"],
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Int[Array, ""] | UInt32[Array, ""] | int | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """softmax(q k^T * sm_scale [+ causal mask]) v, with optional hashed dropout.

    With `q_len < k_len` and `causal=True` the queries are the *last* `q_len`
    positions (bottom-right aligned), as in decoding after a prefix.
    """
    q_len, k_len = q.shape[1], k.shape[1]
    mask = causal_mask(q_len, k_len) if causal else None
    out = _softmax_attention(*_heads_major(q, k, v), mask, sm_scale, dropout_rate, dropout_seed, k_len - q_len)
    return _heads_major(out)[0]


def blocked_causal_attention(
    q: Float[Array, "batch seq heads head_dim"],
    k: Float[Array, "batch seq heads head_dim"],
    v: Float[Array, "batch seq heads head_dim"],
    *,
    block_q: int = 64,
    sm_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Int[Array, ""] | UInt32[Array, ""] | int | None = None,
) -> Float[Array, "batch seq heads head_dim"]:
    """Causal self-attention, one query block at a time over only the keys it can see.

    Query block [s, s + block_q) attends to keys [0, s + block_q): each block is a
    plain softmax over its whole visible prefix, so no online-softmax rescaling is
    needed and autodiff gives the backward. It computes the same numbers as
    `reference_attention(causal=True)` (dropout bits included: they hash global
    indices) while skipping the score blocks above the diagonal, about
    (n + 1) / 2n of the work for n blocks.
    """
    seq = q.shape[1]
    q, k, v = _heads_major(q, k, v)
    outs = []
    for start in range(0, seq, block_q):
        end = min(start + block_q, seq)
        outs.append(_softmax_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end],
                                       causal_mask(end - start, end), sm_scale, dropout_rate, dropout_seed, start))
    return _heads_major(jnp.concatenate(outs, axis=2))[0]


def cached_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k_cache: Float[Array, "batch heads cache_len head_dim"],
    v_cache: Float[Array, "batch heads cache_len head_dim"],
    query_positions: Int[Array, "q_len"],
    *,
    sm_scale: float | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Decode-time attention over a fixed-size KV cache.

    Query i sits at absolute position `query_positions[i]` and sees the cache
    slots `0..query_positions[i]`; slots past it (future or not yet written)
    are masked. Every attention implementation uses this for the KV-cached
    sampler: with one query row there is nothing for a fused kernel to fuse.

    The cache is kept heads-major, `[B, H, S, D]`, unlike q/k/v: each
    per-(batch, head) matmul then reads a contiguous [S, D] slab. With the
    `[B, S, H, D]` layout XLA transposes the whole cache on every decode step:
    attention ~7x slower at batch 10 on CPU, 13.5 instead of 8.5 ms per step.
    """
    mask = jnp.arange(k_cache.shape[2])[None, :] <= query_positions[:, None]
    if q.shape[1] > 1:  # prefill: the prompt's queries at once
        out = _softmax_attention(_heads_major(q)[0], k_cache, v_cache, mask, sm_scale, 0.0, None, 0)
        return _heads_major(out)[0]
    # One new token per step, the hot path: with the query axis squeezed out XLA runs plain
    # matrix-vector products over the cache instead of transposing it first.
    compute_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("bhd,bhkd->bhk", q[:, 0], k_cache, preferred_element_type=compute_dtype)
    scores = jnp.where(mask[0], scores * default_scale(q.shape[-1], sm_scale), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bhk,bhkd->bhd", probs, v_cache, preferred_element_type=compute_dtype)
    return out[:, None].astype(q.dtype)
