"""The one attention entry point the model calls, selected by `config.attention_impl`.

  "reference": `kernels.reference.reference_attention` (einsum, float32 softmax).
  "blocked":   `kernels.reference.blocked_causal_attention` (the same einsums per query
               block, skipping the keys above the diagonal: the fastest choice on CPU).
  "xla":       `jax.nn.dot_product_attention` (XLA's own fused path where it has one).
  "pallas":    `kernels.flash_attention.flash_attention` (fused causal flash attention;
               interpret mode on CPU, compiled on GPU/TPU).

Layout everywhere: `[batch, seq, heads, head_dim]`.
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Float, Int, UInt32

from kernels.reference import blocked_causal_attention, default_scale, reference_attention

ATTENTION_IMPLS = ("reference", "blocked", "xla", "pallas")
BLOCKED_QUERY_BLOCK = 64  # 4 blocks at block_size 256: ~5/8 of the score work, ~25% faster fwd+bwd on CPU


def check_attention_impl(impl: str, dropout_rate: float = 0.0) -> None:
    """Raise ValueError with the list of choices for a bad `attention_impl`."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"unknown attention_impl {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)} "
            f"(e.g. --config.attention_impl=reference)")
    if impl == "xla" and dropout_rate > 0.0:
        raise ValueError(
            "attention_impl='xla' (jax.nn.dot_product_attention) has no attention dropout; "
            "set --config.dropout=0.0 or use --config.attention_impl=reference or pallas")


def attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch k_len heads head_dim"],
    v: Float[Array, "batch k_len heads head_dim"],
    *,
    impl: str = "reference",
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Int[Array, ""] | UInt32[Array, ""] | int | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Causal (by default) softmax attention through the chosen implementation."""
    check_attention_impl(impl, dropout_rate)
    if impl == "blocked" and causal and q.shape[1] == k.shape[1]:
        return blocked_causal_attention(q, k, v, block_q=BLOCKED_QUERY_BLOCK, sm_scale=sm_scale,
                                        dropout_rate=dropout_rate, dropout_seed=dropout_seed)
    if impl in ("reference", "blocked"):  # blocked: non-causal or cross-length has no diagonal to skip
        return reference_attention(q, k, v, causal=causal, sm_scale=sm_scale,
                                   dropout_rate=dropout_rate, dropout_seed=dropout_seed)
    if impl == "xla":
        scale = default_scale(q.shape[-1], sm_scale)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal)
    from kernels.flash_attention import flash_attention  # noqa: PLC0415 (Pallas import is slow)
    return flash_attention(q, k, v, causal=causal, sm_scale=sm_scale,
                           dropout_rate=dropout_rate, dropout_seed=dropout_seed)
