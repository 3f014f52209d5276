"""The KV-cached sampler against nanoGPT's full recompute, inside and past the context window, for a
multi-head model and a grouped-query one (a KV cache of fewer heads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haiku_gpt.model import GPTConfig, make_model
from haiku_gpt.sample import generate_tokens, read_prompt
from haiku_gpt.errors import UserError

CFG = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=32)
GQA_CFG = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=4, n_embd=32, n_kv_head=1)  # multi-query


def init_params(cfg: GPTConfig):
    # Larger-than-default weights give peaked distributions, so sampling is not a coin toss.
    params = make_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 12), jnp.int32))
    return jax.tree.map(lambda p: p * 8 if p.ndim == 2 else p, params)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG)


@pytest.fixture(scope="module", params=[CFG, GQA_CFG], ids=["mha", "gqa"])
def model(request):
    """(config, params) of the multi-head model and of a grouped-query one."""
    return request.param, init_params(request.param)


def generate(params, context, **kw):
    kw = {"config": CFG, "max_new_tokens": 20, "temperature": 0.5, "top_k": 10, **kw}
    return np.asarray(generate_tokens(params, jnp.asarray(context, jnp.int32), jax.random.PRNGKey(3), **kw))


@pytest.mark.parametrize("prompt_len, new", [(1, 11), (5, 7), (12, 1)])
def test_cached_equals_recompute_inside_window(model, prompt_len, new):
    cfg, params = model
    context = np.arange(2 * prompt_len).reshape(2, prompt_len) % 23
    cached = generate(params, context, max_new_tokens=new, config=cfg)
    full = generate(params, context, max_new_tokens=new, use_cache=False, config=cfg)
    np.testing.assert_array_equal(cached, full)
    np.testing.assert_array_equal(cached[:, :prompt_len], context)


def crop_and_recompute(cfg, params, context, new_tokens, key, temperature, top_k):
    """nanoGPT's generate, written independently: crop to the last block_size tokens, run the
    model's full forward, sample the last position from softmax(logits / temperature) over the
    top_k tokens (Gumbel-max with the sampler's per-step keys), append."""
    forward = jax.jit(make_model(cfg).apply)  # the model's own forward, compiled per prompt length
    tokens = np.asarray(context)
    for step_key in jax.random.split(key, new_tokens):
        logits, _ = forward(params, None, jnp.asarray(tokens[:, -cfg.block_size:], jnp.int32))
        logits = logits[:, -1] / temperature
        logits = jnp.where(logits < jnp.sort(logits, axis=-1)[:, -top_k:][:, :1], -jnp.inf, logits)
        token = jax.random.categorical(step_key, logits, axis=-1)
        tokens = np.concatenate([tokens, np.asarray(token)[:, None]], axis=1)
    return tokens


def test_exact_window_past_block_size_is_nanogpts(model):
    cfg, params = model
    context = np.array([[1, 2, 3], [7, 8, 9]])
    expected = crop_and_recompute(cfg, params, context, 30, jax.random.PRNGKey(3), 2.0, 10)  # 33 > block 12
    for use_cache in (True, False):
        got = generate(params, context, max_new_tokens=30, temperature=2.0, use_cache=use_cache, config=cfg)
        np.testing.assert_array_equal(got, expected)


def test_half_window_refill_runs_and_agrees_until_the_window_fills(model):
    cfg, params = model
    context = np.array([[1, 2, 3]])
    exact = generate(params, context, max_new_tokens=30, config=cfg)
    half = generate(params, context, max_new_tokens=30, window="half", config=cfg)
    assert half.shape == exact.shape and half.min() >= 0 and half.max() < 23
    np.testing.assert_array_equal(half[:, :13], exact[:, :13])  # identical while everything fits


def test_same_seed_same_text_and_top_k_one_is_greedy(params):
    context = np.array([[4, 5]])
    np.testing.assert_array_equal(generate(params, context), generate(params, context))
    greedy = generate(params, context, top_k=1, max_new_tokens=5)
    logits, _ = make_model(CFG).apply(params, None, jnp.asarray(context))
    assert greedy[0, 2] == int(jnp.argmax(logits[0, -1]))


def test_padded_vocabulary_rows_are_never_sampled(params):
    tokens = generate(params, np.array([[1]]), valid_vocab=5, temperature=5.0, top_k=0, max_new_tokens=11)
    assert tokens.max() < 5


def test_prompt_from_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("ROMEO:")
    assert read_prompt(f"FILE:{path}") == "ROMEO:"
    assert read_prompt("plain") == "plain"
    with pytest.raises(UserError, match="cannot read the prompt file"):
        read_prompt(f"FILE:{tmp_path}/missing.txt")
