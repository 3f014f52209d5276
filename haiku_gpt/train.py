"""Training, as nanoGPT's train.py: evaluate and checkpoint every eval_interval steps, log every step.

Flow: Experiment (experiment.py: config, dataset, jitted steps) -> initial state (scratch, resume,
or pretrained GPT-2) -> the loop -> metrics.jsonl, loss.png and checkpoints (orbax, written
asynchronously: checkpoint.py) in out_dir.

The loop keeps the device busy: it dispatches call N+1 (JAX returns at once) before it reads
call N's losses (`metrics.StepLog`), so logging overlaps the device's work, and a background thread
draws the batches of the coming calls and starts their transfer to the device (`data.BatchPrefetcher`):
per step the loop itself only takes a batch from a queue and dispatches.
"""

from __future__ import annotations

import math
import os
import signal
import time

import jax
from tqdm import tqdm

from haiku_gpt import checkpoint, costs, distributed, pretrained
from haiku_gpt.config import profile_window
from haiku_gpt.data import BatchPrefetcher, train_batches
from haiku_gpt.evaluate import estimate_loss
from haiku_gpt.experiment import Experiment
from haiku_gpt.metrics import Call, LossPlot, MetricsWriter, StepLog, open_sinks
from haiku_gpt.steps import TrainingState


def train(exp: Experiment) -> dict:
    """Train (or resume) as nanoGPT's train.py does; returns a summary (final losses, timings)."""
    config, steps, log = exp.config, exp.steps, exp.log
    checkpoint.ensure_writable(config.out_dir)
    state, best_val_loss = _initial_state(exp)
    peak = _report_sizes(exp)
    writer = MetricsWriter(config.out_dir, enabled=exp.is_main, sinks=open_sinks(config) if exp.is_main else ())
    bar = tqdm(total=config.max_iters, initial=int(state.step), disable=None if exp.is_main else True,
               leave=False, unit="step")
    step_log = StepLog(config, costs.flops_per_step(config, steps.model_config), costs.tokens_per_step(config),
                       peak, writer, emit=log if bar.disable else tqdm.write)  # log lines above a live bar
    batch_shape = (config.gradient_accumulation_steps, config.batch_size)
    step, in_flight, scan_lengths, summary = int(state.step), None, set(), {}
    resumed_at = step if config.init_from == "resume" else None  # its checkpoint holds this state already
    checkpoints = checkpoint.Checkpoints(config.out_dir, config.keep_checkpoints)
    tokens, rows = exp.dataset.splits["train"], steps.local_rows()

    def device_batches(first: int, k: int):  # on the prefetcher's thread: draw, then start the transfer
        x, y = train_batches(tokens, config.seed, first, k, batch_shape, config.block_size, rows=rows)
        return steps.shard_batch(x, y)  # several devices: one global array from each process's rows

    batches = BatchPrefetcher(device_batches, lambda s: _steps_in_next_call(s, config), step, config.max_iters)
    with (_StopRequest() as stop, bar, writer, LossPlot(writer) as plot, _Profile(config, log) as profile,
          checkpoints, batches):
        while True:
            if step % config.eval_interval == 0 or step == config.max_iters:
                step_log.finish(in_flight)
                in_flight = None
                losses = _evaluate(exp, state.params, step, writer, plot)
                summary.update(train_loss=losses["train"], val_loss=losses["val"])
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if (improved or config.always_save_checkpoint) and 0 < step != resumed_at and not config.eval_only:
                    _save(exp, checkpoints, step, state, best_val_loss, val_loss=losses["val"])
                if config.eval_only:
                    break
            if step >= config.max_iters:
                break
            k = _steps_in_next_call(step, config)
            x, y = batches.get(step, k)  # drawn and sent to the device while the previous calls ran
            profile.update(step, state)
            dispatched = time.perf_counter()
            state, metrics = steps.train_steps(state, x, y)  # returns at once; runs asynchronously
            scan_lengths.add(k)
            _warn_if_recompiled(steps.train_steps, scan_lengths, step, log)
            step_log.finish(in_flight)  # the previous call's losses, read while this one runs
            in_flight = Call(step, k, metrics, dispatched)
            bar.update(k)
            step += k
            if distributed.any_process(stop.signal is not None):  # several processes stop together
                step_log.finish(in_flight)
                in_flight = None
                summary["interrupted"] = stop.signal or "a signal to another process"
                _save(exp, checkpoints, step, state, best_val_loss)
                log(f"stopped by {summary['interrupted']} at step {step}; resume with --config.init_from=resume")
                break
        step_log.finish(in_flight)
    return {**summary, **step_log.summary(), "step": step, "n_params": costs.param_count(steps.model_config)}


def _initial_state(exp: Experiment) -> tuple[TrainingState, float]:
    """(the state to start from, laid out over the devices; the best val loss so far)."""
    config, steps = exp.config, exp.steps
    if config.init_from == "resume":
        state, meta = exp.restore()
        exp.log(f"resuming from step {int(state.step)} in {config.out_dir}")
        return steps.place(state), meta.get("best_val_loss") or math.inf
    if pretrained.is_pretrained(config.init_from):
        return steps.place(steps.init_with(exp.pretrained_params())), math.inf
    return steps.place(steps.init(config.seed)), math.inf


def _report_sizes(exp: Experiment) -> float:
    """Log the model's and the step's sizes; returns the peak FLOP/s that MFU is measured against."""
    config, mcfg = exp.config, exp.steps.model_config
    if exp.steps.parallel is not None:
        exp.log(exp.steps.parallel.describe(config.batch_size))
    exp.log(f"number of parameters: {costs.param_count(mcfg) / 1e6:.2f}M")
    peak, source = costs.peak_flops(config.peak_flops, config.dtype)
    peak *= jax.device_count()
    exp.log(f"tokens per iteration: {costs.tokens_per_step(config):,}; MFU against {peak / 1e12:.3g} TFLOP/s "
            f"({jax.device_count()} x {source})")
    return peak


def _steps_in_next_call(step: int, config) -> int:
    """steps_per_call steps per jitted call (a lax.scan), or 1 where an evaluation comes sooner."""
    next_eval = min((step // config.eval_interval + 1) * config.eval_interval, config.max_iters)
    return config.steps_per_call if next_eval - step >= config.steps_per_call else 1


def _evaluate(exp: Experiment, params, step: int, writer: MetricsWriter, plot: LossPlot) -> dict[str, float]:
    losses = estimate_loss(exp.steps, params, exp.dataset, step)
    exp.log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    writer.write({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
    plot.evaluated()
    return losses


def _save(exp: Experiment, checkpoints: checkpoint.Checkpoints, step: int, state: TrainingState,
          best_val_loss: float, val_loss: float | None = None) -> None:
    """Every process saves its own shards; the files are written while training goes on."""
    meta = exp.run_meta(best_val_loss=best_val_loss, pretrained_from=pretrained.origin(exp.config))
    started = time.perf_counter()
    path = checkpoints.save(step, state, meta, val_loss)
    exp.log(f"saved checkpoint {path} (the loop waited {(time.perf_counter() - started) * 1e3:.0f} ms; "
            "the files are written in the background)")


def _warn_if_recompiled(train_steps, scan_lengths: set[int], step: int, log) -> None:
    """One warning when the step holds more executables than scan lengths seen (a shape or dtype changed)."""
    cache_size = getattr(train_steps, "_cache_size", None)  # absent when wrapped, e.g. by chexify
    variants = cache_size() if callable(cache_size) else None
    if variants is not None and variants == len(scan_lengths) + 1:
        log(f"warning: the train step was compiled again at step {step} ({variants} versions for "
            f"{len(scan_lengths)} scan lengths): an input changed shape or dtype; every recompilation costs seconds")


class _Profile:
    """--config.profile_steps=START,STOP: a jax.profiler trace of the calls that run steps START to
    STOP-1 (whole calls, with steps_per_call > 1), written to out_dir/profile: TensorBoard's profile
    plugin reads plugins/profile/*/*.xplane.pb, ui.perfetto.dev opens perfetto_trace.json.gz."""

    def __init__(self, config, log):
        self.window, self.log, self.active = profile_window(config.profile_steps), log, False
        self.path = os.path.join(config.out_dir, "profile")

    def __enter__(self) -> _Profile:
        return self

    def update(self, step: int, state) -> None:
        """Before dispatching the call that starts at `step`: start or stop the trace."""
        if self.window is None:
            return
        start, stop = self.window
        if not self.active and start <= step < stop:
            jax.profiler.start_trace(self.path, create_perfetto_trace=True)
            self.active = True
        elif self.active and step >= stop:
            jax.block_until_ready(state)  # the traced calls finish inside the trace
            self._stop(step)

    def _stop(self, step: int) -> None:
        jax.profiler.stop_trace()
        self.active = False
        self.log(f"profile of steps {self.window[0]} to {step - 1} written to {self.path} (tensorboard --logdir "
                 f"{self.path}, or open perfetto_trace.json.gz in ui.perfetto.dev)")

    def __exit__(self, *exc) -> None:
        if self.active:  # the run ended inside the window
            jax.effects_barrier()
            self._stop(self.window[1])


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

