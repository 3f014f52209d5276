"""Run metrics: `out_dir/metrics.jsonl` (one JSON object per event), TensorBoard event files in
`out_dir` and a wandb run (`config.tensorboard`, `config.wandb_log`), `out_dir/loss.png`, and the
per-step log lines of training (`StepLog`). TensorBoard and wandb get the same names and values as
metrics.jsonl: loss, lr, grad_norm, param_norm, update_norm, dt_ms, tokens_per_sec, mfu at log
steps; train_loss, val_loss at evaluations."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from haiku_gpt.costs import mfu
from haiku_gpt.errors import UserError


class MetricsWriter:
    """Appends one JSON object per line (`log` and `eval` events share the file) and hands each
    record's scalars to the sinks (TensorBoard, wandb: `open_sinks`). A context manager: leaving it
    flushes and closes the sinks."""

    def __init__(self, out_dir: str, enabled: bool = True, sinks: tuple = ()):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        self.sinks = sinks

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step"}
        for sink in self.sinks:
            sink.log(record["step"], scalars)

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        for sink in self.sinks:
            sink.close()


class TensorBoard:
    """Scalars as TensorBoard event files in out_dir (tensorboardX: no TensorFlow needed);
    `tensorboard --logdir OUT_DIR` shows them."""

    def __init__(self, out_dir: str):
        from tensorboardX import SummaryWriter  # noqa: PLC0415

        self.writer = SummaryWriter(logdir=out_dir, flush_secs=10)

    def log(self, step: int, scalars: dict) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A wandb run named as nanoGPT's config names it (wandb_project, wandb_run_name), its files
    under out_dir; WANDB_MODE=offline logs without a network (`wandb sync` uploads later)."""

    def __init__(self, config):
        import wandb  # noqa: PLC0415 (optional: config.validate refuses wandb_log without it)

        self.run = wandb.init(project=config.wandb_project, name=config.wandb_run_name,
                              config=config.to_dict(), dir=config.out_dir)

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(config) -> tuple:
    """The sinks the config asks for, opened (process 0 only: the caller decides)."""
    return ((TensorBoard(config.out_dir),) if config.tensorboard else ()) + \
        ((Wandb(config),) if config.wandb_log else ())


def plot_losses(out_dir: str, records: list[dict]) -> str | None:
    """Train and val loss against step (from eval records) into out_dir/loss.png."""
    evals = [r for r in records if "val_loss" in r]
    if not evals:
        return None
    # The Figure API, not pyplot: no GUI state, and the run does not pay pyplot's import.
    from matplotlib.figure import Figure  # noqa: PLC0415 (optional at import time, only needed here)

    # Only the latest run's curve: a resumed run re-evaluates steps, keep the newest record per step.
    by_step = {r["step"]: r for r in evals}
    steps = sorted(by_step)
    fig = Figure(figsize=(6, 4), dpi=100)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.97)  # fixed margins: no layout pass
    ax = fig.add_subplot()
    ax.plot(steps, [by_step[s]["train_loss"] for s in steps], "o-", label="train")
    ax.plot(steps, [by_step[s]["val_loss"] for s in steps], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(out_dir, "loss.png")
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


class LossPlot:
    """out_dir/loss.png during a run: drawn at an evaluation when `every_s` seconds have passed since
    the run started or since the last drawing, and at the end of the run. A drawing costs the loop
    0.1-0.2 s (the first one 0.3 s: matplotlib's import), which a run that evaluates every few seconds
    would otherwise pay each time; the step-0 evaluation would only plot one point.
    A context manager: leaving it draws what the last drawing missed."""

    def __init__(self, writer: MetricsWriter, every_s: float = 60.0):
        self.writer, self.every_s = writer, every_s
        self._drawn_at, self._behind = time.monotonic(), False

    def __enter__(self) -> LossPlot:
        return self

    def evaluated(self) -> None:
        """After an evaluation was written: draw now if the last drawing is `every_s` old."""
        if not self.writer.enabled:
            return
        self._behind = True
        if time.monotonic() - self._drawn_at >= self.every_s:
            self._draw()

    def _draw(self) -> None:
        plot_losses(os.path.dirname(self.writer.path), self.writer.read())
        self._drawn_at, self._behind = time.monotonic(), False

    def __exit__(self, *exc) -> None:
        if self._behind:
            self._draw()


@dataclasses.dataclass
class Call:
    """One dispatched train-step call: steps first..first+k-1, its (device) metrics, when it was dispatched."""

    first: int
    k: int
    metrics: Any  # {"loss": [k], "lr": [k], "grad_norm": [k], ...}, still on the device
    dispatched: float


class StepLog:
    """Reads a finished call's losses and logs them: the host half of the training loop.

    The loop dispatches call N+1 before it hands call N here, so reading N's losses (which waits
    for N) overlaps the device's work on N+1. Keeps the timings for the run's summary and stops
    the run at the first non-finite loss.
    """

    def __init__(self, config, flops_per_step: float, tokens_per_step: int, peak_flops: float,
                 writer: MetricsWriter, emit: Callable[[str], None]):
        self.config, self.writer, self.emit = config, writer, emit
        self.flops_per_step, self.tokens_per_step, self.peak_flops = flops_per_step, tokens_per_step, peak_flops
        self.seconds_per_step: list[float] = []  # every call's but the first (which compiles)
        self.first_call_seconds: float | None = None
        self.last_loss: float | None = None
        self._last_finished = 0.0

    def finish(self, call: Call | None) -> None:
        """Wait for `call` (None: nothing in flight) and log its steps."""
        if call is None:
            return
        metrics = jax.device_get(call.metrics)  # waits for the call; one transfer for every metric
        losses = metrics["loss"]
        now = time.perf_counter()
        dt = (now - max(call.dispatched, self._last_finished)) / call.k  # busy with the previous call until then
        self._last_finished = now
        if self.first_call_seconds is None:
            self.first_call_seconds = dt * call.k
        else:
            self.seconds_per_step.append(dt)
        for i in range(call.k):
            self._check_finite(float(losses[i]), call.first + i)
            self.last_loss = float(losses[i])
            skipped = "skipped" in metrics and bool(metrics["skipped"][i])
            if (call.first + i) % self.config.log_interval == 0 or skipped:  # a skipped update is always logged
                self._log(call.first + i, {name: float(values[i]) for name, values in metrics.items()}, dt)

    def _check_finite(self, loss: float, step: int) -> None:
        if np.isfinite(loss):
            return
        cfg = self.config
        raise UserError(
            f"the loss became {loss} at step {step} (last finite loss: "
            f"{self.last_loss if self.last_loss is not None else 'none'}): training stopped and the last good "
            f"checkpoint in {cfg.out_dir} was left untouched. Likely causes: a learning rate too high "
            f"(--config.learning_rate={cfg.learning_rate}), or bfloat16 overflow (--config.dtype=float32).")

    def _log(self, step: int, values: dict[str, float], dt: float) -> None:
        """values: the step's loss, lr and norms (the train step's metrics)."""
        utilisation = mfu(self.flops_per_step, dt, self.peak_flops)
        record = {"step": step, **values, "dt_ms": dt * 1e3, "tokens_per_sec": self.tokens_per_step / dt,
                  "mfu": utilisation}
        self.writer.write(record)
        skipped = (f"; update skipped: the loss or gradient norm was a spike ({values['skipped_total']:.0f} "
                   f"skipped so far)") if values.get("skipped") else ""
        self.emit(f"iter {step}: loss {values['loss']:.4f}, lr {values['lr']:.2e}, grad norm "
                  f"{values['grad_norm']:.3f}, time {dt * 1e3:.2f}ms, {record['tokens_per_sec']:,.0f} tok/s, "
                  f"mfu {utilisation * 100:.2f}%{skipped}")

    def summary(self) -> dict:
        out = {} if self.first_call_seconds is None else {"first_call_seconds": self.first_call_seconds}
        if self.seconds_per_step:
            median = float(np.median(self.seconds_per_step))
            out.update(ms_per_iter_median=median * 1e3, mfu_median=mfu(self.flops_per_step, median, self.peak_flops))
        return out
