"""`python -m haiku_gpt.benchmarks.bench --what=gpu [--nanogpt_dir=DIR]`: one command that measures a GPU.

First checks the pallas kernel's families against the reference on this GPU (`correctness_table`: fresh
random inputs, odd lengths, dropout, GQA, documents; the forward and the three gradients), each family in a
child process (`check_in_child`: a family that hangs or crashes there is reported and not timed), then
prints four tables, and writes all five (markdown and JSON) to --json_out's folder:
  1. attention: pallas (its Triton and its opt-in Hopper family, "pallas mosaic_gpu"), cudnn and xla,
     forward and forward+backward, bf16, causal, in TFLOP/s counted as causal FLOPs (forward 2 B H T^2 D,
     forward+backward 3.5x that), at the shapes of `KERNEL_SHAPES` (with a grouped-query row and a
     document-masked one);
  2. the gpt2_124m train step (batch 16 x 1024, bf16) for pallas (both families) and cudnn: ms/iter, tokens/s
     and MFU (against the datasheet's dense bf16 peak), beside nanoGPT's own train.py with --compile=True;
  3. the char quick start (configs/shakespeare_char.py through the real training loop, pallas, bf16): p10,
     median and p90 ms/iter over `CHAR_ITERS` steps, beside nanoGPT's train.py on the same data;
  4. where one gpt2_124m step's GPU time goes, from a jax.profiler trace: float32 GEMMs, bf16 GEMMs,
     attention kernels, transposes, copies, other fusions; beside each, the GB its kernels move (read from
     the same compiled step, `hlo_breakdown`) and the rate that makes, in TB/s.
Each part is timed in one run on one GPU, so the ratios compare like with like.
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from haiku_gpt import costs
from haiku_gpt.config import attention_desc

# (batch, seq, heads, head_dim, kv_heads, documents): the four causal shapes, then grouped-query K/V (32 query
# heads over 8 K/V heads) and document masking (each row of the batch 8 documents of T/8 tokens, segment ids)
KERNEL_SHAPES = ((16, 1024, 32, 64, 32, 1), (8, 2048, 16, 128, 16, 1), (4, 8192, 16, 128, 16, 1),
                 (1, 32768, 8, 128, 8, 1), (4, 8192, 32, 128, 8, 1), (4, 8192, 16, 128, 16, 8))
KERNEL_IMPLS = ("pallas", "pallas mosaic_gpu", "cudnn", "xla")
XLA_MAX_SEQ = 8192  # XLA's attention holds [B, H, T, T] scores: past this it only measures its memory traffic
CHAR_ITERS = 500
# (batch, seq, heads, kv_heads, head_dim, causal, dropout, documents): odd lengths and head dims, every mask
CHECK_CASES = ((2, 1000, 8, 8, 64, True, 0.0, 1), (1, 4097, 4, 2, 128, True, 0.1, 1), (2, 333, 8, 2, 96, False, 0.1, 3),
               (3, 65, 4, 1, 48, True, 0.0, 2), (2, 1, 2, 2, 64, True, 0.0, 1), (1, 2048, 16, 4, 128, True, 0.1, 5))
CHECK_TOLERANCE = {"bfloat16": 2e-2, "float16": 4e-3}  # max |error| / max |reference|, as tests/ require
CHECK_TIMEOUT_S = 240.0  # one family's check, compiles included; past it the family counts as hung
CHILD_MEMORY_FRACTION = 0.15  # of the GPU's memory for the check's process (the benchmark's holds 0.75)
UNTIMED = "not timed: its check hung or crashed"
GPT2_OVERRIDES = dict(batch_size=16, block_size=1024, gradient_accumulation_steps=1, dtype="bfloat16",
                      dropout=0.0, vocab_size=50304)


def _median_seconds(f, *args, calls: int = 10, repeats: int = 5) -> float:
    """Median over `repeats` of the mean time of `calls` back-to-back calls (the GPU queue kept full)."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def _passes(attend):
    """Two new jitted functions of (q, k, v): attend's forward, and its forward + backward (given dO); new
    functions, so each traces anew (tile_sweep changes the kernel's tiles between calls)."""
    forward = jax.jit(lambda q, k, v: attend(q, k, v))
    backward = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
    return forward, backward


def _error_text(e: Exception) -> str:
    """A failed row's error: the exception's type and first line (its repr if it has no message)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [repr(e)])[0][:200]}"


def _relative_error(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def correctness_table(cases=CHECK_CASES, families=("auto", "mosaic_gpu"), dtype=jnp.bfloat16,
                      seed: int | None = None) -> list[dict]:
    """Each family of `flash_attention` (impl='pallas') against `reference_attention` in float32 at HIGHEST
    precision on the same 16-bit inputs: the relative error of the output and of dQ, dK, dV (a random dO), at
    each case, with the reference's dropout bits and the documents' segment ids. Fresh inputs: `seed` (a
    new one each run unless given, printed with the rows) draws them. The kernels run as the model calls
    them, `attention_qkv` on one fused [B, T, H + 2 KVH, D] array (read and written in place where the
    layout allows, sliced where it needs padding). A family that refuses or fails a case is a row with its
    error. The kernel families must pass this on a GPU before one becomes the default."""
    from haiku_gpt.kernels import attention_qkv, reference_attention, split_qkv  # noqa: PLC0415

    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    rows = []
    for i, (batch, seq, heads, kv_heads, head_dim, causal, rate, documents) in enumerate(cases):
        keys = jax.random.split(jax.random.PRNGKey(seed + i), 4)
        q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
        k, v = (jax.random.normal(key, (batch, seq, kv_heads, head_dim), dtype) for key in keys[1:3])
        do = jax.random.normal(keys[3], q.shape, jnp.float32)
        masks = dict(causal=causal, dropout_rate=rate, dropout_seed=seed % 1000 if rate else None,
                     segment_ids=jnp.broadcast_to(jnp.arange(seq) * documents // seq, (batch, seq)) if documents > 1
                     else None)
        with jax.default_matmul_precision("highest"):
            ref = jax.vjp(lambda q, k, v: reference_attention(q, k, v, **masks), *(x.astype(jnp.float32)
                                                                                     for x in (q, k, v)))
            expected = (ref[0], *ref[1](do))
        case = (f"B{batch} T{seq} H{heads} KV{kv_heads} D{head_dim} {'causal' if causal else 'non-causal'}"
                + (f" dropout {rate}" if rate else "") + (f" {documents} docs" if documents > 1 else ""))
        for family in families:
            row = {"case": case, "family": family, "seed": seed}
            attend = jax.jit(functools.partial(attention_qkv, kv_heads=kv_heads, impl="pallas", kernel_family=family,
                                               **masks))
            try:
                out, pullback = jax.vjp(lambda qkv: attend(qkv).astype(jnp.float32), jnp.concatenate([q, k, v], 2))
                got = (out, *split_qkv(pullback(do)[0], kv_heads))
                errors = {name: _relative_error(x, r) for name, x, r in zip(("out", "dq", "dk", "dv"), got, expected)}
            except Exception as e:  # noqa: BLE001 (a family failing a case is a result, not the end of the run)
                rows.append({**row, "error": _error_text(e)})
                print(_row_text(rows[-1]), flush=True)
                continue
            ok = all(np.isfinite(e) and e <= CHECK_TOLERANCE[jnp.dtype(dtype).name] for e in errors.values())
            rows.append({**row, **errors, "ok": ok})  # a NaN error is not ok (max() would skip it)
            print(_row_text(rows[-1]), flush=True)
    return rows


def check_in_child(family: str, seed: int, timeout_s: float = CHECK_TIMEOUT_S, cases=CHECK_CASES,
                   command: list[str] | None = None) -> list[dict]:
    """`correctness_table` for one family in a child process (`python -m haiku_gpt.benchmarks.gpu_bench`),
    so that a kernel which hangs or faults the GPU on its first run ends that child, not the benchmark: its
    rows then are one row whose error says so, with "fatal": True, and run() times the family no further.
    The child gets CHILD_MEMORY_FRACTION of the GPU's memory (this process holds XLA's default share)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "check.json")
        command = command or [sys.executable, "-m", "haiku_gpt.benchmarks.gpu_bench", "--family", family,
                              "--seed", str(seed), "--cases", json.dumps(cases), "--out", out]
        env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=str(CHILD_MEMORY_FRACTION))
        fatal = {"case": "all cases", "family": family, "seed": seed, "fatal": True}
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            output = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            done = [line for line in output.splitlines() if line.startswith("case=")]
            for line in done:
                print(line, flush=True)
            return [{**fatal, "error": f"the check did not finish in {timeout_s:.0f} s (a kernel hung?) and was "
                                      f"killed after {len(done)} of {len(cases)} cases"}]
        if proc.returncode != 0 or not os.path.exists(out):
            last = (proc.stderr.strip().splitlines() or [f"no output, exit status {proc.returncode}"])[-1]
            return [{**fatal, "error": f"the check's process failed (exit status {proc.returncode}): {last[:200]}"}]
        with open(out) as f:
            rows = json.load(f)
    for row in rows:
        print(_row_text(row), flush=True)
    return rows


def kernel_table(shapes=KERNEL_SHAPES, impls=KERNEL_IMPLS,
                 dtype=jnp.bfloat16) -> list[dict]:
    """Forward and forward+backward TFLOP/s of each attention implementation at each shape, counting the
    FLOPs the mask leaves: causal, within each document (2 B H D sum(L^2) for documents of length L).
    "pallas mosaic_gpu" is the pallas kernel's Hopper family (kernel_family='mosaic_gpu')."""
    from haiku_gpt.kernels import attention  # noqa: PLC0415

    rows = []
    for batch, seq, heads, head_dim, kv_heads, documents in shapes:
        keys = jax.random.split(jax.random.PRNGKey(seq), 4)
        q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
        k, v = (jax.random.normal(key, (batch, seq, kv_heads, head_dim), dtype) for key in keys[1:3])
        do = jax.random.normal(keys[3], q.shape, dtype)
        ids = None if documents == 1 else jnp.broadcast_to(jnp.arange(seq) * documents // seq, (batch, seq))
        flops = 2 * batch * heads * head_dim * documents * (seq // documents) ** 2  # causal: half of 4 B H T^2 D
        for impl in impls:
            row = {"shape": f"B{batch} T{seq} H{heads} KV{kv_heads} D{head_dim}"
                            + (f" {documents} docs" if documents > 1 else ""), "impl": impl}
            if impl == "xla" and (seq > XLA_MAX_SEQ or kv_heads != heads or documents > 1):
                rows.append({**row, "skipped": f"T > {XLA_MAX_SEQ}" if seq > XLA_MAX_SEQ else "causal rows only"})
                continue
            name, family = _impl_and_family(impl)
            fwd, fwd_bwd = _passes(lambda q, k, v, name=name, family=family, ids=ids: attention(
                q, k, v, impl=name, segment_ids=ids, kernel_family=family))
            try:
                t_fwd = _median_seconds(fwd, q, k, v)
                t_all = _median_seconds(fwd_bwd, q, k, v, do)
            except Exception as e:  # noqa: BLE001 (a failed implementation is a row, not the end of the run)
                rows.append({**row, "error": _error_text(e)})
                continue
            rows.append({**row, "fwd_ms": t_fwd * 1e3, "fwd_tflops": flops / t_fwd / 1e12,
                         "fwd_bwd_ms": t_all * 1e3, "fwd_bwd_tflops": 3.5 * flops / t_all / 1e12})
            print(_row_text(rows[-1]), flush=True)
    return rows


# --- Triton tiles (--what=tiles) ---------------------------------------------------------------------

# Hopper bf16 candidates (block_q, block_k, num_warps, num_stages) per head_dim and pass: the ones whose kernels
# ptxas compiled with no spills for an H100 (deviceless, T=1000, dropout 0.1; 128x32x4x3 forward at D128 and
# 128x64x8x2, 128x128x8x2, 64x128x8x2, 64x64x4x2 backward spilled and are left out).
TILE_CANDIDATES = {
    "forward": {
        64: ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 128, 4, 3),
             (128, 64, 8, 2), (64, 32, 4, 4)),
        128: ((64, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2),
              (64, 128, 8, 2)),
    },
    "backward": {
        64: ((64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3), (64, 128, 8, 2), (128, 32, 8, 2),
             (32, 32, 4, 3)),
        128: ((64, 64, 8, 2), (32, 64, 4, 3), (64, 32, 8, 2), (128, 32, 8, 2), (32, 32, 4, 3)),
    },
}
TILE_SHAPES = {64: (16, 1024, 32), 128: (8, 2048, 16)}  # head_dim: (batch, seq, heads), the kernel table's


def tile_sweep(shapes=TILE_SHAPES, candidates=TILE_CANDIDATES, budget_s: float = 240.0,
               dtype=jnp.bfloat16) -> dict:
    """Time each candidate tile of this GPU's generation: the forward ones on the forward alone, then the
    backward ones (forward + backward, with the fastest forward). Returns every row and, per head_dim, the
    fastest (forward, backward) pair: the entry for flash_attention's `_TRITON_16BIT[generation]`. The
    table is restored afterwards; the budget is shared evenly by the head dims."""
    from haiku_gpt.kernels import flash_attention as fa  # noqa: PLC0415

    kind = jax.devices()[0].device_kind
    table = fa._TRITON_16BIT[fa._gpu_generation(kind)]
    saved, rows, chosen, started = dict(table), [], {}, time.perf_counter()
    try:
        for n, (head_dim, (batch, seq, heads)) in enumerate(shapes.items()):
            deadline = started + budget_s * (n + 1) / len(shapes)
            keys = jax.random.split(jax.random.PRNGKey(0), 4)
            q, k, v, do = (jax.random.normal(key, (batch, seq, heads, head_dim), dtype) for key in keys)
            flops = 2 * batch * heads * seq * seq * head_dim
            best = {"forward": fa.triton_tiles(kind, head_dim, dtype, backward=False),
                    "backward": fa.triton_tiles(kind, head_dim, dtype, backward=True)}
            for pass_ in ("forward", "backward"):
                fastest = None
                for tiles in candidates[pass_].get(head_dim, ()):
                    if time.perf_counter() > deadline:
                        break
                    table[head_dim] = (best["forward"], tiles) if pass_ == "backward" else (tiles, best["backward"])
                    row = {"head_dim": head_dim, "pass": pass_, "tiles": tiles}
                    forward, backward = _passes(fa.flash_attention)
                    try:
                        if pass_ == "forward":
                            seconds = _median_seconds(forward, q, k, v, repeats=3)
                        else:
                            seconds = _median_seconds(backward, q, k, v, do, repeats=3)
                    except Exception as e:  # noqa: BLE001 (a tile Triton rejects is a row)
                        rows.append({**row, "error": _error_text(e)})
                        continue
                    rows.append({**row, "ms": seconds * 1e3,
                                 "tflops": (1.0 if pass_ == "forward" else 3.5) * flops / seconds / 1e12})
                    print(_row_text(rows[-1]), flush=True)
                    if fastest is None or seconds < fastest[0]:
                        fastest = (seconds, tiles)
                if fastest is not None:
                    best[pass_] = fastest[1]
            chosen[head_dim] = (best["forward"], best["backward"])
    finally:
        table.clear()
        table.update(saved)
    return {"device": kind, "rows": rows, "chosen": chosen}


def train_step_speed(config, vocab: int, iters: int = 30, warmup: int = 5) -> dict:
    """The train step as the loop runs it: call N+1 dispatched before call N's metrics are read."""
    from haiku_gpt.steps import make_steps  # noqa: PLC0415

    steps = make_steps(config, vocab)
    state = steps.init(config.seed)
    rng = np.random.default_rng(0)
    shape = (1, 1, config.batch_size, config.block_size)
    batches = [jax.device_put(tuple(rng.integers(0, vocab, size=shape, dtype=np.int32) for _ in range(2)))
               for _ in range(4)]
    compile_started = time.perf_counter()
    state, metrics = steps.train_steps(state, *batches[0])
    jax.device_get(metrics)
    compile_s = time.perf_counter() - compile_started
    previous = None
    for i in range(warmup + iters):
        if i == warmup:
            jax.device_get(previous)
            start = time.perf_counter()
        state, metrics = steps.train_steps(state, *batches[i % len(batches)])
        if previous is not None:
            jax.device_get(previous)
        previous = metrics
    jax.device_get(previous)
    dt = (time.perf_counter() - start) / iters
    tokens = config.batch_size * config.block_size
    peak, _ = costs.peak_flops(0.0, config.dtype)
    flops = costs.flops_per_step(config, steps.model_config)
    return {"attention": attention_desc(config), "ms_per_iter": dt * 1e3, "tokens_per_sec": tokens / dt,
            "mfu": costs.mfu(flops, dt, peak), "first_call_s": compile_s, "steps": steps, "state": state,
            "batch": batches[0]}


def percentiles(ms: list[float]) -> dict:
    p10, median, p90 = np.percentile(ms, [10, 50, 90])
    return {"p10_ms": float(p10), "median_ms": float(median), "p90_ms": float(p90), "n": len(ms)}


def char_quick_start(config, out_dir: str) -> dict:
    """The real training loop (train.train) on the char recipe, every step's dt_ms from metrics.jsonl."""
    from haiku_gpt import prepare  # noqa: PLC0415
    from haiku_gpt.experiment import setup  # noqa: PLC0415
    from haiku_gpt.train import train  # noqa: PLC0415

    config.update(out_dir=out_dir, max_iters=CHAR_ITERS, eval_interval=CHAR_ITERS, eval_iters=20, log_interval=1)
    prepare.ensure_prepared(os.path.join(config.data_dir, config.dataset), config.dataset)
    summary = train(setup(config, lambda message: None))
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        ms = [r["dt_ms"] for r in map(json.loads, f) if "dt_ms" in r and r["step"] >= 10]
    return {**percentiles(ms), "val_loss": summary.get("val_loss"), "dtype": config.dtype,
            "attention": config.attention_impl}


def nanogpt_run(nanogpt_dir: str, args: list[str]) -> dict:
    """nanoGPT's train.py on this GPU; every logged iteration's own `time` (after the first 10, which
    compile), and the wall-clock rate between its log lines as they arrive."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.Popen([sys.executable, "-u", "train.py", *args, f"--out_dir={out}"], cwd=nanogpt_dir,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ms, arrivals, tail = [], [], []
        for line in proc.stdout:
            tail = (tail + [line])[-30:]
            m = re.match(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", line)
            if m and int(m.group(1)) >= 10:
                ms.append(float(m.group(2)))
                arrivals.append((int(m.group(1)), time.perf_counter()))
        proc.wait()
    if proc.returncode != 0 or len(ms) < 5:
        return {"error": f"nanoGPT exited {proc.returncode}: {''.join(tail)[-1500:]}"}
    wall = (arrivals[-1][1] - arrivals[0][1]) / (arrivals[-1][0] - arrivals[0][0]) * 1e3
    return {**percentiles(ms), "wall_ms_per_iter": wall}


def _synthetic_nanogpt_data(nanogpt_dir: str, vocab: int = 50257, tokens: int = 4_000_000) -> str:
    """Random GPT-2 tokens as nanoGPT's data/<name>/{train,val}.bin: the speed does not depend on the text."""
    path = os.path.join(nanogpt_dir, "data", "synthetic_gpt2")
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, vocab, size=tokens, dtype=np.uint16).tofile(os.path.join(path, f"{split}.bin"))
    return "synthetic_gpt2"


def nanogpt_data_dir(nanogpt_dir: str, config) -> None:
    """nanoGPT reads data/<dataset>/{train,val}.bin and meta.pkl from its cwd: link ours there."""
    import pickle  # noqa: PLC0415

    from haiku_gpt.tokenizer import read_meta  # noqa: PLC0415

    ours = os.path.abspath(os.path.join(config.data_dir, config.dataset))
    theirs = os.path.join(nanogpt_dir, "data", config.dataset)
    os.makedirs(theirs, exist_ok=True)
    for split in ("train", "val"):
        link = os.path.join(theirs, f"{split}.bin")
        if not os.path.exists(link):
            os.symlink(os.path.join(ours, f"{split}.bin"), link)
    meta = read_meta(ours)
    if meta["tokenizer"] == "char" and not os.path.exists(os.path.join(theirs, "meta.pkl")):
        itos = dict(enumerate(meta["itos"]))
        with open(os.path.join(theirs, "meta.pkl"), "wb") as f:
            pickle.dump({"vocab_size": meta["vocab_size"], "itos": itos,
                         "stoi": {c: i for i, c in itos.items()}}, f)


# --- where the time goes ----------------------------------------------------------------------------

CATEGORIES = ("float32 GEMM", "bf16 GEMM", "attention kernels", "transposes", "copies", "other fusions")


def _category(name: str, float32_fusions: set[str]) -> str:
    lower = name.lower()
    if "flash_attention" in lower or "cudnn" in lower or "fmha" in lower or "flash_fprop" in lower:
        return "attention kernels"
    if "memcpy" in lower or "memset" in lower or re.search(r"(^|_)copy", lower):
        return "copies"
    if "transpose" in lower:
        return "transposes"
    if any(word in lower for word in ("gemm", "xmma", "cutlass", "cublas", "nvjet", "dot")):  # nvjet: cuBLAS, Hopper
        is_f32 = "f32f32" in lower or "tf32" in lower or "sgemm" in lower or lower in float32_fusions
        return "float32 GEMM" if is_f32 else "bf16 GEMM"
    return "other fusions"


def float32_gemm_fusions(hlo_text: str) -> set[str]:
    """Kernel names (lowercase, '.' as '_') of the fusions whose computation holds a dot of two f32 operands."""
    from haiku_gpt.aot.targets import hlo_ops  # noqa: PLC0415

    f32_dots = {op.name for op in hlo_ops(hlo_text) if op.opcode == "dot" and op.operand_dtypes == ("f32", "f32")}
    computation, f32_computations = None, set()
    for line in hlo_text.splitlines():
        header = re.match(r"^%?([\w.\-]+) .*\{$", line)
        if header and "=" not in line.split("{")[0]:
            computation = header.group(1)
        instruction = re.match(r"^\s*(?:ROOT\s+)?%(\S+)\s*=", line)
        if instruction and instruction.group(1) in f32_dots:
            f32_computations.add(computation)
    calls = re.finditer(r"%([\w.\-]+) = .*? fusion\(.*?calls=%([\w.\-]+)", hlo_text)
    return {m.group(1).replace(".", "_").lower() for m in calls if m.group(2) in f32_computations}


def gpu_time_breakdown(trace_json: str, steps_traced: int, float32_fusions: set[str] = frozenset()) -> dict:
    """Milliseconds per step of GPU kernel time by category, from a jax.profiler Perfetto trace (json[.gz]):
    the kernels on the GPU's streams (threads named 'Stream...' of a process named like '/device:GPU:0')."""
    opener = gzip.open if trace_json.endswith(".gz") else open
    with opener(trace_json, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
    streams = {(e["pid"], e.get("tid")) for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
               and e["pid"] in gpu_pids and str(e.get("args", {}).get("name", "")).lower().startswith("stream")}
    totals, counts = dict.fromkeys(CATEGORIES, 0.0), dict.fromkeys(CATEGORIES, 0)
    names: dict[str, float] = {}
    spans = []
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
            continue
        if streams and (e["pid"], e.get("tid")) not in streams:
            continue
        category = _category(e["name"], float32_fusions)
        totals[category] += e.get("dur", 0.0) / 1e3 / steps_traced
        counts[category] += 1
        names[e["name"]] = names.get(e["name"], 0.0) + e.get("dur", 0.0) / 1e3 / steps_traced
        spans.append((float(e["ts"]), float(e["ts"]) + e.get("dur", 0.0)))
    top = sorted(names.items(), key=lambda kv: -kv[1])[:30]
    first_to_last = (max(end for _, end in spans) - min(start for start, _ in spans)) / 1e3 if spans else 0.0
    return {"ms_per_step": totals, "total_ms_per_step": sum(totals.values()), "top_kernels_ms": dict(top),
            "kernels_per_step": {k: n / steps_traced for k, n in counts.items()},
            "first_to_last_kernel_ms_per_step": first_to_last / steps_traced}


def hlo_breakdown(hlo_text: str) -> dict:
    """What one call of a compiled program moves, by the trace breakdown's categories, read from its
    optimized HLO (`haiku_gpt.aot.targets.kernel_traffic`: no GPU needed): kernels and GB per call, and the
    30 kernels that move the most."""
    from haiku_gpt.aot.targets import kernel_traffic  # noqa: PLC0415

    float32_fusions = float32_gemm_fusions(hlo_text)
    gb, counts = dict.fromkeys(CATEGORIES, 0.0), dict.fromkeys(CATEGORIES, 0)
    for kernel in (kernels := kernel_traffic(hlo_text)):
        category = "copies" if kernel.opcode == "copy" else _category(kernel.name.replace(".", "_"), float32_fusions)
        gb[category] += kernel.launches * kernel.bytes / 1e9
        counts[category] += kernel.launches
    top = sorted(kernels, key=lambda k: -k.launches * k.bytes)[:30]
    return {"gb_per_call": gb, "kernels_per_call": counts, "total_gb": sum(gb.values()),
            "kernels": sum(counts.values()),
            "top_kernels": [{"name": k.name, "opcode": k.opcode, "launches": k.launches,
                             "gb": k.launches * k.bytes / 1e9} for k in top]}


def profile_step(result: dict, out_dir: str, steps_traced: int = 3) -> dict:
    """Trace `steps_traced` train steps (compiled already by train_step_speed) and break their GPU time down,
    beside the bytes the same compiled step's kernels move (`hlo_breakdown`, "hlo")."""
    steps, state, batch = result["steps"], result["state"], result["batch"]
    trace_dir = os.path.join(out_dir, "profile")
    jax.block_until_ready(state)
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps_traced):
        state, metrics = steps.train_steps(state, *batch)
    jax.block_until_ready((state, metrics))
    jax.profiler.stop_trace()
    traces = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json*"), recursive=True)
    hlo = steps.train_steps.lower(state, *batch).compile().as_text()
    breakdown = gpu_time_breakdown(max(traces, key=os.path.getmtime), steps_traced, float32_gemm_fusions(hlo))
    return {**breakdown, "hlo": hlo_breakdown(hlo), "trace": max(traces, key=os.path.getmtime)}


def _row_text(row: dict) -> str:
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _impl_and_family(label: str) -> tuple[str, str]:
    """"pallas mosaic_gpu" -> ("pallas", "mosaic_gpu"); "cudnn" -> ("cudnn", "auto")."""
    impl, _, family = label.partition(" ")
    return impl, family or "auto"


def _gpt2_config(attention_impl: str):
    """gpt2_124m's bench config; attention_impl "pallas mosaic_gpu": pallas with its Hopper kernel family."""
    from haiku_gpt.configs import gpt2_124m  # noqa: PLC0415

    config = gpt2_124m.get_config()
    impl, family = _impl_and_family(attention_impl)
    config.update(attention_impl=impl, kernel_family=family, **GPT2_OVERRIDES)
    return config


def _char_config(data_dir: str):
    from haiku_gpt.configs import shakespeare_char  # noqa: PLC0415
    from haiku_gpt.config import resolved  # noqa: PLC0415

    config = shakespeare_char.get_config()
    config.update(attention_impl="pallas", data_dir=data_dir)
    return resolved(config)


def markdown(results: dict) -> str:
    """The tables, as docs/performance.md has them."""
    lines = [f"GPU: {results['device']}; JAX {results['jax']}", ""]
    if "check" in results:
        lines += ["| check against the float32 reference (16-bit inputs) | family | out | dQ | dK | dV | ok |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["check"]:
            cells = ([r["error"][:100], "", "", "", "NO"] if "error" in r else
                     [f"{r[x]:.1e}" for x in ("out", "dq", "dk", "dv")] + ["yes" if r["ok"] else "NO"])
            lines.append(f"| {r['case']} | {r['family']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| B, T, H, KV, D | impl | fwd TFLOP/s | fwd+bwd TFLOP/s |", "|---|---|---|---|"]
    for r in results.get("kernels", []):
        note = r.get("skipped") or r.get("error")
        lines.append(f"| {r['shape']} | {r['impl']} | " + (f"{note} | |" if note else
                     f"{r['fwd_tflops']:.0f} | {r['fwd_bwd_tflops']:.0f} |"))
    lines += ["", "| gpt2_124m, B16 T1024 bf16 | ms/iter | tokens/s | MFU |", "|---|---|---|---|"]
    for name, r in results.get("gpt2", {}).items():
        if "error" in r:
            lines.append(f"| {name} | {r['error'][:100]} | | |")
        elif "ms_per_iter" in r:
            lines.append(f"| {name} | {r['ms_per_iter']:.1f} | {r['tokens_per_sec']:,.0f} | {r['mfu'] * 100:.1f}% |")
        else:
            lines.append(f"| {name} | {r['median_ms']:.1f} (wall {r['wall_ms_per_iter']:.1f}) | "
                         f"{16 * 1024 / r['wall_ms_per_iter'] * 1e3:,.0f} | |")
    lines += ["", f"| char quick start, {CHAR_ITERS} iters | p10 ms | median ms | p90 ms |", "|---|---|---|---|"]
    for name, r in results.get("char", {}).items():
        lines.append(f"| {name} | " + (r["error"][:100] + " | | |" if "error" in r else
                     f"{r['p10_ms']:.2f} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |"))
    if "breakdown" in results:
        lines += ["", _breakdown_markdown(results["breakdown"])]
    return "\n".join(lines)


def _breakdown_markdown(breakdown: dict) -> str:
    """The step's GPU time by category, beside the GB its kernels move (from the compiled HLO) and the rate
    that makes: a memory-bound category far under the GPU's bandwidth is where time is lost."""
    hlo = breakdown.get("hlo", {"gb_per_call": {}, "total_gb": 0.0})
    lines = ["| one gpt2_124m step (pallas) | GPU ms | kernels | GB moved (HLO) | TB/s |", "|---|---|---|---|---|"]
    rows = [(name, ms, breakdown["kernels_per_step"][name], hlo["gb_per_call"].get(name, 0.0))
            for name, ms in breakdown["ms_per_step"].items()]
    rows.append(("total", breakdown["total_ms_per_step"], sum(r[2] for r in rows), hlo["total_gb"]))
    for name, ms, kernels, gb in rows:
        lines.append(f"| {name} | {ms:.2f} | {kernels:g} | {gb:.2f} | " + (f"{gb / ms:.2f} |" if ms and gb else "|"))
    return "\n".join(lines)


PARTS = ("check", "kernels", "gpt2", "char", "breakdown")


def parse_parts(names: list[str]) -> tuple[str, ...]:
    """--gpu_parts's names, checked: a subset of PARTS ("breakdown" rides on the gpt2 part's pallas step)."""
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise ValueError(f"--gpu_parts={','.join(names)!s}: {', '.join(map(repr, unknown)) or 'nothing'} is not a "
                         f"part of --what=gpu; pick from {','.join(PARTS)} (for example --gpu_parts=check,kernels "
                         "in one call and --gpu_parts=gpt2,char,breakdown in the next)")
    if "breakdown" in names and "gpt2" not in names:
        raise ValueError("--gpu_parts: 'breakdown' traces the gpt2 part's pallas step: add gpt2 "
                         "(--gpu_parts=gpt2,breakdown)")
    return tuple(names)


def run(nanogpt_dir: str | None, data_dir: str, out_dir: str, parts=PARTS) -> dict:
    """Everything above, in one run, printed as it goes and written to out_dir (gpu.json, gpu.md; a run of
    some parts writes gpu-<parts>.json and .md, so calls that split the parts keep each other's results)."""
    os.makedirs(out_dir, exist_ok=True)
    results = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "jax": jax.__version__}

    stem = "gpu" if tuple(parts) == PARTS else "gpu-" + "-".join(parts)  # split calls keep each other's files

    def save():
        with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
            f.write(markdown(results) + "\n")

    # The families whose check hung or crashed are not timed, in this call or (split calls) the later ones.
    fatal_path = os.path.join(out_dir, "gpu-check-fatal.json")
    if "check" in parts:
        seed = int.from_bytes(os.urandom(4), "little")
        results["check"] = [row for family in ("auto", "mosaic_gpu") for row in check_in_child(family, seed)]
        with open(fatal_path, "w") as f:
            json.dump(sorted({row["family"] for row in results["check"] if row.get("fatal")}), f)
        save()
    failed = set()
    if os.path.exists(fatal_path):
        with open(fatal_path) as f:
            failed = set(json.load(f))
    untimed = {label for label in KERNEL_IMPLS if label.startswith("pallas") and _impl_and_family(label)[1] in failed}
    if "kernels" in parts:
        results["kernels"] = kernel_table(impls=[i for i in KERNEL_IMPLS if i not in untimed])
        results["kernels"] += [{"shape": "every shape", "impl": impl, "skipped": UNTIMED}
                               for impl in sorted(untimed)]
        save()
    nano_data = _synthetic_nanogpt_data(nanogpt_dir) if nanogpt_dir else None
    if "gpt2" in parts:
        results["gpt2"] = {}
        for impl in ("pallas", "pallas mosaic_gpu", "cudnn"):
            if impl in untimed:
                results["gpt2"][f"haiku_gpt {impl}"] = {"error": UNTIMED}
                continue
            try:
                timed = train_step_speed(_gpt2_config(impl), GPT2_OVERRIDES["vocab_size"])
            except Exception as e:  # noqa: BLE001 (the opt-in family failing is a result, not the end of the run)
                error = _error_text(e)
                results["gpt2"][f"haiku_gpt {impl}"] = {"error": error}
                print(f"gpt2_124m {impl}: {results['gpt2'][f'haiku_gpt {impl}']}", flush=True)
                continue
            results["gpt2"][f"haiku_gpt {impl}"] = {k: v for k, v in timed.items()
                                                     if k not in ("steps", "state", "batch")}
            print(f"gpt2_124m {impl}: {_row_text(results['gpt2'][f'haiku_gpt {impl}'])}", flush=True)
            if impl == "pallas" and "breakdown" in parts:
                results["breakdown"] = profile_step(timed, out_dir)
                print(json.dumps(results["breakdown"]["ms_per_step"]), flush=True)
            del timed
            save()
        if nanogpt_dir:
            results["gpt2"]["nanoGPT --compile=True"] = nanogpt_run(nanogpt_dir, [
                f"--dataset={nano_data}", "--batch_size=16", "--block_size=1024", "--gradient_accumulation_steps=1",
                "--compile=True", "--max_iters=60", "--eval_interval=100000", "--eval_iters=1", "--log_interval=1",
                "--always_save_checkpoint=False", "--dtype=bfloat16"])
            print(f"nanoGPT gpt2: {results['gpt2']['nanoGPT --compile=True']}", flush=True)
            save()
    if "char" in parts and "pallas" in untimed:
        results["char"] = {"haiku_gpt pallas": {"error": UNTIMED}}
    elif "char" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            results["char"] = {"haiku_gpt pallas": char_quick_start(_char_config(data_dir), tmp)}
        print(f"char quick start: {results['char']}", flush=True)
        if nanogpt_dir:
            nanogpt_data_dir(nanogpt_dir, _char_config(data_dir))
            results["char"]["nanoGPT --compile=True"] = nanogpt_run(nanogpt_dir, [
                "config/train_shakespeare_char.py", "--compile=True", f"--max_iters={CHAR_ITERS}",
                f"--eval_interval={CHAR_ITERS}", "--eval_iters=20", "--log_interval=1"])
            print(f"nanoGPT char: {results['char']['nanoGPT --compile=True']}", flush=True)
        save()
    print(markdown(results), flush=True)
    return results


def _check_main() -> None:
    """The child of check_in_child: one family's correctness_table, written as JSON."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=_check_main.__doc__)
    parser.add_argument("--family", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--cases", default=json.dumps(CHECK_CASES), help="a JSON list of CHECK_CASES tuples")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = correctness_table(cases=[tuple(c) for c in json.loads(args.cases)], families=(args.family,),
                             seed=args.seed)
    with open(args.out, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    _check_main()
