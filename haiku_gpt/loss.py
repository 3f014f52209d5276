"""The language-model loss: a chunked (fused) lm_head + cross-entropy that never holds the full logits.

Shape glossary:
  N: tokens (B * T, flattened)   C: n_embd   V: vocabulary (embedding rows)
  n: tokens per chunk            K: chunks = N / n

The tied lm_head's logits are [N, V]: for GPT-2 at batch 16 x 1024 that is 16384 x 50304, 3.3 GB in
float32, and the plain path (logits, then `softmax_cross_entropy`) holds them and their gradient, and
runs its two backward GEMMs on float32 operands. Here the logits exist one [n, V] chunk at a time:

  for each chunk of n tokens (a `lax.scan`):
    logits  = x_c @ E^T                      operands in x's dtype (bf16 in a bf16 run), float32 accumulation,
                                             stored in x's dtype (as nanoGPT's autocast logits are)
    lse     = logsumexp(logits)              float32
    loss   += sum(lse - logits[label])
    dlogits = (softmax(logits) - onehot(label)) / N, cast to x's dtype
    dx_c    = dlogits @ E                    float32 accumulation, stored in x's dtype
    dE     += dlogits^T @ x_c                float32 accumulator, [V, C]

The gradients are computed in the forward pass (a `jax.custom_vjp` whose residuals are dx and dE), so
training runs the same three GEMMs as the plain path (logits, dx, dE) and never recomputes the logits;
the backward only scales them by the incoming cotangent. Without differentiation (evaluation) only the
loss is computed. float32 inputs give the plain path's numbers up to summation order.

Each chunk's logits are read three times after the GEMM writes them (max, sum of exponentials, then
dlogits with the label's logit), and dlogits twice (the two GEMMs): in a bf16 run, bf16 logits halve
those bytes against float32 ones, and a chunk of the same 512 MiB holds twice the tokens, so the
float32 dE accumulator is read and written half as often. gpt2_124m at 16 x 1024 in bf16 runs four chunks
of 4,096 tokens, whose 64 kernels move 13.9 GB a step where float32 logits in eight chunks took 128 kernels
and 22.8 GB (`python -m haiku_gpt.benchmarks.bench --what=hlo`, docs/performance.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

# Auto chunking: at most this many bytes of logits per chunk, 512 MiB. Big enough that each chunk's
# GEMMs fill a GPU (GPT-2 in bf16: 4,096 tokens x 50,304), small enough that the logits of a GPT-2 batch
# of 16 x 1024 tokens take a quarter of the memory (an eighth in float32).
MAX_CHUNK_BYTES = 1 << 29


def chunk_tokens(num_tokens: int, vocab_size: int, requested: int = 0, logit_bytes: int = 4) -> int:
    """Tokens per chunk: `requested` (it must divide `num_tokens`), else the largest divisor of
    `num_tokens` whose logits (`logit_bytes` each: the compute dtype's size) stay within MAX_CHUNK_BYTES
    (all tokens when they fit)."""
    if requested:
        if num_tokens % requested:
            raise ValueError(f"loss_chunk_tokens={requested} does not divide the {num_tokens} tokens of a batch "
                             f"(batch_size x block_size): choose a divisor of {num_tokens}, or 0 for automatic")
        return requested
    chunks = min(-(-num_tokens * vocab_size * logit_bytes // MAX_CHUNK_BYTES), num_tokens)  # one token a chunk at most
    while num_tokens % chunks:
        chunks += 1
    return num_tokens // chunks


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _chunk_stats(x_c, embeddings, labels_c):
    """One chunk's logits [n, V] (float32, from logits rounded to x_c's dtype), their logsumexp [n] and
    the labels' logits [n]."""
    # x_c @ E^T without a transpose op. The GEMM writes x_c's dtype (a convert XLA fuses into it) and each
    # pass below reads that and computes in float32: in a bf16 run no float32 [n, V] array is stored.
    logits = _dot(x_c, embeddings, ((1,), (1,))).astype(x_c.dtype).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    is_label = jnp.arange(logits.shape[-1])[None, :] == labels_c[:, None]
    label_logit = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
    return logits, lse, label_logit, is_label


def _chunked(x, labels, n: int):
    return x.reshape(-1, n, *x.shape[1:]), labels.reshape(-1, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cross_entropy(x, embeddings, labels, n: int):
    def body(total, chunk):
        x_c, labels_c = chunk
        _, lse, label_logit, _ = _chunk_stats(x_c, embeddings, labels_c)
        return total + jnp.sum(lse - label_logit), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), _chunked(x, labels, n))
    return total / x.shape[0]


def _cross_entropy_fwd(x, embeddings, labels, n: int):
    num_tokens = x.shape[0]

    def body(carry, chunk):
        total, d_embeddings = carry
        x_c, labels_c = chunk
        logits, lse, label_logit, is_label = _chunk_stats(x_c, embeddings, labels_c)
        dlogits = ((jnp.exp(logits - lse[:, None]) - is_label) / num_tokens).astype(x.dtype)
        dx_c = _dot(dlogits, embeddings, ((1,), (0,))).astype(x.dtype)  # [n, C]
        d_embeddings = d_embeddings + _dot(dlogits, x_c, ((0,), (0,)))  # dlogits^T @ x_c: [V, C]
        return (total + jnp.sum(lse - label_logit), d_embeddings), dx_c

    init = (jnp.zeros((), jnp.float32), jnp.zeros(embeddings.shape, jnp.float32))
    (total, d_embeddings), dx = jax.lax.scan(body, init, _chunked(x, labels, n))
    return total / num_tokens, (dx.reshape(x.shape), d_embeddings.astype(embeddings.dtype), labels)


def _cross_entropy_bwd(n: int, residuals, g):
    dx, d_embeddings, labels = residuals
    zeros = jnp.zeros(labels.shape, jax.dtypes.float0)  # integer labels have no cotangent
    return (g * dx).astype(dx.dtype), (g * d_embeddings).astype(d_embeddings.dtype), zeros


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def chunked_cross_entropy(
    x: Float[Array, "N C"],
    embeddings: Float[Array, "V C"],
    labels: Int[Array, "N"],
    chunk: int = 0,
) -> Float[Array, ""]:
    """mean over tokens of -log softmax(x @ embeddings^T)[label], differentiable in x and embeddings.

    The GEMMs run on operands of x's dtype (embeddings are cast to it) with float32 accumulation, the
    logits are rounded to x's dtype; the softmax and the loss are float32. `chunk`: tokens per chunk
    (0: `chunk_tokens`' automatic choice).
    """
    if x.ndim != 2 or embeddings.ndim != 2 or x.shape[1] != embeddings.shape[1] or labels.shape != x.shape[:1]:
        raise ValueError(f"chunked_cross_entropy takes x [N, C], embeddings [V, C] and labels [N]; got "
                         f"{x.shape}, {embeddings.shape} and {labels.shape}")
    n = chunk_tokens(x.shape[0], embeddings.shape[0], chunk, x.dtype.itemsize)
    return _cross_entropy(x, embeddings.astype(x.dtype), labels.astype(jnp.int32), n)
