"""The KV-cached sampler against nanoGPT's full recompute, inside and past the context window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haiku_gpt.model import GPTConfig, make_model
from haiku_gpt.sample import generate_tokens, read_prompt
from haiku_gpt.errors import UserError

CFG = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def params():
    # Larger-than-default weights give peaked distributions, so sampling is not a coin toss.
    params = make_model(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 12), jnp.int32))
    return jax.tree.map(lambda p: p * 8 if p.ndim == 2 else p, params)


def generate(params, context, **kw):
    kw = {"config": CFG, "max_new_tokens": 20, "temperature": 0.5, "top_k": 10, **kw}
    return np.asarray(generate_tokens(params, jnp.asarray(context, jnp.int32), jax.random.PRNGKey(3), **kw))


@pytest.mark.parametrize("prompt_len, new", [(1, 11), (5, 7), (12, 1)])
def test_cached_equals_recompute_inside_window(params, prompt_len, new):
    context = np.arange(2 * prompt_len).reshape(2, prompt_len) % 23
    cached = generate(params, context, max_new_tokens=new)
    full = generate(params, context, max_new_tokens=new, use_cache=False)
    np.testing.assert_array_equal(cached, full)
    np.testing.assert_array_equal(cached[:, :prompt_len], context)


def test_exact_window_past_block_size_is_nanogpts(params):
    context = np.array([[1, 2, 3]])
    cached = generate(params, context, max_new_tokens=30)  # 33 tokens > block_size 12
    full = generate(params, context, max_new_tokens=30, use_cache=False)
    np.testing.assert_array_equal(cached, full)


def test_half_window_refill_runs_and_agrees_until_the_window_fills(params):
    context = np.array([[1, 2, 3]])
    exact = generate(params, context, max_new_tokens=30)
    half = generate(params, context, max_new_tokens=30, window="half")
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
