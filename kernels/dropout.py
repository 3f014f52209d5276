"""Counter-based dropout masks: attention dropout shared by every attention path,
and the model's embedding/residual dropout.

Attention dropout zeroes individual probabilities `p[b, h, i, j]`. A stateful
RNG cannot be reproduced block by block inside a fused kernel, so the keep bit
is a pure function of `(seed, batch, head, q index, k index)`: a kernel that
visits the scores in blocks (forward and backward) and the reference that
materialises them all at once compute the same bits and agree exactly.

The hash is Chris Wellons' `lowbias32` integer finaliser applied in three
rounds. It only needs uint32 multiply, xor and shift, which every Pallas
backend (interpret, Triton, Mosaic GPU/TPU) supports.

The same hash drops activations (`element_keep_mask`): it fuses into the
select that applies it, where `hk.dropout`'s threefry bits cost ~0.8 s of a
~12 s training step at the shakespeare_char size on a 2-core CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, UInt32

_ROW_MULTIPLIER = 0x9E3779B1  # golden-ratio constants decorrelate the indices
_COL_MULTIPLIER = 0x85EBCA77


def _mix32(x: UInt32[Array, "..."]) -> UInt32[Array, "..."]:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def keep_threshold(rate: float) -> int:
    """Hashes at or above this uint32 value are kept (probability 1 - rate)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return min(int(round(rate * 2.0**32)), 2**32 - 1)


def row_hash(seed, batch_index, head_index, q_index) -> UInt32[Array, "..."]:
    """The part of the hash that depends on the query row (broadcastable)."""
    u32 = lambda a: jnp.asarray(a).astype(jnp.uint32)
    h = _mix32(u32(seed) ^ (u32(batch_index) * jnp.uint32(_ROW_MULTIPLIER)))
    h = _mix32(h ^ (u32(head_index) * jnp.uint32(_COL_MULTIPLIER)))
    return _mix32(h ^ u32(q_index))


def keep_mask(row: UInt32[Array, "..."], k_index, rate: float) -> Bool[Array, "..."]:
    """Keep bits for a row hash (from `row_hash`) and key indices (broadcast)."""
    h = _mix32(row ^ (jnp.asarray(k_index).astype(jnp.uint32) * jnp.uint32(_ROW_MULTIPLIER)))
    return h >= jnp.uint32(keep_threshold(rate))


def dropout_keep_mask(
    seed, batch: int, heads: int, q_len: int, k_len: int, rate: float, q_offset: int = 0
) -> Bool[Array, "batch heads q_len k_len"]:
    """The full `[batch, heads, q, k]` keep mask, for the reference path."""
    b = jnp.arange(batch, dtype=jnp.uint32)[:, None, None, None]
    h = jnp.arange(heads, dtype=jnp.uint32)[None, :, None, None]
    qi = (jnp.arange(q_len, dtype=jnp.uint32) + jnp.uint32(q_offset))[None, None, :, None]
    ki = jnp.arange(k_len, dtype=jnp.uint32)[None, None, None, :]
    return keep_mask(row_hash(seed, b, h, qi), ki, rate)


def element_keep_mask(seed, shape: tuple[int, ...], rate: float) -> Bool[Array, "..."]:
    """Keep bits for every element of an array of `shape`: a hash of (seed, flat index).

    The index is uint32: a single activation holds far fewer than 2**32 elements.
    """
    flat = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    row = _mix32(jnp.asarray(seed).astype(jnp.uint32))
    return keep_mask(row, flat, rate)
