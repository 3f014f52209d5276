"""Tests for the Pallas flash-attention kernel (kernels/flash_attention.py).

Numerics run the real kernel bodies in the Pallas interpreter on CPU and are
checked against `reference_attention` evaluated in float64. GPU (Triton) and
TPU (Mosaic) are checked by lowering from CPU. Every kernel call here uses
`_debug_poison=True`: each output buffer starts as NaN (aliased in place), so
an element no program writes stays NaN and fails the finiteness checks.

Relative error is max|a - ref| / max|ref| (absolute when ref is all zeros, as
dq and dk are for a length-1 sequence: softmax over one key is constant).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import pallas as pl

from haiku_gpt.kernels.dropout import dropout_keep_mask, element_keep_mask
from haiku_gpt.kernels.flash_attention import flash_attention, flash_attention_qkv
from haiku_gpt.kernels.reference import blocked_causal_attention, reference_attention, split_qkv

import haiku_gpt.kernels.flash_attention as fa  # noqa: E402 (the module, for its internals)

F32_TOL = 1e-5
BF16_TOL = 2e-2


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def rel_err(a, ref) -> float:
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    scale = np.max(np.abs(ref))
    err = np.max(np.abs(a - ref))
    return float(err / scale) if scale > 0 else float(err)


def random_inputs(seed, batch, seq, heads, head_dim, dtype=jnp.float32):
    """q, k, v and a cotangent dO, all standard normal (never all zero)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    shape = (batch, seq, heads, head_dim)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


@functools.partial(jax.jit, static_argnames=("causal", "dropout_rate", "block_q", "block_k",
                                             "streamed"))
def flash_value_and_vjp(q, k, v, do, seed, *, causal, dropout_rate, block_q=None, block_k=None,
                        streamed=False):
    """O and (dQ, dK, dV) for cotangent dO, all through the kernel, poisoned outputs.

    `streamed=True` interprets the TPU kernels (K/V streamed through the grid,
    scratch accumulators) instead of the GPU ones (a loop inside each program).
    """
    fn = functools.partial(flash_attention, causal=causal, dropout_rate=dropout_rate,
                           dropout_seed=seed, block_q=block_q, block_k=block_k,
                           _debug_poison=True, _streamed=streamed)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)


@functools.partial(jax.jit, static_argnames=("causal", "dropout_rate"))
def reference_value_and_vjp(q, k, v, do, seed, *, causal, dropout_rate):
    fn = functools.partial(reference_attention, causal=causal, dropout_rate=dropout_rate,
                           dropout_seed=seed)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)


def reference_float64(q, k, v, do, seed, *, causal, dropout_rate):
    """The reference forward and VJP in float64 (x64 switched on only in here)."""
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, do)]
        out, grads = reference_value_and_vjp(*args, jnp.uint32(seed), causal=causal,
                                             dropout_rate=dropout_rate)
        return np.asarray(out), [np.asarray(g) for g in grads]


def assert_finite(*arrays):
    for a in arrays:
        a = np.asarray(a, np.float32)
        assert np.all(np.isfinite(a)), f"{np.sum(~np.isfinite(a))} non-finite elements"


def check_against_float64(batch, seq, heads, head_dim, *, causal, dropout_rate, dtype,
                          block_q=None, block_k=None, seed=0, streamed=False):
    q, k, v, do = random_inputs(seed, batch, seq, heads, head_dim, dtype)
    dropout_seed = jnp.uint32(1234 + seed)
    out, grads = flash_value_and_vjp(q, k, v, do, dropout_seed, causal=causal,
                                     dropout_rate=dropout_rate, block_q=block_q, block_k=block_k,
                                     streamed=streamed)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert out.shape == q.shape and all(g.shape == q.shape for g in grads)
    assert_finite(out, *grads)
    ref_out, ref_grads = reference_float64(q, k, v, do, 1234 + seed, causal=causal,
                                           dropout_rate=dropout_rate)
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    errors = {"out": rel_err(out, ref_out)}
    errors.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    assert max(errors.values()) <= tol, errors


# ---------------------------------------------------------------------------
# Forward and gradients against float64
# ---------------------------------------------------------------------------

# (batch, seq, heads, head_dim, causal, dropout_rate, block_q, block_k)
F32_CASES = [
    (1, 1, 1, 16, True, 0.0, None, None),  # one key: row 0 sees only itself
    (1, 1, 2, 40, False, 0.3, None, None),
    (2, 7, 3, 40, True, 0.0, None, None),
    (1, 7, 2, 16, False, 0.0, None, None),
    (2, 100, 2, 64, True, 0.0, 16, 16),  # many blocks, padded tail
    (1, 100, 1, 80, False, 0.0, 32, 16),  # block_q > block_k
    (1, 129, 2, 96, True, 0.0, 16, 64),  # block_q < block_k
    (2, 129, 1, 128, False, 0.0, None, None),  # default blocks: 2 key blocks
    (1, 64, 1, 256, True, 0.0, 32, 32),
    (3, 33, 2, 32, True, 0.1, 16, 16),
    (1, 129, 2, 40, False, 0.2, 32, 32),
    (2, 100, 2, 64, True, 0.5, 32, 16),
]

BF16_CASES = [
    (2, 100, 2, 64, True, 0.0, 32, 32),
    (1, 129, 2, 80, False, 0.1, None, None),
    (1, 7, 1, 256, True, 0.0, None, None),
    (2, 50, 2, 40, True, 0.2, 16, 32),
]


@pytest.mark.parametrize("batch,seq,heads,head_dim,causal,rate,block_q,block_k", F32_CASES)
def test_float32_matches_float64_reference(batch, seq, heads, head_dim, causal, rate, block_q,
                                           block_k):
    check_against_float64(batch, seq, heads, head_dim, causal=causal, dropout_rate=rate,
                          dtype=jnp.float32, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize("batch,seq,heads,head_dim,causal,rate,block_q,block_k", BF16_CASES)
def test_bfloat16_matches_float64_reference(batch, seq, heads, head_dim, causal, rate, block_q,
                                            block_k):
    check_against_float64(batch, seq, heads, head_dim, causal=causal, dropout_rate=rate,
                          dtype=jnp.bfloat16, block_q=block_q, block_k=block_k)


# The TPU kernel family (streamed through the grid) on the cases that exercise
# its index-map clamping: one block, padded tails, unequal blocks, dropout.
STREAMED_CASES = [F32_CASES[i] for i in (0, 2, 4, 5, 6, 9, 11)] + [
    (1, 300, 1, 64, True, 0.1, 64, 16),  # many key blocks above the diagonal
]


@pytest.mark.parametrize("batch,seq,heads,head_dim,causal,rate,block_q,block_k", STREAMED_CASES)
def test_streamed_float32_matches_float64_reference(batch, seq, heads, head_dim, causal, rate,
                                                    block_q, block_k):
    check_against_float64(batch, seq, heads, head_dim, causal=causal, dropout_rate=rate,
                          dtype=jnp.float32, block_q=block_q, block_k=block_k, streamed=True)


@pytest.mark.parametrize("batch,seq,heads,head_dim,causal,rate,block_q,block_k", BF16_CASES[2:])
def test_streamed_bfloat16_matches_float64_reference(batch, seq, heads, head_dim, causal, rate,
                                                     block_q, block_k):
    check_against_float64(batch, seq, heads, head_dim, causal=causal, dropout_rate=rate,
                          dtype=jnp.bfloat16, block_q=block_q, block_k=block_k, streamed=True)


def test_forward_long_sequence():
    """seq 1000 with default blocks: 8 key blocks, 24 padded rows, causal skipping."""
    q, k, v, _ = random_inputs(7, 1, 1000, 2, 32)
    out = jax.jit(functools.partial(flash_attention, _debug_poison=True))(q, k, v)
    assert_finite(out)
    with jax.enable_x64(True):
        ref = reference_attention(*(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)))
        ref = np.asarray(ref)
    assert rel_err(out, ref) <= F32_TOL


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2),
    seq=st.integers(1, 70),
    heads=st.integers(1, 2),
    head_dim=st.sampled_from([16, 24, 40, 64]),
    causal=st.booleans(),
    rate=st.sampled_from([0.0, 0.25]),
    blocks=st.sampled_from([(16, 16), (16, 32), (32, 16), (None, None)]),
)
def test_property_random_shapes(batch, seq, heads, head_dim, causal, rate, blocks):
    check_against_float64(batch, seq, heads, head_dim, causal=causal, dropout_rate=rate,
                          dtype=jnp.float32, block_q=blocks[0], block_k=blocks[1], seed=seq)


# ---------------------------------------------------------------------------
# Robustness: NaN/Inf, poisoning, causal block skipping
# ---------------------------------------------------------------------------


def test_no_nan_with_large_scores_and_single_visible_key():
    """Scores of magnitude ~1e3: the online softmax must not overflow, row 0 must be v[0]."""
    q, k, v, do = random_inputs(3, 2, 40, 2, 16)
    q, k = 30.0 * q, 30.0 * k
    out, grads = flash_value_and_vjp(q, k, v, do, jnp.uint32(0), causal=True, dropout_rate=0.0,
                                     block_q=16, block_k=16)
    assert_finite(out, *grads)
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-6)  # the only visible key
    # Scores of ~1e3 carry float32 rounding of ~1e-4 in the exponent whatever
    # the algorithm (the float32 reference shows the same), hence the looser bound.
    ref_out, ref_grads = reference_float64(q, k, v, do, 0, causal=True, dropout_rate=0.0)
    assert rel_err(out, ref_out) <= 1e-3
    assert rel_err(grads[2], ref_grads[2]) <= 1e-3


def test_poison_catches_unwritten_output():
    """The poisoning is honest: a kernel that skips a block leaves NaN behind."""
    opts = fa._Options(causal=True, sm_scale=1.0, dropout_rate=0.0, block_q=None, block_k=None,
                       interpret=True, debug_poison=True)

    def lazy_kernel(seed_ref, x_ref, o_ref):
        @pl.when(pl.program_id(2) == 0)  # "forgets" every block but the first
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((1, 1, 16, 16), jnp.float32)
    spec = fa._Specs(heads_major=True).rows(8, 16)  # x is [B, H, T, D]
    (out,) = jax.jit(lambda x: fa._pallas(
        fa._INTERPRET, opts, lazy_kernel, name="lazy", grid=(1, 1, 2), sizes=fa.BlockSizes(8, 8),
        in_specs=[spec], out_specs=[spec], out_shapes=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
        seed=jnp.zeros((1,), jnp.uint32), inputs=[x]))(x)
    assert np.all(np.asarray(out[:, :, :8]) == 1.0)
    assert np.all(np.isnan(np.asarray(out[:, :, 8:])))


@pytest.mark.parametrize("streamed", [False, True])
def test_causal_blocks_above_diagonal_are_skipped(streamed):
    """NaN in future keys' V cannot reach earlier rows unless those blocks are visited.

    Masking alone would not save them: a masked probability is 0 and 0 * NaN = NaN.
    """
    attention = functools.partial(flash_attention, block_q=16, block_k=16, _streamed=streamed)
    q, k, v, do = random_inputs(5, 1, 64, 1, 16)
    v = v.at[:, 16:].set(jnp.nan)  # key blocks 1..3 (block_k = 16) poisoned
    out = jax.jit(attention)(q, k, v)
    assert_finite(out[:, :16])  # query block 0 reads key block 0 only
    assert np.all(np.isnan(np.asarray(out[:, 16:])))  # sanity: later rows do see NaN

    def loss(q):
        return jnp.sum(attention(q, k, v)[:, :16] * do[:, :16])

    dq = jax.jit(jax.grad(loss))(q)
    assert_finite(dq[:, :16])  # the dQ pass skips the same blocks


@pytest.mark.parametrize("streamed", [False, True])
def test_dkdv_pass_skips_query_blocks_above_the_diagonal(streamed):
    """NaN in the first query block reaches dK/dV of later key blocks only if visited.

    Key block j (block 16) is seen by query rows >= 16 j: with the rows of query
    block 0 poisoned, dK and dV of key blocks 1..3 stay finite only when the
    dK/dV pass starts each key block at its diagonal.
    """
    attention = functools.partial(flash_attention, block_q=16, block_k=16, _streamed=streamed)
    q, k, v, do = random_inputs(6, 1, 64, 1, 16)
    q = q.at[:, :16].set(jnp.nan)
    _, vjp = jax.vjp(attention, q, k, v)
    _, dk, dv = jax.jit(vjp)(do)
    assert_finite(dk[:, 16:], dv[:, 16:])
    assert np.all(np.isnan(np.asarray(dk[:, :16])))  # sanity: key block 0 does see the NaN


# ---------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_dropout_keep_bits_identical_to_reference_mask(causal):
    """With V = identity, output rows are the dropped probabilities: 0 exactly where dropped."""
    batch, seq, heads, rate, seed = 2, 32, 2, 0.3, 99
    q, k, _, _ = random_inputs(11, batch, seq, heads, seq)
    v = jnp.broadcast_to(jnp.eye(seq)[None, :, None, :], (batch, seq, heads, seq))
    out = jax.jit(functools.partial(flash_attention, causal=causal, dropout_rate=rate,
                                    dropout_seed=seed, block_q=16, block_k=16,
                                    _debug_poison=True))(q, k, v)
    kept = np.asarray(out).transpose(0, 2, 1, 3) != 0.0  # [B, H, Tq, Tk]
    expected = np.array(dropout_keep_mask(seed, batch, heads, seq, seq, rate))
    if causal:
        expected &= np.tril(np.ones((seq, seq), bool))
    np.testing.assert_array_equal(kept, expected)


@pytest.mark.parametrize("causal", [True, False])
def test_dropout_matches_reference_same_seed(causal):
    q, k, v, do = random_inputs(2, 2, 48, 2, 32)
    seed = jnp.int32(7)
    out, grads = flash_value_and_vjp(q, k, v, do, seed, causal=causal, dropout_rate=0.25,
                                     block_q=16, block_k=32)
    ref_out, ref_grads = reference_value_and_vjp(q, k, v, do, seed, causal=causal,
                                                 dropout_rate=0.25)
    assert rel_err(out, ref_out) <= F32_TOL
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= F32_TOL


def test_dropout_seed_changes_output_and_rate_zero_is_no_dropout():
    q, k, v, do = random_inputs(4, 1, 32, 2, 16)
    run = lambda seed, rate: flash_value_and_vjp(q, k, v, do, jnp.uint32(seed), causal=True,
                                                 dropout_rate=rate)[0]
    a, b = run(1, 0.2), run(2, 0.2)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(run(1, 0.2), a)  # deterministic per seed
    plain = jax.jit(flash_attention)(q, k, v)
    np.testing.assert_array_equal(run(1, 0.0), plain)
    np.testing.assert_array_equal(run(2, 0.0), plain)


def test_dropout_rate_zero_traces_no_hash():
    """rate == 0 is a Python branch: the kernels contain no hash arithmetic at all."""
    q, k, v, _ = random_inputs(0, 1, 16, 1, 16)

    def jaxpr_text(rate):
        fn = lambda q, k, v: jnp.sum(flash_attention(q, k, v, dropout_rate=rate, dropout_seed=3,
                                                     interpret=True))
        return str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(q, k, v))

    assert "shift_right_logical" not in jaxpr_text(0.0)
    assert "shift_right_logical" in jaxpr_text(0.1)


# ---------------------------------------------------------------------------
# API: fall-back, guards
# ---------------------------------------------------------------------------


def attention_float64(q, k, v, causal: bool) -> np.ndarray:
    """Softmax attention in numpy float64, causal mask bottom-right aligned: with q_len < kv_len,
    query i sits at position kv_len - q_len + i (decoding with a cached prefix)."""
    q, k, v = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, D]
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    if causal:
        q_len, kv_len = s.shape[-2:]
        visible = np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + (kv_len - q_len)
        s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True) @ v).transpose(0, 2, 1, 3)


def test_decode_with_a_cached_prefix_is_bottom_right_aligned():
    """Fewer queries than keys (KV-cached decoding): each query sees the prefix and itself."""
    q, _, _, _ = random_inputs(8, 2, 3, 2, 16)
    _, k, v, _ = random_inputs(9, 2, 11, 2, 16)
    for causal in (True, False):
        out = flash_attention(q, k, v, causal=causal)
        assert rel_err(out, attention_float64(q, k, v, causal)) <= F32_TOL, causal


def test_input_guards():
    x = jnp.zeros((2, 8, 2, 16))
    with pytest.raises(AssertionError):
        flash_attention(x[0], x[0], x[0])  # rank 3
    with pytest.raises(AssertionError):
        flash_attention(x, x[..., :8], x[..., :8])  # head_dim mismatch
    with pytest.raises(AssertionError):
        flash_attention(x, x.astype(jnp.bfloat16), x)  # dtype mismatch
    with pytest.raises(ValueError):
        flash_attention(x, x, x, dropout_rate=0.1)  # no seed
    with pytest.raises(ValueError):
        flash_attention(x, x, x, dropout_rate=1.0, dropout_seed=0)
    with pytest.raises(ValueError):
        flash_attention(x, x, x, block_q=12)


# ---------------------------------------------------------------------------
# Lowering for GPU (Triton) and TPU (Mosaic) from a CPU-only machine
# ---------------------------------------------------------------------------

# The custom call each platform's compiled kernel lowers to: seeing it proves
# the real kernel was lowered (not the interpreter's XLA loop).
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype,rate", [(jnp.float32, 0.0), (jnp.bfloat16, 0.1)])
def test_lowers_for_accelerators(platform, dtype, rate):
    # Odd seq and head_dim exercise the padding: Tp = 192 (GPU) / 256 (TPU), Dp = 64.
    x = jnp.zeros((2, 129, 3, 40), dtype)
    fwd = lambda q, k, v: flash_attention(q, k, v, dropout_rate=rate, dropout_seed=jnp.uint32(5))
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
    grad = jax.grad(loss, argnums=(0, 1, 2))
    for fn, expected_calls in ((fwd, 1), (grad, 4)):  # forward; forward + delta + dK/dV + dQ
        text = jax.jit(fn).trace(x, x, x).lower(lowering_platforms=(platform,)).as_text()
        assert text.count(KERNEL_CALL[platform]) >= expected_calls, platform


def test_interpret_false_has_no_cpu_kernel():
    x = jnp.zeros((1, 16, 1, 16))
    with pytest.raises(NotImplementedError, match=r"platform_index\(platforms=\(\('cuda',\), \('rocm',\), \('tpu',\)\)\).*cpu"):
        jax.jit(functools.partial(flash_attention, interpret=False)).lower(x, x, x)


# ---------------------------------------------------------------------------
# Memory: linear for the kernel, quadratic for the reference
# ---------------------------------------------------------------------------


# batch 2, heads 2, head_dim 64. (With batch 1, heads 2, XLA:CPU happens to
# reuse buffers for the reference at T=2048 only: 49 MB -> 130 MB, ratio 2.65,
# though still quadratic from 2048 to 4096: 3.97.)
MEMORY_SHAPE = (2, 2, 64)


def temp_bytes(attention, seq):
    batch, heads, head_dim = MEMORY_SHAPE
    x = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.float32)
    loss = lambda q, k, v: jnp.sum(attention(q, k, v))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_is_linear_in_sequence_length():
    table = {}
    for name, attention in (("flash_attention", flash_attention),
                            ("reference_attention", reference_attention)):
        table[name] = {seq: temp_bytes(attention, seq) for seq in (1024, 2048)}
    print("\nfwd+bwd temp bytes (batch, heads, head_dim = %s, float32, CPU)" % (MEMORY_SHAPE,))
    print(f"{'impl':<22}{'T=1024':>14}{'T=2048':>14}{'ratio':>8}")
    for name, row in table.items():
        print(f"{name:<22}{row[1024]:>14,}{row[2048]:>14,}{row[2048] / row[1024]:>8.2f}")
    flash, ref = table["flash_attention"], table["reference_attention"]
    assert flash[2048] / flash[1024] <= 2.5
    assert ref[2048] / ref[1024] >= 3.0


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_attention_dropout_mask_rate_and_independence_across_batch_head_query_key(rate):
    """The (seed, b, h, i, j) hash every attention path shares: kept fraction ~ 1 - rate, and no
    correlation between neighbours along any of the four axes (a weak mix of one index shows up)."""
    keep = np.asarray(dropout_keep_mask(jnp.uint32(5), 4, 4, 64, 64, rate))  # [B, H, Tq, Tk]
    n = keep.size
    assert abs(keep.mean() - (1 - rate)) < 4 * math.sqrt(rate * (1 - rate) / n)
    for axis in range(4):
        a, b = np.moveaxis(keep, axis, 0)[:-1], np.moveaxis(keep, axis, 0)[1:]
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.03, axis
    # Whole slices of one batch row / head are unrelated to another's, not shifted copies.
    agree = 1 - 2 * rate * (1 - rate)  # chance that two independent bits agree
    for other in (keep[1, 0], keep[0, 1], np.roll(keep[0, 0], 1, axis=0), np.roll(keep[0, 0], 1, axis=1)):
        assert abs((other == keep[0, 0]).mean() - agree) < 0.03


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_element_dropout_mask_rate_independence_and_determinism(rate):
    """The model's activation dropout: kept fraction ~ 1 - rate, no structure, same seed same bits."""
    shape = (64, 3, 384)
    keep = np.asarray(element_keep_mask(jnp.uint32(11), shape, rate))
    n = keep.size
    assert abs(keep.mean() - (1 - rate)) < 4 * math.sqrt(rate * (1 - rate) / n)
    # neighbours along every axis are uncorrelated (a bad hash of the flat index shows up here)
    for axis in range(3):
        a, b = np.moveaxis(keep, axis, 0)[:-1], np.moveaxis(keep, axis, 0)[1:]
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02
    np.testing.assert_array_equal(element_keep_mask(jnp.uint32(11), shape, rate), keep)
    other = np.asarray(element_keep_mask(jnp.uint32(12), shape, rate))
    assert (other != keep).mean() > 0.5 * 2 * rate * (1 - rate)


@pytest.mark.parametrize("seq,block_q", [(48, 16), (50, 16), (64, 64), (40, 64)])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_blocked_causal_attention_equals_reference(seq, block_q, rate):
    """Query blocks over their visible keys: the reference's numbers, dropout bits and gradients."""
    q, k, v, do = random_inputs(3, 2, seq, 2, 16)
    seed = jnp.uint32(5)

    def value_and_vjp(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, dropout_rate=rate, dropout_seed=seed), q, k, v)
        return out, vjp(do)

    out, grads = jax.jit(lambda: value_and_vjp(
        functools.partial(blocked_causal_attention, block_q=block_q)))()
    ref_out, ref_grads = jax.jit(lambda: value_and_vjp(
        functools.partial(reference_attention, causal=True)))()
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Under a device mesh: shard_map over the batch, global dropout bits
# ---------------------------------------------------------------------------

SHARDED_SCRIPT = r'''
import functools, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
from haiku_gpt.kernels.flash_attention import flash_attention, flash_attention_qkv

mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
keys = jax.random.split(jax.random.PRNGKey(0), 4)
q, k, v, do = (jax.random.normal(key, (8, 40, 2, 16)) for key in keys)
attention = functools.partial(flash_attention, dropout_rate=0.3, dropout_seed=7, block_q=16, block_k=16)

def value_and_grads(q, k, v):
    out, vjp = jax.vjp(attention, q, k, v)
    return out, vjp(do)

def under_mesh(q, k, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return value_and_grads(q, k, v)

rows = NamedSharding(mesh, P("data"))
sharded = jax.jit(under_mesh, in_shardings=(rows, rows, rows))
text = sharded.lower(q, k, v).as_text()
assert "shard_map" in text or "sdy.manual_computation" in text, "no shard_map in the lowered step"
one = jax.jit(value_and_grads)(q, k, v)
many = sharded(q, k, v)
for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)

# The fused form (q, k, v read out of one [B, T, H + 2 KVH, D] array): one operand, one gradient.
qkv = jax.random.normal(keys[0], (8, 32, 2 + 2 * 1, 16))
fused = functools.partial(flash_attention_qkv, kv_heads=1, dropout_rate=0.3, dropout_seed=7, block_q=16, block_k=16)
fused_grads = lambda qkv: jax.vjp(fused, qkv)[1](do[:, :32])

def fused_under_mesh(qkv):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return fused(qkv), fused_grads(qkv)

one = jax.jit(lambda qkv: (fused(qkv), fused_grads(qkv)))(qkv)
many = jax.jit(fused_under_mesh, in_shardings=(rows,))(qkv)
for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
print("SHARDED OK")
'''


def test_under_a_mesh_each_device_runs_its_batch_rows_with_global_dropout_bits(tmp_path):
    """XLA cannot partition a Pallas call: under a 4-device mesh the kernel is shard_mapped
    over the batch, and output and gradients (dropout included) equal one device's; also for
    flash_attention_qkv's one fused operand."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    environ = __import__("os").environ
    env = {**environ, "XLA_FLAGS": environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(script), str(Path(__file__).resolve().parents[1])],
                            capture_output=True, text=True, env=env, timeout=600)
    assert "SHARDED OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------
# Grouped-query attention and segment ids (document masking) in the kernel
#
# flash_attention(q [B, T, H, D], k, v [B, T, KVH, D], ..., segment_ids [B, T] | None): query head h
# uses K/V head h // (H // KVH); a query sees only keys of its own segment (with the causal mask).
# Checked against tests/test_attention_masks.py's float64 definition (K/V repeated, masks spelled
# out, dropout by the shared keep mask of the query head), in both interpreted kernel families.
# ---------------------------------------------------------------------------

from tests.test_attention_masks import attention_float64 as masked_attention_float64  # noqa: E402
from tests.test_attention_masks import gqa_inputs, segments  # noqa: E402

MASKED_TOL = 2e-5  # dK/dV of a K/V head sum over its query heads: a little more float32 rounding


def flash_value_and_grads(q, k, v, w, *, streamed=False, **kwargs):
    """The kernel's output and the gradients of sum(out * w) w.r.t. q, k, v (interpreted on CPU)."""
    fn = functools.partial(flash_attention, block_q=16, block_k=16, _debug_poison=True, _streamed=streamed,
                           **kwargs)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def assert_flash_matches_float64(out, grads, q, k, v, *, dtype=jnp.float32, **kwargs):
    assert out.dtype == dtype and out.shape == q.shape
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert_finite(out, *grads)
    ref_out, ref_grads = masked_attention_float64(q, k, v, kwargs.pop("w"), **kwargs)
    errors = {"out": rel_err(out, ref_out)}
    errors.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    assert max(errors.values()) <= (MASKED_TOL if dtype == jnp.float32 else BF16_TOL), errors


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_flash_gqa_matches_float64(group, streamed):
    """8 query heads over 8, 4, 2 and 1 K/V heads; seq 37 in blocks of 16 (a padded tail)."""
    q, k, v, w = gqa_inputs(group, 2, 37, 8, 8 // group, 16)
    out, grads = flash_value_and_grads(q, k, v, w, streamed=streamed)
    assert_flash_matches_float64(out, grads, q, k, v, w=w)


@pytest.mark.parametrize("causal,rate", [(False, 0.0), (True, 0.25), (False, 0.25)])
def test_flash_gqa_non_causal_and_dropout_match_float64(causal, rate):
    q, k, v, w = gqa_inputs(3, 2, 40, 8, 2, 16)
    out, grads = flash_value_and_grads(q, k, v, w, causal=causal, dropout_rate=rate, dropout_seed=jnp.uint32(5))
    assert_flash_matches_float64(out, grads, q, k, v, w=w, causal=causal, dropout_rate=rate, dropout_seed=5)


def test_flash_gqa_bfloat16_matches_float64():
    q, k, v, w = gqa_inputs(4, 2, 50, 4, 1, 64, dtype=jnp.bfloat16)
    out, grads = flash_value_and_grads(q, k, v, w.astype(jnp.float32))
    assert_flash_matches_float64(out, grads, q, k, v, w=w, dtype=jnp.bfloat16)


def test_flash_gqa_dropout_keep_bits_are_the_query_heads():
    """V = identity: the output rows are the dropped probabilities, 0 exactly where the query head's bits drop."""
    batch, seq, heads, kv_heads, rate, seed = 2, 32, 4, 2, 0.3, 99
    q, k, _, _ = gqa_inputs(11, batch, seq, heads, kv_heads, seq)
    v = jnp.broadcast_to(jnp.eye(seq)[None, :, None, :], (batch, seq, kv_heads, seq))
    out = jax.jit(functools.partial(flash_attention, dropout_rate=rate, dropout_seed=seed, block_q=16,
                                    block_k=16, _debug_poison=True))(q, k, v)
    kept = np.asarray(out).transpose(0, 2, 1, 3) != 0.0  # [B, H, Tq, Tk]
    expected = np.array(dropout_keep_mask(seed, batch, heads, seq, seq, rate)) & np.tril(np.ones((seq, seq), bool))
    np.testing.assert_array_equal(kept, expected)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_segments_match_float64(causal, streamed):
    """Random document lengths (a one-token document in row 0, row 1 one document), blocks of 16 over 37."""
    q, k, v, w = gqa_inputs(6, 3, 37, 4, 4, 16)
    ids = jnp.asarray(segments(6, 3, 37))
    out, grads = flash_value_and_grads(q, k, v, w, causal=causal, segment_ids=ids, streamed=streamed)
    assert_flash_matches_float64(out, grads, q, k, v, w=w, causal=causal, segment_ids=ids)


def test_flash_segments_skip_nothing_they_need_and_stay_finite():
    """Documents ending exactly on block edges and a long one spanning blocks; large scores."""
    q, k, v, w = gqa_inputs(7, 2, 64, 2, 2, 16)
    q, k = 20.0 * q, 20.0 * k
    ids = jnp.asarray(np.stack([np.repeat([0, 1, 2], [16, 32, 16]), np.repeat([0, 1], [1, 63])]).astype(np.int32))
    out, grads = flash_value_and_grads(q, k, v, w, segment_ids=ids)
    assert_finite(out, *grads)
    ref_out, ref_grads = masked_attention_float64(q, k, v, w, segment_ids=ids)
    assert rel_err(out, ref_out) <= 1e-3 and rel_err(grads[2], ref_grads[2]) <= 1e-3


@pytest.mark.parametrize("streamed", [False, True])
def test_flash_segments_with_gqa_and_dropout_match_float64(streamed):
    q, k, v, w = gqa_inputs(8, 3, 45, 8, 2, 16)
    ids = jnp.asarray(segments(8, 3, 45))
    out, grads = flash_value_and_grads(q, k, v, w, segment_ids=ids, dropout_rate=0.2, dropout_seed=jnp.uint32(9),
                                       streamed=streamed)
    assert_flash_matches_float64(out, grads, q, k, v, w=w, segment_ids=ids, dropout_rate=0.2, dropout_seed=9)


def test_flash_segments_through_the_dispatcher_match_the_reference():
    """attention(impl='pallas', segment_ids=..., GQA K/V) is the kernel; it agrees with the reference path."""
    from haiku_gpt import kernels  # noqa: PLC0415

    q, k, v, _ = gqa_inputs(9, 2, 40, 4, 2, 16)
    ids = jnp.asarray(segments(9, 2, 40))
    out = jax.jit(functools.partial(kernels.attention, impl="pallas", segment_ids=ids))(q, k, v)
    ref = reference_attention(q, k, v, segment_ids=ids)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("seq,heads,kv_heads,streamed,segmented", [
    (64, 4, 4, False, False),  # read in place (token-major, nothing to pad), d(qkv) written in place
    (64, 4, 4, False, True),  # the same with documents
    (64, 4, 2, False, True),  # read in place, grouped K/V heads (dK, dV summed, then concatenated)
    (37, 4, 1, False, False),  # a padded tail: sliced first
    (64, 4, 2, True, True),  # the TPU kernels (heads-major): sliced first
])
def test_fused_qkv_equals_the_kernel_on_its_slices(seq, heads, kv_heads, streamed, segmented):
    """flash_attention_qkv reads q, k and v out of one [B, T, H + 2 KVH, D] array (the model's c_attn output):
    in place where the kernels' layout allows, else from slices; with one K/V head per query head it writes
    d(qkv) in place too. Output and d(qkv) are flash_attention's on the slices, bit for bit (dropout on), and
    every element of d(qkv) is written (the outputs start as NaN)."""
    batch, head_dim = 2, 16
    qkv = jax.random.normal(jax.random.PRNGKey(seq + kv_heads), (batch, seq, heads + 2 * kv_heads, head_dim))
    w = jax.random.normal(jax.random.PRNGKey(1), (batch, seq, heads, head_dim))
    ids = jnp.asarray(segments(3, batch, seq)) if segmented else None
    options = dict(dropout_rate=0.2, dropout_seed=jnp.uint32(4), segment_ids=ids, block_q=16, block_k=16,
                   _debug_poison=True, _streamed=streamed)
    fused = lambda qkv: flash_attention_qkv(qkv, kv_heads, **options)
    sliced = lambda qkv: flash_attention(*split_qkv(qkv, kv_heads), **options)
    results = [jax.jit(lambda qkv: jax.value_and_grad(lambda x: jnp.sum(f(x) * w))(qkv))(qkv) for f in (fused, sliced)]
    (loss, grads), (ref_loss, ref_grads) = results
    assert grads.shape == qkv.shape
    assert_finite(grads)
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(ref_loss))
    np.testing.assert_array_equal(np.asarray(grads), np.asarray(ref_grads))
