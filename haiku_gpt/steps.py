"""The jitted functions of a run: init, the train step (a `lax.scan` of optimizer steps), eval losses.

Built once per run from the config (`make_steps`), compiled on first call, reused for every step.
Params and optimizer state are donated to the train step, so XLA updates them in place. On
several devices (`distributed.py`) the same functions are jitted with NamedShardings over a
'data' mesh; on one device nothing is sharded.

Shapes: K optimizer steps per call (`config.steps_per_call`), A micro-batches of gradient
accumulation, B batch rows, T = block_size, E = eval_iters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from haiku_gpt import distributed, system
from haiku_gpt.config import model_config, resolve_dtype
from haiku_gpt.model import GPTConfig, document_segment_ids, make_model
from haiku_gpt.optimizer import global_norm, lr_schedule, make_optimizer
from haiku_gpt.tokenizer import GPT2_END_OF_TEXT


class TrainingState(NamedTuple):
    params: hk.Params
    opt_state: optax.OptState
    step: Int[Array, ""]
    rng: jax.Array  # raw uint32[2] key: serialisable as it is


@dataclasses.dataclass(frozen=True)
class Steps:
    """The run's model and its jitted functions, with how their arrays are laid out over devices."""

    config: ml_collections.ConfigDict
    model_config: GPTConfig
    optimizer: optax.GradientTransformation
    init: Callable  # (seed) -> TrainingState
    train_steps: Callable  # (state, x[K,A,B,T], y[K,A,B,T]) -> (state, {"loss": [K], "lr": [K], norms: [K]})
    eval_losses: Callable  # (params, x[E,B,T], y[E,B,T]) -> [E] losses
    mesh: jax.sharding.Mesh | None = None  # what make_steps was given (compile-only devices), else None
    parallel: distributed.DataParallel | None = None  # several devices: the mesh (None on one device)
    state_shardings: Any = None  # TrainingState of NamedShardings, with `parallel`

    def abstract_state(self) -> TrainingState:
        """The state's shapes and dtypes, nothing computed (a template for restoring and loading)."""
        return jax.eval_shape(self.init, self.config.seed)

    def restore_target(self) -> TrainingState:
        """`abstract_state` with the layout a restored state takes on this run's devices (checkpoint.py
        reads each array straight into it, whatever the device count of the run that saved it)."""
        abstract = self.abstract_state()
        if self.parallel is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.state_shardings)

    def init_with(self, params: hk.Params) -> TrainingState:
        """A fresh state (step 0, new optimizer state, init's rng) around `params` (e.g. pretrained GPT-2)."""
        step, rng = jax.jit(lambda: tuple(self.init(self.config.seed))[2:])()  # XLA drops the unused init
        return TrainingState(params, jax.jit(self.optimizer.init)(params), step, rng)

    def place(self, state: TrainingState) -> TrainingState:
        """Lay a state of full arrays (scratch, restored or loaded) out on the mesh; as is on one device."""
        return state if self.parallel is None else self.parallel.put(state, self.state_shardings)

    def place_params(self, params: hk.Params) -> hk.Params:
        return params if self.parallel is None else self.parallel.put(params, self.state_shardings.params)

    def local_rows(self) -> slice | None:
        """The rows of the global batch this process feeds (None: all of them, on one device)."""
        return None if self.parallel is None else self.parallel.local_rows(self.config.batch_size)

    def shard_batch(self, *arrays: np.ndarray):
        """This process's rows [..., local, T] -> global device arrays [..., batch_size, T] (on one device: put
        there, the transfer started and not waited for)."""
        if self.parallel is None:
            return tuple(jax.device_put(arrays))
        return tuple(self.parallel.global_batch(a, self.config.batch_size) for a in arrays)

    def traceable(self) -> Steps:
        """These functions without the attention cross-check, for abstract traces (`jax.eval_shape`):
        chex's value assertions need concrete values, and the cross-check changes no shape."""
        if not self.config.check_attention:
            return self
        config = ml_collections.ConfigDict(self.config.to_dict())
        config.check_attention = False
        return make_steps(config, self.model_config.vocab_size, self.mesh)


def _in_compute_dtype(params, dtype: str):
    """Mixed precision: float32 master params, computed with in `dtype` (bfloat16 casts them once per step).
    `dtype` is a resolved one ('float32' or 'bfloat16': config.resolved / resolve_dtype make 'auto' one)."""
    if dtype == "float32":
        return params
    return jax.tree.map(lambda p: p.astype(jnp.dtype(dtype)), params)


def make_logits_fn(model: hk.Transformed, dtype: str) -> Callable:
    """(params, rng, x, is_training, segment_ids=None) -> float32 logits, computed in `dtype` as the train step
    computes them."""

    def logits_fn(params, rng, x: Int[Array, "B T"], is_training: bool,
                  segment_ids: Int[Array, "B T"] | None = None) -> Float[Array, "B T V"]:
        logits, _ = model.apply(_in_compute_dtype(params, dtype), rng, x, is_training, None, 0, segment_ids)
        return logits.astype(jnp.float32)

    return logits_fn


def make_loss_fn(model: hk.Transformed, dtype: str, end_of_text: int | None = None) -> Callable:
    """(params, rng, x, y, is_training) -> the mean cross-entropy, computed in `dtype` through the chunked lm_head
    (haiku_gpt/loss.py: in a bfloat16 run its GEMMs take bfloat16 operands, and no [B T, V] logits exist).

    `end_of_text` (--config.document_mask): attention stays within the documents that token ends,
    with segment ids computed from x on the device (`model.document_segment_ids`).
    """

    def loss_fn(params, rng, x: Int[Array, "B T"], y: Int[Array, "B T"], is_training: bool) -> Float[Array, ""]:
        segment_ids = None if end_of_text is None else document_segment_ids(x, end_of_text)
        return model.apply(_in_compute_dtype(params, dtype), rng, x, is_training, segment_ids=segment_ids,
                           targets=y)

    return loss_fn


def accumulated_grads(loss_fn: Callable, params, rng, x: Int[Array, "A B T"], y: Int[Array, "A B T"]):
    """Mean loss and gradient over A micro-batches (gradient accumulation, a scan when A > 1)."""
    grad_fn = jax.value_and_grad(loss_fn)
    accum = x.shape[0]
    if accum == 1:
        return grad_fn(params, rng, x[0], y[0], True)

    def micro_step(carry, i):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(params, jax.random.fold_in(rng, i), x[i], y[i], True)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros(()), zeros), jnp.arange(accum))
    return loss / accum, jax.tree.map(lambda g: g / accum, grads)


def norms(grads, updates, params, fused: bool = True) -> dict[str, Float[Array, ""]]:
    """Global L2 norms: the gradient before clipping (the clip's), the optimizer's update, the parameters after
    it. The update's per-leaf sums fuse into AdamW's kernels; the other two are `global_norm`s."""
    return {"grad_norm": global_norm(grads, fused), "update_norm": optax.tree.norm(updates),
            "param_norm": global_norm(params, fused)}


def make_steps(config: ml_collections.ConfigDict, vocab_size: int, mesh: jax.sharding.Mesh | None = None) -> Steps:
    """The run's model and jitted functions; `mesh`: lay them out over these devices instead of this
    process's (compile-only devices of `haiku_gpt.aot.targets`, for `--mode=check --config.target=...`)."""
    mcfg = model_config(config, vocab_size)
    model = make_model(mcfg)
    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    fused_norms = platform != "cpu"  # optimizer.global_norm: one reduction over all leaves, but not on a CPU
    optimizer = make_optimizer(config, fused_norms)
    schedule = lr_schedule(config)
    dtype = resolve_dtype(config.dtype, platform)
    # --config.document_mask: GPT-2's <|endoftext|>, the one separator token (config.check_document_mask)
    loss_fn = make_loss_fn(model, dtype, GPT2_END_OF_TEXT if config.document_mask else None)
    parallel = distributed.make_data_parallel(config, mesh)  # None on one device: nothing below is sharded

    # Initialise through the reference attention without the cross-check: attention has no
    # parameters, so every impl gives the same ones, and init (which runs the forward) neither
    # compiles a kernel nor meets chex's value assertions when it runs abstractly (jax.eval_shape).
    init_model = make_model(dataclasses.replace(mcfg, attention_impl="reference", kernel_family="auto",
                                                check_attention=False))

    def init(seed: int) -> TrainingState:
        init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
        params = init_model.init(init_rng, jnp.zeros((1, mcfg.block_size), jnp.int32))
        return TrainingState(params, optimizer.init(params), jnp.zeros((), jnp.int32), train_rng)

    # several devices: trace init (abstractly) for the state's layout
    state_shardings = None if parallel is None else parallel.state_shardings(jax.eval_shape(init, config.seed))

    def one_step(state: TrainingState, batch) -> tuple[TrainingState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        loss, grads = accumulated_grads(loss_fn, state.params, step_rng, *batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, loss=loss)
        # The barrier keeps the parameter norm out of the AdamW update's fusion: fused, XLA could not write the
        # new params, mu and nu in place and copied all three (the donated buffers) on every step.
        params = jax.lax.optimization_barrier(optax.apply_updates(state.params, updates))
        spikes = {}  # skip_spikes: a skipped step's update is zero (optimizer.skip_spikes); log it
        if config.skip_spikes:
            spiked = opt_state.skipped > state.opt_state.skipped
            spikes = {"skipped": spiked.astype(jnp.int32), "skipped_total": opt_state.skipped}
        new_state = TrainingState(params, opt_state, state.step + 1, rng)
        if parallel is not None:  # keep the scan's carry laid out as the state (fsdp: sharded)
            new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
        return new_state, {"loss": loss, "lr": schedule(state.step), **norms(grads, updates, params, fused_norms),
                           **spikes}

    def train_steps(state, x, y):
        if x.shape[0] == 1:  # one step: no while loop, whose carry XLA copies (the whole state) every call
            state, metrics = one_step(state, (x[0], y[0]))
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(one_step, state, (x, y))

    def eval_losses(params, x, y):
        return jax.lax.map(lambda xy: loss_fn(params, None, xy[0], xy[1], False), (x, y))

    options = None if mesh is not None else system.cpu_compiler_options(
        config.cpu_matmul_library, config.batch_size * config.block_size, config.n_embd)
    init_jit = jax.jit(init, static_argnums=0)
    train_steps_jit = jax.jit(train_steps, donate_argnums=0, compiler_options=options)
    eval_jit = jax.jit(eval_losses, compiler_options=options)
    if parallel is not None:  # the same functions with NamedSharding in/out shardings (distributed.py)
        init_jit, train_steps_jit, eval_jit = parallel.jit(init, train_steps, eval_losses, state_shardings, options)
    if config.check_attention:
        # chex value assertions inside jit need chexify; synchronous so a mismatch stops the step.
        train_steps_jit, eval_jit = (chex.chexify(f, async_check=False) for f in (train_steps_jit, eval_jit))
    return Steps(config, mcfg, optimizer, init_jit, train_steps_jit, eval_jit, mesh, parallel, state_shardings)
