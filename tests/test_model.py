"""The GPT: parameter counts as nanoGPT prints them, shapes, initial loss, attention paths, KV cache,
grouped-query attention (n_kv_head) and document masking (segment ids)."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from haiku_gpt.configs import gpt2_124m, shakespeare_char, shakespeare_char_cpu
from haiku_gpt.config import model_config
from haiku_gpt.costs import param_count
from haiku_gpt.model import GPTConfig, document_segment_ids, init_kv_cache, make_model
from haiku_gpt.steps import make_loss_fn


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


def test_the_mlp_keeps_no_gelu_intermediate_for_its_backward(capsys):
    """The backward recomputes the GELU's tanh from its input: of the MLP's [N, 4C] arrays only the c_fc output
    and the GELU's output (c_proj's input) are kept for the backward; autodiff kept four more (the tanh and
    three products), which XLA wrote out as one more [N, 4C] array a layer."""
    import haiku as hk
    from jax.ad_checkpoint import print_saved_residuals

    from haiku_gpt.model import MLP

    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=8)
    mlp = hk.transform(lambda x: MLP(cfg, name="mlp")(x, False))
    x = jnp.ones((12, 8))
    params = mlp.init(jax.random.PRNGKey(0), x)
    print_saved_residuals(lambda p, x: jnp.sum(mlp.apply(p, None, x)), params, x)
    wide = [line for line in capsys.readouterr().out.splitlines() if "[12,32]" in line]
    assert len(wide) == 2, wide


def test_causality_future_tokens_do_not_change_past_logits():
    init, apply = compiled(small_config())
    idx = jax.random.randint(jax.random.PRNGKey(1), (1, 16), 0, 37)
    params = init(jax.random.PRNGKey(0), idx)
    changed = idx.at[0, 10].set((idx[0, 10] + 1) % 37)
    a, _ = apply(params, None, idx)
    b, _ = apply(params, None, changed)
    np.testing.assert_allclose(a[0, :10], b[0, :10], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[0, 10:], b[0, 10:])


def test_bfloat16_params_cast_runs():
    init, apply = compiled(small_config())
    idx = jnp.zeros((1, 16), jnp.int32)
    params = init(jax.random.PRNGKey(0), idx)
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    logits, _ = apply(params16, None, idx)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


# ---------------------------------------------------------------------------
# Grouped-query attention (n_kv_head) and document masking (segment ids)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_n_kv_head_shapes_c_attn_and_the_count(n_kv_head, bias):
    """c_attn is [C, C + 2 KVH D] (q for every head, k and v for KVH heads); param_count agrees."""
    cfg = small_config(n_head=4, n_embd=32, n_kv_head=n_kv_head, bias=bias)
    params = abstract_params(cfg)
    width = 32 + 2 * n_kv_head * 8
    assert params["gpt/h_0/attn/c_attn"]["w"].shape == (32, width)
    assert params["gpt/h_1/attn/c_proj"]["w"].shape == (32, 32)
    if bias:
        assert params["gpt/h_0/attn/c_attn"]["b"].shape == (width,)
    counted(cfg)


def test_n_kv_head_equal_to_n_head_is_gpt2s_attention_exactly():
    """n_kv_head=n_head (or 0) creates GPT-2's [C, 3C] c_attn with the same values, and the same logits."""
    idx = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 37)
    init, apply = compiled(small_config(bias=True))
    default = init(jax.random.PRNGKey(0), idx)
    explicit = compiled(small_config(bias=True, n_kv_head=2))[0](jax.random.PRNGKey(0), idx)
    assert default["gpt/h_0/attn/c_attn"]["w"].shape == (32, 96)
    jax.tree.map(np.testing.assert_array_equal, default, explicit)
    np.testing.assert_array_equal(apply(default, None, idx)[0],
                                  compiled(small_config(bias=True, n_kv_head=2))[1](explicit, None, idx)[0])


def repeat_kv_columns(params, n_layer: int, n_head: int, n_kv_head: int, head_dim: int):
    """A GQA model's params as multi-head params: each K/V head's columns of c_attn repeated for its group."""
    out = jax.tree.map(lambda x: x, params)
    width, kv_width, group = n_head * head_dim, n_kv_head * head_dim, n_head // n_kv_head
    for i in range(n_layer):
        c_attn = dict(out[f"gpt/h_{i}/attn/c_attn"])
        for name, value in c_attn.items():
            q, k, v = value[..., :width], value[..., width:width + kv_width], value[..., width + kv_width:]
            heads = lambda a: jnp.repeat(a.reshape(*a.shape[:-1], n_kv_head, head_dim), group, axis=-2)
            c_attn[name] = jnp.concatenate([q, *(heads(a).reshape(*a.shape[:-1], width) for a in (k, v))], -1)
        out[f"gpt/h_{i}/attn/c_attn"] = c_attn
    return out


@pytest.mark.parametrize("impl", ["reference", "blocked", "xla"])
@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_model_is_the_multi_head_model_with_repeated_kv_heads(n_kv_head, impl):
    """Query head h uses K/V head h // (H // KVH): the GQA forward equals the multi-head model whose c_attn
    repeats each K/V head's columns for its query heads."""
    cfg = small_config(n_head=4, n_kv_head=n_kv_head, bias=True, attention_impl=impl)
    idx = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 37)
    params = compiled(cfg)[0](jax.random.PRNGKey(0), idx)
    params = jax.tree.map(lambda p: p * 4 if p.ndim == 2 else p + 0.1, params)  # peaked attention, nonzero biases
    mha = small_config(n_head=4, bias=True)
    expected, _ = compiled(mha)[1](repeat_kv_columns(params, 2, 4, n_kv_head, 8), None, idx)
    got, _ = compiled(cfg)[1](params, None, idx)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_head,n_kv_head", [(2, 0), (4, 2), (4, 1)])
def test_kv_cache_decoding_matches_full_forward(n_head, n_kv_head):
    cfg = small_config(n_head=n_head, n_kv_head=n_kv_head)
    init, apply = compiled(cfg)
    idx = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 37)
    params = init(jax.random.PRNGKey(0), idx)
    full, _ = apply(params, None, idx)
    cache = init_kv_cache(cfg, 2)
    assert cache.k[0].shape == cache.v[1].shape == (2, cfg.kv_heads, 16, 32 // n_head)  # [B, KVH, S, D]
    logits, cache = apply(params, None, idx[:, :5], False, cache, 0)  # prefill
    np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, 16):  # then one token at a time (the position traced, as in generation)
        step_logits, cache = apply(params, None, idx[:, t:t + 1], False, cache, t)
        np.testing.assert_allclose(step_logits[:, 0], full[:, t], rtol=1e-4, atol=1e-5)
    assert cache.k[0].shape == (2, cfg.kv_heads, 16, 32 // n_head)


def test_document_segment_ids_count_the_end_of_text_tokens_before_each_position():
    """A token after end-of-text starts a new segment; end-of-text belongs to the document it ends."""
    eot = 9
    idx = jnp.array([[1, 2, eot, 3, eot, eot, 4, 5],   # two documents, an empty one (only its eot), a last one
                     [eot, 1, 2, 3, 4, 5, 6, 7],       # the window starts on a document's end
                     [1, 2, 3, 4, 5, 6, 7, 8]])        # one document
    np.testing.assert_array_equal(document_segment_ids(idx, eot), [[0, 0, 0, 1, 1, 2, 3, 3],
                                                                    [0, 1, 1, 1, 1, 1, 1, 1],
                                                                    [0, 0, 0, 0, 0, 0, 0, 0]])
    assert document_segment_ids(idx, eot).dtype == jnp.int32


@pytest.mark.parametrize("impl", ["reference", "blocked", "xla"])
def test_document_mask_loss_of_two_documents_is_theirs_apart(impl, monkeypatch):
    """The loss function with document masking, end to end: a row holding documents A (ending in eot) and B
    gives per-token losses equal to those of A and of B, each alone in its own row.

    Positions would differ (B alone starts at 0), so the position table is set to zero: the model is then
    position-free and each token's logits depend only on the tokens it attends to. Exactly compared:
    T * loss(A + B) == len(A) * loss(A) + len(B) * loss(B), and without the mask B's tokens see A."""
    monkeypatch.setattr(importlib.import_module("haiku_gpt.kernels.attention"), "BLOCKED_QUERY_BLOCK", 4)  # 4 blocks of 16
    eot = 0
    cfg = small_config(n_head=4, n_kv_head=2, attention_impl=impl)
    params = make_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
    params = jax.tree.map(lambda p: p * 6 if p.ndim == 2 else p, params)  # peaked attention: mixing shows
    params["gpt"] = {"wpe": jnp.zeros_like(params["gpt"]["wpe"])}
    rng = np.random.default_rng(3)
    a = np.append(rng.integers(1, 37, 6), eot).astype(np.int32)  # 7 tokens, the eot last
    b = rng.integers(1, 37, 9).astype(np.int32)
    x, y = np.concatenate([a, b])[None], rng.integers(0, 37, (1, 16)).astype(np.int32)
    masked = jax.jit(make_loss_fn(make_model(cfg), "float32", end_of_text=eot), static_argnums=4)
    plain = jax.jit(make_loss_fn(make_model(cfg), "float32"), static_argnums=4)
    together = 16 * float(masked(params, None, x, y, False))
    apart = 7 * float(masked(params, None, x[:, :7], y[:, :7], False)) + 9 * float(
        masked(params, None, x[:, 7:], y[:, 7:], False))
    assert together == pytest.approx(apart, rel=1e-5)
    across = 16 * float(plain(params, None, x, y, False))
    assert abs(across - apart) > 1e-3 * abs(apart)  # without the mask B's tokens attend to A


def test_segment_ids_with_a_kv_cache_are_refused():
    init, apply = compiled(small_config())
    idx = jnp.zeros((1, 4), jnp.int32)
    params = init(jax.random.PRNGKey(0), idx)
    with pytest.raises(ValueError, match="pass segment_ids=None with a cache"):
        make_model(small_config()).apply(params, None, idx, False, init_kv_cache(small_config(), 1), 0, idx)
