"""The model's attention dispatch: choices, chex cross-checking, and pallas training like reference."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haiku_gpt import kernels
from haiku_gpt.data import train_batches
from haiku_gpt.steps import make_steps
from haiku_gpt.data import open_dataset
from haiku_gpt.model import GPTConfig, make_model


def test_unknown_impl_lists_the_choices():
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="choose one of reference, blocked, xla, cudnn, pallas"):
        kernels.attention(q, q, q, impl="flashy")


@pytest.mark.parametrize("impl", ["xla", "cudnn"])
def test_dot_product_attention_impls_refuse_attention_dropout(impl):
    with pytest.raises(ValueError, match="no attention dropout"):
        kernels.check_attention_impl(impl, dropout_rate=0.1)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_cudnn_is_refused_off_gpu_with_the_alternatives(platform):
    with pytest.raises(ValueError, match=f"only on an NVIDIA GPU, and this run is on {platform}.*pallas"):
        kernels.check_attention_impl("cudnn", platform=platform, dtype="bfloat16")


def test_cudnn_needs_16_bit_inputs():
    with pytest.raises(ValueError, match="bfloat16 or float16 inputs, not float32.*--config.dtype=bfloat16"):
        kernels.check_attention_impl("cudnn", platform="gpu", dtype="float32")
    kernels.check_attention_impl("cudnn", platform="gpu", dtype="bfloat16")  # accepted


@pytest.mark.parametrize("impl", ["blocked", "xla", "pallas"])
def test_impls_match_reference_in_the_model_forward_and_grad(impl, monkeypatch):
    monkeypatch.setattr(importlib.import_module("haiku_gpt.kernels.attention"), "BLOCKED_QUERY_BLOCK", 6)  # 3 blocks
    cfg = GPTConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=32)
    idx = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 29)
    params = make_model(cfg).init(jax.random.PRNGKey(0), idx)

    def loss(params, impl):
        model = make_model(GPTConfig(**{**cfg.__dict__, "attention_impl": impl}))
        logits, _ = model.apply(params, None, idx)
        return jax.nn.log_softmax(logits).mean()

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "reference")
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, impl)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_grads, ref_grads)


def test_check_attention_names_the_layer_on_mismatch(tiny_config, monkeypatch):
    """A broken implementation is caught inside the jitted step by the chex cross-check."""
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda q, k, v, **kw: real(q, k, v, **kw) * 1.01)
    tiny_config.attention_impl = "xla"
    tiny_config.check_attention = True
    ds = open_dataset(tiny_config.data_dir, tiny_config.dataset, tiny_config.block_size)
    trainer = make_steps(tiny_config, ds.vocab_size)
    x, y = train_batches(ds.splits["train"], 0, 0, 1, (1, 4), 16)
    with pytest.raises(AssertionError, match=r"disagrees with the reference attention in layer gpt/h_0/attn"):
        trainer.train_steps(trainer.init(0), x, y)


def test_pallas_training_tracks_reference(tiny_config):
    """The CPU recipe's shape (block 64, 4 heads of 32) for 20 steps: same loss curve as reference."""
    tiny_config.update(n_layer=2, n_head=4, n_embd=128, block_size=64, batch_size=12, check_attention=False,
                       max_iters=20, lr_decay_iters=20, warmup_iters=5, learning_rate=1e-3)
    ds = open_dataset(tiny_config.data_dir, tiny_config.dataset, tiny_config.block_size)
    curves = {}
    for impl in ("reference", "pallas"):
        tiny_config.attention_impl = impl
        trainer = make_steps(tiny_config, ds.vocab_size)
        x, y = train_batches(ds.splits["train"], 0, 0, 20, (1, 12), 64)
        _, metrics = trainer.train_steps(trainer.init(0), x, y)  # 20 steps in one scanned call
        curves[impl] = np.asarray(metrics["loss"])
    np.testing.assert_allclose(curves["pallas"], curves["reference"], rtol=2e-4)
    assert curves["reference"][-1] < curves["reference"][0] - 0.5
