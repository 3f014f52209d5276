"""AdamW with nanoGPT's learning-rate schedule, weight decay only on matrices, global-norm clipping."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """nanoGPT's get_lr(it): linear warmup, cosine decay to min_lr, then min_lr (or constant)."""
    lr, min_lr = config.learning_rate, config.min_lr
    warmup, decay_iters = config.warmup_iters, config.lr_decay_iters

    def schedule(step):
        it = jnp.asarray(step, jnp.float32)
        if not config.decay_lr:
            return jnp.full_like(it, lr)
        warm = lr * (it + 1) / (warmup + 1)
        ratio = jnp.clip((it - warmup) / max(decay_iters - warmup, 1), 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (lr - min_lr)
        return jnp.where(it < warmup, warm, jnp.where(it > decay_iters, min_lr, cosine))

    return schedule


def decay_mask(params):
    """nanoGPT decays every >=2-D parameter (matmul weights, embeddings), not biases or LayerNorms."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(config), b1=config.beta1, b2=config.beta2, eps=1e-8,
                        weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip > 0.0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
