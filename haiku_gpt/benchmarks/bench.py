"""Benchmarks that print numbers: training step, sampling, attention.

  python -m haiku_gpt.benchmarks.bench --config=configs/shakespeare_char_cpu.py --what=train
  python -m haiku_gpt.benchmarks.bench --config=configs/shakespeare_char.py --what=sample
  python -m haiku_gpt.benchmarks.bench --config=configs/shakespeare_char_cpu.py --what=attention [--plot]
  python -m haiku_gpt.benchmarks.bench --what=kernels [--targets=h100,tpu-v5e] (compile matrix; needs the aot extra)
  python -m haiku_gpt.benchmarks.bench --config=configs/gpt2_124m.py --vocab_size=50304 --what=hlo [--hlo_target=h100]
      (the train step's kernels and the GB they move, from its deviceless compile; needs the aot extra)
  python -m haiku_gpt.benchmarks.bench --config=configs/gpt2_124m.py --vocab_size=50304 --what=checkpoint
  python -m haiku_gpt.benchmarks.bench --what=gpu [--nanogpt_dir=DIR] (a GPU: kernels, gpt2_124m, char quick start, trace)
  python -m haiku_gpt.benchmarks.bench --what=tiles (a GPU: the fastest Triton tiles per head_dim, forward and backward)
  python -m haiku_gpt.benchmarks.bench --config=configs/shakespeare_char_cpu.py --what=cpu (GEMM rates, XLA:CPU options, trace)

Each prints a table and writes JSON (--json_out, default bench-results/<what>.json).
Times are medians after warm-up; compilation is reported separately. This is a
benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

from haiku_gpt.system import set_up_process

set_up_process()  # JAX_PLATFORMS=cpu without a GPU/TPU (the aot plugins stay quiet); on the CPU, the allocator tuning

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from haiku_gpt import costs  # noqa: E402
from haiku_gpt.config import attention_desc, model_config, resolved  # noqa: E402
from haiku_gpt.benchmarks import cpu_bench, gpu_bench  # noqa: E402
from haiku_gpt.sample import generate_tokens  # noqa: E402
from haiku_gpt.steps import make_steps  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char_cpu.py", "Config file.",
                                          lock_config=True)
_WHAT = flags.DEFINE_enum("what", "train", ["train", "sample", "attention", "nanogpt", "kernels", "checkpoint",
                                           "gpu", "tiles", "cpu", "hlo"],
                          "What to benchmark.")
_TARGETS = flags.DEFINE_list("targets", ["a100", "h100", "tpu-v4:1x1x1", "tpu-v5e:1x1", "tpu-v5p:1x1x1",
                                         "tpu-v6e:1x1"], "kernels: compile-only targets (haiku_gpt.aot.targets).")
_HLO_TARGET = flags.DEFINE_string("hlo_target", "h100", "hlo: the compile-only target (haiku_gpt.aot.targets).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "kernels: input dtypes.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["16", "32", "64", "128", "256"], "kernels: head dims.")
_KERNEL_SEQS = flags.DEFINE_list("kernel_seqs", [], "kernels: sequence lengths (default: per platform, "
                                 "77, 1000, 65536 on GPU and 77, 1000, 32768, 131072 on TPU).")
_DROPOUTS = flags.DEFINE_list("dropouts", ["0.0", "0.1"], "kernels: attention dropout rates.")
_ITERS = flags.DEFINE_integer("iters", 50, "Timed iterations (train) / repetitions (attention).")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed iterations after compilation.")
_VOCAB = flags.DEFINE_integer("vocab_size", 65, "Vocabulary size (no dataset is read: random tokens).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 0, "sample: tokens to generate (0: block_size - 6).")
_SEQS = flags.DEFINE_list("seqs", ["128", "256", "512", "1024", "2048", "4096"], "attention: sequence lengths.")
_IMPLS = flags.DEFINE_list("impls", ["reference", "xla", "pallas"], "attention: implementations.")
_MAX_PALLAS_SEQ = flags.DEFINE_integer("max_interpret_seq", 1024,
                                       "attention: longest seq for pallas in (slow) interpret mode on CPU.")
_PLOT = flags.DEFINE_bool("plot", False, "attention: also write a PNG of the table (needs matplotlib).")
_JSON = flags.DEFINE_string("json_out", None, "Where to write the JSON results.")
_NANOGPT = flags.DEFINE_string("nanogpt_dir", None, "nanogpt: a local checkout of karpathy/nanoGPT.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "nanogpt: interleaved rounds of (haiku_gpt, nanoGPT, nanoGPT+allocator); "
                               "checkpoint: interleaved rounds of (npz, orbax); cpu: of the step's variants.")
_GPU_PARTS = flags.DEFINE_list("gpu_parts", list(gpu_bench.PARTS), "gpu: which parts to run (to split them over "
                                "several calls): " + ",".join(gpu_bench.PARTS))
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "train: also write a jax.profiler trace of --trace_steps "
                                 "steps after the timed ones here.")
_TRACE_STEPS = flags.DEFINE_integer("trace_steps", 10, "train: steps in the --trace_dir trace.")

# glibc settings equivalent to haiku_gpt.system.tune_allocator, for the "same allocator tuning" baseline.
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30), "MALLOC_TOP_PAD_": str(64 << 20)}


def _random_tokens(rng: np.random.Generator, shape, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, size=shape, dtype=np.int32)


def bench_train(config, iters: int, warmup: int, vocab: int, trace_dir: str | None = None,
                trace_steps: int = 10) -> dict:
    """ms/iter of the jitted train step (median), tokens/s, MFU, first-call (compile) time; with
    `trace_dir`, then a jax.profiler trace (Perfetto JSON too) of `trace_steps` more steps."""
    steps = make_steps(config, vocab)
    k = config.steps_per_call
    state = steps.init(config.seed)
    n_params = costs.param_count(steps.model_config)
    rng = np.random.default_rng(0)
    shape = (k, config.gradient_accumulation_steps, config.batch_size, config.block_size)
    batches = [(_random_tokens(rng, shape, vocab), _random_tokens(rng, shape, vocab)) for _ in range(4)]
    t0 = time.perf_counter()
    state, m = steps.train_steps(state, *batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    calls = max(iters // k, 1)
    times = []
    for i in range(warmup // k + 1 + calls):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        state, m = steps.train_steps(state, x, y)
        np.asarray(m["loss"])  # the loop fetches the losses every call too
        times.append((time.perf_counter() - t0) / k)
    dt = statistics.median(times[-calls:])
    traced_calls = max(trace_steps // k, 1) if trace_dir else 0
    if trace_dir:
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # XLA's events only: Python's would slow the traced steps
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True, profiler_options=options)
        for i in range(traced_calls):
            state, m = steps.train_steps(state, *batches[i % len(batches)])
            np.asarray(m["loss"])
        jax.profiler.stop_trace()
    tokens = costs.tokens_per_step(config)
    flops = costs.flops_per_step(config, steps.model_config)
    peak, _ = costs.peak_flops(config.peak_flops, config.dtype)
    return {"config": config.config_name, "dtype": config.dtype, "steps_per_call": k, "ms_per_iter": dt * 1e3,
            "tokens_per_sec": tokens / dt, "mfu": costs.mfu(flops, dt, peak), "peak_gflops": peak / 1e9,
            "first_call_s": compile_s, "n_params": n_params, "traced_steps": traced_calls * k}


def bench_checkpoint(config, vocab: int, rounds: int, out_dir: str) -> dict:
    """How long a checkpoint save blocks the training loop: the format before orbax (gather, npz, sha256,
    fsync: all before the loop goes on) against orbax's asynchronous save (the loop waits for the arrays
    to be copied off the device; the files are written in the background). Interleaved rounds."""
    import shutil  # noqa: PLC0415

    from haiku_gpt import checkpoint, checkpoint_npz  # noqa: PLC0415

    steps = make_steps(config, vocab)
    state = jax.block_until_ready(steps.init(config.seed))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    meta = {"config": config.config_name}
    times = {"npz_blocking_s": [], "orbax_blocking_s": [], "orbax_written_s": []}
    for r in range(rounds):
        shutil.rmtree(out_dir, ignore_errors=True)
        t0 = time.perf_counter()
        checkpoint_npz.write(os.path.join(out_dir, "npz", f"step_{r:08d}"), state, meta)
        times["npz_blocking_s"].append(time.perf_counter() - t0)
        with checkpoint.Checkpoints(os.path.join(out_dir, "orbax")) as checkpoints:
            t0 = time.perf_counter()
            checkpoints.save(r, state, meta, val_loss=None)
            times["orbax_blocking_s"].append(time.perf_counter() - t0)
            checkpoints.manager.wait_until_finished()
            times["orbax_written_s"].append(time.perf_counter() - t0)
    shutil.rmtree(out_dir, ignore_errors=True)
    result = {k: statistics.median(v) for k, v in times.items()}
    return {"config": config.config_name, "state_gb": state_bytes / 1e9, "rounds": rounds, **result,
            "blocking_ratio": result["npz_blocking_s"] / result["orbax_blocking_s"], "all": times}


def _nanogpt_generate_tokens_per_sec(nanogpt_dir: str, config, vocab: int, prompt_len: int, n: int) -> float:
    """nanoGPT's model.generate (PyTorch, CPU, batch 1, random weights): tokens/s, best of 2."""
    import subprocess  # noqa: PLC0415

    script = f"""
import sys, time, torch
sys.path.insert(0, {nanogpt_dir!r})
from model import GPT, GPTConfig
torch.manual_seed(0)
m = GPT(GPTConfig(block_size={config.block_size}, vocab_size={vocab}, n_layer={config.n_layer},
                  n_head={config.n_head}, n_embd={config.n_embd}, dropout=0.0, bias={config.bias})).eval()
idx = torch.randint({vocab}, (1, {prompt_len}))
best = 1e9
with torch.no_grad():
    for _ in range(2):
        t = time.perf_counter(); m.generate(idx, {n}, temperature=1.0, top_k=None); best = min(best, time.perf_counter() - t)
print({n} / best)
"""
    threads = str(os.cpu_count())
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_sample(config, vocab: int, new_tokens: int, nanogpt_dir: str | None = None) -> dict:
    """Tokens/s of KV-cached decoding vs nanoGPT-style full recompute, compile time apart.

    Batch 1 is nanoGPT's generate (sample.py draws its samples one at a time); batch
    num_samples is what `--mode=sample` runs. Our full recompute runs a padded window of
    min(block_size, prompt + new tokens) positions per token, so inside the window it does
    more work than nanoGPT's growing context: `--nanogpt_dir` also times nanoGPT's own
    generate (PyTorch, batch 1, same model shape) for the side-by-side number.
    """
    steps = make_steps(config, vocab)
    params = steps.init(config.seed).params
    mcfg = steps.model_config
    prompt_len = 6
    new_tokens = new_tokens or config.block_size - prompt_len
    batch_n = config.sample.num_samples
    past = 2 * config.block_size
    variants = [  # batch 1 unless noted: the recompute is slow, and nanoGPT's generate is batch 1
        ("kv cache", 1, new_tokens, dict(use_cache=True)),
        ("full recompute (nanoGPT)", 1, new_tokens, dict(use_cache=False)),
        ("kv cache", batch_n, new_tokens, dict(use_cache=True)),
        ("past window: exact", 1, past, dict(window="exact")),
        ("past window: half refill", 1, past, dict(window="half")),
    ]
    rows = []
    for name, batch, n, kw in variants:
        context = jnp.asarray(_random_tokens(np.random.default_rng(0), (batch, prompt_len), vocab))
        run = lambda: generate_tokens(params, context, jax.random.PRNGKey(0), config=mcfg, max_new_tokens=n,  # noqa: E731
                                      temperature=1.0, top_k=0, **kw).block_until_ready()
        t0 = time.perf_counter()
        run()
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        rows.append({"variant": name, "batch": batch, "new_tokens": n, "tokens_per_sec": batch * n / min(times),
                     "first_call_s": compile_s})
        print(f"{name:<28} batch {batch:>3} {n:>5} tokens {rows[-1]['tokens_per_sec']:>10,.1f} tok/s  "
              f"first call {compile_s:.2f} s", flush=True)
    result = {"config": config.config_name, "block_size": config.block_size, "rows": rows}
    if nanogpt_dir:
        tps = _nanogpt_generate_tokens_per_sec(nanogpt_dir, config, vocab, prompt_len, new_tokens)
        rows.append({"variant": "nanoGPT generate (PyTorch)", "batch": 1, "new_tokens": new_tokens,
                     "tokens_per_sec": tps, "first_call_s": 0.0})
        print(f"{'nanoGPT generate (PyTorch)':<28} batch   1 {new_tokens:>5} tokens {tps:>10,.1f} tok/s", flush=True)
        result["sampler_vs_torch_nanogpt_generate"] = rows[2]["tokens_per_sec"] / tps
        result["kv_batch1_vs_torch_nanogpt_generate"] = rows[0]["tokens_per_sec"] / tps
    return {**result,
            "kv_speedup_batch1": rows[0]["tokens_per_sec"] / rows[1]["tokens_per_sec"],
            "sampler_vs_nanogpt_generate": rows[2]["tokens_per_sec"] / rows[1]["tokens_per_sec"]}


def bench_attention(config, seqs, impls, iters: int, max_interpret_seq: int) -> dict:
    """Forward and forward+backward time and compiled temp memory per implementation and length."""
    from haiku_gpt.kernels import attention  # noqa: PLC0415

    heads, head_dim = config.n_head, config.n_embd // config.n_head
    rows = []
    on_cpu = jax.default_backend() == "cpu"
    for seq in seqs:
        key = jax.random.PRNGKey(seq)
        q, k, v = jax.random.normal(key, (3, 1, seq, heads, head_dim), jnp.float32)
        for impl in impls:
            if impl == "pallas" and on_cpu and seq > max_interpret_seq:
                continue
            fwd = jax.jit(lambda q, k, v, impl=impl: attention(q, k, v, impl=impl))
            loss = lambda q, k, v, impl=impl: attention(q, k, v, impl=impl).sum()  # noqa: E731
            bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            row = {"impl": impl, "seq": seq}
            for name, f in (("fwd", fwd), ("fwd_bwd", bwd)):
                compiled = f.lower(q, k, v).compile()
                mem = compiled.memory_analysis()
                row[f"{name}_temp_mb"] = mem.temp_size_in_bytes / 2**20 if mem is not None else None
                jax.block_until_ready(f(q, k, v))
                times = []
                for _ in range(max(iters // 10, 2) if impl == "pallas" and on_cpu else iters):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(q, k, v))
                    times.append(time.perf_counter() - t0)
                row[f"{name}_ms"] = statistics.median(times) * 1e3
            rows.append(row)
            print(_format_row(row), flush=True)
    return {"backend": jax.default_backend(), "heads": heads, "head_dim": head_dim, "rows": rows,
            "interpret_mode": on_cpu}


def _run_nanogpt(nanogpt_dir: str, config, iters: int, env_extra: dict) -> float:
    """Median ms/iter of nanoGPT's train.py with the config's settings (first 5 iterations dropped)."""
    import re  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    c = config
    args = ["train.py", f"--dataset={c.dataset}", "--device=cpu", "--compile=False", "--eval_iters=1",
            "--log_interval=1", f"--block_size={c.block_size}", f"--batch_size={c.batch_size}",
            f"--gradient_accumulation_steps={c.gradient_accumulation_steps}",
            f"--n_layer={c.n_layer}", f"--n_head={c.n_head}", f"--n_embd={c.n_embd}", f"--dropout={c.dropout}",
            f"--bias={c.bias}", f"--learning_rate={c.learning_rate}", f"--max_iters={iters + 5}",
            f"--lr_decay_iters={c.lr_decay_iters}", f"--warmup_iters={c.warmup_iters}", f"--beta2={c.beta2}",
            "--eval_interval=1000000", "--always_save_checkpoint=False", "--wandb_log=False"]
    threads = str(os.cpu_count())
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **env_extra)
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run([sys.executable, *args, f"--out_dir={out}"], cwd=nanogpt_dir, env=env,
                                capture_output=True, text=True, check=False)
    times = [float(m) for m in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", result.stdout, re.M)]
    if result.returncode != 0 or len(times) < 6:
        raise SystemExit(f"nanoGPT failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return statistics.median(times[5:])


def bench_nanogpt(config, nanogpt_dir: str, iters: int, rounds: int) -> dict:
    """haiku_gpt vs nanoGPT (plain, and with haiku_gpt's allocator tuning), interleaved in one run."""
    gpu_bench.nanogpt_data_dir(nanogpt_dir, config)
    overrides = [f"--config.{k}={config[k]}" for k in ("data_dir", "dataset", "batch_size", "block_size",
                                                        "n_layer", "n_head", "n_embd", "dropout", "dtype",
                                                        "attention_impl", "steps_per_call", "cpu_matmul_library")]
    results = {"haiku_gpt": [], "nanogpt": [], "nanogpt_allocator_tuned": []}
    for r in range(rounds):
        results["haiku_gpt"].append(cpu_bench.train_in_child(_config_path(), overrides, iters)["ms_per_iter"])
        results["nanogpt"].append(_run_nanogpt(nanogpt_dir, config, iters, {}))
        results["nanogpt_allocator_tuned"].append(_run_nanogpt(nanogpt_dir, config, iters, ALLOCATOR_ENV))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} ms/iter" for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"config": config.config_name, "iters": iters, "rounds": results, "median_ms_per_iter": med,
            "speedup_vs_nanogpt": med["nanogpt"] / med["haiku_gpt"],
            "speedup_vs_nanogpt_allocator_tuned": med["nanogpt_allocator_tuned"] / med["haiku_gpt"]}


def bench_kernels() -> dict:
    """The kernel's compile matrix (haiku_gpt/aot/kernel_matrix.py), one line per case as it compiles."""
    from haiku_gpt.aot import kernel_matrix  # noqa: PLC0415 (imports the aot targets)

    cases = kernel_matrix.cases(_TARGETS.value, _DTYPES.value, [int(d) for d in _HEAD_DIMS.value],
                                [int(s) for s in _KERNEL_SEQS.value] or None, [float(r) for r in _DROPOUTS.value])
    rows = []
    for case in cases:
        rows.append(kernel_matrix.compile_case(case))
        print(kernel_matrix.markdown(rows[-1:]).splitlines()[-1], flush=True)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} cases compile with no spills and fit on-chip memory")
    print(kernel_matrix.summary_markdown(rows))
    return {"rows": rows, "failed": len(failed), "summary": kernel_matrix.summary_markdown(rows)}


def bench_hlo(config, vocab: int, target: str) -> dict:
    """The train step compiled for `target` without its hardware: its kernels and the bytes they move per
    call, by category (gpu_bench.hlo_breakdown), for dtype=auto as that target would run it."""
    from haiku_gpt.aot import targets  # noqa: PLC0415 (the aot extra is optional)

    mesh = targets.make_mesh(targets.parse_target(target))
    config = resolved(config, mesh)
    steps = make_steps(config, vocab, mesh)
    tokens = jax.ShapeDtypeStruct((config.steps_per_call, config.gradient_accumulation_steps, config.batch_size,
                                   config.block_size), jnp.int32)
    compiled = targets.compile_for(target, steps.train_steps, steps.abstract_state(), tokens, tokens).compiled
    result = {"target": target, "attention": attention_desc(config), "dtype": config.dtype,
              "tokens_per_call": math.prod(tokens.shape), **gpu_bench.hlo_breakdown(compiled.as_text())}
    print(f"train step for {target} ({result['attention']}, {config.dtype}, {result['tokens_per_call']:,} tokens a "
          f"call): {result['kernels']:,} kernels move {result['total_gb']:.2f} GB")
    print("| category | kernels | GB |\n|---|---|---|")
    for category, gb in result["gb_per_call"].items():
        print(f"| {category} | {result['kernels_per_call'][category]:,} | {gb:.2f} |")
    print("| kernel | opcode | launches | GB |\n|---|---|---|---|")
    for k in result["top_kernels"][:15]:
        print(f"| {k['name']} | {k['opcode']} | {k['launches']} | {k['gb']:.2f} |")
    return result


def _config_path() -> str:
    for i, arg in enumerate(sys.argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return "configs/shakespeare_char_cpu.py"


def _format_row(row: dict) -> str:
    return "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _plot_attention(result: dict, path: str) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for impl in sorted({r["impl"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["impl"] == impl]
        axes[0].loglog([r["seq"] for r in rows], [r["fwd_bwd_ms"] for r in rows], "o-", label=impl)
        axes[1].loglog([r["seq"] for r in rows], [r["fwd_bwd_temp_mb"] for r in rows], "o-", label=impl)
    axes[0].set(xlabel="seq", ylabel="fwd+bwd ms", title=f"time ({result['backend']})")
    axes[1].set(xlabel="seq", ylabel="temp MB", title="compiled temporary memory")
    seqs = sorted({r["seq"] for r in result["rows"]})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.minorticks_off()
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = resolved(_CONFIG.value)  # --config.dtype=auto: this machine's choice
    what = _WHAT.value
    if what == "train":
        result = bench_train(config, _ITERS.value, _WARMUP.value, _VOCAB.value, _TRACE_DIR.value, _TRACE_STEPS.value)
        print(f"train {result['config']} ({result['dtype']}): {result['ms_per_iter']:.2f} ms/iter (median), "
              f"{result['tokens_per_sec']:,.0f} tok/s, MFU {result['mfu'] * 100:.1f}% of "
              f"{result['peak_gflops']:.0f} GFLOP/s, first call {result['first_call_s']:.2f} s, "
              f"{result['steps_per_call']} steps per call")
    elif what == "sample":
        result = bench_sample(config, _VOCAB.value, _NEW_TOKENS.value, _NANOGPT.value)
        print("KV cache speed-up inside the window: " + ", ".join(
            f"{k[len('kv_speedup_'):]} {v:.1f}x" for k, v in result.items() if k.startswith("kv_speedup"))
            + f"; --mode=sample (batch {config.sample.num_samples}, cached) vs full recompute at batch 1: "
              f"{result['sampler_vs_nanogpt_generate']:.1f}x")
        if "sampler_vs_torch_nanogpt_generate" in result:
            print(f"vs nanoGPT's own generate (PyTorch, batch 1): kv cache batch 1 "
                  f"{result['kv_batch1_vs_torch_nanogpt_generate']:.1f}x, --mode=sample batch "
                  f"{config.sample.num_samples} {result['sampler_vs_torch_nanogpt_generate']:.1f}x")
    elif what == "nanogpt":
        if not _NANOGPT.value:
            raise app.UsageError("--what=nanogpt needs --nanogpt_dir=PATH/to/a/nanoGPT/checkout")
        result = bench_nanogpt(config, _NANOGPT.value, _ITERS.value, _ROUNDS.value)
        med = result["median_ms_per_iter"]
        print(f"median ms/iter: haiku_gpt {med['haiku_gpt']:.2f}, nanoGPT {med['nanogpt']:.2f} "
              f"({result['speedup_vs_nanogpt']:.2f}x), nanoGPT + allocator tuning "
              f"{med['nanogpt_allocator_tuned']:.2f} ({result['speedup_vs_nanogpt_allocator_tuned']:.2f}x)")
    elif what == "kernels":
        result = bench_kernels()
    elif what == "hlo":
        result = bench_hlo(_CONFIG.value, _VOCAB.value, _HLO_TARGET.value)
    elif what == "gpu":
        if jax.default_backend() != "gpu":
            raise app.UsageError(f"--what=gpu measures an NVIDIA GPU, and this machine runs JAX on "
                                 f"{jax.default_backend()}: run it where `pip install -e '.[cuda]'` found a GPU")
        try:
            parts = gpu_bench.parse_parts(_GPU_PARTS.value)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        out_dir = os.path.dirname(_JSON.value) if _JSON.value else "bench-results"
        result = gpu_bench.run(_NANOGPT.value, config.data_dir, out_dir, parts)
    elif what == "tiles":
        if jax.default_backend() != "gpu":
            raise app.UsageError(f"--what=tiles times the Triton kernels on an NVIDIA GPU, and this machine runs "
                                 f"JAX on {jax.default_backend()}: run it where `pip install -e '.[cuda]'` found a GPU")
        result = gpu_bench.tile_sweep()
        print(f"fastest (forward, backward) tiles on {result['device']}, per head_dim, for "
              f"kernels/flash_attention.py's _TRITON_16BIT: {result['chosen']}")
    elif what == "cpu":
        if jax.default_backend() != "cpu":
            raise app.UsageError(f"--what=cpu measures XLA's CPU backend, and this run's JAX is on "
                                 f"{jax.default_backend()}: run it with JAX_PLATFORMS=cpu")
        result = cpu_bench.run(config, model_config(config, _VOCAB.value), _config_path(), _ITERS.value,
                               _ROUNDS.value)
    elif what == "checkpoint":
        result = bench_checkpoint(config, _VOCAB.value, _ROUNDS.value, os.path.join("bench-results", "checkpoints"))
        print(f"checkpoint of {result['config']} ({result['state_gb']:.2f} GB of state), median of "
              f"{result['rounds']}: the loop waits {result['npz_blocking_s']:.2f} s (npz, before orbax) vs "
              f"{result['orbax_blocking_s']:.2f} s (orbax, async; {result['blocking_ratio']:.0f}x less), "
              f"orbax's files complete after {result['orbax_written_s']:.2f} s")
    else:
        result = bench_attention(config, [int(s) for s in _SEQS.value], _IMPLS.value, _ITERS.value,
                                 _MAX_PALLAS_SEQ.value)
    path = _JSON.value or os.path.join("bench-results", f"{what}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    if what == "attention" and _PLOT.value:
        png = os.path.splitext(path)[0] + ".png"
        _plot_attention(result, png)
        print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(app.run(main))
