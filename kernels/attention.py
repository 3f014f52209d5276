"""The one attention entry point the model calls, selected by `config.attention_impl`.

  "reference": `kernels.reference.reference_attention` (einsum, float32 softmax).
  "blocked":   `kernels.reference.blocked_causal_attention` (the same einsums per query
               block, skipping the keys above the diagonal: the fastest choice on CPU).
  "xla":       `jax.nn.dot_product_attention` (plain XLA: `implementation=None`).
  "cudnn":     `jax.nn.dot_product_attention(..., implementation="cudnn")`: cuDNN's fused
               flash attention, the fastest GPU baseline (GPU only, bfloat16/float16, no dropout;
               segment ids become an additive [B, 1, T, T] bias: on an H200 at T=1024, fwd+bwd
               took ~25-40% longer than causal alone, GQA or not).
  "pallas":    `kernels.flash_attention.flash_attention` (fused causal flash attention;
               interpret mode on CPU, compiled on GPU/TPU). `kernel_family="mosaic_gpu"` picks its
               Hopper kernels (`kernels.flash_attention_mgpu`, opt-in: H100/H200, 16-bit inputs,
               head_dim <= 128) instead of the Triton ones.

Layout everywhere: `[batch, seq, heads, head_dim]`; k and v may have fewer heads than q (grouped-query
attention, every implementation), and `segment_ids` `[batch, seq]` mask attention across documents.

`cross_checked_attention` is `attention` that also runs the reference and asserts with chex that
both agree (`--config.check_attention`; inside jit the assertion needs `chex.chexify`).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt32

from haiku_gpt.kernels.families import check_kernel_family
from haiku_gpt.kernels.reference import (
    blocked_causal_attention,
    check_attention_inputs,
    default_scale,
    reference_attention,
    segment_mask,
    split_qkv,
)

ATTENTION_IMPLS = ("reference", "blocked", "xla", "cudnn", "pallas")
NO_DROPOUT_IMPLS = ("xla", "cudnn")  # jax.nn.dot_product_attention has no attention dropout
BLOCKED_QUERY_BLOCK = 64  # 4 blocks at block_size 256: ~5/8 of the score work, ~25% faster fwd+bwd on CPU


def check_attention_impl(impl: str, dropout_rate: float = 0.0, *, platform: str | None = None,
                         dtype: str | None = None, kernel_family: str = "auto", head_dim: int | None = None,
                         device_kind: str | None = None) -> None:
    """Raise ValueError, naming the fix, for an `attention_impl` that cannot run here.

    `platform` ("cpu", "gpu"/"cuda", "tpu"), `dtype` (the compute dtype), `head_dim` and `device_kind`
    are checked when given: cuDNN's attention needs an NVIDIA GPU and 16-bit inputs; the pallas kernel's
    `kernel_family="mosaic_gpu"` a Hopper GPU (or the CPU, which interprets it), 16-bit inputs and a
    head_dim up to 128.
    """
    check_kernel_family(impl, kernel_family, platform=platform, dtype=dtype, head_dim=head_dim,
                         device_kind=device_kind)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"unknown attention_impl {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)} "
            f"(e.g. --config.attention_impl=reference)")
    if impl in NO_DROPOUT_IMPLS and dropout_rate > 0.0:
        raise ValueError(
            f"attention_impl={impl!r} (jax.nn.dot_product_attention) has no attention dropout; "
            "set --config.dropout=0.0 or use --config.attention_impl=reference or pallas")
    if impl != "cudnn":
        return
    if platform is not None and platform not in ("gpu", "cuda"):
        raise ValueError(
            f"attention_impl='cudnn' runs only on an NVIDIA GPU, and this run is on {platform}; use "
            "--config.attention_impl=pallas (compiled on TPU, interpreted on CPU), xla or reference")
    if dtype is not None and dtype not in ("bfloat16", "float16"):
        raise ValueError(
            f"attention_impl='cudnn' (cuDNN flash attention) takes bfloat16 or float16 inputs, not "
            f"{dtype}; add --config.dtype=bfloat16, or use --config.attention_impl=pallas for float32")


def attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch k_len kv_heads head_dim"],
    v: Float[Array, "batch k_len kv_heads head_dim"],
    *,
    impl: str = "reference",
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Int[Array, ""] | UInt32[Array, ""] | int | None = None,
    segment_ids: Int[Array, "batch q_len"] | None = None,
    kernel_family: str = "auto",
) -> Float[Array, "batch q_len heads head_dim"]:
    """Causal (by default) softmax attention through the chosen implementation.

    k and v may have fewer heads than q (grouped-query attention: KVH must divide H; query head h
    uses K/V head h // (H // KVH)). `segment_ids` ([B, T], q and k of one length T) confine each
    query to the keys of its own segment (document masking), on top of the causal mask.
    """
    check_attention_impl(impl, dropout_rate, kernel_family=kernel_family)
    check_attention_inputs(q, k, v, segment_ids)
    if impl == "blocked" and causal and q.shape[1] == k.shape[1]:
        return blocked_causal_attention(q, k, v, block_q=BLOCKED_QUERY_BLOCK, sm_scale=sm_scale,
                                        dropout_rate=dropout_rate, dropout_seed=dropout_seed,
                                        segment_ids=segment_ids)
    if impl in ("reference", "blocked"):  # blocked: non-causal or cross-length has no diagonal to skip
        return reference_attention(q, k, v, causal=causal, sm_scale=sm_scale, dropout_rate=dropout_rate,
                                   dropout_seed=dropout_seed, segment_ids=segment_ids)
    if impl == "cudnn" and q.dtype == jnp.float32:
        # cuDNN's kernels take 16-bit inputs only; float32 reaches here from parameter init, which
        # traces the model in float32 (validation requires dtype=bfloat16 for the step itself).
        out = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), impl=impl, causal=causal,
                        sm_scale=sm_scale, segment_ids=segment_ids)
        return out.astype(q.dtype)
    if impl in ("xla", "cudnn"):
        # K/V with fewer heads pass straight through: dot_product_attention groups the query heads itself.
        # Segments become a boolean [B, 1, T, T] mask (cuDNN: an additive bias), combined with is_causal.
        scale = default_scale(q.shape[-1], sm_scale)
        mask = None if segment_ids is None else segment_mask(segment_ids, 0, q.shape[1], k.shape[1])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                            implementation="cudnn" if impl == "cudnn" else None)
    from haiku_gpt.kernels.flash_attention import flash_attention  # noqa: PLC0415 (Pallas import is slow)
    segments = {} if segment_ids is None else {"segment_ids": segment_ids}
    return flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, dropout_rate=dropout_rate,
                           dropout_seed=dropout_seed, family=kernel_family, **segments)


def attention_qkv(
    qkv: Float[Array, "batch seq qkv_heads head_dim"],
    kv_heads: int,
    *,
    impl: str = "reference",
    causal: bool = True,
    dropout_rate: float = 0.0,
    dropout_seed: Int[Array, ""] | UInt32[Array, ""] | int | None = None,
    segment_ids: Int[Array, "batch seq"] | None = None,
    kernel_family: str = "auto",
) -> Float[Array, "batch seq heads head_dim"]:
    """`attention` of the q, k and v heads of one fused projection: `qkv` is [q | k | v] heads along axis 2,
    [B, T, H + 2 KVH, D]. `pallas` reads the three out of `qkv` in place (`flash_attention_qkv`: no copies
    of them in XLA); the other implementations take them as slices."""
    q, k, v = split_qkv(qkv, kv_heads)
    if impl != "pallas":
        return attention(q, k, v, impl=impl, causal=causal, dropout_rate=dropout_rate, dropout_seed=dropout_seed,
                         segment_ids=segment_ids, kernel_family=kernel_family)
    check_attention_impl(impl, dropout_rate, kernel_family=kernel_family)
    check_attention_inputs(q, k, v, segment_ids)
    from haiku_gpt.kernels.flash_attention import flash_attention_qkv  # noqa: PLC0415 (Pallas import is slow)
    return flash_attention_qkv(qkv, kv_heads, causal=causal, dropout_rate=dropout_rate, dropout_seed=dropout_seed,
                               segment_ids=segment_ids, family=kernel_family)


def cross_checked_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch k_len kv_heads head_dim"],
    v: Float[Array, "batch k_len kv_heads head_dim"],
    *,
    layer: str,
    impl: str = "reference",
    causal: bool = True,
    dropout_rate: float = 0.0,
    dropout_seed: Int[Array, ""] | UInt32[Array, ""] | int | None = None,
    segment_ids: Int[Array, "batch q_len"] | None = None,
    kernel_family: str = "auto",
) -> Float[Array, "batch q_len heads head_dim"]:
    """`attention(impl=impl)`, with a chex assertion that it matches the reference path (same dropout bits).

    Inside jit the assertion runs under `chex.chexify` (steps.make_steps wraps the jitted steps so);
    a mismatch names `layer`.
    """
    out = attention(q, k, v, impl=impl, causal=causal, dropout_rate=dropout_rate, dropout_seed=dropout_seed,
                    segment_ids=segment_ids, kernel_family=kernel_family)
    if impl == "reference":
        return out
    expected = reference_attention(q, k, v, causal=causal, dropout_rate=dropout_rate, dropout_seed=dropout_seed,
                                   segment_ids=segment_ids)
    tol = 1e-4 if out.dtype == jnp.float32 else 2e-2  # 16-bit inputs: bfloat16's or float16's rounding
    actual, expected = out.astype(jnp.float32), expected.astype(jnp.float32)
    # NaN in both is a diverged step, which the training loop's NaN guard reports, not a mismatch.
    both_nan = jnp.isnan(actual) & jnp.isnan(expected)
    chex.assert_trees_all_close(
        jnp.where(both_nan, 0.0, actual), jnp.where(both_nan, 0.0, expected), rtol=tol, atol=tol,
        custom_message=f"attention_impl disagrees with the reference attention in layer {layer}")
    return out
