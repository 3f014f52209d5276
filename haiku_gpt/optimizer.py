"""AdamW with a learning-rate schedule (nanoGPT's cosine, WSD or constant), weight decay only on
matrices, global-norm clipping."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate at step `it` (nanoGPT's names: learning_rate, warmup_iters, lr_decay_iters, min_lr).

    Every schedule warms up linearly as nanoGPT's get_lr(it) does, lr * (it + 1) / (warmup_iters + 1), then:
      cosine    nanoGPT's: cosine from learning_rate down to min_lr at lr_decay_iters, min_lr after.
      wsd       warmup-stable-decay: learning_rate until the last `wsd_decay_fraction` of the steps
                from warmup_iters to lr_decay_iters, then down to min_lr at lr_decay_iters ('linear',
                or '1-sqrt': lr - (lr - min_lr) * sqrt(t) at decay progress t), min_lr after.
      constant  learning_rate after the warmup.
    `decay_lr=False` (nanoGPT's switch) is learning_rate at every step, no warmup.
    """
    lr, min_lr = config.learning_rate, config.min_lr
    warmup, decay_iters = config.warmup_iters, config.lr_decay_iters
    kind, shape, decay = config.lr_schedule, config.wsd_decay_shape, config.decay_lr
    decay_start = decay_iters - config.wsd_decay_fraction * (decay_iters - warmup) if kind == "wsd" else warmup

    def schedule(step):
        it = jnp.asarray(step, jnp.float32)
        if not decay:
            return jnp.full_like(it, lr)
        warm = lr * (it + 1) / (warmup + 1)
        if kind == "constant":
            return jnp.where(it < warmup, warm, lr)
        t = jnp.clip((it - decay_start) / max(decay_iters - decay_start, 1), 0.0, 1.0)  # decay progress
        if kind == "cosine":
            decayed = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * t)) * (lr - min_lr)
        elif shape == "linear":
            decayed = lr - (lr - min_lr) * t
        else:  # 1-sqrt
            decayed = lr - (lr - min_lr) * jnp.sqrt(t)
        return jnp.where(it < warmup, warm, jnp.where(it > decay_iters, min_lr, decayed))

    return schedule


def global_norm(tree, fused: bool = True) -> jax.Array:
    """The L2 norm of every leaf together (optax.tree.norm's, summed in float32).

    fused (GPUs, TPUs): one reduction over the leaves' concatenation, which XLA fuses into it (nothing is
    copied); per-leaf sums are two GPU kernels a leaf, each too small to fill the GPU (150 of the 1,038
    kernels of a gpt2_124m step). Not fused (the CPU, where a kernel costs no launch but XLA:CPU writes the
    concatenation out): a sum per leaf.
    """
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)]
    if fused:
        return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate([x.ravel() for x in leaves]))))
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def clip_by_global_norm(max_norm: float, fused: bool = True) -> optax.GradientTransformation:
    """optax.clip_by_global_norm (the same arithmetic) on `global_norm`."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates, fused)
        clip = lambda t: jax.lax.select(norm < max_norm, t, (t / norm.astype(t.dtype)) * max_norm)  # noqa: E731
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def decay_mask(params):
    """nanoGPT decays every >=2-D parameter (matmul weights, embeddings), not biases or LayerNorms."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   fused_norms: bool = True) -> optax.GradientTransformationExtraArgs:
    """update(grads, state, params, loss=...): the step's loss feeds the spike detector (skip_spikes).
    fused_norms: how the gradient's global norm is summed (`global_norm`; False on a CPU)."""
    adamw = optax.adamw(lr_schedule(config), b1=config.beta1, b2=config.beta2, eps=1e-8,
                        weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip > 0.0:
        adamw = optax.chain(clip_by_global_norm(config.grad_clip, fused_norms), adamw)
    if config.skip_spikes:
        return skip_spikes(adamw, config.spike_window, config.spike_z, fused_norms)
    return optax.with_extra_args_support(adamw)


class SpikeState(NamedTuple):
    inner: optax.OptState  # the wrapped optimizer's state: a skipped step moves only its schedule's count
    losses: jax.Array  # [window] the losses of the latest accepted steps (a ring buffer)
    grad_norms: jax.Array  # [window] their gradients' global norms, before clipping
    accepted: jax.Array  # steps accepted so far (the ring's write position)
    skipped: jax.Array  # steps skipped so far


def _is_schedule(node) -> bool:
    """The state of optax's scale_by_schedule (its step count): a skipped step advances it too."""
    return isinstance(node, optax.ScaleByScheduleState)


def skip_spikes(inner: optax.GradientTransformation, window: int, z: float,
                fused_norms: bool = True) -> optax.GradientTransformationExtraArgs:
    """Skip an update whose loss or gradient norm (before clipping) is an outlier, as llm.c's
    OutlierDetector, MaxText and levanter do: more than `z` standard deviations above the mean of the
    latest `window` accepted steps, once that many have been seen. A skipped step's update is zero and
    the wrapped optimizer's state stays as it was (Adam's moments and bias-correction count), except
    that its learning-rate schedule advances: the schedule follows the step, as in other trainers that
    skip, so the rate applied at step s is the schedule's at s (the one logged) however many steps were
    skipped. The window lives in the optimizer state, so checkpoints carry it and a resumed run skips
    exactly as an uninterrupted one.
    """

    def init(params) -> SpikeState:
        zeros = jnp.zeros((window,), jnp.float32)
        return SpikeState(inner.init(params), zeros, zeros, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def is_outlier(value, history, ready):
        mean, std = jnp.mean(history), jnp.std(history)
        return ready & (value > mean + z * jnp.maximum(std, 1e-12))

    def update(grads, state: SpikeState, params=None, *, loss, **extra):
        grad_norm = global_norm(grads, fused_norms)  # the clip's own (one computation: XLA's CSE)
        ready = state.accepted >= window
        spike = is_outlier(loss, state.losses, ready) | is_outlier(grad_norm, state.grad_norms, ready)
        updates, new_inner = inner.update(grads, state.inner, params)
        keep = lambda old, new: jnp.where(spike, old, new)  # noqa: E731
        slot = state.accepted % window
        new_state = SpikeState(
            inner=jax.tree.map(lambda old, new: new if _is_schedule(old) else keep(old, new),
                               state.inner, new_inner, is_leaf=_is_schedule),
            losses=keep(state.losses, state.losses.at[slot].set(loss)),
            grad_norms=keep(state.grad_norms, state.grad_norms.at[slot].set(grad_norm)),
            accepted=state.accepted + jnp.where(spike, 0, 1),
            skipped=state.skipped + jnp.where(spike, 1, 0))
        return jax.tree.map(lambda u: jnp.where(spike, jnp.zeros_like(u), u), updates), new_state

    return optax.GradientTransformationExtraArgs(init, update)

