"""Grouped-query attention (K/V with fewer heads) and segment ids (document masking) in every attention path.

The reference, blocked and xla paths are checked against `attention_float64`: an independent float64
definition (jax under enable_x64) that repeats K/V to the query heads and spells each mask out, so
the grouping (query head h uses K/V head h // G) and the masks are checked, not just self-consistency.
The Pallas kernel's checks against it are in test_kernels.py (test_flash_gqa_*, test_flash_segments_*).

Relative error is max|a - ref| / max|ref|, as in test_kernels.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haiku_gpt import kernels
from haiku_gpt.kernels.dropout import dropout_keep_mask
from haiku_gpt.kernels.reference import blocked_causal_attention, cached_attention, reference_attention

F32_TOL = 2e-5
HEADS = 8


def rel_err(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    scale = np.max(np.abs(ref))
    return float(np.max(np.abs(a - ref)) / scale) if scale > 0 else float(np.max(np.abs(a - ref)))


def gqa_inputs(seed, batch, seq, heads, kv_heads, head_dim, dtype=jnp.float32):
    """q [B, T, H, D], k and v [B, T, KVH, D], and a cotangent (random projection) w like q."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), jnp.float32)
    k, v = (jax.random.normal(key, (batch, seq, kv_heads, head_dim), jnp.float32) for key in keys[1:3])
    w = jax.random.normal(keys[3], (batch, seq, heads, head_dim), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v, w))


def segments(seed: int, batch: int, seq: int) -> np.ndarray:
    """[B, T] int32 segment ids: row 0 has a one-token document, row 1 is one document, the rest random lengths."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(batch):
        if b == 1:
            lengths = [seq]
        else:
            lengths = [] if b else [3, 1]  # row 0: a document of length 1 after the first
            while sum(lengths) < seq:
                lengths.append(int(rng.integers(1, max(2, seq // 3))))
        ids = np.repeat(np.arange(len(lengths)), lengths)[:seq]
        rows.append(ids + int(rng.integers(0, 5)))  # ids need not start at 0, only compare equal
    return np.stack(rows).astype(np.int32)


def attention_float64(q, k, v, w, *, causal=True, segment_ids=None, dropout_rate=0.0, dropout_seed=0):
    """Output and (dq, dk, dv) of sum(attention * w) in float64: K/V repeated to H heads, masks spelled out,
    dropout by the shared keep mask `dropout_keep_mask(seed, B, H, Tq, Tk)` (indexed by the query head)."""
    with jax.enable_x64(True):
        def attend(q, k, v):
            batch, q_len, heads, head_dim = q.shape
            k_len, kv_heads = k.shape[1], k.shape[2]
            k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))  # head h -> kv head h // G
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
            visible = np.ones((batch, 1, q_len, k_len), bool)
            if causal:
                visible &= np.arange(k_len)[None, :] <= np.arange(q_len)[:, None] + (k_len - q_len)
            if segment_ids is not None:
                ids = np.asarray(segment_ids)
                visible &= (ids[:, :, None] == ids[:, None, :])[:, None]
            p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
            if dropout_rate:
                keep = dropout_keep_mask(jnp.uint32(dropout_seed), batch, heads, q_len, k_len, dropout_rate)
                p = jnp.where(keep, p / (1 - dropout_rate), 0.0)
            return jnp.einsum("bhqk,bkhd->bqhd", p, v)

        @jax.jit  # one compile, not one per operation
        def value_and_vjp(q, k, v, w):
            out, vjp = jax.vjp(attend, q, k, v)
            return out, vjp(w)

        out, grads = value_and_vjp(*[jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, w)])
        return np.asarray(out), [np.asarray(g) for g in grads]


def value_and_grads(fn, q, k, v, w):
    """fn(q, k, v) and the gradients of the random-projection loss sum(fn(q, k, v) * w) w.r.t. q, k, v."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    out = jax.jit(fn)(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def assert_matches_float64(out, grads, ref_out, ref_grads, tol=F32_TOL):
    assert out.shape == ref_out.shape and [g.shape for g in grads] == [r.shape for r in ref_grads]
    errors = {"out": rel_err(out, ref_out)}
    errors.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    assert max(errors.values()) <= tol, errors


IMPLS = {
    "reference": functools.partial(reference_attention, causal=True),
    "blocked": functools.partial(blocked_causal_attention, block_q=16),  # 3 query blocks of 37
    "xla": functools.partial(kernels.attention, impl="xla"),
}


# ---------------------------------------------------------------------------
# Grouped-query attention
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_matches_float64(impl, group):
    """Groups of 1 (multi-head), 2, 4 and 8 (multi-query) query heads per K/V head: forward and gradients."""
    q, k, v, w = gqa_inputs(group, 2, 37, HEADS, HEADS // group, 16)
    out, grads = value_and_grads(IMPLS[impl], q, k, v, w)
    assert grads[1].shape == k.shape  # dK and dV of the KVH heads: each sums its group's contributions
    assert_matches_float64(out, grads, *attention_float64(q, k, v, w))


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_reference_non_causal_and_fewer_queries_than_keys(causal):
    """The reference's other shapes: no causal mask, and decoding after a prefix (queries bottom-right aligned)."""
    q, _, _, w = gqa_inputs(1, 2, 5, HEADS, 2, 16)
    _, k, v, _ = gqa_inputs(2, 2, 13, HEADS, 2, 16)
    out, grads = value_and_grads(functools.partial(reference_attention, causal=causal), q, k, v, w)
    assert_matches_float64(out, grads, *attention_float64(q, k, v, w, causal=causal))


@pytest.mark.parametrize("impl", ["reference", "blocked"])
def test_gqa_equals_attention_with_repeated_kv_dropout_included(impl):
    """GQA is multi-head attention over K/V repeated to every query head, dropout bits and gradients included
    (the keep bit of p[b, h, i, j] uses the query head h: with kv_heads == heads they are today's bits)."""
    q, k, v, w = gqa_inputs(3, 2, 40, HEADS, 2, 16)
    fn = functools.partial(IMPLS[impl], dropout_rate=0.3, dropout_seed=jnp.uint32(11))
    out, (dq, dk, dv) = value_and_grads(fn, q, k, v, w)
    repeat = lambda x: jnp.repeat(x, HEADS // 2, axis=2)
    full, (fdq, fdk, fdv) = value_and_grads(lambda q, k, v: fn(q, repeat(k), repeat(v)), q, k, v, w)
    np.testing.assert_allclose(out, full, rtol=1e-6, atol=1e-6)
    for a, b in ((dq, fdq), (dk, fdk), (dv, fdv)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "blocked"])
def test_gqa_dropout_keep_bits_are_the_query_heads(impl):
    """With V = identity the output rows are the dropped probabilities: 0 exactly where the shared mask of
    the query head (not the K/V head) drops."""
    batch, seq, kv_heads, rate, seed = 2, 32, 2, 0.3, 99
    q, k, _, _ = gqa_inputs(11, batch, seq, HEADS, kv_heads, seq)
    v = jnp.broadcast_to(jnp.eye(seq)[None, :, None, :], (batch, seq, kv_heads, seq))
    out = jax.jit(functools.partial(IMPLS[impl], dropout_rate=rate, dropout_seed=seed))(q, k, v)
    kept = np.asarray(out).transpose(0, 2, 1, 3) != 0.0  # [B, H, Tq, Tk]
    expected = np.array(dropout_keep_mask(seed, batch, HEADS, seq, seq, rate)) & np.tril(np.ones((seq, seq), bool))
    np.testing.assert_array_equal(kept, expected)


def test_kv_heads_that_do_not_divide_heads_are_refused():
    q, k, v, _ = gqa_inputs(0, 1, 8, 6, 4, 16)
    for impl in kernels.ATTENTION_IMPLS:
        with pytest.raises(ValueError, match=r"k and v have 4 heads, which does not divide the 6 query heads"):
            kernels.attention(q, k, v, impl=impl)
    with pytest.raises(ValueError, match="does not divide"):
        blocked_causal_attention(q, k, v)
    with pytest.raises(ValueError, match="does not divide"):
        cached_attention(q[:, :1], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), jnp.array([3]))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        reference_attention(q, k, v[:, :, :2])


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
def test_cached_attention_with_kv_heads_matches_float64(kv_heads):
    """The sampler's cache of KVH heads: prefill (queries 0..P-1) and one-token decoding at position p
    see slots 0..p, whatever is written past them."""
    q, k, v, w = gqa_inputs(4, 2, 12, HEADS, kv_heads, 16)
    cache = lambda x: x.transpose(0, 2, 1, 3)  # [B, KVH, S, D]
    prefill = cached_attention(q[:, :5], cache(k), cache(v), jnp.arange(5))
    ref, _ = attention_float64(q[:, :5], k[:, :5], v[:, :5], w[:, :5])
    assert rel_err(prefill, ref) <= F32_TOL
    for p in (0, 7, 11):
        step = jax.jit(cached_attention)(q[:, p:p + 1], cache(k), cache(v), jnp.array([p]))
        ref, _ = attention_float64(q[:, p:p + 1], k[:, :p + 1], v[:, :p + 1], w[:, p:p + 1])
        assert rel_err(step, ref) <= F32_TOL, p


# ---------------------------------------------------------------------------
# Segment ids (document masking)
# ---------------------------------------------------------------------------


def test_segments_helper_has_the_promised_documents():
    ids = segments(0, 3, 37)
    assert ids.shape == (3, 37) and ids.dtype == np.int32
    assert np.sum(ids[0] == ids[0, 3]) == 1  # a document of length 1
    assert len(set(ids[1])) == 1  # a row that is one document
    assert len(set(ids[2])) > 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", [1, 4])
def test_segments_match_float64(impl, group):
    q, k, v, w = gqa_inputs(5 + group, 3, 37, HEADS, HEADS // group, 16)
    ids = jnp.asarray(segments(group, 3, 37))
    out, grads = value_and_grads(functools.partial(IMPLS[impl], segment_ids=ids), q, k, v, w)
    assert_matches_float64(out, grads, *attention_float64(q, k, v, w, segment_ids=ids))


def test_segments_without_causal_mask_match_float64():
    q, k, v, w = gqa_inputs(6, 3, 37, HEADS, 2, 16)
    ids = jnp.asarray(segments(6, 3, 37))
    fn = functools.partial(reference_attention, causal=False, segment_ids=ids)
    out, grads = value_and_grads(fn, q, k, v, w)
    assert_matches_float64(out, grads, *attention_float64(q, k, v, w, causal=False, segment_ids=ids))


def causal_attention_numpy(q, k, v) -> np.ndarray:
    """Causal attention of one sequence in float64 NumPy: q [T, H, D], k and v [T, KV, D] -> [T, H, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = (np.repeat(x, q.shape[1] // x.shape[1], axis=1) for x in (k, v))  # head h -> kv head h // G
    s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones(s.shape[1:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("impl", IMPLS)
def test_segments_equal_each_document_attended_alone(impl):
    """The definition itself: each document's rows are attention over that document alone, and a
    one-token document's output is its own value."""
    q, k, v, _ = gqa_inputs(7, 3, 37, HEADS, 2, 16)
    ids = segments(7, 3, 37)
    out = np.asarray(jax.jit(functools.partial(IMPLS[impl], segment_ids=jnp.asarray(ids)))(q, k, v))
    for b in range(3):
        for doc in np.unique(ids[b]):
            rows = np.flatnonzero(ids[b] == doc)
            s = slice(rows[0], rows[-1] + 1)
            alone = causal_attention_numpy(q[b, s], k[b, s], v[b, s])
            np.testing.assert_allclose(out[b, s], alone, rtol=1e-5, atol=1e-5)
    one = int(np.flatnonzero(ids[0] == ids[0, 3])[0])
    np.testing.assert_allclose(out[0, one], np.repeat(np.asarray(v[0, one]), HEADS // 2, axis=0), rtol=1e-6)


def test_bad_segment_ids_are_refused():
    q, k, v, _ = gqa_inputs(0, 2, 8, 4, 2, 16)
    with pytest.raises(ValueError, match=r"segment_ids .* need shape \[B, T\] = \(2, 8\)"):
        kernels.attention(q, k, v, segment_ids=jnp.zeros((2, 7), jnp.int32))
    with pytest.raises(ValueError, match="q and k of the same length"):
        reference_attention(q[:, :3], k, v, segment_ids=jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="must be integers"):
        reference_attention(q, k, v, segment_ids=jnp.zeros((2, 8), jnp.float32))


def test_rows_without_a_visible_key_are_zero_not_nan():
    """More queries than keys under the bottom-right causal mask: the first rows see no key. The reference
    gives them zeros, with finite gradients (a plain -inf softmax gives NaN)."""
    q, _, _, w = gqa_inputs(8, 1, 9, 4, 2, 16)
    _, k, v, _ = gqa_inputs(9, 1, 4, 4, 2, 16)
    out, grads = value_and_grads(reference_attention, q, k, v, w)
    assert np.all(np.asarray(out[:, :5]) == 0.0) and all(np.isfinite(np.asarray(g)).all() for g in grads)
    ref, ref_grads = attention_float64(q[:, 5:], k, v, w[:, 5:])
    assert rel_err(out[:, 5:], ref) <= F32_TOL and rel_err(grads[1], ref_grads[1]) <= F32_TOL


# ---------------------------------------------------------------------------
# Both, with dropout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seq,block_q", [(37, 16), (64, 64), (50, 8)])
def test_gqa_segments_dropout_blocked_equals_reference_and_float64(seq, block_q):
    """GQA + segments + dropout: the blocked path draws the reference's dropout bits (identical outputs up
    to rounding) and both match float64 with the same keep mask."""
    q, k, v, w = gqa_inputs(seq, 3, seq, HEADS, 2, 16)
    ids = jnp.asarray(segments(seq, 3, seq))
    common = dict(dropout_rate=0.25, dropout_seed=jnp.uint32(21), segment_ids=ids)
    ref_out, ref_grads = value_and_grads(functools.partial(reference_attention, **common), q, k, v, w)
    out, grads = value_and_grads(functools.partial(blocked_causal_attention, block_q=block_q, **common), q, k, v, w)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    f64 = attention_float64(q, k, v, w, segment_ids=ids, dropout_rate=0.25, dropout_seed=21)
    assert_matches_float64(out, grads, *f64)
    assert_matches_float64(ref_out, ref_grads, *f64)


# ---------------------------------------------------------------------------
# The dispatcher: cuDNN's arguments, the chex cross-check
# ---------------------------------------------------------------------------


def test_cudnn_gets_the_kv_heads_and_a_segment_mask(monkeypatch):
    """cuDNN cannot run here: its call is intercepted, checked (K/V with their own heads, a boolean
    [B, 1, T, T] mask beside is_causal) and run by XLA's implementation instead."""
    real = jax.nn.dot_product_attention
    calls = []

    def fake(q, k, v, **kw):
        calls.append((q.shape, k.shape, kw["mask"].shape, kw["mask"].dtype, kw["is_causal"], kw["implementation"]))
        return real(q, k, v, **{**kw, "implementation": None})

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q, k, v, w = gqa_inputs(10, 3, 37, HEADS, 2, 16)
    ids = jnp.asarray(segments(10, 3, 37))
    out = kernels.attention(q, k, v, impl="cudnn", segment_ids=ids)  # float32: run in bfloat16
    assert calls == [((3, 37, HEADS, 16), (3, 37, 2, 16), (3, 1, 37, 37), jnp.bool_, True, "cudnn")]
    ref, _ = attention_float64(*(x.astype(jnp.bfloat16) for x in (q, k, v)), w, segment_ids=ids)
    assert out.dtype == jnp.float32 and rel_err(out, ref) <= 1e-2


def test_cross_check_passes_gqa_and_segments_to_both_paths():
    q, k, v, _ = gqa_inputs(12, 3, 37, HEADS, 2, 16)
    ids = jnp.asarray(segments(12, 3, 37))
    out = kernels.cross_checked_attention(q, k, v, layer="test", impl="blocked", segment_ids=ids,
                                          dropout_rate=0.1, dropout_seed=3)
    np.testing.assert_allclose(out, reference_attention(q, k, v, segment_ids=ids, dropout_rate=0.1,
                                                        dropout_seed=3), rtol=1e-5, atol=1e-6)
