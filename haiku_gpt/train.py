"""Training: one jitted step for the whole run, evaluation, logging, checkpoints.

Flow: config -> dataset -> model/optimizer -> TrainingState -> jitted steps ->
metrics and checkpoints. The step is compiled once (per scan length) and
reused; params and optimizer state are donated so XLA updates them in place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jaxtyping import Array, Float, Int
from tqdm import tqdm

from haiku_gpt import checkpoint, distributed, pretrained, system
from haiku_gpt.config import MODEL_FIELDS, model_config, padded_vocab_size, validate
from haiku_gpt.data import Dataset, batch_rng, open_dataset, sample_batch
from haiku_gpt.errors import UserError
from haiku_gpt.metrics import MetricsWriter, measure_peak_flops, plot_losses
from haiku_gpt.model import GPTConfig, count_params, flops_per_token, make_model
from haiku_gpt.optimizer import lr_schedule, make_optimizer


class TrainingState(NamedTuple):
    params: hk.Params
    opt_state: optax.OptState
    step: Int[Array, ""]
    rng: jax.Array  # raw uint32[2] key: serialisable as it is


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything built from the config once per run: the model and its jitted functions."""

    config: ml_collections.ConfigDict
    model_config: GPTConfig
    model: hk.Transformed
    optimizer: optax.GradientTransformation
    init: Callable
    train_steps: Callable  # (state, x[K,A,B,T], y[K,A,B,T]) -> (state, {"loss": [K], "lr": [K]})
    eval_losses: Callable  # (params, x[E,B,T], y[E,B,T]) -> [E] losses
    parallel: distributed.DataParallel | None = None  # several devices: the mesh (None on one device)
    state_shardings: Any = None  # TrainingState of NamedShardings, with `parallel`

    def place(self, state: TrainingState) -> TrainingState:
        """Lay a state of full arrays (scratch, restored or loaded) out on the mesh; as is on one device."""
        return state if self.parallel is None else self.parallel.put(state, self.state_shardings)

    def place_params(self, params: hk.Params) -> hk.Params:
        return params if self.parallel is None else self.parallel.put(params, self.state_shardings.params)

    def local_rows(self) -> slice | None:
        """The rows of the global batch this process feeds (None: all of them, on one device)."""
        return None if self.parallel is None else self.parallel.local_rows(self.config.batch_size)

    def shard_batch(self, *arrays: np.ndarray):
        """This process's rows [..., local, T] -> global arrays [..., batch_size, T] (as is on one device)."""
        if self.parallel is None:
            return arrays
        return tuple(self.parallel.global_batch(a, self.config.batch_size) for a in arrays)

    @property
    def compute_dtype(self):
        return jnp.bfloat16 if self.config.dtype == "bfloat16" else jnp.float32


def make_loss_fn(model: hk.Transformed, compute_dtype) -> Callable:
    def loss_fn(params, rng, x: Int[Array, "B T"], y: Int[Array, "B T"], is_training: bool) -> Float[Array, ""]:
        if compute_dtype != jnp.float32:  # mixed precision: float32 master params, low-precision compute
            params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        logits, _ = model.apply(params, rng, x, is_training)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()

    return loss_fn


def make_trainer(config: ml_collections.ConfigDict, vocab_size: int, mesh: jax.sharding.Mesh | None = None) -> Trainer:
    """The run's model and jitted functions; `mesh`: lay them out over these devices instead of this
    process's (compile-only devices of `haiku_gpt.targets`, for `--mode=check --config.target=...`)."""
    mcfg = model_config(config, vocab_size)
    model = make_model(mcfg)
    optimizer = make_optimizer(config)
    schedule = lr_schedule(config)
    compute_dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    loss_fn = make_loss_fn(model, compute_dtype)
    accum = config.gradient_accumulation_steps
    parallel = distributed.make_data_parallel(config, mesh)  # None on one device: nothing below is sharded

    # Initialise without the attention cross-check: same parameters, and init may run
    # abstractly (jax.eval_shape), where chex's value assertions cannot.
    init_model = make_model(dataclasses.replace(mcfg, check_attention=False))

    def init(seed: int) -> TrainingState:
        init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
        params = init_model.init(init_rng, jnp.zeros((1, mcfg.block_size), jnp.int32))
        return TrainingState(params, optimizer.init(params), jnp.zeros((), jnp.int32), train_rng)

    state_shardings = None if parallel is None else parallel.state_shardings(jax.eval_shape(init, config.seed))

    def one_step(state: TrainingState, batch) -> tuple[TrainingState, dict]:
        x, y = batch  # [A, B, T] each: A micro-batches of gradient accumulation
        rng, step_rng = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(loss_fn)
        if accum == 1:
            loss, grads = grad_fn(state.params, step_rng, x[0], y[0], True)
        else:
            def micro_step(carry, i):
                loss_sum, grad_sum = carry
                loss, grads = grad_fn(state.params, jax.random.fold_in(step_rng, i), x[i], y[i], True)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros(()), zeros), jnp.arange(accum))
            loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "lr": schedule(state.step)}
        new_state = TrainingState(params, opt_state, state.step + 1, rng)
        if parallel is not None:  # keep the scan's carry laid out as the state (fsdp: sharded)
            new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
        return new_state, metrics

    def train_steps(state, x, y):
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
    return Trainer(config, mcfg, model, optimizer, init_jit, train_steps_jit, eval_jit, parallel, state_shardings)


def estimate_loss(trainer: Trainer, params, dataset: Dataset, step: int) -> dict[str, float]:
    """Mean loss over eval_iters random batches of each split (nanoGPT's estimate_loss)."""
    cfg = trainer.config
    out = {}
    for split, tokens in dataset.splits.items():
        rng = batch_rng(cfg.seed + 1, split, step)  # eval draws never disturb the training stream
        x, y = sample_batch(tokens, rng, (cfg.eval_iters, cfg.batch_size), cfg.block_size, rows=trainer.local_rows())
        x, y = trainer.shard_batch(x, y)
        out[split] = float(jnp.mean(trainer.eval_losses(params, x, y)))
    return out


def checkpoint_meta(config: ml_collections.ConfigDict, dataset: Dataset, vocab_size: int, **extra) -> dict:
    model_fields = {f: config[f] for f in MODEL_FIELDS if f != "vocab_size"}
    model_fields["vocab_size"] = vocab_size
    vocab = {k: dataset.meta.get(k) for k in ("tokenizer", "vocab_size", "itos")}
    return dict(model=model_fields, dataset=dataset.name, vocab=vocab,
                config=json.loads(config.to_json_best_effort()), **extra)


def check_compatible(meta: dict, config: ml_collections.ConfigDict, dataset: Dataset, vocab_size: int,
                     out_dir: str) -> None:
    """A checkpoint must match the model shape and the vocabulary of this run."""
    expected = checkpoint_meta(config, dataset, vocab_size)
    # The vocabulary first: another dataset also changes vocab_size, and the dataset is the real cause.
    if meta.get("vocab") != expected["vocab"]:
        raise UserError(
            f"the checkpoint in {out_dir} was trained on dataset {meta.get('dataset')!r} with another "
            f"vocabulary than dataset {dataset.name!r} has now: use --config.dataset={meta.get('dataset')} "
            "(prepared with the same tokenizer and text), or start a new run in another --config.out_dir.")
    diffs = [f"{k}: checkpoint {meta['model'].get(k)!r} vs config {v!r}"
             for k, v in expected["model"].items() if meta["model"].get(k) != v]
    if diffs:
        raise UserError(
            f"the checkpoint in {out_dir} has a different model shape ({'; '.join(diffs)}): "
            "pass the checkpoint's values (--config.<field>=...) to resume or sample from it, or "
            "start a new run in another --config.out_dir.")


def restore(trainer: Trainer, dataset: Dataset, vocab_size: int, log: Callable) -> tuple[TrainingState, dict]:
    cfg = trainer.config
    template = jax.eval_shape(trainer.init, cfg.seed)
    meta = checkpoint.latest_meta(cfg.out_dir)
    if meta is not None:
        check_compatible(meta, cfg, dataset, vocab_size, cfg.out_dir)
    state, meta = checkpoint.load_latest(cfg.out_dir, template, warn=log)
    return jax.tree.map(jnp.asarray, state), meta


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the current step and exits."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: give up on the clean stop
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _compiled_variants(fn) -> int | None:
    """How many executables a jitted function holds (None when it is wrapped, e.g. by chexify)."""
    cache_size = getattr(fn, "_cache_size", None)
    return cache_size() if callable(cache_size) else None


def ensure_writable(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        writable = os.access(out_dir, os.W_OK)
    except OSError as e:
        writable, why = False, f" ({e.strerror})"
    else:
        why = ""
    if not writable:
        raise UserError(f"--config.out_dir={out_dir} is not writable{why}: choose a directory you can write to.")


def train(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> dict:
    """Train as nanoGPT's train.py does; returns a summary (final losses, timings)."""
    validate(config)
    main = distributed.is_main_process()  # only process 0 logs and writes metrics, plots and checkpoints
    if not main:
        log = distributed.quiet_log
    config = pretrained.effective_config(config, log)  # init_from=gpt2*: the checkpoint's model shape
    dataset = open_dataset(config.data_dir, config.dataset, config.block_size)
    vocab_size = padded_vocab_size(dataset.meta, config.vocab_size)
    trainer = make_trainer(config, vocab_size)
    ensure_writable(config.out_dir)

    best_val_loss = math.inf
    if config.init_from == "resume":
        state, meta = restore(trainer, dataset, vocab_size, log)
        best_val_loss = meta.get("best_val_loss") or math.inf
        log(f"resuming from step {int(state.step)} in {config.out_dir}")
    elif pretrained.is_pretrained(config.init_from):
        state = pretrained.init_state(trainer, config, log)
    else:
        state = trainer.init(config.seed)
    state = trainer.place(state)  # several devices: shard/replicate over the mesh (a no-op on one)
    if trainer.parallel is not None:
        log(trainer.parallel.describe(config.batch_size))
    n_params = count_params(state.params)
    log(f"number of parameters: {n_params / 1e6:.2f}M")

    mcfg = trainer.model_config
    tokens_per_iter = config.gradient_accumulation_steps * config.batch_size * config.block_size
    flops_per_iter = flops_per_token(mcfg, n_params, config.block_size) * tokens_per_iter
    peak = (config.peak_flops or measure_peak_flops()) * jax.device_count()  # per device x devices
    log(f"tokens per iteration: {tokens_per_iter:,}; MFU against {peak / 1e9:.0f} GFLOP/s "
        f"({'configured' if config.peak_flops else 'measured float32 matmul'})")

    metrics = MetricsWriter(config.out_dir, enabled=main)
    k_steps = config.steps_per_call  # steps per jitted call (lax.scan); every step's loss is still logged
    batch_shape = (config.gradient_accumulation_steps, config.batch_size)
    step = int(state.step)
    summary = {"n_params": n_params}
    dts, last_loss = [], None

    def evaluate_and_checkpoint(step: int, state: TrainingState) -> None:
        nonlocal best_val_loss
        losses = estimate_loss(trainer, state.params, dataset, step)
        log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        metrics.write({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
        if main:
            plot_losses(config.out_dir, metrics.read())
        summary.update(train_loss=losses["train"], val_loss=losses["val"])
        improved = losses["val"] < best_val_loss
        if improved or config.always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses["val"])
            if step > 0 and not config.eval_only:
                save_checkpoint(step, state, val_loss=losses["val"])

    def save_checkpoint(step: int, state: TrainingState, val_loss: float | None = None) -> None:
        meta = checkpoint_meta(config, dataset, vocab_size, best_val_loss=best_val_loss, val_loss=val_loss,
                               pretrained_from=pretrained.origin(config))
        state = distributed.to_host(state)  # several processes: every one takes part in the gather
        if main:
            path = checkpoint.save(config.out_dir, step, state, meta, config.keep_checkpoints)
            log(f"saved checkpoint {path}")
        distributed.barrier("checkpoint saved")

    with _StopRequest() as stop, tqdm(total=config.max_iters, initial=step, disable=None if main else True, leave=False,
                                       unit="step") as bar:
        compile_seconds, scan_lengths, warned_recompile = None, set(), False
        emit = log if bar.disable else tqdm.write  # keep log lines above a live progress bar
        # The call in flight: (first step, k, metrics, dispatch time). Its losses are read only after
        # the next call is dispatched, so sampling batches and logging overlap the device's work.
        in_flight, last_finished = None, 0.0

        def finish(call) -> None:
            nonlocal compile_seconds, last_finished, last_loss
            first, k, step_metrics, dispatched = call
            losses = np.asarray(step_metrics["loss"])  # waits for that call
            now = time.perf_counter()
            dt = (now - max(dispatched, last_finished)) / k  # the device was busy with the previous call until then
            last_finished = now
            if compile_seconds is None:
                compile_seconds = dt * k
                summary["first_call_seconds"] = compile_seconds
            else:
                dts.append(dt)
            lrs = np.asarray(step_metrics["lr"])
            for i in range(k):
                if not np.isfinite(losses[i]):
                    raise UserError(
                        f"the loss became {losses[i]} at step {first + i} (last finite loss: "
                        f"{last_loss if last_loss is not None else 'none'}): training stopped and the last "
                        f"good checkpoint in {config.out_dir} was left untouched. Likely causes: a learning "
                        f"rate too high (--config.learning_rate={config.learning_rate}), or bfloat16 "
                        f"overflow (--config.dtype=float32).")
                last_loss = float(losses[i])
                s = first + i
                if s % config.log_interval == 0:
                    mfu = flops_per_iter / dt / peak
                    rec = {"step": s, "loss": last_loss, "lr": float(lrs[i]), "dt_ms": dt * 1e3,
                           "tokens_per_sec": tokens_per_iter / dt, "mfu": mfu}
                    metrics.write(rec)
                    emit(f"iter {s}: loss {last_loss:.4f}, lr {rec['lr']:.2e}, time {dt * 1e3:.2f}ms, "
                         f"{rec['tokens_per_sec']:,.0f} tok/s, mfu {mfu * 100:.2f}%")
            bar.update(k)

        def drain() -> None:
            nonlocal in_flight
            if in_flight is not None:
                call, in_flight = in_flight, None
                finish(call)

        while True:
            if step % config.eval_interval == 0 or step == config.max_iters:
                drain()
                evaluate_and_checkpoint(step, state)
                if config.eval_only:
                    break
            if step >= config.max_iters:
                drain()
                break
            next_eval = min((step // config.eval_interval + 1) * config.eval_interval, config.max_iters)
            k = k_steps if next_eval - step >= k_steps else 1
            x, y = sample_batches(dataset.splits["train"], config.seed, step, k, batch_shape, config.block_size,
                                  rows=trainer.local_rows())
            x, y = trainer.shard_batch(x, y)  # several devices: one global array from each process's rows
            dispatched = time.perf_counter()
            state, step_metrics = trainer.train_steps(state, x, y)  # returns at once; runs asynchronously
            scan_lengths.add(k)
            variants = _compiled_variants(trainer.train_steps)
            if variants is not None and variants > len(scan_lengths) and not warned_recompile:
                warned_recompile = True
                log(f"warning: the train step was compiled again at step {step} ({variants} versions for "
                    f"{len(scan_lengths)} scan lengths): an input changed shape or dtype; every "
                    "recompilation costs seconds")
            previous, in_flight = in_flight, (step, k, step_metrics, dispatched)
            if previous is not None:
                finish(previous)
            step += k
            if distributed.any_process(stop.signal is not None):  # several processes stop together
                drain()
                stop.signal = stop.signal or "a signal to another process"
                save_checkpoint(step, state)
                log(f"stopped by {stop.signal} at step {step}; resume with --config.init_from=resume")
                summary["interrupted"] = stop.signal
                break

    if dts:
        summary["ms_per_iter_median"] = float(np.median(dts) * 1e3)
        summary["mfu_median"] = flops_per_iter / (summary["ms_per_iter_median"] / 1e3) / peak
    summary["step"] = step
    return summary


def sample_batches(tokens: np.ndarray, seed: int, step: int, k: int, batch_shape: tuple[int, int],
                   block_size: int, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Batches for steps step..step+k-1, shaped [k, accum, batch, T]; each step's draw depends only on its index.

    `rows`: only these rows of each batch (a process's share of the global batch, see distributed.py).
    """
    xs, ys = zip(*(sample_batch(tokens, batch_rng(seed, "train", step + i), batch_shape, block_size, rows=rows)
                   for i in range(k)))
    return np.stack(xs), np.stack(ys)


def evaluate_checkpoint(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> dict:
    """--mode=eval: train/val loss of out_dir's newest checkpoint, printed and recorded."""
    validate(config)
    config = pretrained.effective_config(config, log)
    dataset = open_dataset(config.data_dir, config.dataset, config.block_size)
    vocab_size = padded_vocab_size(dataset.meta, config.vocab_size)
    trainer = make_trainer(config, vocab_size)
    if not distributed.is_main_process():  # only process 0 prints and records
        log = distributed.quiet_log
    from_pretrained = pretrained.is_pretrained(config.init_from)
    if from_pretrained:  # the pretrained model itself, not a run: nothing is recorded in out_dir
        params, step = pretrained.load_model_params(trainer, config, log), 0
    else:
        state, meta = restore(trainer, dataset, vocab_size, log)
        params, step = state.params, int(meta["step"])
    params = trainer.place_params(params)
    losses = estimate_loss(trainer, params, dataset, step)
    log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    MetricsWriter(config.out_dir, enabled=not from_pretrained and distributed.is_main_process()).write({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
    return losses
