"""The GPT: parameter counts as nanoGPT prints them, shapes, initial loss, attention paths, KV cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import gpt2_124m, shakespeare_char, shakespeare_char_cpu
from haiku_gpt.config import model_config
from haiku_gpt.costs import param_count
from haiku_gpt.model import GPTConfig, init_kv_cache, make_model


def abstract_params(cfg: GPTConfig):
    return jax.eval_shape(make_model(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))


def counted(cfg: GPTConfig) -> int:
    """nanoGPT's get_num_params() of the model's real parameters; the analytic count must agree."""
    params = abstract_params(cfg)
    real = sum(x.size for x in jax.tree.leaves(params)) - params["gpt"]["wpe"].size
    assert param_count(cfg) == real
    assert param_count(cfg, position_embeddings=True) == real + params["gpt"]["wpe"].size
    return real


@pytest.mark.parametrize("config_module, vocab, expected_millions", [
    (shakespeare_char_cpu, 65, "0.80"),
    (shakespeare_char, 65, "10.65"),
    (gpt2_124m, 50304, "123.59"),
])
def test_parameter_count_matches_nanogpt(config_module, vocab, expected_millions):
    assert f"{counted(model_config(config_module.get_config(), vocab)) / 1e6:.2f}" == expected_millions


def test_gpt2_with_bias_and_tied_head():
    cfg = model_config(gpt2_124m.get_config(), 50304)
    biased = GPTConfig(**{**cfg.__dict__, "bias": True})
    assert f"{counted(biased) / 1e6:.2f}" == "123.69"
    params = abstract_params(biased)
    assert "lm_head" not in str(params.keys())  # tied to wte: no separate output matrix


def compiled(cfg: GPTConfig):
    """The model's init and apply, each jitted whole (run eagerly, every primitive compiles on its own)."""
    model = make_model(cfg)
    return jax.jit(model.init), jax.jit(model.apply, static_argnums=3)


def small_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return GPTConfig(**{**base, **overrides})


def test_shapes_and_initial_loss_is_log_vocab():
    init, apply = compiled(small_config(vocab_size=65))
    idx = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, 65)
    params = init(jax.random.PRNGKey(0), idx)
    logits, cache = apply(params, None, idx)
    assert logits.shape == (4, 16, 65) and logits.dtype == jnp.float32 and cache is None
    targets = jax.random.randint(jax.random.PRNGKey(2), (4, 16), 0, 65)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    assert abs(float(loss) - math.log(65)) < 0.1  # small init: near-uniform predictions


def test_init_follows_gpt2():
    cfg = small_config(n_layer=4, n_embd=64)
    params = compiled(cfg)[0](jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
    np.testing.assert_allclose(np.std(params["gpt/wte"]["embeddings"]), 0.02, rtol=0.1)
    np.testing.assert_allclose(np.std(params["gpt/h_0/mlp/c_fc"]["w"]), 0.02, rtol=0.1)
    scaled = 0.02 / math.sqrt(2 * cfg.n_layer)  # residual projections
    np.testing.assert_allclose(np.std(params["gpt/h_0/mlp/c_proj"]["w"]), scaled, rtol=0.1)
    np.testing.assert_allclose(np.std(params["gpt/h_3/attn/c_proj"]["w"]), scaled, rtol=0.1)
    assert params["gpt/ln_f"]["scale"].min() == 1.0 and "offset" not in params["gpt/ln_f"]


def test_dropout_only_in_training_and_deterministic_per_rng():
    init, apply = compiled(small_config(dropout=0.3))
    idx = jnp.arange(32).reshape(2, 16) % 37
    params = init(jax.random.PRNGKey(0), idx)
    eval_a, _ = apply(params, None, idx, False)
    eval_b, _ = apply(params, jax.random.PRNGKey(5), idx, False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, _ = apply(params, jax.random.PRNGKey(5), idx, True)
    train_b, _ = apply(params, jax.random.PRNGKey(5), idx, True)
    train_c, _ = apply(params, jax.random.PRNGKey(6), idx, True)
    np.testing.assert_array_equal(train_a, train_b)
    assert not np.allclose(train_a, train_c) and not np.allclose(train_a, eval_a)


def test_reference_and_xla_attention_agree_in_the_model():
    idx = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, 37)
    params = compiled(small_config())[0](jax.random.PRNGKey(0), idx)
    ref, _ = compiled(small_config(attention_impl="reference"))[1](params, None, idx)
    xla, _ = make_model(small_config(attention_impl="xla", check_attention=True)).apply(params, None, idx)
    np.testing.assert_allclose(ref, xla, rtol=1e-5, atol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits():
    init, apply = compiled(small_config())
    idx = jax.random.randint(jax.random.PRNGKey(1), (1, 16), 0, 37)
    params = init(jax.random.PRNGKey(0), idx)
    changed = idx.at[0, 10].set((idx[0, 10] + 1) % 37)
    a, _ = apply(params, None, idx)
    b, _ = apply(params, None, changed)
    np.testing.assert_allclose(a[0, :10], b[0, :10], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[0, 10:], b[0, 10:])


def test_kv_cache_decoding_matches_full_forward():
    cfg = small_config()
    init, apply = compiled(cfg)
    idx = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 37)
    params = init(jax.random.PRNGKey(0), idx)
    full, _ = apply(params, None, idx)
    logits, cache = apply(params, None, idx[:, :5], False, init_kv_cache(cfg, 2), 0)  # prefill
    np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, 16):  # then one token at a time (the position traced, as in generation)
        step_logits, cache = apply(params, None, idx[:, t:t + 1], False, cache, t)
        np.testing.assert_allclose(step_logits[:, 0], full[:, t], rtol=1e-4, atol=1e-5)


def test_bfloat16_params_cast_runs():
    init, apply = compiled(small_config())
    idx = jnp.zeros((1, 16), jnp.int32)
    params = init(jax.random.PRNGKey(0), idx)
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    logits, _ = apply(params16, None, idx)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
