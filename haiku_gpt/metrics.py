"""Run metrics: `out_dir/metrics.jsonl` (one JSON object per event) and `out_dir/loss.png`."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp


class MetricsWriter:
    """Appends one JSON object per line; `log` events and `eval` events share the file."""

    def __init__(self, out_dir: str, enabled: bool = True):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def plot_losses(out_dir: str, records: list[dict]) -> str | None:
    """Train and val loss against step (from eval records) into out_dir/loss.png."""
    evals = [r for r in records if "val_loss" in r]
    if not evals:
        return None
    import matplotlib  # noqa: PLC0415 (optional at import time, only needed at evaluation)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    # Only the latest run's curve: a resumed run re-evaluates steps, keep the newest record per step.
    by_step = {r["step"]: r for r in evals}
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [by_step[s]["train_loss"] for s in steps], "o-", label="train")
    ax.plot(steps, [by_step[s]["val_loss"] for s in steps], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "loss.png")
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def measure_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """This device's float32 matmul rate (FLOP/s), the yardstick for MFU when none is configured."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
