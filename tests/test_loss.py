"""The chunked lm_head + cross-entropy (haiku_gpt/loss.py) against the plain path: logits, then optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from haiku_gpt.configs import tiny
from haiku_gpt import loss
from haiku_gpt.config import model_config
from haiku_gpt.model import make_model
from haiku_gpt.steps import make_loss_fn


def plain(x, embeddings, labels):
    """The path the chunks replace: float32 [N, V] logits, then softmax cross-entropy."""
    logits = jnp.dot(x, embeddings.T.astype(x.dtype), preferred_element_type=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def inputs(n=96, c=16, v=53, seed=0):
    kx, ke, kl = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kx, (n, c)), 0.3 * jax.random.normal(ke, (v, c)),
            jax.random.randint(kl, (n,), 0, v))


@pytest.mark.parametrize("chunk", [0, 96, 32, 8, 1])
def test_float32_loss_and_gradients_equal_the_plain_path(chunk):
    x, embeddings, labels = inputs()
    ours = jax.jit(jax.value_and_grad(lambda x, e: loss.chunked_cross_entropy(x, e, labels, chunk), (0, 1)))
    theirs = jax.jit(jax.value_and_grad(lambda x, e: plain(x, e, labels), (0, 1)))
    (value, grads), (value_ref, grads_ref) = ours(x, embeddings), theirs(x, embeddings)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-6 * float(jnp.abs(g_ref).max()))
    # Without differentiation (evaluation) only the loss is computed, the same.
    np.testing.assert_allclose(jax.jit(loss.chunked_cross_entropy, static_argnums=3)(x, embeddings, labels, chunk),
                               value_ref, rtol=1e-6)


def test_the_gradient_scales_with_the_cotangent():
    """The backward multiplies the gradients computed in the forward by the incoming cotangent."""
    x, embeddings, labels = inputs()
    grads = jax.grad(lambda x, e: 3.0 * loss.chunked_cross_entropy(x, e, labels, 32), (0, 1))(x, embeddings)
    grads_ref = jax.grad(lambda x, e: 3.0 * plain(x, e, labels), (0, 1))(x, embeddings)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-6 * float(jnp.abs(g_ref).max()))


def test_bfloat16_operands_keep_the_gradients_dtypes_and_stay_within_bfloat16_noise():
    x, embeddings, labels = inputs(n=256, c=64, v=300)
    f = lambda x, e: loss.chunked_cross_entropy(x.astype(jnp.bfloat16), e, labels, 64)  # noqa: E731
    value, (dx, de) = jax.jit(jax.value_and_grad(f, (0, 1)))(x, embeddings)
    value_ref, (dx_ref, de_ref) = jax.value_and_grad(lambda x, e: plain(x, e, labels), (0, 1))(x, embeddings)
    assert value.dtype == jnp.float32 and dx.dtype == x.dtype and de.dtype == embeddings.dtype
    assert abs(float(value) - float(value_ref)) < 1e-2 * float(value_ref)
    for g, g_ref in ((dx, dx_ref), (de, de_ref)):
        assert float(jnp.abs(g - g_ref).max()) < 3e-2 * float(jnp.abs(g_ref).max())


def test_a_tiny_gpt_in_bfloat16_stays_within_bfloat16_noise_of_float32(data_dir):
    """The whole model's loss and gradient, bf16 (chunked head on bf16 operands) against float32."""
    config = tiny.get_config()
    config.update(loss_chunk_tokens=16)  # 64 tokens, four chunks
    model = make_model(model_config(config, 65))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
    x, y = (jax.random.randint(jax.random.PRNGKey(i), (4, 16), 0, 65) for i in (1, 2))
    results = {dtype: jax.jit(jax.value_and_grad(make_loss_fn(model, dtype)), static_argnums=4)(
        params, None, x, y, False) for dtype in ("float32", "bfloat16")}
    (loss32, grads32), (loss16, grads16) = results["float32"], results["bfloat16"]
    assert abs(float(loss16) - float(loss32)) < 1e-2 * float(loss32)
    flat32, flat16 = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)]) for t in (grads32, grads16))
    cosine = float(flat32 @ flat16 / jnp.linalg.norm(flat32) / jnp.linalg.norm(flat16))
    assert cosine > 0.999 and jax.tree.map(lambda g: g.dtype, grads16) == jax.tree.map(lambda g: g.dtype, grads32)


def test_automatic_chunks_hold_at_most_the_budget_and_divide_the_tokens():
    assert loss.chunk_tokens(16384, 50304) == 2048  # GPT-2 at batch 16 x 1024, float32 logits: eight chunks
    assert loss.chunk_tokens(16384, 50304, logit_bytes=2) == 4096  # bf16 logits: four
    assert loss.chunk_tokens(768, 65) == 768  # the CPU recipe: one chunk
    for tokens, vocab in [(16384, 50304), (12 * 1024, 50304), (1000, 50304 * 300), (7, 1 << 30)]:
        for logit_bytes in (2, 4):
            n = loss.chunk_tokens(tokens, vocab, logit_bytes=logit_bytes)
            assert tokens % n == 0 and (n * vocab * logit_bytes <= loss.MAX_CHUNK_BYTES or n == 1)
    assert loss.chunk_tokens(4096, 50304, 512) == 512
    with pytest.raises(ValueError, match="does not divide"):
        loss.chunk_tokens(4096, 50304, 500)
