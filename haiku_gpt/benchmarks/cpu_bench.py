"""Why the CPU step runs at the speed it does: `python -m haiku_gpt.benchmarks.bench --what=cpu`.

Three measurements, printed as markdown tables (docs/performance.md keeps one run of them):

1. **GEMM rates at the model's own shapes** (GFLOP/s): every weight matmul of a train step (the forward,
   and the backward's dX and dW), in XLA float32 and bfloat16, beside PyTorch's where `torch` is
   importable (nanoGPT's CPU runs use it). Summed over a step, they say how long the step's weight
   GEMMs take in each.
2. **The train step under XLA:CPU's options**: vector width, fast math, oneDNN, the concurrency-optimised
   scheduler, Eigen instead of YNNPACK, and bfloat16. Each runs `bench --what=train` in a fresh process
   (XLA reads its flags once), in interleaved rounds, so a busy moment of the machine spreads over all.
3. **Where the step's wall time goes**: a `jax.profiler` trace of a few steps with XLA's per-thunk trace
   events on: the time a matmul runs, other fusions run, or nothing runs (dispatch, synchronisation).

Names used below: N = tokens per micro-batch (batch x block), C = n_embd, Q = c_attn's outputs
(C + 2 x kv_heads x head_dim), V = vocabulary.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

# (name, XLA_FLAGS added, config overrides): the options `--what=cpu` times the step under.
VARIANTS = (
    ("default", "", ()),
    ("512-bit vectors", "--xla_cpu_prefer_vector_width=512", ()),
    ("fast math", "--xla_cpu_enable_fast_math=true", ()),
    ("oneDNN", "--xla_cpu_use_onednn=true", ()),
    ("concurrency-optimised scheduler", "--xla_cpu_enable_concurrency_optimized_scheduler=true", ()),
    ("Eigen matmuls (no YNNPACK)", "", ("--config.cpu_matmul_library=eigen",)),
    ("bfloat16", "", ("--config.dtype=bfloat16",)),
)
# Thunks of XLA:CPU's trace whose time is a matmul: YNNPACK/XNNPACK/oneDNN fusions and Eigen dots.
_MATMUL_THUNK = re.compile(r"^(ynn_fusion|xnn_fusion|onednn|dot)")
# Events that wrap other thunks (the executor, a loop or call thunk running its body) or mark an end.
_WRAPPER_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "end: ", "while", "call", "conditional")


def cpu_description() -> str:
    """The CPU's model name and its vector extensions (AVX-512 and AMX flags), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown CPU"
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    vector = sorted({f for f in (flags.group(1).split() if flags else []) if f.startswith(("avx", "amx", "fma"))})
    return f"{model.group(1).strip() if model else 'unknown CPU'}, {os.cpu_count()} cores ({' '.join(vector)})"


def gemm_shapes(config, mcfg) -> list[tuple[str, int, int, int, int]]:
    """(name, M, N, K, per step) of the step's weight matmuls: each layer's four and the tied lm_head, in
    the forward and the backward's dX (dY W^T) and dW (x^T dY; the lm_head's as dY^T x, [V, C], the tied
    embedding's layout), per micro-batch (M = batch x block; the lm_head's M: the loss's chunk of tokens),
    times the micro-batches of a step. Left out: attention's own matmuls and, for a vocabulary small
    enough to embed as a one-hot matmul, that embedding's."""
    from haiku_gpt.loss import chunk_tokens  # noqa: PLC0415

    n = config.batch_size * config.block_size
    c, q, v = mcfg.n_embd, mcfg.n_embd + 2 * mcfg.kv_heads * mcfg.head_dim, mcfg.vocab_size
    per_step, micro = mcfg.n_layer * config.gradient_accumulation_steps, config.gradient_accumulation_steps
    shapes = []
    for name, fan_in, fan_out in (("c_attn", c, q), ("attn c_proj", c, c), ("c_fc", c, 4 * c), ("mlp c_proj", 4 * c, c)):
        shapes += [(f"{name} forward", n, fan_out, fan_in, per_step), (f"{name} dX", n, fan_in, fan_out, per_step),
                   (f"{name} dW", fan_in, fan_out, n, per_step)]
    logit_bytes = 2 if config.get("dtype") in ("bfloat16", "float16") else 4  # 'auto' is float32 on a CPU
    chunk = chunk_tokens(n, v, config.get("loss_chunk_tokens", 0), logit_bytes)
    chunks = micro * (n // chunk)
    return shapes + [("lm_head forward", chunk, v, c, chunks), ("lm_head dX", chunk, c, v, chunks),
                     ("lm_head dW", v, c, chunk, chunks)]


def _median_seconds(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def xla_gemm_seconds(m: int, n: int, k: int, dtype: str, repeats: int = 30) -> float:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    return _median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)


def torch_gemm_seconds(m: int, n: int, k: int, dtype: str, repeats: int = 30) -> float | None:
    """PyTorch's time for the same matmul on all cores, or None where torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count())
    a, b = torch.ones(m, k, dtype=getattr(torch, dtype)), torch.ones(k, n, dtype=getattr(torch, dtype))
    return _median_seconds(lambda: a @ b, repeats)


def gemm_table(shapes, dtypes=("float32", "bfloat16"), repeats: int = 30) -> dict:
    """GFLOP/s per shape and (library, dtype), and the step's weight-GEMM milliseconds in each."""
    rows, step_ms = [], {}
    for name, m, n, k, count in shapes:
        row = {"gemm": name, "m": m, "n": n, "k": k, "per_step": count}
        for dtype in dtypes:
            for library, timer in (("xla", xla_gemm_seconds), ("torch", torch_gemm_seconds)):
                seconds = timer(m, n, k, dtype, repeats)
                if seconds is None:
                    continue
                key = f"{library} {dtype}"
                row[key] = 2 * m * n * k / seconds / 1e9
                step_ms[key] = step_ms.get(key, 0.0) + count * seconds * 1e3
        rows.append(row)
    return {"rows": rows, "step_gemm_ms": step_ms}


def train_in_child(config_path: str, overrides, iters: int, xla_flags: str = "", extra=(),
                   timeout_s: float = 900) -> dict:
    """`bench --what=train` in a fresh process with `xla_flags` added to XLA_FLAGS; its JSON result
    (RuntimeError, with the process's last words, when it fails or outlasts `timeout_s`)."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip())
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "train.json")
        proc = subprocess.run([sys.executable, "-m", "haiku_gpt.benchmarks.bench", "--what=train",
                               f"--config={config_path}", *overrides, f"--iters={iters}", f"--json_out={out}",
                               *extra], env=env, capture_output=True, text=True, check=False, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"bench --what=train {' '.join(overrides)} (XLA_FLAGS={xla_flags!r}) failed:\n"
                               f"{proc.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def step_variants(config_path: str, overrides, iters: int, rounds: int, variants=VARIANTS) -> list[dict]:
    """Median ms/iter of the train step under each variant, interleaved over `rounds` rounds."""
    times, errors = {name: [] for name, _, _ in variants}, {}
    for r in range(rounds):
        for name, xla_flags, extra_overrides in variants:
            if name in errors:
                continue
            try:
                result = train_in_child(config_path, [*overrides, *extra_overrides], iters, xla_flags)
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # one variant failing is a row, not the end
                errors[name] = str(e).strip().splitlines()[-1][:200]
                continue
            times[name].append(result["ms_per_iter"])
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items() if v) + " ms/iter", flush=True)
    base = statistics.median(times[variants[0][0]]) if times[variants[0][0]] else float("nan")
    rows = []
    for name, xla_flags, extra in variants:
        row = {"variant": name, "xla_flags": xla_flags, "overrides": list(extra), "ms_per_iter": times[name]}
        if name in errors:
            row["error"] = errors[name]
        else:
            row.update(median_ms=statistics.median(times[name]), vs_default=base / statistics.median(times[name]))
        rows.append(row)
    return rows


def _category(name: str) -> str:
    if _MATMUL_THUNK.match(name):
        return "matmul"
    return "copies and transposes" if re.search(r"(^|_)(copy|transpose)", name) else "other fusions"


def wall_breakdown(trace_json: str, steps_traced: int) -> dict:
    """Milliseconds of wall time per step by what XLA:CPU runs then, from a Perfetto trace taken with
    --xla_cpu_enable_xprof_traceme: a matmul thunk (YNNPACK or oneDNN fusion, Eigen dot) on any thread;
    else a copy or transpose; else another fusion; else none (the gaps: dispatch, synchronisation, the
    host). By wall time, not summed thread time: a matmul thunk spreads its work over the other cores."""
    opener = gzip.open if trace_json.endswith(".gz") else open
    with opener(trace_json, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    xla_threads = {(e["pid"], e.get("tid")) for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
                   and str(e.get("args", {}).get("name", "")).startswith("tf_XLA")}
    order = ("matmul", "copies and transposes", "other fusions")
    edges = []  # (time, +1/-1, category index)
    for e in events:
        if e.get("ph") != "X" or (e["pid"], e.get("tid")) not in xla_threads or e["name"].startswith(_WRAPPER_EVENTS):
            continue
        index = order.index(_category(e["name"]))
        edges += [(float(e["ts"]), 1, index), (float(e["ts"]) + e.get("dur", 0.0), -1, index)]
    edges.sort()
    totals, active, previous = [0.0] * (len(order) + 1), [0] * len(order), None
    for t, change, index in edges:
        if previous is not None:
            running = [i for i, n in enumerate(active) if n > 0]
            totals[running[0] if running else len(order)] += (t - previous) / 1e3 / steps_traced
        active[index] += change
        previous = t
    if not edges:
        return {"error": "the trace has no XLA:CPU thunk events (threads named tf_XLA*): was it taken with "
                         "XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true on the CPU?"}
    wall = (edges[-1][0] - edges[0][0]) / 1e3 / steps_traced
    return {"ms_per_step": dict(zip((*order, "no thunk running"), totals)), "wall_ms_per_step": wall}


def traced_step(config_path: str, overrides, steps_traced: int = 10) -> dict:
    """Trace `steps_traced` steps in a fresh process with XLA's thunk trace events on; break them down."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = train_in_child(config_path, overrides, 20, "--xla_cpu_enable_xprof_traceme=true",
                                  extra=(f"--trace_dir={tmp}", f"--trace_steps={steps_traced}"))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return {"error": str(e).strip().splitlines()[-1][:200]}
        traces = [os.path.join(d, f) for d, _, files in os.walk(tmp) for f in files if f.startswith("perfetto_trace")]
        if not traces:
            return {"error": f"the traced run wrote no Perfetto trace under {tmp}"}
        return wall_breakdown(traces[0], result["traced_steps"])


def markdown(result: dict) -> str:
    gemm = result["gemms"]
    keys = [k for k in ("xla float32", "torch float32", "xla bfloat16", "torch bfloat16") if k in gemm["step_gemm_ms"]]
    lines = [f"CPU: {result['cpu']}", "", "GEMM rates at the step's shapes, GFLOP/s:", "",
             "| GEMM | M x N x K | per step | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for row in gemm["rows"]:
        lines.append(f"| {row['gemm']} | {row['m']} x {row['n']} x {row['k']} | {row['per_step']} | "
                     + " | ".join(f"{row[k]:.0f}" for k in keys) + " |")
    lines.append("| **the step's weight GEMMs, ms** | | | "
                 + " | ".join(f"**{gemm['step_gemm_ms'][k]:.1f}**" for k in keys) + " |")
    lines += ["", f"The train step under XLA:CPU's options, median of {len(result['variants'][0]['ms_per_iter'])} "
              "interleaved rounds:", "", "| variant | XLA_FLAGS / config | ms/iter | rounds | vs default |",
              "|---|---|---|---|---|"]
    for row in result["variants"]:
        how = " ".join([row["xla_flags"], *row["overrides"]]).strip() or "(none)"
        lines.append(f"| {row['variant']} | `{how}` | " + (f"failed: {row['error']} | | |" if "error" in row else
                     f"{row['median_ms']:.2f} | {', '.join(f'{t:.1f}' for t in row['ms_per_iter'])} | "
                     f"{row['vs_default']:.2f}x |"))
    trace = result["trace"]
    if "error" in trace:
        return "\n".join([*lines, "", f"The traced step: {trace['error']}"])
    lines += ["", f"One traced step's wall time ({trace['wall_ms_per_step']:.1f} ms; tracing slows it), by what "
              "XLA:CPU runs:", "", "| running | ms per step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / trace['wall_ms_per_step']:.0%} |" for k, v in trace["ms_per_step"].items()]
    return "\n".join(lines)


def run(config, mcfg, config_path: str, iters: int, rounds: int) -> dict:
    fields = ("batch_size", "block_size", "gradient_accumulation_steps", "steps_per_call", "n_layer", "n_head",
              "n_kv_head", "n_embd", "bias", "dropout", "dtype", "attention_impl", "remat", "loss_chunk_tokens",
              "cpu_matmul_library")  # the model and step the parent's GEMM table describes
    overrides = [f"--config.{k}={config[k]}" for k in fields] + [f"--vocab_size={mcfg.vocab_size}"]
    config_path = os.path.abspath(config_path)  # the subprocesses may start elsewhere
    result = {"cpu": cpu_description(), "config": config.config_name}
    result["gemms"] = gemm_table(gemm_shapes(config, mcfg))
    result["variants"] = step_variants(config_path, overrides, iters, rounds)
    result["trace"] = traced_step(config_path, overrides)
    result["markdown"] = markdown(result)
    print(result["markdown"])
    return result
